"""Command-line pieces shared by rayjobs/, tuning/ and serving/: flags, config from flags,
and the wrapper that turns a UserError into one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from .config import DATASET_DEFAULTS, DATASETS, MODELS, SCHEDULES, TrainConfig, UserError

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
    g.add_argument("--dataset", choices=DATASETS, default="sample",
                   help="'sample': the embedded sample scenes (generated on first use); "
                        "'places365': torchvision's Places365 (default: %(default)s)")
    g.add_argument("--data-root", help="dataset directory (places365: default "
                   "/scratch/datasets/places365; sample: cache base, default ~/.cache/placesnet/sample)")
    g.add_argument("--skip-verify", action="store_true",
                   help="load a Places365 copy whose list files differ from the official ones "
                        "(a subset or derived copy); the layout must still match")
    g.add_argument("--download", action="store_true",
                   help="download Places365 (256x256, about 26 GB) into --data-root first")
    g.add_argument("--image-size", type=positive_int,
                   help="side in pixels the images are resized to "
                        f"(default: sample {DATASET_DEFAULTS['sample']['image_size']}, "
                        f"places365 {DATASET_DEFAULTS['places365']['image_size']})")
    g.add_argument("--augment", action="store_true",
                   help="random resized crop + horizontal flip on the training split")
    g.add_argument("--sample-classes", type=positive_int, default=8,
                   help="sample dataset: number of classes, 2-8 (default: %(default)s)")
    g.add_argument("--sample-train-per-class", type=positive_int, default=150,
                   help="sample dataset: training images per class (default: %(default)s)")
    g.add_argument("--sample-val-per-class", type=positive_int, default=40,
                   help="sample dataset: validation images per class (default: %(default)s)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", choices=MODELS, default="deepcnn",
                   help="deepcnn: conv-BN-ReLU-pool stages + fc1(1024) + fc2; workshop: the "
                        "workshop's two conv layers (64, 128), corrected; resnet18: torchvision's, "
                        "random init (default: %(default)s)")
    g.add_argument("--widths", type=int_list, default=(32, 64, 128, 256),
                   help="deepcnn: channels of each conv stage, e.g. 32,64,128,256 (the default)")
    g.add_argument("--epochs", type=positive_int, help="epochs (default: sample "
                   f"{DATASET_DEFAULTS['sample']['epochs']}, places365 "
                   f"{DATASET_DEFAULTS['places365']['epochs']})")
    g.add_argument("--batch-size", type=int, help="GLOBAL batch size, split evenly across the "
                   "workers so results do not depend on the worker count (default: sample "
                   f"{DATASET_DEFAULTS['sample']['batch_size']}, places365 "
                   f"{DATASET_DEFAULTS['places365']['batch_size']})")
    g.add_argument("--lr", type=float, help="peak learning rate of SGD (default: sample "
                   f"{DATASET_DEFAULTS['sample']['lr']}, places365 {DATASET_DEFAULTS['places365']['lr']})")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="default: %(default)s")
    g.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="per-epoch LR schedule (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=non_negative_int, default=0,
                   help="linear LR warmup epochs (default: %(default)s)")
    g.add_argument("--no-amp", action="store_true",
                   help="GPU: train in fp32 instead of bf16/fp16 mixed precision")
    g.add_argument("--no-channels-last", action="store_true",
                   help="GPU: keep NCHW memory format instead of channels_last")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model: faster steps after a compile of a minute or "
                        "more; worth it for long GPU runs (see docs/benchmarks.md)")
    g.add_argument("--loader-workers", type=non_negative_int,
                   help="DataLoader processes per Ray worker (default: on GPU its CPUs minus one, "
                        "on CPU one per 4 CPUs)")
    g.add_argument("--log-every", type=non_negative_int, default=0,
                   help="progress line every N steps (default: 10 per epoch when an epoch has >= 100 steps)")
    g.add_argument("--seed", type=int, default=0, help="default: %(default)s")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A validated TrainConfig from parsed flags, with per-dataset defaults filled in."""
    defaults = DATASET_DEFAULTS[args.dataset]

    def pick(name):
        value = getattr(args, name, None)
        return defaults[name] if value is None else value

    return TrainConfig(
        dataset=args.dataset, data_root=args.data_root, skip_verify=args.skip_verify,
        download=args.download, image_size=pick("image_size"), augment=args.augment,
        sample_classes=args.sample_classes, sample_train_per_class=args.sample_train_per_class,
        sample_val_per_class=args.sample_val_per_class, model=args.model, widths=args.widths,
        epochs=pick("epochs"), batch_size=pick("batch_size"), lr=pick("lr"),
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, amp=not args.no_amp,
        channels_last=not args.no_channels_last, compile=args.compile, loader_workers=args.loader_workers,
        log_every=args.log_every, seed=args.seed,
    ).validate()


def ray_init(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster in --address / RAY_ADDRESS, or start a local Ray.

    The package travels to the workers as a py_module, so ``python rayjobs/train.py`` works
    without installing the project and ``ray job submit --working-dir .`` works on any cluster.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = dict(runtime_env={"py_modules": [str(PACKAGE_DIR)]}, logging_level=logging.WARNING,
                  log_to_driver=True)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {e}") from None


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main``; a UserError or Ctrl-C becomes one line on stderr and a non-zero exit."""
    prog = Path(sys.argv[0]).name
    try:
        sys.exit(main() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
