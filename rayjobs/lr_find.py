"""Find a learning rate: the LR range test (Smith, 2015), as fastai's and Lightning's lr_find.

    # the embedded sample data, in this process (a GPU if there is one), about a minute on a CPU:
    python rayjobs/lr_find.py
    # what train.py would train on Places365 (same flags), with the global batch on one GPU:
    python rayjobs/lr_find.py --dataset places365 --data-root /scratch/datasets/places365 --batch-size 256
    # or let training run it first and use its suggestion:
    python rayjobs/train.py --lr auto ...

A fresh model trains for --steps steps while the lr grows exponentially from --min-lr to --max-lr;
the run stops once the smoothed loss is 4x its minimum. It prints the suggested lr (by default
Lightning's: where the smoothed loss falls fastest; --suggest valley for fastai's, minimum for
the lowest loss / 10; docs/recipe.md compares them) and writes lr_find.png (loss against lr on a log
axis, the suggestion marked) and lr_find.csv to --out. The suggestion is the PEAK lr for that
model, batch size and optimizer: train with `--lr <suggestion>` and the same --batch-size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from placesnet.cli import (
    add_data_args,
    add_model_args,
    config_from_args,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
)
from placesnet.config import DEFAULT_STORAGE, UserError


def add_finder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LR range test")
    g.add_argument("--min-lr", type=positive_float, default=1e-5, help="default: %(default)s")
    g.add_argument("--max-lr", type=positive_float, default=10.0, help="default: %(default)s")
    g.add_argument(
        "--steps",
        type=positive_int,
        default=100,
        help="optimizer steps at most (the data is cycled if needed; default: %(default)s)",
    )
    g.add_argument(
        "--suggest",
        choices=["steepest", "valley", "minimum"],
        default="steepest",
        help="steepest: where the smoothed loss falls fastest (Lightning's); valley: "
        "fastai's; minimum: the lowest loss's lr / 10 (default: %(default)s)",
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p)
    add_model_args(p)
    add_finder_args(p)
    g = p.add_argument_group("where")
    g.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: the GPU if there is one (default: %(default)s)",
    )
    g.add_argument(
        "--workers", type=non_negative_int, default=0, help="DataLoader processes (default: %(default)s)"
    )
    g.add_argument(
        "--out",
        help="directory for lr_find.png and lr_find.csv (default: "
        f"{DEFAULT_STORAGE}/lr_find-<model>-<dataset>-<date>-<time>)",
    )
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.lr is not None:
        raise UserError("--lr is what this finds; leave it out")
    if not args.min_lr < args.max_lr:
        raise UserError(f"need --min-lr < --max-lr, got {args.min_lr} >= {args.max_lr}")
    cfg = config_from_args(args)
    if cfg.init_from:
        raise UserError(
            "--init-from: the LR range test starts from random weights; "
            "for a run from a checkpoint give train.py --lr"
        )
    import torch

    from placesnet.data.places import resolve_data_root
    from placesnet.data.validate import check_dataset
    from placesnet.train.lr_find import find_lr, write_outputs

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this machine has no CUDA GPU")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    out = (
        Path(
            args.out
            or Path(DEFAULT_STORAGE) / f"lr_find-{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        .expanduser()
        .resolve()
    )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    root = resolve_data_root(cfg)
    print(
        check_dataset(root, ("train",), files=args.check_files), file=sys.stderr if args.json else sys.stdout
    )
    result = find_lr(
        cfg,
        root,
        device,
        loader_workers=args.workers,
        min_lr=args.min_lr,
        max_lr=args.max_lr,
        steps=args.steps,
        suggest=args.suggest,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(result, lambda name, data: (out / name).write_bytes(data))
    if args.json:
        print(
            json.dumps(
                {
                    "suggestion": result.suggestion,
                    "stopped_early": result.stopped_early,
                    "steps_run": len(result.lrs),
                    "plot": str(out / "lr_find.png"),
                    "csv": str(out / "lr_find.csv"),
                }
            )
        )
        return 0
    print(
        f"LR range test: {cfg.model}, batch {cfg.batch_size}, {len(result.lrs)} steps from "
        f"{result.lrs[0]:.2g} to {result.lrs[-1]:.3g} on {device}"
        + ("" if result.stopped_early else " (the loss never diverged: try a larger --max-lr)")
    )
    print(
        f"suggested lr: {result.suggestion:.4g}   (train with --lr {result.suggestion:.3g} "
        f"--batch-size {cfg.batch_size}, or let train.py do this with --lr auto)"
    )
    print(f"plot:         {out / 'lr_find.png'}")
    print(f"losses:       {out / 'lr_find.csv'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
