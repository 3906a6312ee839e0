"""One typed training config, and the metric names everything else refers to.

A frozen :class:`TrainConfig` flows CLI -> ``train_loop_config`` (as a dict) -> every worker
(rebuilt with :meth:`TrainConfig.from_dict`) -> each checkpoint (``config.json``) -> evaluation,
prediction and serving, which rebuild the model from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

# Metric names are defined once: used by report(), CheckpointConfig, plots and summaries.
METRIC = "val_top1"
METRIC_MODE = "max"
# The best epoch/checkpoint: highest val top-1, ties broken by the lower val loss. Ray keeps and
# ranks checkpoints by one number, SCORE (reported next to the metrics, not in metrics.csv):
# val top-1 steps by at least 1/36,500 on Places365's val split, far more than the loss term.
SCORE = "checkpoint_score"
_LOSS_WEIGHT, _LOSS_CAP = 1e-7, 100.0


def checkpoint_score(metrics: dict) -> float:
    """val top-1 minus a tie-breaking sliver of val loss: the number checkpoints are ranked by."""
    loss = metrics.get("val_loss", _LOSS_CAP)
    loss = _LOSS_CAP if loss != loss else min(max(loss, 0.0), _LOSS_CAP)  # NaN sorts last
    return metrics.get(METRIC, -1.0) - _LOSS_WEIGHT * loss


def best_epoch(history: list[dict]) -> dict | None:
    """The history row of the best epoch (see checkpoint_score), None for an empty history."""
    return max(history, key=checkpoint_score, default=None)


DATASETS = ("sample", "places365")
MODELS = ("deepcnn", "workshop", "resnet18")
SCHEDULES = ("cosine", "step", "none")
BAD_IMAGE_POLICIES = ("fail", "skip")
INPUTS = ("loader", "ray-data")  # how training images reach the workers (docs/input.md)
DECODES = ("auto", "cpu", "gpu")  # where --input loader decodes JPEGs (placesnet/data/gpudecode.py)

# Where generated data and run outputs go by default. Absolute on purpose: under
# `ray job submit --working-dir` the driver runs in a temporary copy of the tree.
CACHE_DIR = Path(os.environ.get("PLACESNET_CACHE", Path.home() / ".cache" / "placesnet"))
DEFAULT_STORAGE = str(Path.home() / "ray_results")

# Per-dataset defaults: the sample data is tiny so the default run fits 2 CPU cores in minutes;
# Places365 uses the workshop's 256 px.
DATASET_DEFAULTS = {
    "sample": dict(image_size=64, epochs=8, batch_size=64),
    "places365": dict(image_size=256, epochs=30, batch_size=256),
}

# Peak learning rate of each model's default recipe (SGD + Nesterov momentum 0.9, weight decay
# 5e-4, per-step warmup + cosine) for a global batch of REFERENCE_BATCH images; other batch sizes
# scale it linearly (Goyal et al., 2017). Chosen from `python benchmarks/recipe.py --lrs ...`:
# the table that justified them is in docs/recipe.md.
REFERENCE_BATCH = 256
MODEL_LR = {"deepcnn": 0.02, "workshop": 0.05, "resnet18": 0.05}
SAMPLE_DIFFICULTIES = ("easy", "hard")
SAMPLE_CLASSES = {"easy": 8, "hard": 16}


def default_lr(model: str, batch_size: int) -> float:
    """The default peak lr of ``model`` at global ``batch_size``: MODEL_LR scaled linearly."""
    return MODEL_LR[model] * batch_size / REFERENCE_BATCH


class UserError(Exception):
    """A mistake in what the user asked for: shown as one line, never as a traceback."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run; the message says how to go on. Exit status 130."""


@dataclass(frozen=True)
class TrainConfig:
    # --- data ---
    dataset: str = "sample"
    data_root: str | None = None  # None: the sample cache dir, or required for places365
    skip_verify: bool = False  # accept list files whose md5 differs from the official ones
    download: bool = False
    image_size: int = 64
    augment: bool = False  # random resized crop + horizontal flip on the training split
    bad_images: str = "fail"  # an image that cannot be decoded: "fail" stops the run, "skip" leaves it out
    # sample-dataset shape (ignored for places365)
    sample_difficulty: str = "easy"  # "hard": 16 look-alike classes where recipes differ
    sample_classes: int = 8
    sample_train_per_class: int = 150
    sample_val_per_class: int = 40
    # --- model ---
    model: str = "deepcnn"
    widths: tuple[int, ...] = (32, 64, 128, 256)  # one conv stage per width (deepcnn)
    fc_hidden: int = 1024  # fc1 units, as in the workshop
    dropout: float = 0.3
    # --- optimisation ---
    epochs: int = 8
    batch_size: int = 64  # GLOBAL batch, split evenly across workers
    lr: float = default_lr("deepcnn", 64)  # the PEAK lr; CLI default: default_lr(model, batch)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # evaluated per optimizer step
    warmup_steps: int = -1  # linear warmup steps; -1: automatic (optim.warmup_steps_for)
    warmup_epochs: int = 0  # > 0: warm up over this many epochs instead
    clip_grad_norm: float = 0.0  # > 0: clip the global gradient norm to this before each step
    label_smoothing: float = 0.0
    # --- speed ---
    amp: bool = True  # mixed precision on GPU (bf16 where supported, else fp16 + GradScaler)
    channels_last: bool = True  # on GPU only
    compile: bool = False  # torch.compile the model (minutes of compile time; pays off on long GPU runs)
    loader_workers: int | None = None  # DataLoader processes per worker; None: from CPUs given
    input: str = "loader"  # "ray-data": Ray Data decodes on any node's CPUs (placesnet/data/raydata.py)
    decode: str = (
        "auto"  # "gpu": nvJPEG on the worker's GPU; auto: gpu on CUDA workers when the files are JPEGs
    )
    log_every: int = 0  # progress line every N steps from rank 0; 0: about 10 per epoch
    # --- where / how ---
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)  # free-form notes kept in checkpoints

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild a config; unknown keys (from a newer version) are ignored, missing ones default."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "TrainConfig":
        """Raise UserError for values that cannot work; return self so calls chain."""
        if self.dataset not in DATASETS:
            raise UserError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.bad_images not in BAD_IMAGE_POLICIES:
            raise UserError(
                f"unknown --bad-images {self.bad_images!r}; choose one of {', '.join(BAD_IMAGE_POLICIES)}"
            )
        if self.input not in INPUTS:
            raise UserError(f"unknown --input {self.input!r}; choose one of {', '.join(INPUTS)}")
        if self.decode not in DECODES:
            raise UserError(f"unknown --decode {self.decode!r}; choose one of {', '.join(DECODES)}")
        if self.decode == "gpu" and self.input == "ray-data":
            raise UserError(
                "--decode gpu is for --input loader: with --input ray-data, Ray Data's CPU tasks decode"
            )
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        checks = [
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.image_size >= 8, f"--image-size must be >= 8 pixels, got {self.image_size}"),
            (self.momentum >= 0, f"--momentum must be >= 0, got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (
                0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
                f"--warmup-epochs must be smaller than --epochs, got {self.warmup_epochs}",
            ),
            (self.warmup_steps >= -1, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.clip_grad_norm >= 0, f"--clip-grad-norm must be > 0, got {self.clip_grad_norm}"),
            (
                self.sample_difficulty in SAMPLE_DIFFICULTIES,
                f"unknown sample difficulty {self.sample_difficulty!r}; choose one of "
                f"{', '.join(SAMPLE_DIFFICULTIES)}",
            ),
            (
                self.loader_workers is None or self.loader_workers >= 0,
                f"--loader-workers must be >= 0, got {self.loader_workers}",
            ),
            (
                len(self.widths) >= 1 and all(w >= 1 for w in self.widths),
                f"--widths must be positive integers, got {list(self.widths)}",
            ),
            (
                self.dataset != "sample"
                or 2 <= self.sample_classes <= SAMPLE_CLASSES.get(self.sample_difficulty, 0),
                f"--sample-classes must be 2 to {SAMPLE_CLASSES.get(self.sample_difficulty)} for the "
                f"{self.sample_difficulty} sample, got {self.sample_classes}",
            ),
            (
                self.sample_train_per_class >= 1 and self.sample_val_per_class >= 1,
                "sample_train_per_class and sample_val_per_class must be >= 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


def pretty(name: str) -> str:
    """'/f/forest/broadleaf' -> 'forest/broadleaf'."""
    return name[3:] if len(name) > 3 and name[0] == "/" and name[2] == "/" else name
