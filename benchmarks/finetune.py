"""Fine-tuning: a model trained on the easy sample, trained on to the hard sample (train.py
--init-from), against the same training from random weights, for the same epochs.

    python benchmarks/finetune.py                     # 32 px: 8 easy epochs, then 2 hard epochs per row
    python benchmarks/finetune.py --epochs 4 --seeds 3
    python benchmarks/finetune.py --quick             # 16 px, fewer images: a smoke test

In this process, without Ray, on the tensors benchmarks/recipe.py decodes once: the easy model is
trained with the project's default recipe (``engine.fit``) and saved as a checkpoint; each row then
trains ``--model`` on the hard sample (16 look-alike classes, so the easy model's 8-class head is
replaced by a new one) with the default recipe, as ``train.py --sample-difficulty hard`` would:

- **from scratch**: random weights;
- **--init-from**: the easy checkpoint's weights, every layer at the lr (``finetune.load_init``,
  what each Ray Train worker runs);
- **--backbone-lr-mult 0.1**: the same, the layers below the head at a tenth of the lr;
- **--freeze-backbone**: the same, only the new head trains.

It prints val top-1 after each epoch (the mean over ``--seeds``) and each row's gain over from
scratch after the last epoch (goal: the --init-from rows ahead after 2 epochs).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import print_table
from recipe import CPU, Row, load, loaders

from placesnet.checkpoint import save_checkpoint
from placesnet.config import MODELS, TrainConfig, default_lr, recipe_of
from placesnet.finetune import load_init
from placesnet.model import build_model
from placesnet.train import engine

# (row, TrainConfig changes): the ways the hard model starts, as train.py's flags set them
STARTS = [
    ("from scratch", None),
    ("--init-from", {}),
    ("--init-from --backbone-lr-mult 0.1", {"backbone_lr_mult": 0.1}),
    ("--init-from --freeze-backbone", {"freeze_backbone": True}),
]


def train(row: Row, data, model_name: str, seed: int, init: Path | None = None, changes=None):
    """``model_name`` trained on ``row``'s data with the default recipe (``changes``: other
    TrainConfig fields), from random weights or from checkpoint ``init``: (model, history)."""
    train_set, val_set, classes = data
    cfg = TrainConfig(
        model=model_name,
        image_size=row.image_size,
        epochs=row.epochs,
        batch_size=row.batch_size,
        lr=default_lr(recipe_of(model_name), row.batch_size),
        seed=seed,
        init_from=str(init) if init else None,
        **(changes or {}),
    ).validate()
    torch.manual_seed(seed)
    model = build_model(cfg, classes)
    if init is not None:
        names = [str(i) for i in range(classes)]  # not the easy model's: a new head, as easy -> hard
        load_init(model, str(init), names)
    history = list(
        engine.fit(model, *loaders(train_set, val_set, row.batch_size, seed), cfg, CPU, num_classes=classes)
    )
    return model, history


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="deepcnn", help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=2, help="epochs on the hard sample (default: %(default)s)")
    p.add_argument(
        "--pretrain-epochs", type=int, default=8, help="epochs on the easy sample (default: %(default)s)"
    )
    p.add_argument("--image-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--seeds", type=int, default=1, help="runs per row, seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="16 px, 12 and 6 images per class: a smoke test")
    args = p.parse_args(argv)
    size, per_class = (16, (12, 4)) if args.quick else (args.image_size, (150, 40))
    easy = Row("easy", "easy", size, args.pretrain_epochs, args.batch_size, *per_class)
    hard = Row("hard", "hard", size, args.epochs, args.batch_size, *per_class)
    cache, start = {}, time.perf_counter()
    easy_data, hard_data = load(easy, cache), load(hard, cache)
    seeds = range(max(args.seeds, 1))
    tops = {name: [[0.0] * args.epochs for _ in seeds] for name, _ in STARTS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            model, history = train(easy, easy_data, args.model, seed)
            init = save_checkpoint(
                Path(tmp) / f"easy-{seed}",
                model=model,
                config=TrainConfig(model=args.model, image_size=size),
                classes=[f"easy{i}" for i in range(easy_data[2])],
                epoch=args.pretrain_epochs - 1,
                metrics=history[-1],
                history=history,
            )
            print(f"  seed {seed}: easy val top-1 {history[-1]['val_top1']:.3f}", flush=True)
            for name, changes in STARTS:
                _, history = train(
                    hard, hard_data, args.model, seed, None if changes is None else init, changes
                )
                tops[name][seed] = [h["val_top1"] for h in history]
                print(
                    f"  seed {seed}: {name}: {tops[name][seed]} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    table = []
    scratch = sum(t[-1] for t in tops["from scratch"]) / len(seeds)
    for name, _ in STARTS:
        means = [sum(t[e] for t in tops[name]) / len(seeds) for e in range(args.epochs)]
        line = {"start": name, **{f"epoch {e + 1} top-1": v for e, v in enumerate(means)}}
        line["vs scratch"] = f"{means[-1] - scratch:+.3f}"
        table.append(line)
    print_table(
        f"Fine-tuning: {args.model} on the hard sample ({hard_data[2]} classes, {size} px, batch "
        f"{args.batch_size}, default lr), from random weights or from {args.pretrain_epochs} epochs on "
        f"the easy sample ({easy_data[2]} classes)",
        table,
        note=f"val top-1 after each epoch, the mean of {len(seeds)} seed(s); vs scratch: the last "
        f"epoch's top-1 minus from scratch's; {time.perf_counter() - start:.0f} s in all",
    )


if __name__ == "__main__":
    main()
