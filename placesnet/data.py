"""Places365 (real or the embedded sample) through torchvision's own ``Places365`` class.

torchvision checks the md5 of the categories and list files even when it does not download, so a
copy whose lists differ (a subset, a derived copy, the sample dataset) fails. :class:`Places365Copy`
keeps torchvision's code path and relaxes only that check; it is used for the sample data and for
``--skip-verify``. Every layout problem becomes one :class:`UserError` naming the missing file.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets import Places365

from .config import TrainConfig, UserError
from .sample import ensure_sample

SPLITS = {"train": "train-standard", "val": "val"}
DEFAULT_PLACES365_ROOT = "/scratch/datasets/places365"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the workshop's Normalize((0.5,), (0.5,))


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
        return ensure_sample(config.sample_classes, config.sample_train_per_class,
                             config.sample_val_per_class, config.seed, base)
    root = Path(config.data_root or DEFAULT_PLACES365_ROOT).expanduser().resolve()
    if not root.is_dir() and not config.download:
        raise UserError(f"data root {root} does not exist; pass --data-root DIR with a Places365 "
                        "copy, or --download to fetch it there (26 GB)")
    return root


def eval_transform(image_size: int) -> T.Compose:
    """The workshop's pipeline (Resize, ToTensor, Normalize 0.5) plus a center crop.

    Places365 images are square, so the crop changes nothing there; it makes any other image
    (predict, serve) come out image_size x image_size.
    """
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def train_transform(image_size: int, augment: bool) -> T.Compose:
    if not augment:
        return eval_transform(image_size)
    return T.Compose([T.RandomResizedCrop(image_size, scale=(0.35, 1.0)), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


def open_split(config: TrainConfig, split: str, root: Path | None = None,
               transform=None) -> Places365:
    """Open ``split`` ("train" or "val") of the dataset ``config`` names.

    Raises UserError for an unknown split, a missing root, list file or image directory, or an
    official copy whose list files do not match (suggesting --skip-verify).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = root or resolve_data_root(config)
    if transform is None:
        transform = (train_transform(config.image_size, config.augment) if split == "train"
                     else eval_transform(config.image_size))
    relaxed = config.dataset == "sample" or config.skip_verify
    cls = Places365Copy if relaxed else Places365
    try:
        ds = cls(str(root), split=SPLITS[split], small=True, download=config.download and not relaxed,
                 transform=transform)
    except RuntimeError as e:  # torchvision's integrity error
        file = str(e).split("The file ")[-1].split(" does not exist")[0]
        if os.path.isfile(file):
            raise UserError(f"{file} differs from the official Places365 file (md5); pass "
                            "--skip-verify to load a subset or derived copy anyway") from None
        raise UserError(f"missing Places365 file: {file} (pass --download to fetch the "
                        "dataset)") from None
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


def pretty(name: str) -> str:
    """'/f/forest/broadleaf' -> 'forest/broadleaf'."""
    return name[3:] if len(name) > 3 and name[0] == "/" and name[2] == "/" else name


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... with NO padding, so evaluation counts every sample once.

    DistributedSampler pads the last round with repeated samples to equalise shards, which would
    make validation metrics depend on the worker count.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loader_kwargs(loader_workers: int, pin_memory: bool) -> dict:
    """DataLoader settings: persistent workers and prefetch only when there are worker processes."""
    kw = dict(num_workers=loader_workers, pin_memory=pin_memory)
    if loader_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=4)
    return kw


def describe(ds: Places365) -> str:
    return f"{len(ds)} images, {len(ds.class_to_idx)} classes, from {ds.root}"

