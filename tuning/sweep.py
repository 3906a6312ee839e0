r"""Sweep batch size and learning rate over DeepCNN with Ray Tune; ASHA stops bad trials early.

Every trial is a full Ray Train run (it can itself be multi-GPU DDP) on the same data and model
options as rayjobs/train.py.

    # random search: 8 samples, batch size from a list, lr log-uniform in [0.005, 0.5]
    python tuning/sweep.py --num-samples 8 --batch-sizes 32,64,128 --lr-min 0.005 --lr-max 0.5
    # grid: every (batch size, lr) pair
    python tuning/sweep.py --grid --batch-sizes 32,64 --lrs 0.01,0.05,0.2 --epochs 6
    # lr per 256 images: batch 64 trains at lr/4, batch 512 at 2 x lr
    python tuning/sweep.py --batch-sizes 64,128,256,512 --lr-min 0.02 --lr-max 0.4 --scale-lr 256
    # on a GPU cluster, 2 GPUs per trial, as a job (token auth: docs/clusters.md)
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python tuning/sweep.py \
        --dataset places365 --data-root /shared/places365 --workers-per-trial 2 --gpus-per-worker 1 \
        --storage-path /shared/ray_results --name places-sweep

Writes <storage-path>/<name>/: results.csv (a row per trial), best.json (the best trial's config,
val top-1/top-5 and absolute best_checkpoint: serve it with
`serve run serving.app:build_app checkpoint=<name>/best.json`), sweep.png. Re-running with the same
--storage-path/--name resumes an interrupted sweep without re-running finished trials.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time

from placesnet.cli import (
    add_train_args,
    positive_int,
    ray_init,
    run_cli,
    worker_count,
    worker_range,
)
from placesnet.config import DEFAULT_STORAGE, Interrupted, UserError
from placesnet.finetune import config_from_init


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    g = p.add_argument_group("search space")
    g.add_argument(
        "--batch-sizes",
        type=int_list,
        default=[32, 64, 128],
        help="global batch sizes to choose from (default: 32,64,128)",
    )
    g.add_argument(
        "--lr-min", type=float, default=0.005, help="log-uniform lr lower bound (default: %(default)s)"
    )
    g.add_argument(
        "--lr-max", type=float, default=0.5, help="log-uniform lr upper bound (default: %(default)s)"
    )
    g.add_argument("--num-samples", type=int, default=8, help="random-search trials (default: %(default)s)")
    g.add_argument(
        "--grid",
        action="store_true",
        help="try every (batch size, lr) pair of --batch-sizes x --lrs instead of sampling",
    )
    g.add_argument("--lrs", type=float_list, default=[], help="learning rates for --grid, e.g. 0.01,0.05,0.2")
    g.add_argument(
        "--scale-lr",
        type=int,
        metavar="REF",
        help="the searched learning rates are for a global batch of REF images; each "
        "trial trains with lr x batch size / REF (the linear scaling rule), so one "
        "lr range suits every batch size (default: off, lr as given)",
    )
    g = p.add_argument_group("early stopping")
    g.add_argument(
        "--scheduler",
        choices=["asha", "none"],
        default="asha",
        help="ASHA stops trials whose val top-1 trails at a rung (default: %(default)s)",
    )
    g.add_argument(
        "--grace-period",
        type=positive_int,
        default=1,
        help="epochs every trial runs before it can be stopped (default: %(default)s)",
    )
    g.add_argument(
        "--reduction-factor",
        type=float,
        default=2,
        help="ASHA keeps 1/reduction-factor of the trials at each rung (default: %(default)s)",
    )
    g = p.add_argument_group("resources and outputs")
    g.add_argument(
        "--workers-per-trial",
        type=worker_count,
        metavar="N|MIN-MAX",
        default=1,
        help="Ray Train workers (DDP ranks) per trial; MIN-MAX: elastic trials that go on with "
        "fewer when a node is lost and grow back (default: %(default)s)",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=int,
        choices=[0, 1],
        default=None,
        help="1: one GPU per worker (default: 1 when the cluster has GPUs)",
    )
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs per worker, fractions allowed (default: %(default)s)",
    )
    g.add_argument(
        "--max-concurrent",
        type=positive_int,
        help="trials at once (default: as many as the cluster can place)",
    )
    g.add_argument(
        "--autoscale",
        action="store_true",
        help="the cluster starts nodes on demand: skip the placement check and run "
        "--max-concurrent trials at a time",
    )
    g.add_argument("--storage-path", default=DEFAULT_STORAGE, help="default: %(default)s")
    g.add_argument("--name", help="sweep name; the same name resumes it (default: sweep-<date>-<time>)")
    g.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument(
        "--verbose",
        action="store_true",
        help="Tune's own progress tables (default: one line per trial event: started, "
        "each epoch's val top-1, finished / stopped early / errored)",
    )
    return p.parse_args(argv)


def check_space(args) -> None:
    """Every bad search-space value is refused before any trial starts."""
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
    most = worker_range(args.workers_per_trial)[1]
    if min(args.batch_sizes) < most:
        raise UserError(f"batch size {min(args.batch_sizes)} is smaller than {most} workers per trial")
    if args.cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if args.autoscale and not args.max_concurrent:
        raise UserError("--autoscale needs --max-concurrent: the trials the cluster can grow to hold")
    if args.scale_lr is not None and args.scale_lr < 1:
        raise UserError(f"--scale-lr must be a batch size >= 1, got {args.scale_lr}")
    if args.lr == "auto":
        raise UserError(
            "--lr auto is for rayjobs/train.py: a sweep searches the lr itself "
            "(--lr-min/--lr-max, or --grid --lrs)"
        )
    if args.reduction_factor <= 1:
        raise UserError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    if args.grid:
        if not args.lrs:
            raise UserError("--grid needs --lrs (and --batch-sizes): the grid has no pairs")
        if min(args.lrs) <= 0:
            raise UserError(f"--lrs must be > 0, got {args.lrs}")
    else:
        if not (0 < args.lr_min < args.lr_max):
            raise UserError(f"need 0 < --lr-min < --lr-max, got [{args.lr_min}, {args.lr_max}]")
        if args.num_samples < 1:
            raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")


@contextlib.contextmanager
def stop_on_signals():
    """Ctrl-C or SIGTERM during ``tuner.fit()``: Tune stops the trials and saves its state (its
    SIGUSR1 handler does that), and the yielded list records the signal, so the sweep does not
    report an unfinished search as done. Tune's own SIGINT handler would hide the interruption."""
    stopped: list[str] = []

    def stop(signum, frame):
        if stopped:  # a second signal: stop at once
            raise KeyboardInterrupt
        stopped.append(signal.Signals(signum).name)
        print(
            f"{signal.Signals(signum).name}: stopping the trials; results so far go to results.csv",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGUSR1)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_space(args)
    cfg = config_from_init(args)  # --init-from: every trial starts from that checkpoint

    from placesnet.launch.driver import setup_driver
    from placesnet.launch.sweep import make_tuner, plan_sweep, search_space

    # Storage, --name and the data are checked before Ray starts (placesnet/launch/driver.py).
    name = args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    driver = setup_driver(cfg, storage_path=args.storage_path, name=name, check_files=args.check_files)
    cfg, storage, root = driver.cfg, driver.storage, driver.root

    ray_init(args.address)
    driver.check_cluster()  # on a multi-node cluster: every node sees the storage and the data
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    use_gpu = bool(has_gpu if args.gpus_per_worker is None else args.gpus_per_worker)
    plan = plan_sweep(
        args.workers_per_trial,
        use_gpu,
        args.cpus_per_worker,
        args.max_concurrent,
        args.autoscale,
        ray_data=cfg.input == "ray-data",
    )
    if args.grid:
        space = search_space(args.batch_sizes, lrs=args.lrs)
        num_samples, count = 1, len(args.batch_sizes) * len(args.lrs)
    else:
        space = search_space(args.batch_sizes, lr_range=(args.lr_min, args.lr_max))
        num_samples = count = args.num_samples
    print(
        f"sweep {name}: {count} trial(s) of {cfg.epochs} epoch(s), {plan.max_concurrent} at a "
        f"time, each {plan.resources.workers_label()} worker(s) x ({args.cpus_per_worker:g} CPU"
        f"{' + 1 GPU' if use_gpu else ''}), scheduler {args.scheduler}"
    )
    tuner = make_tuner(
        cfg,
        root,
        plan,
        storage=storage,
        name=name,
        param_space=space,
        num_samples=num_samples,
        scheduler=args.scheduler,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        scale_lr=args.scale_lr,
        verbose=args.verbose,
    )
    with stop_on_signals() as stopped:
        grid = tuner.fit()

    _report_sweep(grid, storage, name, cfg, args.scale_lr, stopped, count)
    return 0


def _report_sweep(
    grid, storage, name: str, cfg, scale_lr: int | None, stopped: list[str], count: int
) -> None:
    """results.csv, sweep.png and (for a sweep that was not interrupted) best.json into the sweep's
    directory, through the storage's filesystem (``storage``: a driver.Storage), and the table,
    the best trial and where everything is on stdout. The paths printed are local ones where the
    storage is on this machine, so ``serve run`` can read what the last line names."""
    from placesnet.launch.driver import serve_command
    from placesnet.launch.sweep import (
        PLOT_FILE,
        RESULTS_FILE,
        best_record,
        collect_results,
        write_best,
        write_results,
    )

    table = collect_results(grid, storage, name, cfg.epochs, scale_lr, interrupted=bool(stopped))
    write_results(storage, name, table)
    results = storage.readable(storage.fs_path(name, RESULTS_FILE))
    if stopped:
        done = int((table["status"] != "interrupted").sum())
        print(
            "\n"
            + table[["trial_id", "batch_size", "lr", "best_val_top1", "status"]].to_string(
                index=False, float_format=lambda v: f"{v:.4g}"
            )
        )
        print(f"results so far: {results}")
        raise Interrupted(
            f"interrupted by {stopped[0]} with {done} of {count} trial(s) done: resume with the same command"
        )
    best = best_record(table, cfg)
    best_json = write_best(storage, name, best)

    shown = table[
        [
            "trial_id",
            "batch_size",
            "lr",
            *(["train_lr"] if scale_lr else []),
            "epochs_run",
            "best_val_top1",
            "best_val_top5",
            "final_train_loss",
            "status",
        ]
    ]
    print("\n" + shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    scaled = f" (trained at {best['train_lr']:.4g})" if scale_lr else ""
    print(
        f"\nbest: batch {best['batch_size']}, lr {best['lr']:.4g}{scaled}: val top-1 {best['val_top1']:.4f}, "
        f"top-5 {best['val_top5']:.4f}"
    )
    print(f"best checkpoint: {best['best_checkpoint']}")
    print(f"results:         {results}")
    print(f"best:            {storage.readable(best_json)}")
    print(f"plot:            {storage.readable(storage.fs_path(name, PLOT_FILE))}")
    print(f"serve it:        {serve_command(storage, best_json, best['best_checkpoint'])}")


if __name__ == "__main__":
    run_cli(main, resumable=True)
