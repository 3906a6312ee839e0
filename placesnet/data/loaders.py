"""DataLoaders for training and exact (unpadded) sharded validation, and how many loader
processes and threads a worker gets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from placesnet.config import TrainConfig
from placesnet.data.places import MarkBadImages
from placesnet.data.transforms import eval_transform, train_transform


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


class GlobalBatches(Sampler[list[int]]):
    """Rank ``rank``'s share of every GLOBAL batch, the same epoch plan for any worker count.

    Each epoch is a seeded permutation of all ``images`` (seed + epoch: call :meth:`set_epoch`
    before each epoch) cut into global batches of ``batch_size``, the last, partial one kept unless
    :func:`drop_last_batch` drops it (or it has fewer images than ranks); rank r of ``world``
    takes positions r, r + world, ... of each. So global batch i holds the same images, and an
    epoch the same number of steps, on 1 or N workers, nothing is repeated to even out the ranks,
    and their shares differ by at most one image (see :meth:`loss_weight`)."""

    def __init__(self, images: int, batch_size: int, rank: int, world: int, seed: int) -> None:
        self.images, self.batch_size, self.rank, self.world, self.seed = images, batch_size, rank, world, seed
        self.epoch = 0
        last = images % batch_size
        self.keep_last = bool(last) and not drop_last_batch(images, batch_size) and last >= world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.images // self.batch_size + self.keep_last

    def global_size(self, step: int) -> int:
        """Images in global batch ``step`` (0-based)."""
        return self.batch_size if step < self.images // self.batch_size else self.images % self.batch_size

    def loss_weight(self, step: int, share: int) -> float:
        """What this rank's mean loss over its ``share`` of global batch ``step`` is multiplied by
        so that DDP's mean of the ranks' gradients is the gradient of the global batch's mean loss:
        ``world * share / global size``; exactly 1 when the batch divides evenly."""
        return self.world * share / self.global_size(step)

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.images, generator=g).tolist()
        for step in range(len(self)):
            start = step * self.batch_size
            yield order[start : start + self.batch_size][self.rank :: self.world]


def make_train_loader(
    dataset: Dataset, batch_size: int, rank: int, world: int, seed: int, **kw
) -> DataLoader:
    """Rank ``rank``'s training batches: its share of each GLOBAL ``batch_size`` batch
    (:class:`GlobalBatches`; call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch).
    A model without BatchNorm or dropout trains to the same weights on 1 or N workers (tested),
    whether or not the batch divides by N. ``kw``: DataLoader settings (see
    :meth:`LoaderPlan.kwargs`)."""
    return DataLoader(dataset, batch_sampler=GlobalBatches(len(dataset), batch_size, rank, world, seed), **kw)


def make_loaders(
    cfg: TrainConfig,
    train_ds,
    val_ds,
    rank: int,
    world: int,
    kw: dict,
    decode_device: torch.device | None = None,
    warn=None,
) -> tuple:
    """``--input loader`` for rank ``rank`` of ``world``, without Ray: (train batches, val batches,
    the train sampler), each batch ``(uint8 images, targets)``. ``kw``: DataLoader settings
    (:meth:`LoaderPlan.kwargs`); the sampler is the :class:`GlobalBatches` to ``set_epoch``.
    With ``decode_device`` the loader processes only read file bytes
    and each batch is decoded there (``--decode gpu``, :mod:`gpudecode`); ``warn`` then gets one
    line if files leave nvJPEG's batch path."""
    per_worker = max(cfg.batch_size // world, 1)
    if decode_device is not None:
        from placesnet.data.gpudecode import FileBytes, pack

        train_src, val_src = FileBytes(train_ds), FileBytes(val_ds)
        kw = {**kw, "collate_fn": pack}
    else:
        train_src, val_src = MarkBadImages(train_ds, cfg.image_size), MarkBadImages(val_ds, cfg.image_size)
    train = make_train_loader(train_src, cfg.batch_size, rank, world, cfg.seed, **kw)
    sampler = train.batch_sampler
    val = DataLoader(val_src, batch_size=per_worker * 2, sampler=ShardSampler(val_src, rank, world), **kw)
    if decode_device is not None:
        from placesnet.data.gpudecode import DeviceDecode

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
