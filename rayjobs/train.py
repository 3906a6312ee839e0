r"""Train DeepCNN for scene classification with Ray Train (PyTorch DDP on every worker).

    # embedded sample scenes, a local Ray started for you (2 CPU workers, a few minutes):
    python rayjobs/train.py
    # the real Places365 (256x256 'small' images) on 4 GPUs of a running cluster:
    python rayjobs/train.py --dataset places365 --data-root /scratch/datasets/places365 \
        --num-workers 4 --gpu --storage-path /shared/ray_results --name places-deepcnn
    # as a Ray job (token auth on: the CLI needs RAY_AUTH_MODE=token, docs/clusters.md):
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python rayjobs/train.py --num-workers 2

Writes <storage-path>/<name>/: Ray's checkpoints (best --keep-checkpoints by val top-1, plus the
latest), metrics.csv, curves.png and summary.json. Running again with the same --storage-path and
--name resumes from the latest checkpoint (and can extend --epochs).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from placesnet.cli import (
    add_train_args,
    lr_source,
    positive_float,
    positive_int,
    ray_init,
    run_cli,
    worker_count,
    worker_range,
)
from placesnet.config import ARCHITECTURE as WEIGHT_SHAPE
from placesnet.config import DEFAULT_STORAGE, TrainConfig, UserError
from placesnet.finetune import config_from_init

# Fields that decide the shape of the weights or the images the model takes (an --init-from
# model's own transform), and those that decide the optimizer's parameter groups whose state a
# run resumes (--init-from's fine-tuning): a resumed run must not change them.
ARCHITECTURE = ("dataset", *WEIGHT_SHAPE, "preprocess", "sample_difficulty", "sample_classes")
GROUPS = ("freeze_backbone", "backbone_lr_mult")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    g = p.add_argument_group("cluster and outputs")
    g.add_argument(
        "--num-workers",
        type=worker_count,
        metavar="N|MIN-MAX",
        help="Ray Train workers (DDP ranks), one GPU each on GPUs (default: every GPU of "
        "the cluster; 2 on CPU). MIN-MAX: an elastic run on as many as fit, at least MIN; it goes "
        "on with fewer when a node is lost and grows when one joins (docs/reliability.md)",
    )
    g.add_argument(
        "--grow-check-s",
        type=positive_float,
        default=60.0,
        help="an elastic run looks for room to grow this often; it grows after the next epoch "
        "(default: %(default)s)",
    )
    dev = g.add_mutually_exclusive_group()
    dev.add_argument(
        "--gpu",
        dest="gpu",
        action="store_true",
        default=None,
        help="train on GPUs (default: when the cluster has any)",
    )
    dev.add_argument("--cpu", dest="gpu", action="store_false", help="train on CPUs only")
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs reserved per worker, fractions allowed (default: the cluster's CPUs "
        "split over the workers; with GPUs, its CPUs per GPU up to 8)",
    )
    g.add_argument(
        "--placement-strategy",
        choices=["PACK", "SPREAD", "STRICT_SPREAD"],
        default="PACK",
        help="where workers go: PACK fills nodes, STRICT_SPREAD puts each on its own node "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--autoscale",
        action="store_true",
        help="the cluster starts nodes on demand (cluster.yaml): skip the check that the "
        "workers fit on the nodes running now, and wait for new ones instead",
    )
    g.add_argument(
        "--storage-path",
        default=DEFAULT_STORAGE,
        help="where runs are kept; shared (NFS or s3://) on a multi-node cluster (default: %(default)s)",
    )
    g.add_argument(
        "--name", help="run name; the same name resumes that run (default: <model>-<dataset>-<date>-<time>)"
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="worker-group restarts from the latest checkpoint after a crash; -1: "
        "unlimited (default: %(default)s)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=positive_int,
        default=2,
        help="checkpoints kept, the best by val top-1 (the latest is always kept too) (default: %(default)s)",
    )
    g.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    g.add_argument(
        "--fail-after-epoch",
        type=positive_int,
        help="fault-injection test: one worker process exits once after this epoch; "
        "the run must recover from its latest checkpoint",
    )
    g.add_argument(
        "--diverge-at-epoch",
        type=positive_int,
        help="fault-injection test: the loss becomes NaN in this epoch; the run must "
        "stop without restarts and keep the epochs before",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_init(args)  # --init-from: that checkpoint's architecture, verified now
    if args.num_workers:  # early: before data or Ray work
        check_batch(cfg.batch_size, worker_range(args.num_workers, cfg.input == "ray-data")[1])
    if cfg.decode == "gpu" and args.gpu is False:
        raise UserError("--decode gpu decodes on the workers' GPUs, but --cpu trains on CPUs")

    # Imports that pull in Ray and torch come after argument checks, so --help and typos are fast.
    from placesnet.data.places import class_names
    from placesnet.launch.driver import setup_driver
    from placesnet.launch.outputs import summarize
    from placesnet.launch.resources import node_addresses, plan_resources
    from placesnet.launch.trainer import RESUME_HINT, diverged, failure_message, make_trainer

    # Storage, --name and the data are checked before Ray starts (placesnet/launch/driver.py).
    name = args.name or f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    driver = setup_driver(cfg, storage_path=args.storage_path, name=name, check_files=args.check_files)
    cfg, storage, root, run_label = driver.cfg, driver.storage, driver.root, driver.label
    classes = class_names(driver.train_ds)

    resume = driver.resume()
    previous = resume.config if resume else None
    source = lr_source(args, cfg)
    if previous:
        before = TrainConfig.from_dict(previous)  # a run from before a field: its default
        changed = [k for k in (*ARCHITECTURE, *GROUPS) if getattr(before, k) != getattr(cfg, k)]
        if changed:
            raise UserError(
                f"{run_label} holds a run with a different {', '.join(changed)}; "
                "resume it with the same settings or pick a new --name"
            )
        print(f"resuming run {run_label} from {resume.checkpoint.name} (epoch {resume.epoch})")
        if cfg.init_from:  # the weights are the run's own; its record keeps where it started
            print(
                f"--init-from is not applied again: the run goes on from its own checkpoint "
                f"(it started from {previous.get('init_from') or 'random weights'})"
            )
            cfg = cfg.replace(init_from=previous.get("init_from"))
        if args.lr == "auto":  # the schedule continues: keep the lr the range test found before
            cfg, source = cfg.replace(lr=previous["lr"]), "--lr auto, found when the run started"

    ray_init(args.address)
    driver.check_cluster()  # on a multi-node cluster: every node sees the storage and the data
    import ray.train

    res = plan_resources(
        args.num_workers,
        args.gpu,
        args.cpus_per_worker,
        args.placement_strategy,
        args.autoscale,
        ray_data=cfg.input == "ray-data",
        grow_check_s=args.grow_check_s,
    )
    started = node_addresses()  # to name the nodes lost, if the run cannot go on
    check_batch(cfg.batch_size, res.num_workers)
    if cfg.decode == "gpu" and not res.use_gpu:
        raise UserError(
            "--decode gpu decodes on the workers' GPUs, but this run trains on CPUs; "
            "drop --decode gpu or train with --gpu"
        )
    if args.lr == "auto" and not previous:
        cfg, source = find_lr_on_cluster(cfg, root, res, storage, name), "--lr auto: LR range test"
    print(
        f"training {cfg.model} on {len(classes)} classes: {res.workers_label()} worker(s)"
        f"{' (elastic)' if res.elastic else ''} x "
        f"({res.cpus_per_worker:g} CPU{' + 1 GPU' if res.use_gpu else ''}), global batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs, {cfg.image_size}px"
    )
    print(
        f"lr {cfg.lr:.4g} ({source}), warmup + {cfg.schedule} per step"
        + (f", gradient norm clipped to {cfg.clip_grad_norm:g}" if cfg.clip_grad_norm else "")
    )
    if cfg.init_from and not previous:
        print(f"from {cfg.init_from}: {describe_fine_tuning(cfg)}")
    trainer = make_trainer(
        cfg,
        root,
        res,
        storage_path=storage.storage_path,
        name=name,
        max_failures=args.max_failures,
        keep=args.keep_checkpoints,
        fail_after_epoch=args.fail_after_epoch,
        diverge_at_epoch=args.diverge_at_epoch,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        message, users = failure_message(e)
        if users:  # the same data or checkpoint would fail again: no restarts were spent on it
            raise UserError(f"{message} (run dir: {run_label}; fix it and {RESUME_HINT})") from None
        lost = cluster_loss(e, res, started, name, args)
        if lost:
            raise UserError(f"{lost} (run dir: {run_label})") from None
        raise UserError(
            f"training failed after {args.max_failures} restart(s): {message} "
            f"(run dir: {run_label}; {RESUME_HINT})"
        ) from None

    message = diverged(result)
    if message:
        if result.checkpoint is None:
            raise UserError(f"{message} (run dir: {run_label}; no epoch finished, so no checkpoint)")
        # The epochs before are sound: their summary, metrics.csv and curves, as after a full run.
        summary, _ = summarize(result, storage.uri, name)  # metrics.csv and curves are up to date
        done = summary["epochs_completed"]
        kept = "epoch 1 is kept" if done == 1 else f"epochs 1-{done} are kept"
        raise UserError(
            f"{message} (run dir: {run_label}; {kept}, the best checkpoint is {summary['best_checkpoint']})"
        )
    summary, history = summarize(result, storage.uri, name)
    _print_results(summary, history, storage, name)
    return 0


def cluster_loss(error, res, started: dict[str, str], name: str, args) -> str | None:
    """One line for a run that ended because the cluster lost nodes or cannot place its workers
    (a placement time-out): what was lost, what it waited for, what is left, and the command
    that resumes. None for other failures."""
    from placesnet.launch.resources import describe_cluster, lost_nodes, workers_that_fit
    from placesnet.launch.trainer import placement_timeout

    lost, timeout = lost_nodes(started), placement_timeout(error)
    if not lost and timeout is None:
        return None
    what = f"{res.cpus_per_worker:g} CPU{' + 1 GPU' if res.use_gpu else ''} each"
    least = f", the least of {res.workers_label()}" if res.elastic else ""
    if timeout is not None:
        head = f"cannot place {timeout.num_workers} workers ({res.placement_strategy}, {what}{least})"
    else:
        head = (
            f"training failed after {args.max_failures} restart(s) of {res.workers_label()} workers ({what})"
        )
    nodes = f"lost node{'s' if len(lost) > 1 else ''} {', '.join(lost)}" if lost else "no node was lost"
    fits = workers_that_fit(res)
    again = resume_command(name)
    resume = f"resume with `{again}` when the cluster has room again"
    if 0 < fits < res.fewest:  # the same run on what is left: a fixed size, or a range from there
        now = str(fits) if not res.elastic else f"{fits}-{res.num_workers}"
        resume += f", or now on {fits}: `{resume_command(name, num_workers=now)}`"
    return f"{head}: {nodes}; the cluster now has {describe_cluster(res)}; {resume}"


def resume_command(name: str, num_workers: int | str | None = None, argv: list[str] | None = None) -> str:
    """This command line again, with ``--name`` (a default name is new each time) and optionally
    another ``--num-workers``."""
    import shlex
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    out, i = [], 0
    while i < len(args):
        flag = args[i].split("=", 1)[0]
        if flag in ("--name", "--num-workers") and (flag == "--name" or num_workers is not None):
            i += 1 if "=" in args[i] else 2  # dropped here, added below
            continue
        out.append(args[i])
        i += 1
    out += ["--name", name]
    if num_workers is not None:
        out += ["--num-workers", str(num_workers)]
    return shlex.join(["python", sys.argv[0], *out])


def find_lr_on_cluster(cfg, root: Path, res, storage, name: str):
    """--lr auto: the LR range test on one worker's resources (a GPU when training uses GPUs);
    writes lr_find.png/.csv into the run dir (``storage``: a driver.Storage) and returns ``cfg``
    with the suggested lr."""
    import ray

    from placesnet.launch.trainer import run_lr_find
    from placesnet.train.lr_find import PNG_FILE, write_outputs

    print(f"--lr auto: running the LR range test on one worker (global batch {cfg.batch_size})")
    task = ray.remote(run_lr_find).options(
        num_cpus=res.cpus_per_worker, num_gpus=1 if res.use_gpu else 0, max_retries=0
    )
    try:
        result = ray.get(task.remote(cfg.to_dict(), str(root), res.cpus_per_worker))
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), UserError) else None
        raise UserError(str(cause) if cause else f"the LR range test failed: {e}") from None
    write_outputs(result, lambda file, data: storage.write(data, name, file))
    print(
        f"LR range test: {len(result.lrs)} steps up to lr {result.lrs[-1]:.3g}; suggested lr "
        f"{result.suggestion:.4g} (plot: {storage.label(name, PNG_FILE)})"
    )
    return cfg.replace(lr=result.suggestion)


def describe_fine_tuning(cfg) -> str:
    """What --freeze-backbone / --backbone-lr-mult make of a run started --init-from a checkpoint."""
    if cfg.freeze_backbone:
        return "the classifier head trains, the other layers are frozen (--freeze-backbone)"
    if cfg.backbone_lr_mult != 1.0:
        return (
            f"the classifier head trains at lr {cfg.lr:.4g}, the other layers at "
            f"{cfg.lr * cfg.backbone_lr_mult:.4g} (--backbone-lr-mult {cfg.backbone_lr_mult:g})"
        )
    return "every layer trains at the lr"


def check_batch(batch_size: int, num_workers: int) -> None:
    if batch_size < num_workers:
        raise UserError(
            f"--batch-size {batch_size} is smaller than --num-workers {num_workers}: "
            "every worker needs at least one sample per step"
        )
    # (a batch that does not divide by the workers is split into shares one image apart, each
    # share's loss weighted by its size: data.loaders.GlobalBatches; nothing to say about it)


def _print_results(summary: dict, history: list[dict], storage, name: str) -> None:
    """The epoch table, the best epoch, and where the outputs are: the commands (TensorBoard,
    Serve) name local paths when the storage is on this machine (``storage``: a driver.Storage)."""
    import pandas as pd

    from placesnet.launch.driver import serve_command, tensorboard_command

    cols = [
        "epoch",
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "val_top5",
        "images_per_s",
        "epoch_time_s",
        "lr",
    ]
    print("\n" + pd.DataFrame(history)[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    skipped = max((int(row.get("skipped_images", 0)) for row in history), default=0)
    if skipped:
        print(
            f"\nnote: {skipped} image(s) per epoch could not be decoded and were skipped "
            "(--bad-images skip; their paths are in the log, the counts in metrics.csv)"
        )
    print(
        f"\nbest val top-1 {summary['val_top1']:.4f} (top-5 {summary['val_top5']:.4f}) at epoch "
        f"{summary['best_epoch']} of {summary['epochs_completed']}; "
        f"chance is {1 / len(summary['classes']):.4f}"
    )
    print(f"best checkpoint: {summary['best_checkpoint']}")
    print(f"metrics:         {summary['metrics_csv']}")
    print(f"curves:          {summary['curves_png']}")
    print(f"tensorboard:     {tensorboard_command(storage, name)}")
    print(f"summary:         {summary['summary_json']}")
    print(f"serve it:        {serve_command(storage, storage.fs_path(name), summary['best_checkpoint'])}")


if __name__ == "__main__":
    run_cli(main, resumable=True)
