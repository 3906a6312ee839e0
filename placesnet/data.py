"""Places365 (real or the embedded sample) through torchvision's own ``Places365`` class.

The input pipeline stays uint8 until it reaches the training device: files are decoded straight
to uint8 tensors (``read_image_uint8`` as Places365's ``loader=``), resized and cropped as uint8,
collated and pinned as uint8 (a quarter of float32's bytes), and :func:`normalize` turns them into
the workshop's ToTensor + Normalize(0.5) values on the device, with identical numerics.

torchvision checks the md5 of the categories and list files even when it does not download, so a
copy whose lists differ (a subset, a derived copy, the sample dataset) fails. :class:`Places365Copy`
keeps torchvision's code path and relaxes only that check; it is used for the sample data and for
``--skip-verify``. Every layout problem becomes one :class:`UserError` naming the missing file.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T
from torchvision.datasets import Places365
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

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
                             config.sample_val_per_class, config.seed, base, config.sample_difficulty)
    root = Path(config.data_root or DEFAULT_PLACES365_ROOT).expanduser().resolve()
    if not root.is_dir() and not config.download:
        raise UserError(f"data root {root} does not exist; pass --data-root DIR with a Places365 "
                        "copy, or --download to fetch it there (26 GB)")
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
        return (f"cannot decode image {path} (line {index + 1} of "
                f"{os.path.join(self.dataset.root, list_file_name(self.dataset))}): {reason}")

    def check(self, targets: torch.Tensor) -> int:
        """How many samples of a (CPU) target batch are marked bad; raises in ``fail`` mode."""
        marked = targets < 0
        if not bool(marked.any()):
            return 0
        indices = (-targets[marked] - 1).tolist()
        if self.mode == "fail":
            raise BadImageFile(f"{self.describe(indices[0])}; fix or remove the file, or pass "
                               "--bad-images skip to train without it")
        for index in indices:
            if index not in self.seen:
                self.seen.add(index)
                self.warn(f"skipping a bad image: {self.describe(index)}")
        return len(indices)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]: ToTensor's /255 then Normalize(0.5, 0.5).

    The same operations in the same order as torchvision's, so values are bit-identical; run it on
    the training device, after the (4x smaller) uint8 batch has been copied there. Keeps the
    memory format (channels_last stays channels_last).
    """
    return images.float().div_(255).sub_(MEAN[0]).div_(STD[0])


class ResizeCenterCrop:
    """Resize (shorter side) + center crop to ``size``, as a uint8 (3, S, S) tensor.

    Takes a uint8 tensor (training data) or a PIL image (predict, serve), so every path sees the
    same pixels. An image that already is S x S (every Places365 image at 256) passes untouched.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            image = TF.pil_to_tensor(image)
        if image.shape[-2:] != (self.size, self.size):
            image = TF.center_crop(TF.resize(image, self.size, antialias=True), self.size)
        return image

    def __repr__(self) -> str:
        return f"ResizeCenterCrop({self.size})"


def eval_transform(image_size: int) -> ResizeCenterCrop:
    """The eval (and default training) transform. With :func:`normalize` it is the workshop's
    Resize, ToTensor, Normalize(0.5): on square Places365 images the crop changes nothing; it makes
    any other image (predict, serve) ``image_size`` x ``image_size``."""
    return ResizeCenterCrop(image_size)


def train_transform(image_size: int, augment: bool) -> v2.Compose:
    if not augment:
        return eval_transform(image_size)
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToPureTensor()])


def workshop_transform(image_size: int = 256) -> T.Compose:
    """The workshop's float32 pipeline on PIL images: the reference for tests and benchmarks."""
    return T.Compose([T.Resize(image_size), T.ToTensor(), T.Normalize(MEAN, STD)])


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
                 transform=transform, loader=read_image_uint8)
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


def drop_last_batch(images: int, batch_size: int) -> bool:
    """Whether an epoch of ``images`` leaves out its last, partial batch: only when that batch
    would hold less than half of ``batch_size`` (a tiny batch is a noisy step, and BatchNorm
    cannot train on one image). A larger remainder trains: with 1,200 images in batches of 256,
    dropping 176 of them would leave 15 % of the data out of every epoch."""
    return images >= batch_size and images % batch_size < batch_size / 2


def make_train_loader(dataset: Dataset, batch_size: int, rank: int, world: int, seed: int, **kw) -> DataLoader:
    """Rank ``rank``'s training batches: the GLOBAL ``batch_size`` split evenly over ``world`` ranks.

    Every rank, even a lone one, draws from the same seeded permutation of the whole split
    (DistributedSampler; call ``loader.sampler.set_epoch(epoch)`` before each epoch) and takes
    its positions rank, rank + world, ...; so global batch i holds the same images in every
    worker count, and a model without BatchNorm or dropout trains to the same weights on 1 or N
    workers (tested). ``kw``: DataLoader settings (see :meth:`LoaderPlan.kwargs`).
    """
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
    per_rank = max(batch_size // world, 1)
    return DataLoader(dataset, batch_size=per_rank, sampler=sampler,
                      drop_last=drop_last_batch(len(sampler), per_rank), **kw)


def make_loaders(cfg: TrainConfig, train_ds, val_ds, rank: int, world: int, kw: dict,
                 decode_device: torch.device | None = None, warn=None) -> tuple:
    """``--input loader`` for rank ``rank`` of ``world``, without Ray: (train batches, val batches,
    the train sampler), each batch ``(uint8 images, targets)``. ``kw``: DataLoader settings
    (:meth:`LoaderPlan.kwargs`). With ``decode_device`` the loader processes only read file bytes
    and each batch is decoded there (``--decode gpu``, :mod:`gpudecode`); ``warn`` then gets one
    line if files leave nvJPEG's batch path."""
    per_worker = max(cfg.batch_size // world, 1)
    if decode_device is not None:
        from .gpudecode import FileBytes, pack

        train_src, val_src = FileBytes(train_ds), FileBytes(val_ds)
        kw = {**kw, "collate_fn": pack}
    else:
        train_src, val_src = MarkBadImages(train_ds, cfg.image_size), MarkBadImages(val_ds, cfg.image_size)
    train = make_train_loader(train_src, cfg.batch_size, rank, world, cfg.seed, **kw)
    sampler = train.sampler
    val = DataLoader(val_src, batch_size=per_worker * 2, sampler=ShardSampler(val_src, rank, world), **kw)
    if decode_device is not None:
        from .gpudecode import DeviceDecode

        size, warn = cfg.image_size, warn or (lambda message: None)
        train = DeviceDecode(train, decode_device, train_transform(size, cfg.augment), size, warn)
        val = DeviceDecode(val, decode_device, eval_transform(size), size, warn)
    return train, val, sampler


@dataclass(frozen=True)
class LoaderPlan:
    """DataLoader settings for one training worker, derived from the CPUs Ray gives it."""

    workers: int  # DataLoader processes
    threads: int  # torch intra-op threads of the worker's own process (CPU training)
    pin_memory: bool

    @classmethod
    def for_worker(cls, cpus: float, on_gpu: bool, workers: int | None = None) -> "LoaderPlan":
        """``cpus`` CPUs next to a GPU (``on_gpu``) or computing on their own.

        GPU: the GPU computes and the CPUs only feed it, so every CPU but the one driving the GPU
        decodes images. CPU: the CPUs compute, and decoding a uint8 JPEG costs a fraction of a
        CNN step, so only one CPU in four decodes (none below four: the step loop decodes inline).
        ``workers`` (--loader-workers) overrides the process count.
        """
        cpus = max(int(cpus), 1)
        if workers is None:
            workers = cpus - 1 if on_gpu else cpus // 4
        threads = cpus if on_gpu else max(cpus - workers, 1)
        return cls(workers=workers, threads=threads, pin_memory=on_gpu)

    def kwargs(self) -> dict:
        """Persistent workers (no re-fork each epoch) and about 8 batches in flight in total."""
        kw = dict(num_workers=self.workers, pin_memory=self.pin_memory)
        if self.workers > 0:
            kw.update(persistent_workers=True, prefetch_factor=max(2, math.ceil(8 / self.workers)))
        return kw


def loader_kwargs(loader_workers: int, pin_memory: bool) -> dict:
    """DataLoader settings for ``loader_workers`` processes (see :class:`LoaderPlan`)."""
    return LoaderPlan(loader_workers, 1, pin_memory).kwargs()


def describe(ds: Places365) -> str:
    return f"{len(ds)} images, {len(ds.class_to_idx)} classes, from {ds.root}"

