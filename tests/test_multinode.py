"""A simulated two-node cluster on this machine: a head (2 CPUs) plus a `ray start --address`
worker node (1 CPU), running a 2-worker DDP job with one worker per node and a storage path both
nodes share, and a 2-worker job whose images Ray Data decodes on the other node.

The worker node runs in a mount namespace of its own (``unshare -m``) with an empty tmpfs over one
directory, PRIVATE: files the head writes there are invisible to it, like a local disk on another
machine. That lets the tests see what happens with a storage path or data root that is not shared.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import BIN, TINY_ARGS, RayHead, assert_user_error, ray_driver, run_script, worker_node_command

pytestmark = pytest.mark.slow


def _can_unshare() -> bool:
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    return shutil.which("unshare") is not None and probe.returncode == 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("mnhead"), num_cpus=2)
    worker_dir = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
    private = Path(tempfile.mkdtemp(prefix="rp", dir="/tmp"))
    node = worker_node_command(head, worker_dir)
    if _can_unshare():  # the worker node gets an empty tmpfs over PRIVATE
        node = [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs tmpfs "$0" && exec "$@"',
            str(private),
            *node,
        ]
        head.private = private
    else:
        head.private = None
    worker = None
    try:
        head.wait_ready()
        worker = subprocess.Popen(
            node, env=head.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            status = subprocess.run(
                [str(BIN / "ray"), "status", "--address", head.address],
                env=head.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
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
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


def _nodes_that_ran(head: RayHead, task: str) -> set[str]:
    """The ids of the nodes where the cluster ran tasks named ``task`` (Ray's state API)."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=head.dashboard, filters=[("name", "=", task)], limit=10_000, detail=True)
    return {t.node_id for t in tasks}


def test_one_worker_per_node_with_shared_storage(two_nodes, tmp_path):
    shared = tmp_path / "shared"  # the same directory on both "nodes", like NFS
    env = two_nodes.env
    if two_nodes.private:
        # The driver generates the sample data where the worker node cannot see it: that node's
        # worker makes the same (seeded) data in its own cache instead of failing.
        env = {**env, "PLACESNET_CACHE": str(two_nodes.private / "cache")}
    # Given as a URI, so the run goes through the same filesystem layer as s3:// or gs://.
    proc = run_script(
        "rayjobs/train.py",
        *TINY_ARGS,
        "--epochs",
        2,
        "--num-workers",
        2,
        "--cpus-per-worker",
        1,
        "--placement-strategy",
        "STRICT_SPREAD",
        "--storage-path",
        f"file://{shared}",
        "--name",
        "mn",
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    nodes = set(re.findall(r"rank \d/2 on node (\w+)", proc.stdout))
    assert len(nodes) == 2, proc.stdout[-3000:]  # each rank on its own node
    summary = json.loads((shared / "mn" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and Path(summary["best_checkpoint"]).is_dir()
    assert (shared / "mn" / "metrics.csv").is_file() and (shared / "mn" / "curves.png").is_file()
    assert f"file://{shared}/mn/summary.json" in proc.stdout


def test_ray_data_decodes_on_a_node_without_workers_and_counts_every_val_image(
    two_nodes, broken_copy, tmp_path
):
    """--input ray-data: both workers fill the head's 2 CPUs, so Ray Data's decode tasks can only
    run on the other node, a CPU-only node that trains nothing. The data (a copy of the sample
    with one undecodable train and one undecodable val image) is on a directory both nodes see."""
    import pandas as pd

    root, bad = broken_copy
    proc = run_script(
        "rayjobs/train.py",
        *TINY_ARGS,
        "--dataset",
        "places365",
        "--skip-verify",
        "--data-root",
        root,
        "--bad-images",
        "skip",
        "--input",
        "ray-data",
        "--epochs",
        2,
        "--num-workers",
        2,
        "--cpus-per-worker",
        1,
        "--storage-path",
        tmp_path / "runs",
        "--name",
        "rd",
        env=two_nodes.env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    worker_nodes = set(re.findall(r"rank \d/2 on node (\w+)", proc.stdout))
    assert len(worker_nodes) == 1, proc.stdout[-3000:]  # PACK: both ranks on the head
    decoded_on = _nodes_that_ran(two_nodes, "MapBatches(decode_batch)")
    assert decoded_on and not decoded_on & worker_nodes, (decoded_on, worker_nodes)
    # The same promises as the DataLoader path (test_faults::test_skipped_images_are_logged_and_counted):
    # the bad images named and skipped, every val image counted once (47 - 1 bad, on shards of
    # unequal size), every train image but the bad one trained on (160 split equally over 2).
    assert f"skipping a bad image: cannot decode image {bad}" in proc.stdout
    assert "Places365_val_00000002.jpg (line 2 of" in proc.stdout
    metrics = pd.read_csv(tmp_path / "runs" / "rd" / "metrics.csv")
    assert list(metrics["skipped_images"]) == [2, 2]
    assert list(metrics["train_images"]) == [159, 159] and list(metrics["val_images"]) == [46, 46]
    # Exact: the best checkpoint's val metrics are those of a plain DataLoader pass over the split.
    import torch
    from torch.utils.data import DataLoader

    from placesnet.checkpoint import load_checkpoint
    from placesnet.data.places import BadImages, MarkBadImages, open_split
    from placesnet.train import engine

    loaded = load_checkpoint(tmp_path / "runs" / "rd")
    val = open_split(loaded.config, "val", root)
    plain = engine.evaluate(
        loaded.model,
        DataLoader(MarkBadImages(val, loaded.config.image_size), batch_size=16),
        torch.device("cpu"),
        num_classes=len(loaded.classes),
        bad_images=BadImages("skip", val, lambda message: None),
    )
    assert plain["val_images"] == 46 and plain["val_top1"] == loaded.meta["metrics"]["val_top1"]
    assert plain["val_loss"] == pytest.approx(loaded.meta["metrics"]["val_loss"], rel=1e-5)
    # Ray Data's own per-epoch lines stay out of the log.
    out = proc.stdout + proc.stderr
    assert "execution finished" not in out and "Progress bars disabled" not in out
    assert "exclude_resources" not in out


def test_batch_prediction_decodes_on_the_node_without_the_model_and_predicts_every_image_once(
    two_nodes, tiny_root, tiny_config, tmp_path
):
    """rayjobs/batch_predict.py on the two nodes: one model actor of 2 CPUs can only sit on the
    head and fills it, so the decode tasks can only run on the other node, which holds no model
    (decoding fused into the actors would run on the head); every image is in the output once,
    with predict.py's top-k (the one-process answer)."""
    import pandas as pd
    from conftest import untrained_checkpoint
    from ray.util.state import list_nodes

    checkpoint = untrained_checkpoint(tmp_path / "ckpt", tiny_config, seed=5)
    photos = tmp_path / "photos"  # on a directory both nodes see
    for copy in range(4):
        shutil.copytree(tiny_root / "val_256", photos / f"c{copy}")
    out = tmp_path / "out"
    proc = run_script(
        "rayjobs/batch_predict.py",
        "--checkpoint",
        checkpoint,
        "--input",
        photos,
        "--out",
        out,
        "--num-workers",
        1,
        "--cpus-per-worker",
        2,
        "--top-k",
        2,
        env=two_nodes.env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "predicted 192 images" in proc.stdout and "decoded on 1 node(s)" in proc.stdout, proc.stdout
    head = {n.node_id for n in list_nodes(address=two_nodes.dashboard, detail=True) if n.is_head_node}
    decoded_on = _nodes_that_ran(two_nodes, "MapBatches(decode_chunk)")
    assert len(head) == 1 and len(decoded_on) == 1 and not decoded_on & head, (decoded_on, head)
    table = pd.concat(pd.read_parquet(f) for f in sorted(out.glob("part-*.parquet")))
    assert sorted(table["index"]) == list(range(192)) and table["error"].isna().all()
    images = sorted(str(p) for p in photos.rglob("*.jpg"))[::16]  # a sample of 12, all folders
    reference = run_script("rayjobs/predict.py", "--checkpoint", checkpoint, "--json", "--top-k", 2, *images)
    results = json.loads(reference.stdout)["results"]
    expected = {r["image"]: [p["label"] for p in r["predictions"]] for r in results}
    got = {row.path: list(row.labels) for row in table.itertuples() if row.path in expected}
    assert got == expected


def test_paths_and_layouts_the_cluster_cannot_serve_are_refused_before_training(
    two_nodes, tiny_root, tmp_path
):
    from placesnet.config import UserError
    from placesnet.launch.preflight import check_cluster_paths
    from placesnet.launch.resources import plan_resources

    private = two_nodes.private
    if private:
        # End to end: a head-local storage path (checkpoints would be split over two disks) is
        # one error line, before any training.
        storage = private / "runs"
        proc = run_script(
            "rayjobs/train.py",
            *TINY_ARGS,
            "--num-workers",
            2,
            "--cpus-per-worker",
            1,
            "--placement-strategy",
            "STRICT_SPREAD",
            "--storage-path",
            storage,
            "--name",
            "local",
            env=two_nodes.env,
        )
        assert_user_error(proc, f"--storage-path {storage} is not shared", "1 of 2 nodes")
        assert "epoch 1" not in proc.stdout
        shutil.copytree(tiny_root, private / "places365")
    # The same checks in-process (train.py and sweep.py call them).
    with ray_driver(two_nodes.address):
        # A third worker has no node of its own: refused at once instead of waiting forever.
        with pytest.raises(UserError, match="cannot place 3 workers"):
            plan_resources(3, False, 1.0, "STRICT_SPREAD")
        assert plan_resources(2, False, 1.0, "STRICT_SPREAD").num_workers == 2
        check_cluster_paths(str(tmp_path / "runs"), tiny_root)  # both nodes see these
        check_cluster_paths("s3://bucket/not-probed")
        assert not list((tmp_path / "runs").glob(".placesnet-shared-check-*"))  # marker removed
        if private is None:
            pytest.skip("needs `unshare -m` (a mount namespace) to hide a directory from one node")
        with pytest.raises(UserError, match=f"file://{private}/sweeps is not shared: 1 of 2 nodes"):
            check_cluster_paths(f"file://{private}/sweeps")
        with pytest.raises(UserError, match=f"--data-root {private / 'places365'} is missing on 1 of 2"):
            check_cluster_paths(str(tmp_path / "runs"), private / "places365")
