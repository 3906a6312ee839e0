"""One typed training config, and the metric names everything else refers to.

A frozen :class:`TrainConfig` flows CLI -> ``train_loop_config`` (as a dict) -> every worker
(rebuilt with :meth:`TrainConfig.from_dict`) -> each checkpoint (``config.json``) -> evaluation,
prediction and serving, which rebuild the model from the checkpoint alone. Each field that is a
command-line option is declared with option(): its default, --help text, choices and bounds in one
place; placesnet.cli derives the flags from them and validate() checks them.
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
# torchvision architectures: the first is also trained here (MODEL_LR), the others are those of the
# published Places365 models (rayjobs/import_weights.py; placesnet/published.py)
TORCHVISION_MODELS = ("resnet18", "resnet50", "wideresnet18", "alexnet", "densenet161")
MODELS = ("deepcnn", "workshop", *TORCHVISION_MODELS)
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


def recipe_of(model: str) -> str:
    """The model whose MODEL_LR ``model`` trains with by default: its own, or deepcnn's for an
    architecture without a measured recipe (those of the published models)."""
    return model if model in MODEL_LR else "deepcnn"


def default_lr(model: str, batch_size: int) -> float:
    """The default peak lr of ``model`` at global ``batch_size``: MODEL_LR scaled linearly."""
    return MODEL_LR[model] * batch_size / REFERENCE_BATCH


class UserError(Exception):
    """A mistake in what the user asked for: shown as one line, never as a traceback."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a run; the message says how to go on. Exit status 130."""


# The --help headings of the options (option(group=...)), in the order they are shown.
DATA, MODEL, INPUT = "data", "model and optimisation", "input"
GROUPS = (DATA, MODEL, INPUT)


def _per_dataset(name: str) -> str:
    return ", ".join(f"{dataset} {defaults[name]}" for dataset, defaults in DATASET_DEFAULTS.items())


# What --help says of the defaults that a run started --init-from a checkpoint takes from it.
_INHERITED = "with --init-from, that checkpoint's"


def option(
    default,
    help: str,
    *,
    group: str,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    below: float | None = None,
    default_help: str | None = None,
    exclusive: str | None = None,
    metavar: str | None = None,
):
    """A TrainConfig field that is also a command-line option, declared once: its default, its --help
    text and heading (``group``), and the values it takes. placesnet.cli derives the flag from it
    (``clip_grad_norm`` -> ``--clip-grad-norm``; a switch on by default -> ``--no-amp``) and
    validate() refuses values outside ``choices``, below ``minimum`` or not below ``below``.

    default_help: what --help says the default is where the field's own value does not say it (a
    sentinel such as -1, or a default that depends on other options: DERIVED_DEFAULTS);
    exclusive: options with the same tag cannot be given together.
    """
    metadata = dict(
        help=help,
        group=group,
        choices=choices,
        minimum=minimum,
        below=below,
        default_help=default_help,
        exclusive=exclusive,
        metavar=metavar,
    )
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the input of a model trained elsewhere (a published Places365 model):
    resized to ``resize`` = (height, width), aspect ratio not kept, centre-cropped to the config's
    ``image_size``, and normalised per channel with ``mean`` and ``std`` (of values in [0, 1]).
    The project's own models have none: the shorter side resized to ``image_size``, a centre crop,
    and Normalize(0.5, 0.5) (placesnet/data/views.py). ValueError for values that cannot work."""

    resize: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "resize", tuple(int(v) for v in self.resize))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.resize) != 2 or min(self.resize) < 1:
            raise ValueError(f"preprocess resize must be (height, width) >= 1, got {list(self.resize)}")
        if len(self.mean) != 3 or len(self.std) != 3 or not min(self.std) > 0:
            raise ValueError(f"preprocess needs 3 means and 3 stds > 0, got {self.mean}, {self.std}")


@dataclass(frozen=True)
class TrainConfig:
    # Every field but those in NO_FLAG is a command-line option (see option()). The help of a switch
    # that is on by default describes its --no- flag.
    # --- data ---
    dataset: str = option(
        "sample",
        "'sample': the embedded sample scenes (generated on first use); 'places365': torchvision's Places365",
        group=DATA,
        choices=DATASETS,
    )
    data_root: str | None = option(  # None: the sample cache dir, or required for places365
        None,
        "dataset directory",
        group=DATA,
        default_help="places365: /scratch/datasets/places365; sample: cache base ~/.cache/placesnet/sample",
    )
    skip_verify: bool = option(
        False,
        "load a Places365 copy whose list files differ from the official ones (a subset or derived "
        "copy); the layout must still match",
        group=DATA,
    )
    download: bool = option(
        False, "download Places365 (256x256, about 26 GB) into --data-root first", group=DATA
    )
    image_size: int = option(
        DATASET_DEFAULTS["sample"]["image_size"],
        "side in pixels the images are resized to",
        group=DATA,
        minimum=8,
        default_help=f"{_per_dataset('image_size')}; {_INHERITED}",
    )
    augment: bool = option(False, "random resized crop + horizontal flip on the training split", group=DATA)
    bad_images: str = option(
        "fail",
        "an image file that cannot be decoded during training: 'fail' stops the run at once, naming "
        "the file and its list line (no retries); 'skip' leaves it out, logs its path and counts it "
        "in metrics.csv's skipped_images",
        group=DATA,
        choices=BAD_IMAGE_POLICIES,
    )
    # sample-dataset shape (ignored for places365)
    sample_difficulty: str = option(
        "easy",
        "sample dataset: 'easy' (8 distinct scene kinds; about 99% with any recipe) or 'hard' (16 "
        "look-alike categories with occlusion, zoom, colour changes and noise: where training "
        "recipes differ)",
        group=DATA,
        choices=SAMPLE_DIFFICULTIES,
    )
    sample_classes: int = option(
        SAMPLE_CLASSES["easy"],
        "sample dataset: number of classes, "
        + ", ".join(f"2-{n} {difficulty}" for difficulty, n in SAMPLE_CLASSES.items()),
        group=DATA,
        minimum=1,
        default_help="all: " + ", ".join(f"{n} {difficulty}" for difficulty, n in SAMPLE_CLASSES.items()),
    )
    sample_train_per_class: int = option(
        150, "sample dataset: training images per class", group=DATA, minimum=1
    )
    sample_val_per_class: int = option(
        40, "sample dataset: validation images per class", group=DATA, minimum=1
    )
    # --- model ---
    model: str = option(
        "deepcnn",
        "deepcnn: conv-BN-ReLU-pool stages + fc1 (--fc-hidden units, --dropout) + fc2; workshop: the "
        "workshop's two conv layers (64, 128), corrected; resnet18, resnet50, alexnet, densenet161: "
        "torchvision's, random init; wideresnet18: resnet18 without its max-pool (the published "
        "Places365 models' architectures, see docs/published-models.md)",
        group=MODEL,
        choices=MODELS,
        default_help=f"deepcnn; {_INHERITED}",
    )
    widths: tuple[int, ...] = option(
        (32, 64, 128, 256),
        "deepcnn: channels of each conv stage, comma-separated",
        group=MODEL,
        default_help=f"32,64,128,256; {_INHERITED}",
    )
    fc_hidden: int = option(
        1024,
        "deepcnn: units of fc1, the hidden fully connected layer (as in the workshop)",
        group=MODEL,
        minimum=1,
        default_help=f"1024; {_INHERITED}",
    )
    dropout: float = option(
        0.3, "deepcnn: dropout probability on fc1's output", group=MODEL, minimum=0.0, below=1.0
    )
    # --- optimisation ---
    epochs: int = option(
        DATASET_DEFAULTS["sample"]["epochs"],
        "epochs",
        group=MODEL,
        minimum=1,
        default_help=_per_dataset("epochs"),
    )
    batch_size: int = option(
        DATASET_DEFAULTS["sample"]["batch_size"],
        "GLOBAL batch size, split across the workers so results do not depend on the worker count",
        group=MODEL,
        minimum=1,
        default_help=_per_dataset("batch_size"),
    )
    lr: float = option(
        default_lr("deepcnn", DATASET_DEFAULTS["sample"]["batch_size"]),
        "peak learning rate of SGD, or 'auto': run the LR range test (rayjobs/lr_find.py) first and "
        "train with its suggestion",
        group=MODEL,
        default_help=f"the model's lr per {REFERENCE_BATCH} images ("
        + ", ".join(f"{m} {lr:g}" for m, lr in MODEL_LR.items())
        + f") x batch size / {REFERENCE_BATCH}: the linear scaling rule, see docs/recipe.md",
    )
    momentum: float = option(0.9, "SGD momentum", group=MODEL, minimum=0.0)
    weight_decay: float = option(5e-4, "SGD weight decay", group=MODEL, minimum=0.0)
    schedule: str = option(
        "cosine",
        "LR decay after the warmup, evaluated every step: cosine to 0, step (/10 at 50% and 75% of "
        "the steps) or none",
        group=MODEL,
        choices=SCHEDULES,
    )
    warmup_steps: int = option(  # -1: automatic (optim.warmup_steps_for)
        -1,
        "linear LR warmup over this many optimizer steps",
        group=MODEL,
        minimum=-1,
        exclusive="warmup",
        default_help="5% of all steps, at least 50 (at most a fifth of the run), at most 5000",
    )
    warmup_epochs: int = option(  # > 0: warm up over this many epochs instead
        0, "linear LR warmup over this many epochs instead", group=MODEL, minimum=0, exclusive="warmup"
    )
    clip_grad_norm: float = option(  # 0.0: no clipping
        0.0,
        "clip the global gradient norm to MAX before every step",
        group=MODEL,
        minimum=0.0,
        default_help="off",
        metavar="MAX",
    )
    label_smoothing: float = option(
        0.0,
        "label smoothing of the training loss: the share of each target spread evenly over all "
        "classes (the true class keeps the rest)",
        group=MODEL,
        minimum=0.0,
        below=1.0,
    )
    # --- speed ---
    amp: bool = option(  # on GPU: bf16 where supported, else fp16 + GradScaler
        True, "GPU: train in fp32 instead of bf16/fp16 mixed precision", group=MODEL
    )
    channels_last: bool = option(True, "GPU: keep NCHW memory format instead of channels_last", group=MODEL)
    compile: bool = option(
        False,
        "torch.compile the model: faster steps after a compile of a minute or more; worth it for long "
        "GPU runs (see docs/benchmarks.md)",
        group=MODEL,
    )
    loader_workers: int | None = option(  # None: from the CPUs a worker is given
        None,
        "DataLoader processes per Ray worker",
        group=MODEL,
        minimum=0,
        default_help="on GPU its CPUs minus one, on CPU one per 4 CPUs",
    )
    input: str = option(  # placesnet/data/raydata.py
        "loader",
        "how images reach the workers: loader = DataLoader processes on each worker's own CPUs; "
        "ray-data = Ray Data tasks decode on any node's CPUs, CPU-only nodes included, and stream "
        "batches to the workers (see docs/input.md)",
        group=INPUT,
        choices=INPUTS,
    )
    decode: str = option(  # placesnet/data/gpudecode.py
        "auto",
        "where --input loader decodes JPEGs: gpu = loader processes only read the files and each GPU "
        "worker decodes its batches with nvJPEG; cpu = in the loader processes; auto = gpu on GPU "
        "workers when the files are JPEGs",
        group=INPUT,
        choices=DECODES,
    )
    log_every: int = option(
        0,
        "progress line every N steps from rank 0",
        group=MODEL,
        minimum=0,
        default_help="10 per epoch when an epoch has >= 100 steps",
    )
    # --- where / how ---
    seed: int = option(
        0, "random seed: initial weights, order of the training data, generated sample images", group=MODEL
    )
    # --- starting point (placesnet/finetune.py) ---
    init_from: str | None = option(  # the driver stores the checkpoint it found: a path or URI
        None,
        "start from the weights of this checkpoint (a checkpoint or run dir, a summary.json, 'latest' "
        "or a URI, as evaluate.py's --checkpoint takes): its architecture and input transform are "
        "kept, and its classifier head (the fully connected layers) too when the classes are the "
        "same; other classes get a new head. A resumed run goes on from its own checkpoint instead",
        group=MODEL,
        metavar="CHECKPOINT",
        default_help="random initial weights",
    )
    freeze_backbone: bool = option(
        False,
        "with --init-from: train the classifier head (the fully connected layers) alone; the "
        "other layers keep their weights (their BatchNorm statistics still follow the new data)",
        group=MODEL,
        exclusive="backbone",
    )
    backbone_lr_mult: float = option(
        1.0,
        "with --init-from: every layer but the classifier head trains at --lr times this (e.g. 0.1); "
        "the head at --lr",
        group=MODEL,
        minimum=0.0,
        exclusive="backbone",
    )
    # How images become this model's input when it was not trained here (see Preprocess); None:
    # the project's own. Recorded by rayjobs/import_weights.py, read from the checkpoint.
    preprocess: Preprocess | None = None
    extra: dict = field(default_factory=dict, compare=False)  # free-form notes kept in checkpoints

    def __post_init__(self) -> None:
        # JSON round trips turn tuples into lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if isinstance(self.preprocess, dict):
            object.__setattr__(self, "preprocess", Preprocess(**self.preprocess))

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
        """Raise UserError for values that cannot work, naming the flag that sets them (their
        option()'s choices and bounds, then the rules between fields); return self so calls chain."""
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"unknown {flag(f.name)} {value!r}; choose one of {', '.join(choices)}")
        for f in dataclasses.fields(self):
            value, low, below = getattr(self, f.name), f.metadata.get("minimum"), f.metadata.get("below")
            if value is None or low is None:
                continue
            if below is not None and not low <= value < below:
                raise UserError(f"{flag(f.name)} must be in [{low:g}, {below:g}), got {value}")
            if not value >= low:  # also refuses nan
                raise UserError(f"{flag(f.name)} must be >= {low:g}, got {value}")
        if self.decode == "gpu" and self.input == "ray-data":
            raise UserError(
                f"{flag('decode')} gpu is for {flag('input')} loader: with {flag('input')} ray-data, "
                "Ray Data's CPU tasks decode"
            )
        checks = [
            (self.lr > 0, f"{flag('lr')} must be > 0, got {self.lr}"),
            (
                self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
                f"{flag('warmup_epochs')} must be smaller than {flag('epochs')}, got {self.warmup_epochs}",
            ),
            (
                len(self.widths) >= 1 and all(w >= 1 for w in self.widths),
                f"{flag('widths')} must be positive integers, got {list(self.widths)}",
            ),
            (
                self.backbone_lr_mult > 0,
                f"{flag('backbone_lr_mult')} must be > 0, got {self.backbone_lr_mult} (to keep the "
                f"other layers' weights, use {flag('freeze_backbone')})",
            ),
            (
                bool(self.init_from) or not (self.freeze_backbone or self.backbone_lr_mult != 1.0),
                f"{flag('freeze_backbone')} and {flag('backbone_lr_mult')} are for a run that starts "
                f"{flag('init_from')} a checkpoint: a new model has no trained layers to keep",
            ),
            (
                self.preprocess is None or (self.input == "loader" and self.decode != "gpu"),
                f"this model has its own input transform (an imported published model's, kept by "
                f"{flag('init_from')}): it trains with {flag('input')} loader and {flag('decode')} cpu "
                f"or auto, since {flag('input')} ray-data and {flag('decode')} gpu apply the project's",
            ),
            (
                self.preprocess is None or self.image_size <= min(self.preprocess.resize),
                f"{flag('image_size')} {self.image_size} is larger than the images it is cropped from "
                f"({'x'.join(map(str, self.preprocess.resize)) if self.preprocess else ''})",
            ),
            (
                self.dataset != "sample"
                or 2 <= self.sample_classes <= SAMPLE_CLASSES[self.sample_difficulty],
                f"{flag('sample_classes')} must be 2 to {SAMPLE_CLASSES[self.sample_difficulty]} for the "
                f"{self.sample_difficulty} sample, got {self.sample_classes}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


# TrainConfig fields that have no command-line flag, each with the reason; every other field is an
# option() with a flag (tests/test_options.py checks both ways).
NO_FLAG = {
    "extra": "free-form notes a program stores in the checkpoint, not a training setting",
    "preprocess": "how a model trained elsewhere takes its images (rayjobs/import_weights.py), not a setting",
}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag(name: str) -> str:
    """The flag of TrainConfig field ``name``: 'clip_grad_norm' -> '--clip-grad-norm'; a switch
    that is on by default is turned off by its flag: 'amp' -> '--no-amp'. KeyError for a name
    that is not a field or has no flag (NO_FLAG)."""
    if name in NO_FLAG:
        raise KeyError(f"TrainConfig.{name} has no flag: {NO_FLAG[name]}")
    dashed = name.replace("_", "-")
    return f"--no-{dashed}" if _FIELDS[name].default is True else f"--{dashed}"


def _dataset_default(name: str):
    return lambda values: DATASET_DEFAULTS.get(values["dataset"], DATASET_DEFAULTS["sample"])[name]


# The fields that decide the shape of a model's weights (with its number of classes).
ARCHITECTURE = ("model", "widths", "fc_hidden")

# Options whose default depends on other options: left unset (None) on the command line, they are
# resolved by fill_defaults in this order (lr needs the batch size). Their option() says so in --help.
DERIVED_DEFAULTS = {
    # the architecture: the field's default, or (filled in before, placesnet/finetune.py) the
    # --init-from checkpoint's; given, it must be that checkpoint's
    **{name: (lambda values, name=name: _FIELDS[name].default) for name in ARCHITECTURE},
    "image_size": _dataset_default("image_size"),
    "epochs": _dataset_default("epochs"),
    "batch_size": _dataset_default("batch_size"),
    "sample_classes": lambda values: SAMPLE_CLASSES.get(values["sample_difficulty"], SAMPLE_CLASSES["easy"]),
    "lr": lambda values: default_lr(recipe_of(values["model"]), max(values["batch_size"], 1)),
}


def fill_defaults(values: dict) -> dict:
    """``values`` (field -> value, as parsed from the command line) with each DERIVED_DEFAULTS
    option that is None filled in from the others (missing ones count at their field default).
    Fields missing from ``values`` stay missing: TrainConfig gives them its defaults."""
    filled = dict(values)
    for name, derive in DERIVED_DEFAULTS.items():
        if name in filled and filled[name] is None:
            filled[name] = derive({**{n: f.default for n, f in _FIELDS.items()}, **filled})
    return filled


def pretty(name: str) -> str:
    """'/f/forest/broadleaf' -> 'forest/broadleaf'."""
    return name[3:] if len(name) > 3 and name[0] == "/" and name[2] == "/" else name
