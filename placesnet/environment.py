"""Indoor or outdoor, by the official Places365 rule (CSAILVision/places365,
run_placesCNN_unified.py): each of the 365 categories is labelled 1 (indoor) or 2 (outdoor) in
IO_places365.txt (bundled, byte-identical: 161 indoor, 204 outdoor); an image is indoor when the
mean label of its 10 most probable categories is below 1.5, else outdoor (5 and 5 is outdoor).

Only a model of Places365's 365 categories, in their official order, has an environment: for any
other class list :func:`io_labels` is None.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import torch

INDOOR, OUTDOOR = 1, 2
VOTERS = 10  # the top-k categories whose labels are averaged
THRESHOLD = 1.5  # a mean below it is indoor


@cache
def _official() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The 365 category names of IO_places365.txt and their labels, after checking the names are
    those of categories_places365.txt in the same order."""
    from placesnet.data.scenes import official_categories

    text = resources.files("placesnet.assets").joinpath("IO_places365.txt").read_text()
    rows = [line.split() for line in text.splitlines() if line.strip()]
    names, labels = tuple(name for name, _ in rows), tuple(int(label) for _, label in rows)
    if list(names) != official_categories() or not set(labels) <= {INDOOR, OUTDOOR}:
        raise RuntimeError("placesnet/assets/IO_places365.txt does not match categories_places365.txt")
    return names, labels


def io_labels(classes: list[str]) -> torch.Tensor | None:
    """The official label (1 indoor, 2 outdoor) of each of ``classes``, as an int64 tensor, when
    they are Places365's 365 categories in the official order (e.g. ``/a/airfield``); else None."""
    names, labels = _official()
    return torch.tensor(labels) if tuple(classes) == names else None


def environment(probs: torch.Tensor, labels: torch.Tensor) -> str:
    """'indoor' or 'outdoor' for one image's class ``probs`` (365,) and :func:`io_labels`."""
    top = probs.topk(VOTERS).indices
    return "indoor" if labels[top.cpu()].double().mean() < THRESHOLD else "outdoor"
