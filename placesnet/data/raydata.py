"""``--input ray-data``: Ray Data reads and decodes the images on the cluster's CPUs and streams
uint8 batches to the Train workers.

With the default ``--input loader`` every Train worker decodes its own shard with DataLoader
processes on its own node's CPUs, so a GPU node's CPUs bound its GPU. Here decoding runs as Ray
Data tasks anywhere in the cluster, CPU-only nodes included (Train's own workers' resources are
left out of Ray Data's budget), and each worker receives its share as a stream.

A worker gets exactly what the DataLoader gives it: uint8 (B, 3, S, S) images resized and
cropped (``--augment``: randomly) by the same transforms, int64 targets, and a target
``-(index + 1)`` for an image that could not be decoded (as :class:`data.MarkBadImages`), so
``--bad-images`` and engine.py's epoch code work the same for both inputs.

How the shuffling and splitting differ from the DataLoader path (docs/input.md):

- train: the list is permuted once with ``--seed`` and cut into blocks of :data:`BLOCK_ROWS`;
  every epoch the blocks come in a new random order and each worker mixes them in a local
  shuffle buffer of four batches. Not bit-reproducible run to run, unlike the DataLoader path.
- train: every worker gets the same number of images (``streaming_split(equal=True)``, which
  leaves out fewer than ``workers`` images an epoch), so every rank runs the same number of
  steps, as DDP needs; the last partial batch follows :func:`data.drop_last_batch`.
- val: split with ``equal=False``: every image is counted exactly once, whatever the worker
  count, so val metrics are exact, as on the DataLoader path.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import ray.train

from placesnet.config import TrainConfig
from placesnet.data.loaders import drop_last_batch
from placesnet.data.places import BadImageFile, open_split, read_image_uint8, resolve_data_root
from placesnet.data.transforms import train_transform


def quiet_ray_data() -> None:
    """Ray Data's actors that run the datasets (DatasetManager, SplitCoordinator) unpickle
    :func:`decode_batch`, so they import this module: quiet there the lines Ray Data prints every
    epoch (execution finished, progress bars disabled) and a deprecation warning about the
    resources Ray Train itself sets. The project prints one line per epoch."""
    for name in ("ray.data._internal.execution.streaming_executor", "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions.exclude_resources` is deprecated")


quiet_ray_data()


def quiet_context():
    """Ray Data's DataContext of this process, without progress bars or the execution-start
    lines: the project's own lines say what runs (one per epoch; batch prediction's progress)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return context


BLOCK_ROWS = 64  # list rows per block: the unit of a decode task and of the per-epoch block shuffle
SHUFFLE_BATCHES = 4  # a worker's local shuffle buffer, in batches


def build_datasets(cfg: TrainConfig, root: Path, images: int | None = None) -> dict:
    """The ``train`` and ``val`` Ray Datasets for ``cfg``: list rows -> decoded uint8 images.

    Runs on the driver. Only the lists (paths and labels) are read here; decoding happens in
    ``map_batches`` tasks of one CPU each while the workers iterate. ``images``: only the first
    N rows of each split (benchmarks/input.py).
    """
    import pyarrow as pa
    import ray.data

    quiet_context()
    datasets = {}
    for split in ("train", "val"):
        rows = open_split(cfg, split, root).imgs
        order = np.arange(len(rows))
        if split == "train":
            order = np.random.default_rng(cfg.seed).permutation(len(rows))
        order = order[:images]
        table = pa.table(
            {
                "index": pa.array(order, pa.int64()),
                "path": pa.array([rows[i][0] for i in order], pa.string()),
                "label": pa.array([rows[i][1] for i in order], pa.int64()),
            }
        )
        ds = ray.data.from_arrow([table.slice(i, BLOCK_ROWS) for i in range(0, len(order), BLOCK_ROWS)])
        if split == "train":
            ds = ds.randomize_block_order()  # re-drawn every epoch
        datasets[split] = ds.map_batches(
            decode_batch,
            batch_size=None,
            batch_format="numpy",
            num_cpus=1,
            fn_kwargs={"config": cfg.to_dict(), "augment": cfg.augment and split == "train"},
        )
    return datasets


def decode_batch(batch: dict, config: dict, augment: bool) -> dict:
    """A Ray Data task: decode, resize and crop one block of list rows into uint8 images.

    An image that cannot be decoded becomes a blank image with target ``-(index + 1)``; the
    Train worker's :class:`data.BadImages` then stops the run naming it, or skips it.
    """
    import torch

    torch.set_num_threads(1)  # one CPU per task; Ray Data runs as many tasks as there are CPUs
    cfg = TrainConfig.from_dict(config)
    if cfg.dataset == "sample" and len(batch["path"]) and not Path(batch["path"][0]).exists():
        resolve_data_root(cfg)  # a node without the sample data generates the same (seeded) copy
    transform = train_transform(cfg.image_size, augment)
    size = cfg.image_size
    images = np.zeros((len(batch["path"]), 3, size, size), np.uint8)
    labels = np.asarray(batch["label"], np.int64).copy()
    for i, path in enumerate(batch["path"]):
        try:
            images[i] = transform(read_image_uint8(str(path))).numpy()
        except BadImageFile:
            labels[i] = -(int(batch["index"][i]) + 1)
    return {"image": images, "label": labels}


class ExactValDataConfig(ray.train.DataConfig):
    """Ray Train's DataConfig, except that ``val`` is split with ``equal=False``: every val
    image goes to exactly one worker (the default ``equal=True`` would drop some)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        train = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(train, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            val.set_name("val")
            val.context.execution_options = self._resolve_execution_options("val")
            hints = worker_node_ids if self._enable_shard_locality else None
            for shard, split in zip(
                output, val.streaming_split(world_size, equal=False, locality_hints=hints)
            ):
                shard["val"] = split
        return output


class ShardBatches:
    """One Train worker's batches from its Ray Data shard, as ``(images, targets)`` CPU tensors:
    the interface of a DataLoader that engine.py needs (``len`` and iteration)."""

    def __init__(self, shard, batch_size: int, rows: int | None, *, shuffle: bool, pin_memory: bool) -> None:
        self.shard, self.batch_size, self.pin_memory = shard, batch_size, pin_memory
        self.shuffle = shuffle
        # train: ``rows`` images on every rank, so a known, equal number of steps
        self.drop_last = rows is not None and drop_last_batch(rows, batch_size)
        self.steps = (
            None if rows is None else (rows // batch_size if self.drop_last else -(-rows // batch_size))
        )

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("the val shard's length is not known in advance")
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """The DataLoader path's hook; Ray Data re-draws the block order by itself."""

    def __iter__(self):
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            device="cpu",
            pin_memory=self.pin_memory,
            local_shuffle_buffer_size=SHUFFLE_BATCHES * self.batch_size if self.shuffle else None,
            prefetch_batches=2,
        )
        for batch in batches:
            yield batch["image"], batch["label"]


def worker_inputs(cfg: TrainConfig, world: int, train_images: int, pin_memory: bool):
    """This Train worker's (train, val) batches from the datasets :func:`build_datasets` made."""
    per_worker = max(cfg.batch_size // world, 1)
    train = ShardBatches(
        ray.train.get_dataset_shard("train"),
        per_worker,
        train_images // world,
        shuffle=True,
        pin_memory=pin_memory,
    )
    val = ShardBatches(
        ray.train.get_dataset_shard("val"), per_worker * 2, None, shuffle=False, pin_memory=pin_memory
    )
    return train, val
