"""The Ray Train jobs of this project: :func:`make_trainer` (training) and
:func:`distributed_evaluate`, the per-worker entry points they hand to Ray, and the trainer that
runs them (:class:`StopOnUserErrors`: no restarts for a user's mistake; Ctrl-C/SIGTERM end in
:class:`Interrupted`).

Ray Train's controller unpickles the entry points from this module for every run: it stays free of
torchvision, pandas and matplotlib (tests/test_layout.py checks), and the worker loop
(placesnet/launch/worker.py) is imported inside the entry points, on the workers only."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision

from placesnet.config import SCORE, Interrupted, TrainConfig, UserError
from placesnet.launch.logs import echo, quiet_controller, quiet_ray_train, user_error
from placesnet.launch.outputs import RunOutputs
from placesnet.launch.resources import Resources, workers_that_fit

RESUME_HINT = "resume with the same command"
# Ray Train waits this long for a worker group's placement group (Ray's default: 60 s), read by the
# controller from the driver's environment. Without --autoscale no node is on its way, so a
# shorter wait ends a run that lost a node sooner; set the variable to wait longer.
PLACEMENT_WAIT_ENV, PLACEMENT_WAIT_S = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30"
PLACEMENT_RETRIES = 2  # placement time-outs retried while the workers still fit on paper
ABORT_WAIT_S = 3  # then the controller is killed: it cannot abort while it waits for a placement


def placement_timeout(error: BaseException) -> WorkerGroupStartupTimeoutError | None:
    """The time-out of a worker group that could not be placed, if that is what ended ``error``
    (Ray's ControllerError wraps it), else None."""
    cause = getattr(error, "controller_failure", None)
    return cause if isinstance(cause, WorkerGroupStartupTimeoutError) else None


class StopOnUserErrors(DefaultFailurePolicy):
    """Ray Train's failure policy, except that a worker error that is the user's to fix
    (a :class:`UserError`: bad data, a corrupt checkpoint, a bad setting) ends the run at once: a
    restart would only meet it again. Lost workers and nodes still restart, up to --max-failures.

    A worker group that cannot be placed (a node was lost) is not retried forever, as Ray's
    policy does: without ``resources.autoscale`` the run ends at the first placement time-out when
    the alive nodes no longer fit the workers, else after ``PLACEMENT_RETRIES`` more (resources
    held by other jobs); the driver then says what was lost (rayjobs/train.py). One line per retry.

    (Ray 2.60 hands each worker's own exception to the policy in ``worker_failures``, and a
    placement time-out as a ControllerError; it runs on the Train controller.)
    """

    def __init__(self, failure_config, resources: Resources | None = None):
        super().__init__(failure_config)
        self.resources = resources
        self.placement_timeouts = 0

    def make_decision(self, training_failed_error) -> FailureDecision:
        timeout = placement_timeout(training_failed_error)
        if timeout is not None and self.resources is not None:
            return self._placement_decision(timeout.num_workers)
        failures = getattr(training_failed_error, "worker_failures", None) or {}
        if any(isinstance(e, UserError) for e in failures.values()):
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error=training_failed_error)

    def _placement_decision(self, wanted: int) -> FailureDecision:
        self.placement_timeouts += 1
        res, waited = self.resources, os.environ.get(PLACEMENT_WAIT_ENV, "60")
        fits = workers_that_fit(res)
        if res.autoscale:  # nodes may be on their way
            echo(f"placesnet: {wanted} workers not placed within {waited} s; waiting for new nodes")
            return FailureDecision.RETRY
        if fits < wanted or self.placement_timeouts > PLACEMENT_RETRIES:
            return FailureDecision.RAISE  # the driver says why, in one line
        echo(
            f"placesnet: {wanted} workers not placed within {waited} s, though the alive nodes fit {fits} "
            f"(a node not yet marked dead, or CPUs held by other jobs); retry {self.placement_timeouts} "
            f"of {PLACEMENT_RETRIES}"
        )
        return FailureDecision.RETRY


class PlacementGuard(ControllerCallback):
    """On the Train controller: Ray logs each placement time-out with a ~30-line traceback; the
    failure policy's one line says it instead (see :func:`logs.quiet_controller`)."""

    def after_controller_start(self, train_run_context) -> None:
        quiet_controller()


class Trainer(ray.train.torch.TorchTrainer):
    """TorchTrainer with :class:`StopOnUserErrors` and a Ctrl-C / SIGTERM that ends in
    :class:`Interrupted` (exit 130, "resume with the same command") instead of Ray's own handler,
    which aborts the run but exits 1 with nothing said."""

    resources: Resources | None = None  # for StopOnUserErrors' placement rule (make_trainer sets it)

    def _initialize_and_run_controller(self, **kwargs):
        kwargs["failure_policy"] = StopOnUserErrors(self.run_config.failure_config, self.resources)
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), PlacementGuard()]
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
                ray.get(controller.abort.remote(), timeout=ABORT_WAIT_S)
            except ray.exceptions.GetTimeoutError:
                # Blocked in a placement wait (or a restart loop): abort() cannot run until it
                # ends. Killing the controller ends its workers with it, and Ray Train's cleaner
                # removes its placement group; a half-written checkpoint is repaired on resume.
                ray.kill(controller, no_restart=True)
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


def train_loop_per_worker(loop_config: dict) -> dict | None:
    """Ray Train's per-worker function (see :func:`worker.train_worker`); a UserError leaves it
    as one line. The worker module is imported here, in the workers only."""
    from placesnet.launch.worker import train_worker

    quiet_ray_train()
    try:
        return train_worker(loop_config)
    except UserError as e:
        raise user_error(e) from None


def run_lr_find(config: dict, data_root: str, cpus: float):
    """--lr auto's Ray task: :func:`lr_find.find_lr` with one training worker's resources."""
    from placesnet.data.loaders import LoaderPlan
    from placesnet.launch.worker import data_root_here
    from placesnet.train.lr_find import find_lr

    cfg = TrainConfig.from_dict(config)
    device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
    plan = LoaderPlan.for_worker(cpus, device.type == "cuda", cfg.loader_workers)
    if device.type == "cpu":
        torch.set_num_threads(plan.threads)
    return find_lr(cfg, data_root_here(cfg, data_root), device, loader_workers=plan.workers)


def eval_loop_per_worker(loop_config: dict) -> dict | None:
    """Evaluate a checkpoint on this worker's shard; rank 0 returns the exact totals."""
    from placesnet.launch.worker import eval_worker

    quiet_ray_train()
    try:
        return eval_worker(loop_config)
    except UserError as e:
        raise user_error(e) from None


def distributed_evaluate(
    checkpoint: Path,
    data_root: Path,
    resources: Resources,
    *,
    split: str,
    batch_size: int,
    skip_verify: bool,
    storage_path: str | None = None,
    mistakes: int = 0,
) -> dict:
    """Run :func:`eval_loop_per_worker` on ``resources.num_workers`` Ray Train workers.

    Ray Train needs a storage path even though nothing is checkpointed: by default a temporary
    directory that is removed afterwards (pass a shared one on a multi-node cluster).
    """
    if storage_path is None:
        with tempfile.TemporaryDirectory(prefix="placesnet-eval-") as tmp:
            return distributed_evaluate(
                checkpoint,
                data_root,
                resources,
                split=split,
                batch_size=batch_size,
                skip_verify=skip_verify,
                storage_path=tmp,
                mistakes=mistakes,
            )
    trainer = Trainer(
        eval_loop_per_worker,
        train_loop_config={
            "checkpoint": str(checkpoint),
            "data_root": str(data_root),
            "split": split,
            "batch_size": batch_size,
            "skip_verify": skip_verify,
            "cpus_per_worker": resources.cpus_per_worker,
            "mistakes": mistakes,
        },
        scaling_config=resources.scaling_config(),
        run_config=ray.train.RunConfig(
            name=f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=storage_path,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
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


def make_trainer(
    cfg: TrainConfig,
    data_root: Path,
    resources: Resources,
    *,
    storage_path: str,
    name: str,
    max_failures: int,
    keep: int,
    fail_after_epoch: int | None = None,
    diverge_at_epoch: int | None = None,
    callbacks: list | None = None,
) -> "ray.train.torch.TorchTrainer":
    """A TorchTrainer for ``cfg``; the same storage_path/name resumes an earlier run.

    Without ``resources.autoscale`` it shortens Ray's wait for the workers' placement to
    ``PLACEMENT_WAIT_S`` (unless RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S is set): a run that lost a
    node ends sooner (see :class:`StopOnUserErrors`)."""
    if not resources.autoscale:
        os.environ.setdefault(PLACEMENT_WAIT_ENV, PLACEMENT_WAIT_S)  # read by Ray when fit() starts
    loop_config = {
        "config": cfg.to_dict(),
        "data_root": str(data_root),
        "cpus_per_worker": resources.cpus_per_worker,
    }
    if fail_after_epoch:  # the marker goes in the run dir, on any storage (worker._maybe_crash)
        loop_config.update(fail_after_epoch=fail_after_epoch, fail_marker=".fault_injected")
    if diverge_at_epoch:
        loop_config["diverge_at_epoch"] = diverge_at_epoch
    data = {}
    if cfg.input == "ray-data":  # Ray Data decodes on the cluster's CPUs (placesnet/data/raydata.py)
        from placesnet.data.raydata import ExactValDataConfig, build_datasets

        data = dict(datasets=build_datasets(cfg, data_root), dataset_config=ExactValDataConfig())
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=resources.scaling_config(),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=[RunOutputs(), *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        **data,
    )
    trainer.resources = resources
    return trainer
