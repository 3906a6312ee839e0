"""A simulated two-node cluster on this machine: a head plus a `ray start --address` worker node,
each with its own CPUs, running a 2-worker DDP job with one worker per node and a storage path
both nodes share."""

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, RayHead, TINY_ARGS, assert_user_error, run_script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("mnhead"), num_cpus=1)
    worker_dir = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
    worker = None
    try:
        head.wait_ready()
        worker = subprocess.Popen(
            [str(BIN / "ray"), "start", "--address", head.address, "--block", "--num-cpus", "1",
             "--num-gpus", "0", "--disable-usage-stats", "--temp-dir", str(worker_dir)],
            env=head.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            status = subprocess.run([str(BIN / "ray"), "status", "--address", head.address],
                                    env=head.env, capture_output=True, text=True, timeout=60)
            if len(re.findall(r"^\s*1 node_", status.stdout, re.M)) >= 2:
                break
            time.sleep(2)
        else:
            raise RuntimeError(f"worker node did not join: {status.stdout[-2000:]}")
        yield head
    finally:
        if worker is not None:
            try:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(worker.pid, signal.SIGKILL)
        head.stop()


def test_one_worker_per_node_with_shared_storage(two_nodes, tmp_path):
    shared = tmp_path / "shared"  # the same directory on both "nodes", like NFS
    # Given as a URI, so the run goes through the same filesystem layer as s3:// or gs://.
    proc = run_script("rayjobs/train.py", *TINY_ARGS, "--epochs", 2, "--num-workers", 2,
                      "--cpus-per-worker", 1, "--placement-strategy", "STRICT_SPREAD",
                      "--storage-path", f"file://{shared}", "--name", "mn", env=two_nodes.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nodes = set(re.findall(r"rank \d/2 on node (\w+)", proc.stdout))
    assert len(nodes) == 2, proc.stdout[-3000:]  # each rank on its own node
    summary = json.loads((shared / "mn" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and Path(summary["best_checkpoint"]).is_dir()
    assert (shared / "mn" / "metrics.csv").is_file() and (shared / "mn" / "curves.png").is_file()
    assert f"file://{shared}/mn/summary.json" in proc.stdout
    # A third worker has no node of its own: refused at once instead of waiting forever.
    three = run_script("rayjobs/train.py", *TINY_ARGS, "--num-workers", 3, "--cpus-per-worker", 1,
                       "--placement-strategy", "STRICT_SPREAD", "--storage-path", shared,
                       "--name", "mn3", env=two_nodes.env)
    assert_user_error(three, "cannot place 3 workers")
