"""Training recipe: the project's default recipe vs a plain PyTorch reference, on data where
recipes differ.

    python benchmarks/recipe.py                        # every row (about 15 min on 2 CPU cores)
    python benchmarks/recipe.py --rows hard32-few      # one row
    python benchmarks/recipe.py --lrs 0.01,0.02,0.05,0.1,0.2   # + val top-1 of each lr per 256
    python benchmarks/recipe.py --model workshop --lrs 0.005,0.01,0.02,0.05
    python benchmarks/recipe.py --rows easy32-few --seeds 4     # the mean of 4 seeds per cell
    python benchmarks/recipe.py --rows hard32-few --lr-find     # + the LR range test's suggestions
    python benchmarks/recipe.py --rows easy32-few --seeds 4 \
        --variant label_smoothing=0.1 --variant schedule=none

Each row trains, on the same files and in this process (no Ray):
- **defaults**: ``--model`` (deepcnn) exactly as ``rayjobs/train.py`` would with no --lr: SGD +
  Nesterov, the model's lr per 256 images scaled to the row's batch, per-step warmup + cosine
  (``engine.fit``: the training step and epoch functions of a Ray Train worker);
- **reference**: a plain small CNN (3 conv-BN-ReLU-pool stages, global average pool, linear) with
  Adam at lr 1e-3 and batch 64, the settings of a typical PyTorch tutorial, for the same epochs.

It prints val top-1 of both and their ratio (goal: >= 1.00 on every row), and the first epoch's
mean train loss over the first step's loss (goal: <= 1, no blow-up). The **before** columns are
the recipe this project had until 2026-11-28 (what `--dataset places365` ran: lr 0.1 whatever the
batch, no warmup, cosine stepped per epoch). ``--lrs`` adds one column per
lr (per 256 images, scaled to the row's batch): the table behind ``MODEL_LR`` in
placesnet/config.py. Rows mix the easy and hard sample data, 32 and 64 px, short and long runs,
and few (batch 256) and many (batch 32) steps per epoch. Images are decoded once per dataset and
kept in memory, so every run sees identical tensors.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
from common import print_table
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from placesnet.config import MODEL_LR, MODELS, REFERENCE_BATCH, SAMPLE_CLASSES, TrainConfig, default_lr
from placesnet.data.loaders import drop_last_batch
from placesnet.data.places import class_names, open_split, resolve_data_root
from placesnet.model import build_model
from placesnet.train import engine, optim

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Row:
    name: str
    difficulty: str
    image_size: int
    epochs: int
    batch_size: int
    train_per_class: int = 150
    val_per_class: int = 40


ROWS = [
    Row("easy32-few", "easy", 32, 8, 256),  # the failure the issue reported: 4 steps per epoch
    Row("easy64-demo", "easy", 64, 8, 64),  # make demo's settings
    Row("hard32-few", "hard", 32, 8, 256),
    Row("hard32-many", "hard", 32, 8, 32),
    Row("hard32-long", "hard", 32, 30, 64),
    Row("hard64", "hard", 64, 8, 64),
]
QUICK = [Row("quick-easy", "easy", 16, 2, 32, 12, 4), Row("quick-hard", "hard", 16, 2, 32, 6, 2)]


class ReferenceCNN(nn.Module):
    """A plain small CNN as a tutorial would write it: 3 x (conv-BN-ReLU-pool), GAP, linear."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        layers, channels = [], 3
        for width in (32, 64, 128):
            layers += [
                nn.Conv2d(channels, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def load(row: Row, cache: dict) -> tuple[TensorDataset, TensorDataset, int]:
    """The row's sample data as uint8 tensors, read once through torchvision's Places365."""
    key = (row.difficulty, row.image_size, row.train_per_class, row.val_per_class)
    if key not in cache:
        cfg = TrainConfig(
            sample_difficulty=row.difficulty,
            sample_classes=SAMPLE_CLASSES[row.difficulty],
            sample_train_per_class=row.train_per_class,
            sample_val_per_class=row.val_per_class,
            image_size=row.image_size,
        )
        root = resolve_data_root(cfg)
        splits = []
        for split in ("train", "val"):
            ds = open_split(cfg, split, root)
            images, targets = zip(*(ds[i] for i in range(len(ds))))
            splits.append(TensorDataset(torch.stack(images), torch.tensor(targets)))
        cache[key] = (*splits, len(class_names(open_split(cfg, "val", root))))
    return cache[key]


def loaders(train, val, batch_size: int, seed: int, always_drop_last: bool = False):
    """Shuffled training batches, left out the last partial one as the project's train loader
    does (``always_drop_last``: as it did before 2026-11-28, whatever its size)."""
    g = torch.Generator().manual_seed(seed)
    drop = len(train) >= batch_size if always_drop_last else drop_last_batch(len(train), batch_size)
    return (DataLoader(train, batch_size, shuffle=True, drop_last=drop, generator=g), DataLoader(val, 256))


def run_defaults(
    row: Row, data, model_name: str, lr: float | None = None, seed: int = 0, changes: dict | None = None
) -> dict:
    """The project's recipe (train.py with no --lr, or with ``lr``; ``changes``: other TrainConfig
    fields), in this process."""
    train, val, classes = data
    cfg = TrainConfig(
        model=model_name,
        image_size=row.image_size,
        epochs=row.epochs,
        batch_size=row.batch_size,
        lr=lr or default_lr(model_name, row.batch_size),
        seed=seed,
    )
    cfg = cfg.replace(**(changes or {})).validate()
    torch.manual_seed(seed)
    model = build_model(cfg, classes)
    history = list(
        engine.fit(model, *loaders(train, val, row.batch_size, seed), cfg, CPU, num_classes=classes)
    )
    return summary(history, cfg.lr)


def plain_epochs(
    model, optimizer, train_loader, val_loader, epochs: int, classes: int, per_epoch_scheduler=None
) -> list[dict]:
    """A loop without the project's recipe: train and evaluate each epoch, step an optional
    per-epoch scheduler."""
    history = []
    for epoch in range(1, epochs + 1):
        stats = engine.train_one_epoch(model, train_loader, optimizer, CPU, epoch=epoch)
        if per_epoch_scheduler is not None:
            per_epoch_scheduler.step()
        history.append({**stats, **engine.evaluate(model, val_loader, CPU, num_classes=classes)})
    return history


def run_before(row: Row, data, model_name: str, seed: int = 0) -> dict:
    """The recipe before 2026-11-28, as `train.py --dataset places365` ran it on a user's data:
    lr 0.1 whatever the batch size, no warmup, cosine stepped once per epoch."""
    train, val, classes = data
    cfg = TrainConfig(
        model=model_name,
        image_size=row.image_size,
        epochs=row.epochs,
        batch_size=row.batch_size,
        lr=0.1,
        seed=seed,
    )
    torch.manual_seed(seed)
    model = build_model(cfg, classes)
    optimizer = optim.build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, CPU)
    per_epoch = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / row.epochs))
    )
    history = plain_epochs(
        model,
        optimizer,
        *loaders(train, val, row.batch_size, seed, always_drop_last=True),
        row.epochs,
        classes,
        per_epoch,
    )
    return summary(history, cfg.lr)


def run_reference(row: Row, data, seed: int = 0) -> dict:
    """The plain PyTorch loop: ReferenceCNN, Adam(1e-3), batch 64, no schedule."""
    train, val, classes = data
    torch.manual_seed(seed)
    model = ReferenceCNN(classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = plain_epochs(model, optimizer, *loaders(train, val, 64, seed), row.epochs, classes)
    return summary(history, 1e-3)


def finder(row: Row, model_name: str) -> dict:
    """The LR range test's suggestion by each rule, as an lr per 256 images (comparable with the
    --lrs columns)."""
    from placesnet.train.lr_find import SUGGESTIONS, find_lr

    cfg = TrainConfig(
        model=model_name,
        sample_difficulty=row.difficulty,
        sample_classes=SAMPLE_CLASSES[row.difficulty],
        sample_train_per_class=row.train_per_class,
        sample_val_per_class=row.val_per_class,
        image_size=row.image_size,
        batch_size=row.batch_size,
    )
    result = find_lr(cfg, resolve_data_root(cfg), CPU)
    return {
        f"finder {rule}/256": SUGGESTIONS[rule](result.lrs, result.smoothed)
        * REFERENCE_BATCH
        / row.batch_size
        for rule in SUGGESTIONS
    }


def mean(runs: list[dict]) -> dict:
    """The mean of each value over the seeds, but the worst (largest) first-epoch loss rise."""
    out = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    out["rise"] = max(r["rise"] for r in runs)
    return out


def summary(history: list[dict], lr: float) -> dict:
    first = history[0]
    return {
        "val_top1": history[-1]["val_top1"],
        "best_val_top1": max(h["val_top1"] for h in history),
        "rise": first["train_loss"] / first["first_step_loss"],
        "lr": lr,
    }


def variant(text: str) -> tuple[str, dict]:
    """'label_smoothing=0.1,schedule=none' -> (the text, {field: value typed like the default})."""
    import argparse as _argparse
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    changes = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise _argparse.ArgumentTypeError(f"expected FIELD=VALUE with a TrainConfig field, got {item!r}")
        kind = type(getattr(defaults, key))
        changes[key] = kind(value) if kind in (int, float, str) else value
    return text, changes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="deepcnn", help="default: %(default)s")
    p.add_argument(
        "--rows", help="comma-separated row names (default: all: " + ", ".join(r.name for r in ROWS) + ")"
    )
    p.add_argument("--lrs", help="also train at these lrs per 256 images, e.g. 0.01,0.02,0.05")
    p.add_argument("--quick", action="store_true", help="tiny rows (16 px, 2 epochs): a smoke test")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per cell with seeds 0..N-1; cells show the mean (default: %(default)s)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        type=variant,
        metavar="FIELD=VALUE[,...]",
        help="also train the defaults with these TrainConfig fields changed, one column "
        "per --variant, e.g. --variant label_smoothing=0.1 --variant schedule=none",
    )
    p.add_argument(
        "--lr-find",
        action="store_true",
        help="also run the LR range test per row: each rule's suggestion per 256 images",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = QUICK if args.quick else ROWS
    if args.rows:
        wanted = args.rows.split(",")
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown:
            p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in wanted]
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else []
    cache, table, start = {}, [], time.perf_counter()
    for row in rows:
        data = load(row, cache)
        steps = len(loaders(data[0], data[1], row.batch_size, 0)[0])
        seeds = range(max(args.seeds, 1))
        ours = mean([run_defaults(row, data, args.model, seed=s) for s in seeds])
        ref = mean([run_reference(row, data, seed=s) for s in seeds])
        before = mean([run_before(row, data, args.model, seed=s) for s in seeds])
        line = {
            "row": row.name,
            "data": f"{row.difficulty} {row.image_size}px",
            "epochs": row.epochs,
            "batch": row.batch_size,
            "steps/epoch": steps,
            "lr": ours["lr"],
            "defaults top-1": ours["val_top1"],
            "reference top-1": ref["val_top1"],
            "ratio": f"{ours['val_top1'] / max(ref['val_top1'], 1e-9):.2f}",
            "ep1 loss/start": f"{ours['rise']:.2f}",
            "ref ep1 loss/start": f"{ref['rise']:.2f}",
            "before top-1": before["val_top1"],
            "before ep1 loss/start": f"{before['rise']:.2f}",
        }
        for lr in lrs:
            line[f"lr {lr:g}/256"] = mean(
                [
                    run_defaults(row, data, args.model, lr * row.batch_size / REFERENCE_BATCH, seed=s)
                    for s in seeds
                ]
            )["val_top1"]
        for name, changes in args.variant:
            line[name] = mean([run_defaults(row, data, args.model, seed=s, changes=changes) for s in seeds])[
                "val_top1"
            ]
        if args.lr_find:
            line.update(finder(row, args.model))
        table.append(line)
        print(f"  {row.name}: {line} ({time.perf_counter() - start:.0f} s so far)", flush=True)
    print_table(
        f"Recipe: {args.model} defaults ({MODEL_LR[args.model]:g} per {REFERENCE_BATCH} images, "
        "warmup + cosine per step) vs plain reference (small CNN, Adam 1e-3, batch 64)",
        table,
        note=f"top-1: val top-1 after the last epoch (mean of {max(args.seeds, 1)} seed(s)); "
        "ratio: defaults / reference (goal >= 1.00); "
        "ep1 loss/start: first epoch's mean train loss / first step's loss (goal <= 1); "
        "before: the recipe before 2026-11-28 (lr 0.1 at any batch, no warmup, per-epoch cosine).",
    )


if __name__ == "__main__":
    main()
