"""Command-line pieces shared by rayjobs/, tuning/ and serving/: flags, config from flags,
and the wrapper that turns a UserError into one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from placesnet.config import (
    BAD_IMAGE_POLICIES,
    DATASET_DEFAULTS,
    DATASETS,
    DECODES,
    INPUTS,
    MODEL_LR,
    MODELS,
    REFERENCE_BATCH,
    SAMPLE_CLASSES,
    SAMPLE_DIFFICULTIES,
    SCHEDULES,
    Interrupted,
    TrainConfig,
    UserError,
    default_lr,
)

PACKAGE_DIR = Path(__file__).resolve().parent


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def lr_value(text: str) -> float | str:
    """--lr: a positive float, or "auto" (run the LR range test first)."""
    if text == "auto":
        return text
    try:
        return positive_float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'auto', got {text!r}") from None


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default="sample",
        help="'sample': the embedded sample scenes (generated on first use); "
        "'places365': torchvision's Places365 (default: %(default)s)",
    )
    g.add_argument(
        "--data-root",
        help="dataset directory (places365: default "
        "/scratch/datasets/places365; sample: cache base, default ~/.cache/placesnet/sample)",
    )
    g.add_argument(
        "--skip-verify",
        action="store_true",
        help="load a Places365 copy whose list files differ from the official ones "
        "(a subset or derived copy); the layout must still match",
    )
    g.add_argument(
        "--download",
        action="store_true",
        help="download Places365 (256x256, about 26 GB) into --data-root first",
    )
    g.add_argument(
        "--image-size",
        type=positive_int,
        help="side in pixels the images are resized to "
        f"(default: sample {DATASET_DEFAULTS['sample']['image_size']}, "
        f"places365 {DATASET_DEFAULTS['places365']['image_size']})",
    )
    g.add_argument(
        "--augment", action="store_true", help="random resized crop + horizontal flip on the training split"
    )
    g.add_argument(
        "--bad-images",
        choices=BAD_IMAGE_POLICIES,
        default="fail",
        help="an image file that cannot be decoded during training: 'fail' stops the run "
        "at once, naming the file and its list line (no retries); 'skip' leaves it "
        "out, logs its path and counts it in metrics.csv's skipped_images "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--no-check-files",
        dest="check_files",
        action="store_false",
        help="before training, check only the list files, not that every listed image "
        "exists and is non-empty (a stat per file: for slow network filesystems)",
    )
    g.add_argument(
        "--sample-difficulty",
        choices=SAMPLE_DIFFICULTIES,
        default="easy",
        help="sample dataset: 'easy' (8 distinct scene kinds; about 99%% with any recipe) "
        "or 'hard' (16 look-alike categories with occlusion, zoom, colour changes "
        "and noise: where training recipes differ) (default: %(default)s)",
    )
    g.add_argument(
        "--sample-classes",
        type=positive_int,
        help="sample dataset: number of classes, 2-8 easy, 2-16 hard (default: all: "
        f"{SAMPLE_CLASSES['easy']} easy, {SAMPLE_CLASSES['hard']} hard)",
    )
    g.add_argument(
        "--sample-train-per-class",
        type=positive_int,
        default=150,
        help="sample dataset: training images per class (default: %(default)s)",
    )
    g.add_argument(
        "--sample-val-per-class",
        type=positive_int,
        default=40,
        help="sample dataset: validation images per class (default: %(default)s)",
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and optimisation")
    g.add_argument(
        "--model",
        choices=MODELS,
        default="deepcnn",
        help="deepcnn: conv-BN-ReLU-pool stages + fc1(1024) + fc2; workshop: the "
        "workshop's two conv layers (64, 128), corrected; resnet18: torchvision's, "
        "random init (default: %(default)s)",
    )
    g.add_argument(
        "--widths",
        type=int_list,
        default=(32, 64, 128, 256),
        help="deepcnn: channels of each conv stage, e.g. 32,64,128,256 (the default)",
    )
    g.add_argument(
        "--epochs",
        type=positive_int,
        help="epochs (default: sample "
        f"{DATASET_DEFAULTS['sample']['epochs']}, places365 "
        f"{DATASET_DEFAULTS['places365']['epochs']})",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        help="GLOBAL batch size, split evenly across the "
        "workers so results do not depend on the worker count (default: sample "
        f"{DATASET_DEFAULTS['sample']['batch_size']}, places365 "
        f"{DATASET_DEFAULTS['places365']['batch_size']})",
    )
    g.add_argument(
        "--lr",
        type=lr_value,
        help="peak learning rate of SGD, or 'auto': run the LR "
        "range test (rayjobs/lr_find.py) first and train with its suggestion. Default: "
        f"the model's lr per {REFERENCE_BATCH} images ("
        + ", ".join(f"{m} {lr:g}" for m, lr in MODEL_LR.items())
        + ") x batch size / 256 (the linear scaling rule; see docs/recipe.md)",
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="default: %(default)s")
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="LR decay after the warmup, evaluated every step: cosine to 0, step (/10 at "
        "50%% and 75%% of the steps) or none (default: %(default)s)",
    )
    warm = g.add_mutually_exclusive_group()
    warm.add_argument(
        "--warmup-steps",
        type=non_negative_int,
        help="linear LR warmup over this many optimizer steps (default: 5%% of all "
        "steps, at least 50 (at most a fifth of the run), at most 5000)",
    )
    warm.add_argument(
        "--warmup-epochs",
        type=non_negative_int,
        default=0,
        help="linear LR warmup over this many epochs instead",
    )
    g.add_argument(
        "--clip-grad-norm",
        type=positive_float,
        metavar="MAX",
        help="clip the global gradient norm to MAX before every step (default: off)",
    )
    g.add_argument(
        "--no-amp", action="store_true", help="GPU: train in fp32 instead of bf16/fp16 mixed precision"
    )
    g.add_argument(
        "--no-channels-last",
        action="store_true",
        help="GPU: keep NCHW memory format instead of channels_last",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model: faster steps after a compile of a minute or "
        "more; worth it for long GPU runs (see docs/benchmarks.md)",
    )
    g.add_argument(
        "--loader-workers",
        type=non_negative_int,
        help="DataLoader processes per Ray worker (default: on GPU its CPUs minus one, "
        "on CPU one per 4 CPUs)",
    )
    g.add_argument(
        "--log-every",
        type=non_negative_int,
        default=0,
        help="progress line every N steps (default: 10 per epoch when an epoch has >= 100 steps)",
    )
    g.add_argument("--seed", type=int, default=0, help="default: %(default)s")


def data_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig from add_data_args' flags alone (the other fields at defaults)."""
    difficulty = getattr(args, "sample_difficulty", "easy")
    image_size = args.image_size or DATASET_DEFAULTS[args.dataset]["image_size"]
    return TrainConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        skip_verify=args.skip_verify,
        download=args.download,
        image_size=image_size,
        augment=args.augment,
        bad_images=getattr(args, "bad_images", "fail"),
        sample_difficulty=difficulty,
        sample_classes=args.sample_classes or SAMPLE_CLASSES[difficulty],
        sample_train_per_class=args.sample_train_per_class,
        sample_val_per_class=args.sample_val_per_class,
    ).validate()


def add_input_arg(p: argparse.ArgumentParser) -> None:
    """--input, for the commands that train under Ray (train.py, sweep.py)."""
    p.add_argument(
        "--input",
        choices=INPUTS,
        default="loader",
        help="how images reach the workers: loader = DataLoader processes on each "
        "worker's own CPUs; ray-data = Ray Data tasks decode on any node's CPUs, "
        "CPU-only nodes included, and stream batches to the workers (see "
        "docs/input.md) (default: %(default)s)",
    )
    p.add_argument(
        "--decode",
        choices=DECODES,
        default="auto",
        help="where --input loader decodes JPEGs: gpu = loader processes only read the "
        "files and each GPU worker decodes its batches with nvJPEG; cpu = in the "
        "loader processes; auto = gpu on GPU workers when the files are JPEGs "
        "(default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig from parsed flags, with per-dataset defaults filled in."""
    defaults = DATASET_DEFAULTS[args.dataset]

    def pick(name):
        value = getattr(args, name, None)
        return defaults[name] if value is None else value

    batch_size = pick("batch_size")
    lr = getattr(args, "lr", None)
    if lr is None or lr == "auto":  # "auto": a placeholder until the LR range test has run
        lr = default_lr(args.model, max(batch_size, 1))
    warmup_steps = getattr(args, "warmup_steps", None)
    return (
        data_config_from_args(args)
        .replace(
            model=args.model,
            widths=args.widths,
            epochs=pick("epochs"),
            batch_size=batch_size,
            lr=lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            schedule=args.schedule,
            warmup_steps=-1 if warmup_steps is None else warmup_steps,
            warmup_epochs=args.warmup_epochs,
            clip_grad_norm=getattr(args, "clip_grad_norm", None) or 0.0,
            amp=not args.no_amp,
            channels_last=not args.no_channels_last,
            compile=args.compile,
            loader_workers=args.loader_workers,
            input=getattr(args, "input", "loader"),
            decode=getattr(args, "decode", "auto"),
            log_every=args.log_every,
            seed=args.seed,
        )
        .validate()
    )


def lr_source(args: argparse.Namespace, cfg: TrainConfig) -> str:
    """Where the lr of ``cfg`` came from, for the line train.py prints before training."""
    if args.lr is not None and args.lr != "auto":
        return "--lr"
    return (
        f"{cfg.model} default {MODEL_LR[cfg.model]:g} per {REFERENCE_BATCH} images x "
        f"{cfg.batch_size}/{REFERENCE_BATCH}"
    )


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def ray_init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster in --address / RAY_ADDRESS, or start a local Ray.

    The package travels to the workers as a py_module, so ``python rayjobs/train.py`` works
    without installing the project and ``ray job submit --working-dir .`` works on any cluster.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Train 2.60 starts a PreemptionWatcher actor per run that only logs node drains (this
    # project does not read them) and makes the core worker warn about its restartable
    # constructor arguments on every run; off unless the user turns it on.
    env_vars = {PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0")}
    kwargs = dict(
        runtime_env={"py_modules": [str(PACKAGE_DIR)], "env_vars": env_vars},
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {e}") from None


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_cli(main: Callable[[], int | None], resumable: bool = False) -> None:
    """Run ``main``; a UserError becomes one line on stderr and exit 2, Ctrl-C or SIGTERM one line
    and exit 130 (``resumable``: the line says the same command resumes)."""
    prog = Path(sys.argv[0]).name
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        sys.exit(main() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted" + (": resume with the same command" if resumable else ""), file=sys.stderr
        )
        sys.exit(130)
