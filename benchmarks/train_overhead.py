"""Ray Train overhead: steady-state images/s of one Ray Train worker vs a plain PyTorch loop.

    python benchmarks/train_overhead.py                      # sample data, local Ray, 2 CPUs
    python benchmarks/train_overhead.py --epochs 6 --cpus 4 --address auto

Both runs use the same model, data, batch size, DataLoader settings and thread count
(``LoaderPlan`` for --cpus CPUs) and the same epoch functions: the Ray side is the real
``rayjobs/train.py`` trainer (TorchTrainer, per-epoch report + checkpoint), the plain side calls
``engine.train_one_epoch``/``evaluate`` in this process. Steady state = the median of epochs 2..N
(epoch 1 pays start-up). The plain loop runs before and after Ray; the faster of the two is the
baseline, so machine drift cannot flatter Ray.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import print_table, ratio
from torch.utils.data import DataLoader

from placesnet.config import TrainConfig
from placesnet.data.loaders import LoaderPlan
from placesnet.data.places import class_names, open_split, resolve_data_root
from placesnet.model import build_model
from placesnet.train import engine

CPU = torch.device("cpu")


def plain_loop(cfg: TrainConfig, root, cpus: int) -> list[dict]:
    """The per-worker loop without Ray: same data, model, optimiser and epoch code."""
    plan = LoaderPlan.for_worker(cpus, on_gpu=False, workers=cfg.loader_workers)
    torch.set_num_threads(plan.threads)
    torch.manual_seed(cfg.seed)
    train, val = open_split(cfg, "train", root), open_split(cfg, "val", root)
    classes = class_names(train)
    train_loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train) >= cfg.batch_size,
        **plan.kwargs(),
    )
    val_loader = DataLoader(val, batch_size=cfg.batch_size * 2, **plan.kwargs())
    model = build_model(cfg, len(classes))
    history, t0 = [], time.perf_counter()
    for row in engine.fit(model, train_loader, val_loader, cfg, CPU, num_classes=len(classes)):
        history.append({**row, "epoch_time_s": time.perf_counter() - t0})  # with its evaluation
        t0 = time.perf_counter()
    return history


def ray_loop(cfg: TrainConfig, root, cpus: int) -> list[dict]:
    """One Ray Train worker running the project's own train_loop_per_worker."""
    from placesnet.launch.outputs import summarize
    from placesnet.launch.resources import Resources
    from placesnet.launch.trainer import make_trainer

    with tempfile.TemporaryDirectory(prefix="placesnet-bench-") as storage:
        trainer = make_trainer(
            cfg,
            root,
            Resources(1, False, float(cpus)),
            storage_path=storage,
            name="overhead",
            max_failures=0,
            keep=1,
        )
        result = trainer.fit()
        return summarize(result, storage, "overhead")[1]


def steady(history: list[dict], key: str) -> float:
    values = [row[key] for row in history[1:]] or [history[0][key]]
    return statistics.median(values)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="a running Ray cluster (default: start a local one)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the one worker (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=4, help="default: %(default)s")
    p.add_argument("--image-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    p.add_argument("--widths", default="32,64,128,256", help="default: %(default)s")
    p.add_argument("--sample-classes", type=int, default=8, help="default: %(default)s")
    p.add_argument("--sample-train-per-class", type=int, default=150, help="default: %(default)s")
    args = p.parse_args(argv)
    cfg = TrainConfig(
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        widths=tuple(int(w) for w in args.widths.split(",")),
        sample_classes=args.sample_classes,
        sample_train_per_class=args.sample_train_per_class,
        sample_val_per_class=max(args.sample_train_per_class // 4, 1),
    ).validate()
    root = resolve_data_root(cfg)

    from placesnet.cli import ray_init

    ray_init(args.address, num_cpus=None if args.address else args.cpus)
    runs = {"plain (before)": plain_loop(cfg, root, args.cpus)}
    runs["ray train"] = ray_loop(cfg, root, args.cpus)
    runs["plain (after)"] = plain_loop(cfg, root, args.cpus)
    base = max(steady(runs["plain (before)"], "images_per_s"), steady(runs["plain (after)"], "images_per_s"))
    rows = [
        {
            "loop": name,
            "epochs": len(h),
            "steady train images/s": steady(h, "images_per_s"),
            "vs plain": ratio(steady(h, "images_per_s"), base),
            "steady epoch s (train+val)": steady(h, "epoch_time_s"),
            "final val_top1": h[-1]["val_top1"],
        }
        for name, h in runs.items()
    ]
    print_table(
        f"train_overhead: 1 worker, {args.cpus} CPUs, {cfg.image_size} px, batch "
        f"{cfg.batch_size}, {len(open_split(cfg, 'train', root))} train images",
        rows,
        note="goal: ray train >= 0.95x plain (baseline: the faster plain run)",
    )


if __name__ == "__main__":
    main()
