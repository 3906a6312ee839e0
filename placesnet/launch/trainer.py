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
from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision

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


class TooFewWorkers(WorkerGroupStartupTimeoutError):
    """An elastic run's alive nodes have held fewer than its minimum for a placement wait (no
    --autoscale): it ends as a fixed-size run that cannot be placed does."""


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
        if res.elastic and res.fewest <= fits < wanted:  # a node was lost: go on with fewer
            self.placement_timeouts -= 1  # (not a retry of the same placement)
            echo(
                f"placesnet: {wanted} workers not placed within {waited} s; the alive nodes fit "
                f"{fits}: going on with those"
            )
            return FailureDecision.RETRY
        if fits < wanted or self.placement_timeouts > PLACEMENT_RETRIES:
            return FailureDecision.RAISE  # the driver says why, in one line
        echo(
            f"placesnet: {wanted} workers not placed within {waited} s, though the alive nodes fit {fits} "
            f"(a node not yet marked dead, or CPUs held by other jobs); retry {self.placement_timeouts} "
            f"of {PLACEMENT_RETRIES}"
        )
        return FailureDecision.RETRY


_reports = {"count": 0, "epoch": 0}  # this Train controller's reports so far (EpochReports)


class EpochReports(ReportCallback):
    """Counts the reports (one per epoch) on the Train controller, for :class:`ElasticOnLiveNodes`,
    which grows a run only right after one. (The policy cannot take reports itself: Ray calls
    a report callback only from the run's callbacks, and there the policy would be called twice
    as a controller callback.)"""

    def after_report(self, training_report, metrics) -> None:
        _reports["count"] += 1
        _reports["epoch"] = max((m.get("epoch", 0) for m in metrics), default=0)


class ElasticOnLiveNodes(ElasticScalingPolicy):
    """Ray's elastic policy (``ScalingConfig(num_workers=(min, max))``: after a failure the
    workers restart as many as fit, at least min; every ``grow_check_s`` it looks for room to grow),
    with four changes:

    - It counts the workers that fit on the nodes alive now, under the placement strategy (also
      the fewer of that and Ray's count, which comes from the autoscaling coordinator's view of
      the cluster, refreshed every 20 s, and ignores STRICT_SPREAD): a lost node is not counted
      while the coordinator has yet to notice.
    - It grows right after an epoch's report, not mid-epoch: every resize restarts the workers
      from the latest checkpoint, so growing mid-epoch would throw away the epoch's work so far.
    - Without --autoscale, a run whose alive nodes hold fewer than min workers for a placement
      wait ends (:class:`TooFewWorkers`) instead of waiting for nodes forever.
    - One line for every start and resize.

    Runs on the Train controller (:class:`Trainer` puts it in Ray's place)."""

    def __init__(self, scaling_config, resources: Resources):
        super().__init__(scaling_config)
        self.resources = resources
        self.running = 0  # workers of the group now
        self.short_since: float | None = None  # since when fewer than min fit
        self.grow_after: int | None = None  # the report count after which to grow

    def _count_possible_workers(self, reserved_resources) -> int:
        fits = min(workers_that_fit(self.resources), self.scaling_config.max_workers)
        # The coordinator reserves nothing for a request it has not seen yet (its first 20 s tick).
        return min(fits, super()._count_possible_workers(reserved_resources)) if reserved_resources else fits

    def make_decision_for_non_running_worker_group(self):
        fits = workers_that_fit(self.resources)
        if fits < self.resources.fewest and not self.resources.autoscale:
            now, wait = time.monotonic(), float(os.environ.get(PLACEMENT_WAIT_ENV, PLACEMENT_WAIT_S))
            if self.short_since is None:
                self.short_since = now
                echo(
                    f"placesnet: the alive nodes fit {fits} of the {self.resources.fewest} workers this "
                    f"run needs at least; waiting {wait:g} s for a node"
                )
            elif now - self.short_since > wait:
                raise TooFewWorkers(self.resources.fewest)  # the driver says why, in one line
            return NoopDecision()
        self.short_since = None
        return super().make_decision_for_non_running_worker_group()

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status):
        decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
        if isinstance(decision, ResizeDecision) and self.grow_after is None:  # at the next report
            self.grow_after = _reports["count"]
        if self.grow_after is None or _reports["count"] <= self.grow_after:
            return NoopDecision()
        self.grow_after = None
        fits = self._count_possible_workers(self._get_reserved_resources())
        if fits == worker_group_state.num_workers or fits < self.resources.fewest:
            return NoopDecision()  # the room went again
        return self._get_resize_decision(fits)

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        n, label = resize_decision.num_workers, self.resources.workers_label()
        if not self.running:
            what = f"starts on {n} worker{'s' if n != 1 else ''}"
        elif n == self.running:
            what = f"restarts its {n} workers from the latest checkpoint"
        elif n > self.running:
            what = f"grows from {self.running} to {n} workers after epoch {_reports['epoch']}"
        else:
            what = f"goes on with {n} of its {self.running} workers"
        echo(f"placesnet: elastic run ({label} workers) {what}")
        self.running = n
        super().before_controller_execute_resize_decision(resize_decision)


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
        if self.resources is not None and self.resources.elastic:
            kwargs["scaling_policy"] = ElasticOnLiveNodes(self.scaling_config, self.resources)
            kwargs["callbacks"].append(EpochReports())
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
    ten_crop: bool = False,
) -> dict:
    """Run :func:`eval_loop_per_worker` on ``resources.num_workers`` Ray Train workers
    (``ten_crop``: the official ten-crop protocol, see evaluation.evaluate_checkpoint).

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
                ten_crop=ten_crop,
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
            "ten_crop": ten_crop,
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
