"""Everything that ties the Ray-free pieces to Ray Train: the per-worker loop, the trainer,
the callback that keeps metrics.csv/curves.png, and cluster resource checks."""

from __future__ import annotations

import json
import math
import logging
import os
import posixpath
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from .config import SCORE, Interrupted, TrainConfig, UserError

# Deliberately light: Ray's Train controller imports this module for every run. The worker loop
# (placesnet/worker.py: torchvision, the data pipeline) and pandas/matplotlib (run outputs) are
# imported where they are used.

METRICS_FILE, CURVES_FILE = "metrics.csv", "curves.png"
RESUME_HINT = "resume with the same command"


class StopOnUserErrors(DefaultFailurePolicy):
    """Ray Train's failure policy, except that a worker error that is the user's to fix
    (a :class:`UserError`: bad data, a corrupt checkpoint, a bad setting) ends the run at once: a
    restart would only meet it again. Lost workers and nodes still restart, up to --max-failures.

    (Ray 2.60 hands each worker's own exception to the policy in ``worker_failures``.)
    """

    def make_decision(self, training_failed_error) -> FailureDecision:
        failures = getattr(training_failed_error, "worker_failures", None) or {}
        if any(isinstance(e, UserError) for e in failures.values()):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error=training_failed_error)


class Trainer(ray.train.torch.TorchTrainer):
    """TorchTrainer with :class:`StopOnUserErrors` and a Ctrl-C / SIGTERM that ends in
    :class:`Interrupted` (exit 130, "resume with the same command") instead of Ray's own handler,
    which aborts the run but exits 1 with nothing said."""

    def _initialize_and_run_controller(self, **kwargs):
        kwargs["failure_policy"] = StopOnUserErrors(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**kwargs)

    _signal: str = "Ctrl-C"

    def fit(self):
        try:
            return super().fit()
        except KeyboardInterrupt:  # (Ray's get() lets only KeyboardInterrupt out of a handler)
            raise Interrupted(f"interrupted by {self._signal}: {RESUME_HINT}") from None

    def _register_sigint_handler(self, controller) -> None:
        def stop(signum, frame):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._signal = signal.Signals(signum).name
            try:  # stop the workers; the checkpoints already committed stay
                ray.get(controller.abort.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - the controller exits as it aborts
                pass
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)


def failure_message(error: "ray.train.TrainingFailedError") -> tuple[str, bool]:
    """(one line, is it the user's to fix) for a failed run: a worker's UserError verbatim, else
    the most telling line of Ray's error."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank, e in sorted(failures.items()):
        if isinstance(e, UserError):
            return str(e), True
    return last_line(error), False


@dataclass(frozen=True)
class Resources:
    """How the job is laid out on the cluster."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    placement_strategy: str = "PACK"  # SPREAD / STRICT_SPREAD put workers on different nodes

    def scaling_config(self) -> ray.train.ScalingConfig:
        return ray.train.ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                                       resources_per_worker={"CPU": self.cpus_per_worker,
                                                             **({"GPU": 1} if self.use_gpu else {})},
                                       placement_strategy=self.placement_strategy)


def alive_nodes() -> list[dict]:
    """Resources of every live node of the connected cluster."""
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def worker_slots(nodes: list[dict], cpus_per_worker: float, use_gpu: bool) -> list[int]:
    """How many workers of ``cpus_per_worker`` CPUs (+ 1 GPU each if ``use_gpu``) fit per node."""
    return [min(int(n.get("CPU", 0) // cpus_per_worker + 1e-9),
                int(n.get("GPU", 0)) if use_gpu else 10**9) for n in nodes]


def plan_resources(num_workers: int | None, gpu: bool | None, cpus_per_worker: float | None,
                   placement_strategy: str = "PACK", autoscale: bool = False,
                   ray_data: bool = False) -> Resources:
    """Pick GPU/CPU, the worker count (default: every GPU, or 2 on CPU) and CPUs per worker from
    what the connected cluster has, and refuse (with a UserError) a layout it can never place,
    instead of letting Ray wait for it forever. ``autoscale``: the cluster adds nodes on demand
    (cluster.yaml's GPU workers start at 0), so only the request itself is checked.

    ``ray_data`` (--input ray-data): Ray Data tasks of one CPU each decode the images, on CPUs
    the workers do not hold. By default a GPU worker then holds one CPU (it only drives its GPU)
    and CPU workers share three quarters of the cluster's CPUs; a layout that leaves Ray Data no
    whole CPU is refused (it would wait forever)."""
    nodes = alive_nodes()
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    total_cpus = sum(n.get("CPU", 0) for n in nodes)
    use_gpu = total_gpus > 0 if gpu is None else gpu
    if use_gpu and total_gpus == 0 and not autoscale:
        raise UserError("--gpu asked for GPUs but the cluster has none; drop --gpu, use --cpu, or "
                        "pass --autoscale if the cluster starts GPU nodes on demand")
    if num_workers is None:
        if autoscale:
            raise UserError("--autoscale needs an explicit --num-workers")
        num_workers = int(total_gpus) if use_gpu else 2
    if cpus_per_worker is None and ray_data:
        decoders = max(1, total_cpus // 4)  # as the DataLoader path: one CPU in four decodes
        cpus_per_worker = 1.0 if use_gpu else max(0.5, math.floor((total_cpus - decoders) / num_workers * 2) / 2)
    if cpus_per_worker is None:
        if use_gpu and total_gpus == 0:  # nodes yet to come: a modest data-loading share
            cpus_per_worker = 4.0
        elif use_gpu:  # a share of the CPUs next to each GPU, for data loading
            cpus_per_worker = float(max(1, min(8, int(total_cpus // max(total_gpus, 1)))))
        else:  # spread the cluster's CPUs over the workers
            cpus_per_worker = float(max(1, int(total_cpus // num_workers)))
    if cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker must be > 0, got {cpus_per_worker}")
    per_node = worker_slots(nodes, cpus_per_worker, use_gpu)
    placeable = (sum(1 for k in per_node if k) if placement_strategy == "STRICT_SPREAD"
                 else sum(per_node))
    if placeable < num_workers and not autoscale:
        what = f"{cpus_per_worker:g} CPU" + (" + 1 GPU" if use_gpu else "")
        raise UserError(
            f"cannot place {num_workers} workers of {what} each: the cluster ({len(nodes)} node(s), "
            f"{total_cpus:g} CPUs, {total_gpus:g} GPUs) fits only {placeable}; lower --num-workers"
            + " (or pass --autoscale if the cluster adds nodes on demand)"
            + ("" if use_gpu else " or --cpus-per-worker")
            + (" (STRICT_SPREAD: one worker per node)" if placement_strategy == "STRICT_SPREAD" else ""))
    spare = total_cpus - num_workers * cpus_per_worker
    if ray_data and spare < 1 and not autoscale:
        raise UserError(
            f"--input ray-data decodes images in Ray Data tasks of 1 CPU each, but {num_workers} "
            f"workers of {cpus_per_worker:g} CPU leave {max(spare, 0):g} of the cluster's "
            f"{total_cpus:g} CPUs; lower --cpus-per-worker or --num-workers, add a (CPU-only) node, "
            "or use --input loader")
    return Resources(num_workers, use_gpu, cpus_per_worker, placement_strategy)


def check_storage_writable(storage_path: str) -> None:
    """Write and delete a probe file under ``storage_path`` (a local path or a URI) from the
    driver, so an unwritable place fails in one line before anything starts, on any cluster size.
    (On clusters of 2+ nodes :func:`check_cluster_paths` also checks every node sees it.)"""
    from pyarrow import fs as pafs

    try:
        if "://" in storage_path:
            filesystem, base = pafs.FileSystem.from_uri(storage_path)
        else:
            filesystem, base = pafs.LocalFileSystem(), storage_path
        filesystem.create_dir(base, recursive=True)
        probe = posixpath.join(base, f".placesnet-write-check-{secrets.token_hex(4)}")
        with filesystem.open_output_stream(probe) as f:
            f.write(b"ok")
        filesystem.delete_file(probe)
    except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot write to --storage-path {storage_path}: {reason}") from None


def _sees(path: str, token: str | None) -> bool:
    """On one node: is ``path`` there (and, with ``token``, does it hold it)?"""
    if token is None:
        return os.path.exists(path)
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def _blind_nodes(nodes: list[dict], path: str, token: str | None = None) -> list[str]:
    """The nodes on which :func:`_sees` is false, as "ip (node id)"."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(path, token) for n in nodes]
    seen = ray.get(refs, timeout=120)
    return [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]


def check_cluster_paths(storage_path: str, data_root: Path | None = None) -> None:
    """On a multi-node cluster, refuse paths that some nodes do not see, before any worker starts.

    A local ``storage_path`` (or ``file://``) must be one shared filesystem: the driver writes a
    marker there and every live node must read it back. Ray's own marker check does not catch this
    reliably (each worker creates its own marker, and only rank 0 writes checkpoints), so without
    this a run may write checkpoints to one node's disk and fail later with a missing file.
    ``data_root`` (a Places365 copy) must exist on every node. s3:// and gs:// are shared by
    definition and are not probed.

    (Seen with Ray 2.60 on a two-node cluster and a head-local path: Ray's check fires only when
    rank 0 lands on the other node, after an epoch, with a traceback; Ray then restarts the group,
    and if rank 0 lands on the head the run "succeeds" with files on one disk only.)
    """
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    hint = ("on a multi-node cluster use s3://bucket/path, gs://bucket/path, or a shared filesystem "
            "(NFS, Lustre) mounted at the same path on every node")
    if "://" not in storage_path or storage_path.startswith("file://"):
        local = Path(storage_path.removeprefix("file://"))
        token = secrets.token_hex(16)
        try:
            local.mkdir(parents=True, exist_ok=True)
            marker = local / f".placesnet-shared-check-{token[:8]}"
            marker.write_text(token)
        except OSError as e:
            raise UserError(f"cannot write to --storage-path {storage_path}: {e.strerror or e}") from None
        try:
            blind = _blind_nodes(nodes, str(marker), token)
        finally:
            marker.unlink(missing_ok=True)
        if blind:
            raise UserError(f"--storage-path {storage_path} is not shared: {len(blind)} of {len(nodes)} "
                            f"nodes ({', '.join(blind)}) do not see files the driver writes there; {hint}")
    if data_root is not None:
        blind = _blind_nodes(nodes, str(data_root))
        if blind:
            raise UserError(f"--data-root {data_root} is missing on {len(blind)} of {len(nodes)} nodes "
                            f"({', '.join(blind)}): put Places365 on storage mounted at the same "
                            "path on every node (see the README, 'Running on a cluster')")


class RunOutputs(ray.train.UserCallback):
    """Keeps ``metrics.csv``, ``curves.png`` and ``tensorboard/`` in the run dir up to date after
    every epoch.

    Runs on the Train controller. The rows come from the history saved inside each checkpoint,
    so a restarted or resumed run rewrites a consistent file. Writes through the checkpoint's
    own filesystem, so it works for local, NFS and s3:// storage alike.
    """

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is None:
            return
        run_dir = posixpath.dirname(checkpoint.path)
        write_run_outputs(checkpoint.filesystem, run_dir, _checkpoint_meta(checkpoint)["history"],
                          title=posixpath.basename(run_dir))


def write_run_outputs(fs, run_dir: str, history: list[dict], title: str = "") -> None:
    """metrics.csv, curves.png and tensorboard/ (see placesnet/tensorboard.py) from ``history``."""
    from .tensorboard import TB_DIR, TB_FILE, event_file_bytes

    import pandas as pd

    from .plots import curves_png

    csv = pd.DataFrame(history).to_csv(index=False).encode()
    fs.create_dir(posixpath.join(run_dir, TB_DIR), recursive=True)
    for name, payload in ((METRICS_FILE, csv), (CURVES_FILE, curves_png(history, title)),
                          (f"{TB_DIR}/{TB_FILE}", event_file_bytes(history))):
        with fs.open_output_stream(posixpath.join(run_dir, name)) as f:
            f.write(payload)


def _log(message: str) -> None:
    # Ray Train patches print() to also feed its logger, which prints every line twice;
    # writing to the process's real stdout shows it once on the driver.
    print(message, file=sys.__stdout__, flush=True)


class _UserErrorTracebacks(logging.Filter):
    """Drops Ray's "Error in training function" traceback for a UserError raised in this worker
    (see :func:`_user_error`): the driver prints its one line, and a traceback of bad data or a
    corrupt checkpoint only hides it. Tracebacks of real bugs still show."""

    pending = False

    def filter(self, record: logging.LogRecord) -> bool:
        if _UserErrorTracebacks.pending and "Error in training function" in record.getMessage():
            _UserErrorTracebacks.pending = False
            return False
        return True


def _user_error(error: UserError) -> UserError:
    """Mark ``error`` as the user's before it leaves the training function (``raise _user_error(e)``)."""
    _UserErrorTracebacks.pending = True
    return error


def _quiet_ray_train() -> None:
    # Ray Train logs every report() at INFO ("Reporting training result ..."), a screenful per
    # epoch; LoggingConfig(log_level) does not reach that logger in 2.60, so quiet it here.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    util_logger = logging.getLogger("ray.train.v2._internal.util")
    if not any(isinstance(f, _UserErrorTracebacks) for f in util_logger.filters):
        util_logger.addFilter(_UserErrorTracebacks())
    try:  # that message's logger is named after its file path, not its module
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """Ray Train's per-worker function (see :func:`worker.train_worker`); a UserError leaves it
    as one line. The worker module is imported here, in the workers only."""
    from .worker import train_worker

    _quiet_ray_train()
    try:
        return train_worker(loop_config)
    except UserError as e:
        raise _user_error(e) from None


def run_lr_find(config: dict, data_root: str, cpus: float):
    """--lr auto's Ray task: :func:`lr_find.find_lr` with one training worker's resources."""
    from .data import LoaderPlan
    from .lr_find import find_lr
    from .worker import data_root_here

    cfg = TrainConfig.from_dict(config)
    device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
    plan = LoaderPlan.for_worker(cpus, device.type == "cuda", cfg.loader_workers)
    if device.type == "cpu":
        torch.set_num_threads(plan.threads)
    return find_lr(cfg, data_root_here(cfg, data_root), device, loader_workers=plan.workers)


def eval_loop_per_worker(loop_config: dict) -> dict | None:
    """Evaluate a checkpoint on this worker's shard; rank 0 returns the exact totals."""
    from .worker import eval_worker

    _quiet_ray_train()
    try:
        return eval_worker(loop_config)
    except UserError as e:
        raise _user_error(e) from None


def distributed_evaluate(checkpoint: Path, data_root: Path, resources: Resources, *, split: str,
                         batch_size: int, skip_verify: bool, storage_path: str | None = None,
                         mistakes: int = 0) -> dict:
    """Run :func:`eval_loop_per_worker` on ``resources.num_workers`` Ray Train workers.

    Ray Train needs a storage path even though nothing is checkpointed: by default a temporary
    directory that is removed afterwards (pass a shared one on a multi-node cluster).
    """
    if storage_path is None:
        with tempfile.TemporaryDirectory(prefix="placesnet-eval-") as tmp:
            return distributed_evaluate(checkpoint, data_root, resources, split=split,
                                        batch_size=batch_size, skip_verify=skip_verify,
                                        storage_path=tmp, mistakes=mistakes)
    trainer = Trainer(
        eval_loop_per_worker,
        train_loop_config={"checkpoint": str(checkpoint), "data_root": str(data_root),
                           "split": split, "batch_size": batch_size, "skip_verify": skip_verify,
                           "cpus_per_worker": resources.cpus_per_worker, "mistakes": mistakes},
        scaling_config=resources.scaling_config(),
        run_config=ray.train.RunConfig(name=f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                       storage_path=storage_path,
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    try:
        result = trainer.fit().return_value
    except ray.train.TrainingFailedError as e:
        message, users = failure_message(e)
        raise UserError(message if users else f"evaluation failed: {message}") from None
    result["confusion"] = torch.tensor(result["confusion"], dtype=torch.int64)
    return result


def diverged(result: "ray.train.Result") -> str | None:
    """The message of a run whose loss became NaN or infinite, None for one that trained on."""
    value = getattr(result, "return_value", None)
    return value.get("diverged") if isinstance(value, dict) else None


def last_line(error: BaseException) -> str:
    """The most telling line of a (worker) error: its last non-empty one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def make_trainer(cfg: TrainConfig, data_root: Path, resources: Resources, *, storage_path: str,
                 name: str, max_failures: int, keep: int, fail_after_epoch: int | None = None,
                 diverge_at_epoch: int | None = None, callbacks: list | None = None) -> "ray.train.torch.TorchTrainer":
    """A TorchTrainer for ``cfg``; the same storage_path/name resumes an earlier run."""
    loop_config = {
        "config": cfg.to_dict(),
        "data_root": str(data_root),
        "cpus_per_worker": resources.cpus_per_worker,
    }
    if fail_after_epoch:
        loop_config.update(fail_after_epoch=fail_after_epoch,
                           fail_marker=str(Path(storage_path) / name / ".fault_injected"))
    if diverge_at_epoch:
        loop_config["diverge_at_epoch"] = diverge_at_epoch
    data = {}
    if cfg.input == "ray-data":  # Ray Data decodes on the cluster's CPUs (placesnet/raydata.py)
        from .raydata import ExactValDataConfig, build_datasets

        data = dict(datasets=build_datasets(cfg, data_root), dataset_config=ExactValDataConfig())
    return Trainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=resources.scaling_config(),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep, checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=[RunOutputs(), *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        **data,
    )


def _checkpoint_meta(checkpoint: "ray.train.Checkpoint") -> dict:
    """meta.json of a checkpoint on any storage (local, NFS, s3://) through its filesystem."""
    with checkpoint.filesystem.open_input_stream(posixpath.join(checkpoint.path, "meta.json")) as f:
        return json.loads(f.read())


def _uri(checkpoint: "ray.train.Checkpoint") -> str:
    """An absolute local path, or the URI of a checkpoint on remote storage."""
    if checkpoint.filesystem.type_name == "local":
        return str(Path(checkpoint.path).resolve())
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"


def summarize(result: "ray.train.Result", storage_path: str, name: str) -> tuple[dict, list[dict]]:
    """summary.json content for a finished fit (written next to the checkpoints, on any storage),
    and the metrics history."""
    run_dir = f"{storage_path.rstrip('/')}/{name}"
    best = result.get_best_checkpoint(SCORE, "max")
    if best is None or result.checkpoint is None:
        raise UserError(f"the run in {run_dir} produced no checkpoint")
    best_meta, latest_meta = _checkpoint_meta(best), _checkpoint_meta(result.checkpoint)
    summary = {
        "run_dir": run_dir,
        "best_checkpoint": _uri(best),
        "best_epoch": best_meta["metrics"]["epoch"],
        "val_top1": best_meta["metrics"]["val_top1"],
        "val_top5": best_meta["metrics"]["val_top5"],
        "val_loss": best_meta["metrics"]["val_loss"],
        "latest_checkpoint": _uri(result.checkpoint),
        "epochs_completed": latest_meta["metrics"]["epoch"],
        "classes": best_meta["classes"],
        "metrics_csv": f"{run_dir}/{METRICS_FILE}",
        "curves_png": f"{run_dir}/{CURVES_FILE}",
        "tensorboard_dir": f"{run_dir}/tensorboard",
        "summary_json": f"{run_dir}/summary.json",
    }
    fs = result.checkpoint.filesystem
    with fs.open_output_stream(posixpath.join(posixpath.dirname(result.checkpoint.path),
                                              "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    return summary, latest_meta["history"]
