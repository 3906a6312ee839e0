"""Ray-free evaluation of a checkpoint, top-k prediction for images and their class activation
maps (where the model looks, placesnet/cam.py), all through the eval transform the checkpoint
records (placesnet/data/views.py).

``evaluate_checkpoint`` runs the same exact, shard-without-padding evaluation as training, on one
process or (with torch.distributed initialised, e.g. under Ray Train) on several, on one view of
each image or on the official ten crops (:class:`AverageViews`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from placesnet.checkpoint import Loaded
from placesnet.config import UserError, pretty
from placesnet.data.loaders import ShardSampler, loader_kwargs
from placesnet.data.places import class_names, open_split
from placesnet.data.transforms import normalize
from placesnet.data.views import TEN_CROPS, describe, single_view, ten_crops
from placesnet.train.engine import evaluate
from placesnet.train.step import amp_dtype_for


def evaluate_checkpoint(
    loaded: Loaded,
    root: Path,
    device: torch.device,
    *,
    split: str = "val",
    batch_size: int = 256,
    loader_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    mistakes: int = 0,
    ten_crop: bool = False,
) -> dict:
    """Loss, top-1, top-5 and the confusion matrix of ``loaded.model`` on ``split``, and how
    they were measured: ``protocol`` (SINGLE_VIEW or TEN_CROP) and ``transform`` (in words).

    Each rank evaluates its shard; the result is the exact total over the split on every rank.
    With ``mistakes`` = N, ``mistakes`` holds the N most confident wrong predictions over all
    ranks (``index`` in the split, ``image`` path, ``true``, ``predicted``, ``probability``).
    ``ten_crop``: each image's class probabilities are the mean over its ten crops (the official
    protocol; UserError for a checkpoint whose transform does not crop), ``batch_size`` crops
    per forward pass; else one view, ``batch_size`` images.
    """
    cfg = loaded.config
    transform = ten_crops(cfg) if ten_crop else single_view(cfg)
    ds = open_split(cfg, split, root, transform=transform)
    if class_names(ds) != loaded.classes:
        raise UserError(
            f"the dataset under {root} has other classes than the checkpoint "
            f"({len(class_names(ds))} vs {len(loaded.classes)})"
        )
    loader = DataLoader(
        ds,
        batch_size=max(1, batch_size // TEN_CROPS) if ten_crop else batch_size,
        sampler=ShardSampler(ds, rank, world_size),
        **loader_kwargs(loader_workers, pin_memory=device.type == "cuda"),
    )
    channels_last = cfg.channels_last and device.type == "cuda"
    model = loaded.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate(
        AverageViews(model, channels_last) if ten_crop else model,
        loader,
        device,
        num_classes=len(loaded.classes),
        amp_dtype=amp_dtype_for(device, cfg.amp),
        channels_last=channels_last and not ten_crop,  # (B, 10, 3, S, S): AverageViews sets it
        confusion=True,
        mistakes=mistakes,
    )
    result["protocol"] = TEN_CROP if ten_crop else SINGLE_VIEW
    result["transform"] = describe(cfg, ten=ten_crop) + ("; class probabilities averaged" if ten_crop else "")
    if mistakes:
        found = [{"index": loader.sampler.indices[m.pop("position")], **m} for m in result["mistakes"]]
        if world_size > 1:
            import torch.distributed as dist

            everyone = [None] * world_size
            dist.all_gather_object(everyone, found)
            found = [m for part in everyone for m in part]
        found = sorted(found, key=lambda m: (-m["probability"], m["index"]))[:mistakes]
        result["mistakes"] = [{**m, "image": ds.imgs[m["index"]][0]} for m in found]
    return result


SINGLE_VIEW, TEN_CROP = "single view", "ten-crop"  # evaluate_checkpoint's protocols


class AverageViews(nn.Module):
    """``model`` on several views of each image, (B, V, 3, S, S) -> (B, classes): the log of each
    image's class probabilities averaged over its views. They are logits whose softmax is that
    mean, so top-k, the cross-entropy loss and the probability of a mistake are those of the
    averaged probabilities."""

    def __init__(self, model: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.model, self.channels_last = model, channels_last

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        images, count = views.shape[0], views.shape[1]
        views = views.flatten(0, 1)  # (B * V, 3, S, S)
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        probs = torch.softmax(self.model(views).float(), dim=1)  # (B * V, classes)
        mean = probs.view(images, count, -1).mean(dim=1)  # (B, classes)
        return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()  # no -inf: a finite loss


def per_class_table(confusion: torch.Tensor, classes: list[str]) -> pd.DataFrame:
    """One row per class: images, correct, accuracy, and the class it is most often taken for."""
    rows = []
    for i, name in enumerate(classes):
        row = confusion[i].clone()
        total, correct = int(row.sum()), int(row[i])
        row[i] = -1
        j = int(row.argmax())
        rows.append(
            {
                "class_index": i,
                "class": pretty(name),
                "images": total,
                "correct": correct,
                "accuracy": correct / total if total else float("nan"),
                "most_confused_with": pretty(classes[j]) if row[j] > 0 else "",
                "confused_count": max(int(row[j]), 0),
            }
        )
    return pd.DataFrame(rows)


@torch.inference_mode()
def image_probabilities(
    loaded: Loaded, images: list[Image.Image], device: torch.device | str = "cpu", batch_size: int = 32
) -> torch.Tensor:
    """(N, classes) float32 class probabilities of RGB ``images`` on the CPU, each through the
    checkpoint's eval transform (:func:`placesnet.data.views.single_view`)."""
    transform = single_view(loaded.config)
    out = [torch.empty(0, len(loaded.classes))]
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(img) for img in images[start : start + batch_size]])
        out.append(batch_probabilities(loaded, batch, device))
    return torch.cat(out)


@torch.inference_mode()
def batch_probabilities(
    loaded: Loaded, batch: torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(B, classes) float32 class probabilities on the CPU of a uint8 (B, 3, S, S) ``batch``
    already through the checkpoint's eval transform (a Ray Data decode task's output)."""
    model = loaded.model.to(device).eval()
    return torch.softmax(model(normalize(batch.to(device))).float(), dim=1).cpu()


def batch_heatmaps(
    loaded: Loaded,
    batch: torch.Tensor,
    classes: list[int],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> torch.Tensor:
    """(B, S, S) float32 Grad-CAM heatmaps in [0, 1] on the CPU (:func:`placesnet.cam.explain`)
    of a uint8 (B, 3, S, S) ``batch`` already through the checkpoint's eval transform, each for
    its class in ``classes`` (B class indices): the input normalised on ``device`` as in
    :func:`batch_probabilities`, so a map explains exactly what the prediction saw."""
    from placesnet.cam import explain

    model = loaded.model.to(device)
    out = [torch.empty(0, *batch.shape[-2:])]
    for start in range(0, len(batch), batch_size):
        part = normalize(batch[start : start + batch_size].to(device))
        out.append(explain(model, part, list(classes[start : start + batch_size])).heatmaps.cpu())
    return torch.cat(out)


def class_index(classes: list[str], name: str) -> int:
    """The index of the class ``name``, as ``classes`` list it ('/b/beach') or as answers print
    it ('beach'). ValueError for any other name, naming a few of the model's classes (the closest
    to ``name`` first)."""
    import difflib

    for i, c in enumerate(classes):
        if name in (c, pretty(c)):
            return i
    names = [pretty(c) for c in classes]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    shown = close + [n for n in names if n not in close][: 5 - len(close)]
    more = ", ..." if len(classes) > len(shown) else ""
    raise ValueError(
        f"unknown class {name!r}: the model's {len(classes)} classes include {', '.join(shown)}{more}"
    )


def explain_images(
    loaded: Loaded,
    images: list[Image.Image],
    target: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> list[tuple[torch.Tensor, torch.Tensor, str, float]]:
    """Where the model looks in each RGB image: (its view, a uint8 (3, S, S) tensor through the
    checkpoint's eval transform; the (S, S) heatmap of class index ``target``, or of its top-1
    class when None; that class's name; its probability, as predict gives it), the items
    :func:`placesnet.plots.cam_figure` draws."""
    transform = single_view(loaded.config)
    items = []
    for start in range(0, len(images), batch_size):
        views = torch.stack([transform(img) for img in images[start : start + batch_size]])
        probs = batch_probabilities(loaded, views, device)
        chosen = probs.argmax(1).tolist() if target is None else [target] * len(views)
        heatmaps = batch_heatmaps(loaded, views, chosen, device, batch_size)
        items += [
            (view, heatmap, loaded.classes[c], float(p[c]))
            for view, heatmap, c, p in zip(views, heatmaps, chosen, probs)
        ]
    return items


def explain_mistakes(loaded: Loaded, mistakes: list[dict], device: torch.device | str = "cpu") -> list[dict]:
    """:func:`evaluate_checkpoint`'s ``mistakes``, each with the view the evaluation saw
    (``view``, uint8 (3, S, S): its image file through the checkpoint's eval transform, one
    view), the Grad-CAM heatmaps of its true and of its predicted class (``true_map``,
    ``predicted_map``), and the view's probabilities of both (``true_probability``,
    ``predicted_probability``: the mistake's ``probability`` unless it was measured on ten
    crops): what :func:`placesnet.plots.misclassified_figure` draws side by side."""
    from placesnet.data.places import read_image_uint8

    if not mistakes:
        return []
    transform = single_view(loaded.config)
    views = torch.stack([transform(read_image_uint8(m["image"])) for m in mistakes])
    probs = batch_probabilities(loaded, views, device)
    true = batch_heatmaps(loaded, views, [m["true"] for m in mistakes], device)
    predicted = batch_heatmaps(loaded, views, [m["predicted"] for m in mistakes], device)
    return [
        {
            **m,
            "view": view,
            "true_map": t,
            "predicted_map": pr,
            "true_probability": float(p[m["true"]]),
            "predicted_probability": float(p[m["predicted"]]),
        }
        for m, view, t, pr, p in zip(mistakes, views, true, predicted, probs)
    ]


def ranked(probs: torch.Tensor, classes: list[str], top_k: int) -> list[dict]:
    """The ``top_k`` most probable of one image's ``probs``: ``{label, class_index, probability}``
    each, most probable first."""
    values, indices = probs.topk(max(1, min(top_k, len(classes))))
    return [
        {"label": pretty(classes[i]), "class_index": i, "probability": p}
        for p, i in zip(values.tolist(), indices.tolist())
    ]


def predict_images(
    loaded: Loaded,
    images: list[Image.Image],
    top_k: int = 5,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> list[list[dict]]:
    """Top-k ``{label, class_index, probability}`` per RGB image, most probable first."""
    probs = image_probabilities(loaded, images, device, batch_size)
    return [ranked(p, loaded.classes, top_k) for p in probs]
