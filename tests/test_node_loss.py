"""A node lost for real in the middle of a run, on a simulated two-node cluster: a head (2 CPUs)
and a `ray start --address` node (1 CPU) whose processes (`ray start`, its raylet, agents and
Train workers) are all SIGKILLed once epoch 1's checkpoint is on disk.

- STRICT_SPREAD, 2 workers: the lost node's worker cannot be placed again; the run ends after one
  placement wait with one line (the node lost, 2 workers waited for, 1 fits, the resume command).
- PACK, 2 workers that fit on the head alone: the run restarts from Ray's latest checkpoint and
  finishes; metrics.csv, Ray's snapshot and the checkpoints name each epoch once, and a lost
  attempt's unrecorded checkpoints are set aside as ``lost-<name>``.
- SIGTERM while the controller waits for a placement that cannot happen ends the driver within
  seconds (the controller is killed when it cannot abort), the checkpoints intact.

Each scenario prints the seconds it measured (``-s`` shows them); docs/reliability.md quotes them.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    TINY_ARGS,
    ray_driver,
    run_script,
    start_head,
    worker_node_command,
    write_ray_snapshot,
)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    head = start_head(tmp_path_factory, num_cpus=2)
    try:
        yield head
    finally:
        head.stop()


class Node:
    """A `ray start --address --block` node of ``num_cpus`` CPUs joined to ``head``."""

    def __init__(self, head, num_cpus: int = 1):
        self.temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # Ray's sockets: a short path
        self.proc = subprocess.Popen(
            worker_node_command(head, self.temp_dir, num_cpus),
            env=head.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        import ray

        before = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        deadline = time.time() + 90
        while time.time() < deadline:
            new = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before]
            if new:
                self.node_id, self.address = new[0]["NodeID"], new[0]["NodeManagerAddress"]
                return
            if self.proc.poll() is not None:
                break
            time.sleep(1)
        self.kill()
        raise RuntimeError("the worker node did not join")

    def kill(self) -> float:
        """SIGKILL the node's `ray start` and every process under it (raylet, agents, the Train
        workers on it), as when a machine dies. Returns the time of the kill."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        killed_at = time.time()
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        self.proc.wait(timeout=10)
        return killed_at

    def wait_dead(self, timeout: float = 60) -> None:
        import ray

        deadline = time.time() + timeout
        while time.time() < deadline:
            if not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == self.node_id):
                return
            time.sleep(0.5)
        raise AssertionError(f"node {self.node_id} still alive {timeout} s after the kill")


class Run:
    """rayjobs/train.py as a subprocess whose output lines are timestamped as they come."""

    def __init__(self, *args, env):
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "rayjobs/train.py"), *map(str, args)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[tuple[float, str, str]] = []  # (time, "out"/"err", line)
        self._readers = [
            threading.Thread(target=self._read, args=(stream, tag), daemon=True)
            for stream, tag in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))
        ]
        for t in self._readers:
            t.start()

    def _read(self, stream, tag: str) -> None:
        for line in stream:
            self.lines.append((time.time(), tag, line.rstrip("\n")))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"train.py still running after {timeout} s:\n{self.tail()}") from None
        for t in self._readers:
            t.join(timeout=10)
        return rc

    def out(self, tag: str | None = None) -> str:
        return "\n".join(line for _, t, line in list(self.lines) if tag in (None, t))

    def first(self, pattern: str, after: float = 0.0) -> float | None:
        """Time of the first line matching ``pattern`` at or after ``after``."""
        return next((t for t, _, line in list(self.lines) if t >= after and re.search(pattern, line)), None)

    def tail(self, n: int = 60) -> str:
        return "\n".join(line for _, _, line in list(self.lines)[-n:])


def _epochs_on_disk(run_dir: Path, pattern: str = "checkpoint_*") -> dict[str, int]:
    """{checkpoint dir name: epochs it holds} for the intact checkpoints matching ``pattern``."""
    from placesnet.checkpoint import read_meta, verify_checkpoint

    return {
        d.name: read_meta(d)["epoch"] + 1
        for d in sorted(run_dir.glob(pattern))
        if d.is_dir() and verify_checkpoint(d) is None
    }


def _wait_for_checkpoints(run_dir: Path, count: int, run: Run, timeout: float = 180) -> None:
    """Until ``count`` complete checkpoints (with meta.json) are in ``run_dir``: polled every 0.1 s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list(run_dir.glob("checkpoint_*/meta.json"))) >= count:
            return
        if run.proc.poll() is not None:
            raise AssertionError(f"train.py ended before {count} checkpoint(s):\n{run.tail()}")
        time.sleep(0.1)
    raise AssertionError(f"no {count} checkpoint(s) in {timeout} s:\n{run.tail()}")


def _train(head, storage: Path, name: str, *extra, epochs: int, workers="2", env: dict | None = None) -> Run:
    return Run(
        *TINY_ARGS,
        "--epochs",
        epochs,
        "--num-workers",
        workers,
        "--cpus-per-worker",
        1,
        "--storage-path",
        storage,
        "--name",
        name,
        "--keep-checkpoints",
        20,  # every epoch's checkpoint stays: the test compares them with metrics.csv
        *extra,
        env={**head.env, **(env or {})},
    )


@pytest.mark.slow
def test_strict_spread_run_that_lost_its_node_ends_with_one_line(head, tmp_path):
    """STRICT_SPREAD needs the lost node: one placement wait (30 s by default), then one line."""
    with ray_driver(head.address):
        node = Node(head)
        run = _train(head, tmp_path, "spread", "--placement-strategy", "STRICT_SPREAD", epochs=12)
        _wait_for_checkpoints(tmp_path / "spread", 1, run)
        killed_at = node.kill()
        rc = run.wait(timeout=240)
        ended_at = time.time()
    noticed = run.first("a peer worker is gone", after=killed_at) or float("nan")
    print(
        f"\nSTRICT_SPREAD: the kill to the surviving rank's error: {noticed - killed_at:.1f} s, "
        f"to the end: {ended_at - killed_at:.1f} s"
    )
    err, out = run.out("err"), run.out()
    if os.environ.get("NODE_LOSS_LOG"):
        Path(os.environ["NODE_LOSS_LOG"]).write_text(out)
    errors = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert rc == 2 and len(errors) == 1, run.tail()
    line = errors[0]
    assert "cannot place 2 workers (STRICT_SPREAD, 1 CPU each)" in line, line
    assert f"lost node {node.address} ({node.node_id[:8]})" in line, line
    assert "the cluster now has 1 node, 2 CPUs, 0 GPUs, which fit 1 worker" in line, line
    assert "--name spread" in line and "or now on 1: `python" in line and "--num-workers 1`" in line, line
    # No ~30-line traceback per placement time-out (nor the worker group start-up's message).
    assert "worker group startup timed out" not in out, out[-3000:]
    assert "Error in control loop iteration" not in out, out[-3000:]
    # The command it prints goes on from the checkpoints on disk, on the worker that fits.
    command = re.search(r"or now on 1: `python (.*?)`", line).group(1)
    again = run_script(*shlex.split(command), env=head.env, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert re.search(r"resuming run .* from checkpoint_\S+ \(epoch [1-9]", again.stdout), again.stdout[-3000:]
    assert _assert_record_agrees(tmp_path / "spread") == list(range(1, 13))


def _assert_record_agrees(run_dir: Path) -> list[int]:
    """metrics.csv, Ray's snapshot and the intact checkpoint_* directories name the same epochs,
    each once; returns them."""
    import pandas as pd

    on_disk = _epochs_on_disk(run_dir)
    epochs = sorted(on_disk.values())
    assert len(set(epochs)) == len(epochs), on_disk  # no epoch twice
    assert epochs == list(range(1, len(epochs) + 1)), on_disk
    assert list(pd.read_csv(run_dir / "metrics.csv")["epoch"]) == epochs
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    assert sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]) == sorted(on_disk)
    for d in run_dir.glob("checkpoint_*"):  # nothing half-written beside them either
        assert d.name in on_disk or not d.is_dir(), d
    return epochs


@pytest.mark.slow
def test_pack_run_that_lost_a_node_finishes_and_records_each_epoch_once(head, tmp_path):
    """PACK: a worker on the node until it dies, then both on the head (a placeholder actor holds
    one of the head's CPUs until the run has started, so that PACK uses the node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    epochs = 6
    run_dir = tmp_path / "pack"
    with ray_driver(head.address):
        node = Node(head)
        head_id = ray.get_runtime_context().get_node_id()

        class Placeholder:
            def ready(self) -> bool:
                return True

        holder = (
            ray.remote(num_cpus=1)(Placeholder)
            .options(scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False))
            .remote()
        )
        ray.get(holder.ready.remote(), timeout=60)
        run = _train(head, tmp_path, "pack", "--max-failures", 1, epochs=epochs)
        _wait_for_checkpoints(run_dir, 1, run)
        ray.kill(holder)  # the head can now hold both workers
        # Killed once Ray has recorded epoch 1 (metrics.csv is written then) and a newer
        # checkpoint is on disk, which Ray may not have recorded yet: the case that left a lost
        # attempt's checkpoints beside the run's own.
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "metrics.csv").exists():
            time.sleep(0.1)
        _wait_for_checkpoints(run_dir, 2, run)
        killed_at = node.kill()
        rc = run.wait(timeout=300)
        ended_at = time.time()
    out = run.out()
    assert rc == 0, run.tail()
    nodes = re.findall(r"rank \d/2 on node (\w+)", out)  # one worker on each node, then both on the head
    assert len(nodes) == 4 and len(set(nodes[:2])) == 2 and set(nodes[2:]) == {head_id}, out[-3000:]
    resumed = run.first(r"resuming from .* at epoch", after=killed_at)
    again = run.first(r"epoch \d+/\d+ train_loss", after=killed_at)  # the first epoch after it
    print(
        f"\nPACK: the kill to training again: {resumed - killed_at:.1f} s (first epoch done after "
        f"{again - killed_at:.1f} s), to the end: {ended_at - killed_at:.1f} s"
    )
    assert _assert_record_agrees(run_dir) == list(range(1, epochs + 1))
    # A lost attempt's checkpoints, if Ray had not recorded them: set aside, one line each, and
    # newer than the checkpoint the run resumed from.
    from_epoch = int(re.search(r"resuming from .* at epoch (\d+)/", out).group(1)) - 1
    lost = _epochs_on_disk(run_dir, "lost-checkpoint_*")
    for name, epoch in lost.items():
        assert epoch > from_epoch and f"moved to {name}" in out, (name, epoch, from_epoch)
    print(f"PACK: set aside {sorted(lost.values()) or 'none'} (resumed after epoch {from_epoch})")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == epochs and "lost-" not in summary["best_checkpoint"]


@pytest.mark.slow
def test_elastic_run_goes_on_with_fewer_after_a_node_loss_and_grows_when_one_joins(head, tmp_path):
    """--num-workers 2-3 (PACK, 1 CPU each) on the head (2 CPUs) and a node (1 CPU): it starts on
    3; the node is killed after epoch 1 and the run goes on with the 2 the head holds; a new
    node joins and the run grows back to 3 after the next epoch. Each resize is one line;
    metrics.csv records each epoch once, with the workers that trained it."""
    import pandas as pd
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        _AutoscalingCoordinatorActor,
    )

    epochs, run_dir = 30, tmp_path / "elastic"
    with ray_driver(head.address):
        node = Node(head)
        # Ray's count of the workers that fit comes from the cluster's autoscaling coordinator (an
        # actor an earlier run started), which looks at the nodes once a tick: a run started
        # before it has seen the new node starts on 2 (and grows to 3 after epoch 1).
        time.sleep(_AutoscalingCoordinatorActor.TICK_INTERVAL_S + 5)
        run = _train(
            head,
            tmp_path,
            "elastic",
            "--grow-check-s",
            2,
            "--keep-checkpoints",
            epochs,
            epochs=epochs,
            workers="2-3",
        )
        _wait_for_checkpoints(run_dir, 1, run)
        deadline = time.time() + 120  # Ray has recorded epoch 1 (on 3 workers) once metrics.csv is there
        while time.time() < deadline and not (run_dir / "metrics.csv").exists():
            time.sleep(0.1)
        killed_at = node.kill()
        shrunk = _wait_for_line(
            run, r"elastic run \(2-3 workers\) goes on with 2 of its 3 workers", killed_at
        )
        again = _wait_for_line(run, r"epoch \d+/\d+ train_loss", shrunk)  # an epoch on 2
        newcomer = Node(head)
        joined_at = time.time()
        grown = _wait_for_line(
            run, r"elastic run \(2-3 workers\) grows from 2 to 3 workers after epoch \d+", joined_at
        )
        rc = run.wait(timeout=300)
        ended_at = time.time()
        newcomer.kill()
        newcomer.wait_dead()  # the module's later tests count the head alone
    out = run.out()
    print(
        f"\nelastic: the kill to training on 2 workers: {again - killed_at:.1f} s; a node joining "
        f"to the run growing: {grown - joined_at:.1f} s; the kill to the end: {ended_at - killed_at:.1f} s"
    )
    assert rc == 0, run.tail()
    assert "training deepcnn on 4 classes: 2-3 worker(s) (elastic)" in out, out[:2000]
    assert re.search(r"elastic run \(2-3 workers\) starts on 3 workers", out), out[-3000:]
    assert len(re.findall(r"elastic run .* grows", out)) == 1, out[-3000:]
    assert _assert_record_agrees(run_dir) == list(range(1, epochs + 1))
    workers = list(pd.read_csv(run_dir / "metrics.csv")["num_workers"])
    # 3 workers, then 2 after the loss, then 3 again: each epoch recorded with its own world size
    assert workers[0] == 3 and 2 in workers and workers[-1] == 3, (workers, out[-4000:])
    changes = [b for a, b in zip(workers, workers[1:]) if a != b]
    assert changes == [2, 3], (workers, out[-4000:])


def _wait_for_line(run: Run, pattern: str, after: float, timeout: float = 180) -> float:
    """The time of the first output line matching ``pattern`` after ``after``, waited for up to
    ``timeout`` s (the run must still be going)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = run.first(pattern, after=after)
        if found is not None:
            return found
        if run.proc.poll() is not None:
            raise AssertionError(f"train.py ended before {pattern!r}:\n{run.tail()}")
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in {timeout} s:\n{run.tail()}")


def _checkpoints(run: Path, epochs: int, snapshot: bool = False) -> list[str]:
    """Real checkpoints of epochs 1..``epochs`` (a tiny model) in ``run``, and with ``snapshot``
    Ray 2.60's record of them; returns their names."""
    import torch

    from placesnet.checkpoint import save_checkpoint
    from placesnet.config import SCORE, TrainConfig, checkpoint_score

    names, results = [], []
    for epoch in range(epochs):
        name = f"checkpoint_2026-12-01_10-00-0{epoch}.000000"
        metrics = {"epoch": epoch + 1, "val_top1": 0.5, "val_top5": 1.0, "val_loss": 1.0}
        save_checkpoint(
            run / name,
            model=torch.nn.Linear(2, 4),
            config=TrainConfig(),
            classes=list("abcd"),
            epoch=epoch,
            metrics=metrics,
            history=[metrics],
        )
        names.append(name)
        results.append(
            {
                "version": 0,
                "checkpoint_dir_name": name,
                "metrics": {**metrics, SCORE: checkpoint_score(metrics)},
            }
        )
    if snapshot:
        write_ray_snapshot(run, results)
    return names


@pytest.mark.slow
def test_sigterm_during_a_placement_wait_ends_the_run_within_seconds(head, tmp_path):
    """A run resumed with --autoscale and workers no node can take (STRICT_SPREAD, 2 workers, the
    head alone) waits in Ray's placement; SIGTERM then ends it, its checkpoints intact."""
    import ray
    from ray.util import placement_group_table

    from placesnet.checkpoint import verify_checkpoint

    first = _train(head, tmp_path, "term", epochs=1)
    assert first.wait(timeout=240) == 0, first.tail()
    with ray_driver(head.address):
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        assert alive == 1  # the other node of this module is gone
        run = _train(head, tmp_path, "term", "--autoscale", "--placement-strategy", "STRICT_SPREAD", epochs=3)
        deadline = time.time() + 120
        while time.time() < deadline and not _pending_groups(placement_group_table()):
            assert run.proc.poll() is None, run.tail()
            time.sleep(0.5)
        assert _pending_groups(placement_group_table()), run.tail()
        time.sleep(2)  # well inside the wait (60 s with --autoscale)
        sent = time.time()
        run.proc.send_signal(signal.SIGTERM)
        # bounded, not timed: before, the driver waited 60 s for an abort the controller could not
        # take during a placement wait (63.6 s); measured now: 6.5-7.4 s (docs/reliability.md)
        rc = run.wait(timeout=30)
        took = time.time() - sent
        said = (run.first("interrupted by SIGTERM") or float("nan")) - sent
        print(f"\nSIGTERM during a placement wait: its line after {said:.1f} s, ended after {took:.1f} s")
        # The killed controller's placement group is removed (Ray Train's cleaner).
        deadline = time.time() + 30
        while time.time() < deadline and _pending_groups(placement_group_table()):
            time.sleep(0.5)
        assert not _pending_groups(placement_group_table())
    assert rc == 130 and "interrupted by SIGTERM: resume with the same command" in run.out("err"), run.tail()
    done = _epochs_on_disk(tmp_path / "term")
    assert list(done.values()) == [1]
    assert all(verify_checkpoint(d) is None for d in (tmp_path / "term").glob("checkpoint_*/"))


def _pending_groups(table: dict) -> list:
    return [pg for pg in table.values() if pg.get("state") in ("PENDING", "RESCHEDULING")]


def test_a_lost_attempts_checkpoints_are_set_aside_and_the_kept_ones_stay(tmp_path):
    """set_aside_lost_checkpoints, on real checkpoints: what Ray resumes from and the older ones
    stay; a newer one (written, never recorded) and a half-written one become lost-<name>, and a
    summary.json naming a set-aside one goes."""
    import pyarrow.fs as pafs

    from placesnet.launch.outputs import set_aside_lost_checkpoints

    run = tmp_path / "run"
    names = _checkpoints(run, 3)
    (run / "checkpoint_2026-12-01_10-00-09.000000").mkdir()  # an upload cut short: no meta.json
    (run / "summary.json").write_text(json.dumps({"best_checkpoint": str(run / names[2])}))
    lines = set_aside_lost_checkpoints(pafs.LocalFileSystem(), str(run), keep=names[1], epochs_done=2)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_")) == names[:2]
    assert sorted(p.name for p in run.glob("lost-*")) == [
        f"lost-{names[2]}",
        "lost-checkpoint_2026-12-01_10-00-09.000000",
    ]
    assert lines[0].startswith(f"setting aside {names[2]}: epoch 3 of an attempt lost before Ray")
    assert "an unfinished checkpoint" in lines[1] and len(lines) == 2
    assert not (run / "summary.json").exists()
    # A run dir, given to evaluate/serve, never picks a set-aside checkpoint.
    from placesnet.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(run).name in names[:2]


def test_resume_command_names_the_run_and_the_workers_left():
    from rayjobs.train import resume_command

    argv = ["--epochs", "3", "--num-workers=2", "--placement-strategy", "STRICT_SPREAD"]
    assert resume_command("r1", argv=argv).endswith(
        "--epochs 3 --num-workers=2 --placement-strategy STRICT_SPREAD --name r1"
    )
    assert resume_command("r1", 1, argv=[*argv, "--name", "r1"]).endswith(
        "--epochs 3 --placement-strategy STRICT_SPREAD --name r1 --num-workers 1"
    )


def test_placement_time_outs_end_the_run_when_the_workers_no_longer_fit(head):
    """StopOnUserErrors on a placement time-out, against the live head (1 node, 2 CPUs): 2
    STRICT_SPREAD workers no longer fit, so the first time-out ends the run; 2 PACK workers still
    fit on paper (their CPUs held by others?), so 2 more waits, then the end; --autoscale waits on."""
    from ray.train import FailureConfig
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import ControllerError

    from placesnet.launch.resources import Resources
    from placesnet.launch.trainer import StopOnUserErrors

    timeout = ControllerError(WorkerGroupStartupTimeoutError(2))
    RETRY, RAISE = FailureDecision.RETRY, FailureDecision.RAISE

    def decisions(res: Resources, n: int) -> list:
        policy = StopOnUserErrors(FailureConfig(max_failures=2), res)
        return [policy.make_decision(training_failed_error=timeout) for _ in range(n)]

    with ray_driver(head.address):
        assert decisions(Resources(2, False, 1.0, "STRICT_SPREAD"), 1) == [RAISE]
        assert decisions(Resources(2, False, 1.0, "PACK"), 3) == [RETRY, RETRY, RAISE]
        assert decisions(Resources(2, False, 1.0, "STRICT_SPREAD", autoscale=True), 5) == [RETRY] * 5
        # Elastic (at least 1, at most 2): a lost node leaves room for 1, so it goes on with 1 (each
        # time: that is not a retry of the same placement); at least 2 ends as a fixed run does.
        assert decisions(Resources(2, False, 1.0, "STRICT_SPREAD", min_workers=1), 4) == [RETRY] * 4
        assert decisions(Resources(3, False, 1.0, "STRICT_SPREAD", min_workers=2), 1) == [RAISE]


def test_an_elastic_range_is_planned_on_its_least_and_asks_ray_for_the_range(head):
    """plan_resources with --num-workers MIN-MAX against the live head (1 node, 2 CPUs): CPUs are
    shared out for MAX, only MIN must fit now, and Ray's ScalingConfig gets the range."""
    from placesnet.config import UserError
    from placesnet.launch.resources import plan_resources

    with ray_driver(head.address):
        res = plan_resources((1, 4), False, None)
        assert (res.min_workers, res.num_workers, res.cpus_per_worker, res.workers_label()) == (
            1,
            4,
            1.0,
            "1-4",
        )
        config = res.scaling_config()
        assert config.elasticity_enabled and (config.min_workers, config.max_workers) == (1, 4)
        assert plan_resources(2, False, None).scaling_config().num_workers == 2  # fixed stays fixed
        with pytest.raises(UserError, match=r"cannot place 3 workers \(the least of 3-4\) of 1 CPU each"):
            plan_resources((3, 4), False, 1.0)
        with pytest.raises(UserError, match=r"\(elastic\) needs --input loader"):
            plan_resources((1, 2), False, 0.5, ray_data=True)


def test_the_driver_sets_aside_checkpoints_ray_never_recorded(tmp_path):
    """summarize(): a checkpoint on disk that neither the Result nor Ray's snapshot names (a lost
    attempt's, written after the last restart) is set aside before summary.json is written."""
    import shutil

    import ray.train

    from placesnet.launch.outputs import summarize

    run = tmp_path / "run"
    names = _checkpoints(run, 2, snapshot=True)
    stray = run / "checkpoint_2026-12-01_10-00-05.000000"
    shutil.copytree(run / names[1], stray)  # epoch 2 again, as a lost attempt would leave it
    summary, _ = summarize(ray.train.Result.from_path(str(run)), str(tmp_path), "run")
    assert not stray.exists() and (run / f"lost-{stray.name}").is_dir()
    assert sorted(p.name for p in run.glob("checkpoint_*/")) == names
    assert summary["epochs_completed"] == 2
