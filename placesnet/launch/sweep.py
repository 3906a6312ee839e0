"""Ray Tune sweeps over batch size and learning rate, each trial a full Ray Train run.

Train V2 pattern: every trial runs :func:`trial_driver`, which builds and fits a TorchTrainer
(so a trial may itself be multi-GPU DDP) and forwards its reports to Tune with
``TuneReportCallback``; ASHA stops weak trials early on val top-1. Trial Train runs live in
``<storage>/<name>/train/<trial_id>``; Tune's own state in ``<storage>/<name>/``. The sweep's
outputs are read and written through the storage's pyarrow filesystem (:class:`Storage`), as Ray
does, so local paths, ``file://`` and ``s3://`` work alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from pyarrow import fs as pafs
from ray import tune

from placesnet.checkpoint import META_FILE
from placesnet.config import METRIC, METRIC_MODE, TrainConfig, UserError, checkpoint_score
from placesnet.launch.resources import Resources, alive_nodes, worker_range, worker_slots
from placesnet.launch.trainer import diverged, make_trainer
from placesnet.train.engine import TrainingDiverged

if TYPE_CHECKING:
    from placesnet.launch.driver import Storage

# An elastic trial restarts this often after a lost worker (on fewer); a fixed one errors at once
# (the sweep goes on without it).
ELASTIC_TRIAL_RESTARTS = 2
DRIVER_CPU = 0.01  # a trial's driver only waits on its TorchTrainer; its workers hold the CPUs


@dataclass(frozen=True)
class SweepPlan:
    resources: Resources  # per trial
    max_concurrent: int


def plan_sweep(
    workers_per_trial: int | tuple[int, int],
    use_gpu: bool,
    cpus_per_worker: float,
    max_concurrent: int | None,
    autoscale: bool = False,
    ray_data: bool = False,
) -> SweepPlan:
    """How many trials can run at once on the connected cluster; refuse what can never fit.

    Concurrency is capped so that every running trial's workers can be placed: Tune would
    otherwise start drivers whose TorchTrainers wait for workers forever. On an autoscaling
    cluster (``autoscale``) the nodes are not there yet: --max-concurrent sets it instead.
    With ``ray_data`` (--input ray-data) every running trial also needs a CPU its workers do not
    hold, for its Ray Data decode tasks. An elastic ``(min, max)`` per trial: as many trials as
    can start with ``max`` workers each (a trial shrinks when a node is lost, and grows back).
    """
    min_workers, workers_per_trial = worker_range(workers_per_trial, ray_data)
    resources = Resources(
        workers_per_trial, use_gpu, cpus_per_worker, autoscale=autoscale, min_workers=min_workers
    )
    if autoscale:
        if not max_concurrent:
            raise UserError("--autoscale needs --max-concurrent: the trials the cluster can grow to hold")
        return SweepPlan(resources, max_concurrent)
    nodes = alive_nodes()
    if use_gpu and not any(n.get("GPU", 0) >= 1 for n in nodes):
        raise UserError("--gpus-per-worker 1 asked for GPUs but no node of the cluster has one")
    slots = sum(worker_slots(nodes, cpus_per_worker, use_gpu))  # workers placeable at once
    fits = slots // workers_per_trial
    total_cpus = sum(n.get("CPU", 0) for n in nodes)
    per_trial = workers_per_trial * cpus_per_worker + DRIVER_CPU + (1 if ray_data else 0)
    fits = min(fits, int((total_cpus + 1e-9) // per_trial))
    if fits < 1:
        what = f"{workers_per_trial} worker(s) x ({cpus_per_worker:g} CPU{' + 1 GPU' if use_gpu else ''})"
        what += " + 1 CPU for Ray Data" if ray_data else ""
        raise UserError(
            f"one trial needs {what}, more than the cluster ({len(nodes)} node(s), "
            f"{total_cpus:g} CPUs) can place; lower --workers-per-trial or --cpus-per-worker"
        )
    if max_concurrent:
        fits = min(fits, max_concurrent)
    return SweepPlan(resources, fits)


def train_lr(lr: float, batch_size: int, scale_lr: int | None) -> float:
    """The lr a trial trains with: the searched ``lr`` as is, or, with ``scale_lr`` (a reference
    batch size), scaled linearly with the batch size (Goyal et al., 2017)."""
    return lr * batch_size / scale_lr if scale_lr else lr


def trial_config(tune_config: dict, base: dict) -> TrainConfig:
    """The TrainConfig of one trial: the base config with its batch size and (scaled) lr."""
    batch_size = int(tune_config["batch_size"])
    lr = train_lr(float(tune_config["lr"]), batch_size, base.get("scale_lr"))
    return TrainConfig.from_dict({**base["config"], "batch_size": batch_size, "lr": lr})


def trial_driver(tune_config: dict, base: dict) -> None:
    """One Tune trial: a Ray Train run of the base config with this trial's batch size and lr."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = trial_config(tune_config, base)
    trial_id = tune.get_context().get_trial_id()
    resources = Resources(**base["resources"])
    trainer = make_trainer(
        cfg,
        Path(base["data_root"]),
        resources,
        storage_path=base["train_storage"],
        name=trial_id,
        max_failures=ELASTIC_TRIAL_RESTARTS if resources.elastic else 0,
        keep=1,
        callbacks=[TuneReportCallback()],
    )
    message = diverged(trainer.fit())
    if message:  # the trial errors (results.csv says why); the sweep goes on
        raise TrainingDiverged(message)


class TrialEvents(tune.Callback):
    """One line per trial event on the driver, in place of Tune's progress tables: a trial
    starts, reports an epoch, finishes, is stopped early by ASHA, or errors."""

    def __init__(self, epochs: int, out=None) -> None:
        self.epochs = epochs
        self.out = out
        self.last: dict[str, dict] = {}

    def _say(self, trial, text: str) -> None:
        config = trial.config or {}
        what = f"bs {config.get('batch_size', '?')} lr {config.get('lr', float('nan')):.3g}"
        print(f"trial {trial.trial_id} ({what}): {text}", file=self.out or sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._say(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last[trial.trial_id] = result
        if METRIC in result:
            self._say(
                trial,
                f"epoch {result.get('epoch', '?')}/{self.epochs} val top-1 {result[METRIC]:.4f} "
                f"val loss {result.get('val_loss', float('nan')):.4f}",
            )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = self.last.get(trial.trial_id, {})
        epoch = result.get("epoch", 0)
        how = "finished" if epoch >= self.epochs else "stopped early by ASHA"
        self._say(trial, f"{how} after {epoch} epoch(s)")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._say(trial, "errored (see results.csv)")


def search_space(
    batch_sizes: list[int], lrs: list[float] | None = None, lr_range: tuple[float, float] | None = None
) -> dict:
    """Tune's param_space: every (batch size, lr) pair of ``lrs`` (grid search), or for random
    search a batch size from the list and an lr log-uniform in ``lr_range``."""
    if lrs is not None:
        return {"batch_size": tune.grid_search(batch_sizes), "lr": tune.grid_search(lrs)}
    return {"batch_size": tune.choice(batch_sizes), "lr": tune.loguniform(*lr_range)}


def make_scheduler(scheduler: str, epochs: int, grace_period: int, reduction_factor: float):
    """ASHA (stops trials behind the others at each rung, never before ``grace_period`` epochs),
    or None for --scheduler none: every trial runs all its epochs."""
    if scheduler == "none":
        return None
    # stop_last_trials=False: a trial that reaches the last epoch ends on its own, so its Train
    # run shuts its workers down normally instead of being killed mid-cleanup.
    return tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        stop_last_trials=False,
    )


def make_tuner(
    cfg: TrainConfig,
    data_root: Path,
    plan: SweepPlan,
    *,
    storage: Storage,
    name: str,
    param_space: dict,
    num_samples: int,
    scheduler: str,
    grace_period: int,
    reduction_factor: float,
    scale_lr: int | None = None,
    verbose: bool = False,
) -> tune.Tuner:
    """A new Tuner, or the interrupted one restored (finished trials are not run again)."""
    exp_dir = storage.path(name)  # Tune opens it (and the trials' Train runs) as Ray opens any storage
    base = {
        "config": cfg.to_dict(),
        "data_root": str(data_root),
        "train_storage": storage.path(name, "train"),
        "scale_lr": scale_lr,
        "resources": dataclasses.asdict(plan.resources),
    }
    if not verbose:
        # Tune's newer output engine prints its experiment box and a final trial table whatever
        # `verbose` says; the legacy one is silent at verbose=0, and TrialEvents speaks instead.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # The shared settings travel with the trainable, so Tune's tables show only the searched values.
    trainable = tune.with_resources(tune.with_parameters(trial_driver, base=base), {"CPU": DRIVER_CPU})
    if tune.Tuner.can_restore(exp_dir):
        print(f"resuming sweep {exp_dir}: finished trials are kept, unfinished ones continue")
        return tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=METRIC_MODE,
            scheduler=make_scheduler(scheduler, cfg.epochs, grace_period, reduction_factor),
            num_samples=num_samples,
            max_concurrent_trials=plan.max_concurrent,
        ),
        # verbose=0: no progress tables (hundreds of lines); TrialEvents says what happens instead
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage.storage_path,
            verbose=1 if verbose else 0,
            callbacks=[] if verbose else [TrialEvents(cfg.epochs)],
        ),
    )


def collect_results(
    result_grid,
    storage: Storage,
    name: str,
    epochs: int,
    scale_lr: int | None = None,
    interrupted: bool = False,
) -> pd.DataFrame:
    """One row per trial of the sweep ``<storage>/<name>``, from Tune's results and each trial's
    own Train run. ``lr`` is the searched value, ``train_lr`` the one the trial trained with
    (they differ with ``scale_lr``). ``interrupted``: the sweep was stopped; trials that the
    saved experiment state has not ended (those a rerun continues) are ``interrupted``.
    ``best_checkpoint`` is a local absolute path on local (and file://) storage, else a URI."""
    rows = []
    ended = unended_trials(storage.path(name)) if interrupted else set()
    for r in result_grid:
        history = r.metrics_dataframe if r.metrics_dataframe is not None else pd.DataFrame()
        trial_id = (r.metrics or {}).get("trial_id") or _trial_id_from_dir(r.path)
        train_dir = storage.fs_path(name, "train", str(trial_id))
        epochs_run = int(history["epoch"].max()) if "epoch" in history and len(history) else 0
        best_ckpt, best_meta = _best_checkpoint(storage.filesystem, train_dir, epochs_run)
        config, error = _config_and_error(r)
        status = (
            "errored"
            if error
            else "finished"
            if epochs_run >= epochs
            else "interrupted"
            if trial_id in ended
            else "stopped early"
        )
        rows.append(
            {
                "trial_id": trial_id,
                "batch_size": config.get("batch_size"),
                "lr": config.get("lr"),
                "train_lr": (
                    train_lr(float(config["lr"]), int(config["batch_size"]), scale_lr)
                    if "lr" in config and "batch_size" in config
                    else math.nan
                ),
                "epochs_run": epochs_run,
                "best_val_top1": best_meta["val_top1"] if best_meta else math.nan,
                "best_val_top5": best_meta["val_top5"] if best_meta else math.nan,
                "final_train_loss": float(history["train_loss"].iloc[-1])
                if "train_loss" in history and len(history)
                else math.nan,
                "status": status,
                "error": error.strip().splitlines()[-1][:200] if error else "",
                "best_checkpoint": storage.readable(best_ckpt) if best_ckpt else "",
                "curve": json.dumps([float(v) for v in history.get(METRIC, [])]),
            }
        )
    return pd.DataFrame(rows).sort_values("best_val_top1", ascending=False, na_position="last")


def unended_trials(exp_dir: str) -> set[str]:
    """Ids of the trials an interrupted sweep's saved state (at ``exp_dir``, a local path or a
    URI) has not ended (pending or running)."""
    from ray.tune import ExperimentAnalysis

    try:
        trials = ExperimentAnalysis(exp_dir).trials
    except Exception:  # noqa: BLE001 - no state saved yet: nothing had started
        return set()
    return {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}


def _read_text(filesystem: pafs.FileSystem, path: str) -> str | None:
    """A small file of the storage, or None when it is not there."""
    try:
        with filesystem.open_input_stream(path) as f:
            return f.read().decode()
    except OSError:  # FileNotFoundError among them
        return None


def _config_and_error(result) -> tuple[dict, str]:
    """A trial's searched values and its error text. A restored sweep's result for a trial that
    errored before its first report has neither in memory: Tune's files in the trial dir do
    (read through the result's filesystem: local, file:// or s3:// alike)."""
    config, error = result.config, str(result.error) if result.error else ""
    if result.path and config is None:
        text = _read_text(result.filesystem, posixpath.join(result.path, "params.json"))
        config = json.loads(text) if text else None
    if result.path and not error:
        error = _read_text(result.filesystem, posixpath.join(result.path, "error.txt")) or ""
    return config or {}, error


def _best_checkpoint(
    filesystem: pafs.FileSystem, train_dir: str, epochs_run: int
) -> tuple[str | None, dict | None]:
    """The trial's best checkpoint (its path on ``filesystem``, and its metrics) among the epochs
    Tune saw (a stopped trial's Train run may finish one more epoch while it is torn down), else
    its best overall."""
    found = []
    listing = filesystem.get_file_info(pafs.FileSelector(train_dir, allow_not_found=True))
    for info in listing:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            found.append(
                (
                    info.path,
                    json.loads(_read_text(filesystem, posixpath.join(info.path, META_FILE)))["metrics"],
                )
            )
        except (TypeError, ValueError, KeyError):  # no meta.json (TypeError: None), or not ours
            continue
    seen = [(d, m) for d, m in found if m["epoch"] <= epochs_run] or found
    if not seen:
        return None, None
    return max(seen, key=lambda dm: checkpoint_score(dm[1]))


def _trial_id_from_dir(path: str | None) -> str | None:
    # "trial_driver_3a2b1_00000_0_batch_size=32,lr=0.05_2026-..." -> "3a2b1_00000"
    parts = Path(path).name.split("_") if path else []
    return f"{parts[2]}_{parts[3]}" if len(parts) > 3 else None


RESULTS_FILE, BEST_FILE, PLOT_FILE = "results.csv", "best.json", "sweep.png"


def write_results(storage: Storage, name: str, table: pd.DataFrame) -> None:
    """results.csv (a row per trial) and sweep.png into ``<storage>/<name>``, written through the
    storage's filesystem as Ray writes its own files there."""
    from placesnet.plots import sweep_png

    storage.write(table.drop(columns=["curve"]).to_csv(index=False).encode(), name, RESULTS_FILE)
    storage.write(sweep_png(table), name, PLOT_FILE)


def write_best(storage: Storage, name: str, best: dict) -> str:
    """best.json (see :func:`best_record`) into ``<storage>/<name>``; returns its fs path."""
    return storage.write(json.dumps(best, indent=2).encode(), name, BEST_FILE)


def best_record(table: pd.DataFrame, base: TrainConfig) -> dict:
    ok = table[table["best_checkpoint"] != ""]
    if ok.empty:
        raise UserError("no trial produced a checkpoint: see the errors in results.csv")
    best = ok.iloc[0]
    config = base.replace(batch_size=int(best["batch_size"]), lr=float(best["train_lr"])).to_dict()
    return {
        "trial_id": best["trial_id"],
        "batch_size": int(best["batch_size"]),
        "lr": float(best["lr"]),
        "train_lr": float(best["train_lr"]),
        "val_top1": float(best["best_val_top1"]),
        "val_top5": float(best["best_val_top5"]),
        "epochs_run": int(best["epochs_run"]),
        "best_checkpoint": best["best_checkpoint"],
        "config": config,
    }
