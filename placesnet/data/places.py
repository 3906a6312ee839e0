"""Places365 (real or the embedded sample) through torchvision's own ``Places365`` class.

The input pipeline stays uint8 until it reaches the training device: files are decoded straight
to uint8 tensors (``read_image_uint8`` as Places365's ``loader=``), resized and cropped as uint8,
collated and pinned as uint8 (a quarter of float32's bytes), and ``transforms.normalize`` turns them into
the workshop's ToTensor + Normalize(0.5) values on the device, with identical numerics.

torchvision checks the md5 of the categories and list files even when it does not download, so a
copy whose lists differ (a subset, a derived copy, the sample dataset) fails. :class:`Places365Copy`
keeps torchvision's code path and relaxes only that check; it is used for the sample data and for
``--skip-verify``. Every layout problem becomes one :class:`UserError` naming the missing file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset
from torchvision.datasets import Places365
from torchvision.io import ImageReadMode, decode_image

from placesnet.config import TrainConfig, UserError
from placesnet.data.sample import ensure_sample
from placesnet.data.transforms import eval_transform, train_transform

SPLITS = {"train": "train-standard", "val": "val"}


DEFAULT_PLACES365_ROOT = "/scratch/datasets/places365"


class Places365Copy(Places365):
    """torchvision's Places365 that accepts list files whose md5 differs from the official ones."""

    def _check_integrity(self, file: str, md5: str, download: bool) -> bool:
        if not os.path.isfile(file):
            raise UserError(f"missing Places365 file: {file}")
        return True


def resolve_data_root(config: TrainConfig) -> Path:
    """The absolute dataset root for ``config``; generates the sample data on first use."""
    if config.dataset == "sample":
        base = Path(config.data_root).expanduser().resolve() if config.data_root else None
        return ensure_sample(
            config.sample_classes,
            config.sample_train_per_class,
            config.sample_val_per_class,
            config.seed,
            base,
            config.sample_difficulty,
        )
    root = Path(config.data_root or DEFAULT_PLACES365_ROOT).expanduser().resolve()
    if not root.is_dir() and not config.download:
        raise UserError(
            f"data root {root} does not exist; pass --data-root DIR with a Places365 "
            "copy, or --download to fetch it there (26 GB)"
        )
    return root


class BadImageFile(UserError):
    """A listed image file that cannot be read or decoded (truncated, empty, not an image)."""


def read_image_uint8(path: str) -> torch.Tensor:
    """Places365's ``loader=``: decode an image file straight to a (3, H, W) uint8 RGB tensor.

    Skips PIL and the float conversion of ToTensor; grayscale and CMYK files come out as RGB.
    Raises :class:`BadImageFile` for a file that cannot be read or decoded.
    """
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = re.sub(r"^\w+, \S+\.cpp:\d+, ", "", reason)  # torchvision's C++ source location
        raise BadImageFile(f"cannot decode image {path}: {reason}") from None


class MarkBadImages(Dataset):
    """A dataset whose samples that cannot be decoded come out as a blank image with the target
    ``-(index + 1)`` instead of an exception, so the training process (not a DataLoader
    process) decides what to do about them: see :class:`BadImages`."""

    def __init__(self, dataset: Places365, image_size: int) -> None:
        self.dataset, self.image_size = dataset, image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except BadImageFile:
            return torch.zeros((3, self.image_size, self.image_size), dtype=torch.uint8), -(index + 1)


def list_file_name(ds: Places365) -> str:
    """The list file a Places365 split reads, e.g. ``places365_val.txt``."""
    return ds._FILE_LIST_META[ds.split][0]


@dataclass
class BadImages:
    """What the epoch loop does with the samples :class:`MarkBadImages` marked.

    ``fail``: raise a :class:`BadImageFile` naming the file, its list line and the reason, at the
    step that meets it. ``skip``: leave it out of the loss and metrics and ``warn`` its path once.
    """

    mode: str
    dataset: Places365
    warn: Callable[[str], None] = print
    seen: set = field(default_factory=set)

    def describe(self, index: int) -> str:
        path = self.dataset.imgs[index][0]
        try:  # decode it again here: the reason was lost in the DataLoader process
            read_image_uint8(path)
            reason = "it failed to decode while loading"
        except BadImageFile as e:
            reason = str(e).split(f"{path}: ", 1)[-1]
        return (
            f"cannot decode image {path} (line {index + 1} of "
            f"{os.path.join(self.dataset.root, list_file_name(self.dataset))}): {reason}"
        )

    def check(self, targets: torch.Tensor) -> int:
        """How many samples of a (CPU) target batch are marked bad; raises in ``fail`` mode."""
        marked = targets < 0
        if not bool(marked.any()):
            return 0
        indices = (-targets[marked] - 1).tolist()
        if self.mode == "fail":
            raise BadImageFile(
                f"{self.describe(indices[0])}; fix or remove the file, or pass "
                "--bad-images skip to train without it"
            )
        for index in indices:
            if index not in self.seen:
                self.seen.add(index)
                self.warn(f"skipping a bad image: {self.describe(index)}")
        return len(indices)


def open_split(config: TrainConfig, split: str, root: Path | None = None, transform=None) -> Places365:
    """Open ``split`` ("train" or "val") of the dataset ``config`` names.

    Raises UserError for an unknown split, a missing root, list file or image directory, or an
    official copy whose list files do not match (suggesting --skip-verify).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = root or resolve_data_root(config)
    if transform is None:
        transform = (
            train_transform(config.image_size, config.augment)
            if split == "train"
            else eval_transform(config.image_size)
        )
    relaxed = config.dataset == "sample" or config.skip_verify
    cls = Places365Copy if relaxed else Places365
    try:
        ds = cls(
            str(root),
            split=SPLITS[split],
            small=True,
            download=config.download and not relaxed,
            transform=transform,
            loader=read_image_uint8,
        )
    except RuntimeError as e:  # torchvision's integrity error
        file = str(e).split("The file ")[-1].split(" does not exist")[0]
        if os.path.isfile(file):
            raise UserError(
                f"{file} differs from the official Places365 file (md5); pass "
                "--skip-verify to load a subset or derived copy anyway"
            ) from None
        raise UserError(f"missing Places365 file: {file} (pass --download to fetch the dataset)") from None
    except ValueError as e:  # malformed line in a list or categories file
        raise UserError(f"malformed Places365 list file under {root}: {e}") from None
    if not os.path.isdir(ds.images_dir):
        raise UserError(f"missing Places365 image directory: {ds.images_dir}")
    if ds.imgs and not os.path.isfile(ds.imgs[0][0]):
        raise UserError(f"missing Places365 image: {ds.imgs[0][0]} (listed in the {split} list)")
    return ds


def class_names(ds: Places365) -> list[str]:
    """Category names in class-index order (torchvision's ``classes`` is sorted by name)."""
    names = sorted(ds.class_to_idx, key=ds.class_to_idx.get)
    if [ds.class_to_idx[n] for n in names] != list(range(len(names))):
        raise UserError(f"categories file under {ds.root} must number classes 0..N-1")
    return names


def describe(ds: Places365) -> str:
    return f"{len(ds)} images, {len(ds.class_to_idx)} classes, from {ds.root}"
