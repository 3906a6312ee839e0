"""Object storage for real: an S3 server on 127.0.0.1 (moto's, from the venv scripts/setup.sh
builds next to the project's) started and stopped by this module, and a Ray head whose
environment has the AWS_* variables, as every node of a cloud cluster would.

Training is interrupted and resumed on ``s3://`` (the run-dir repair goes through pyarrow.fs), a
worker is killed mid-run, a sweep writes its best.json there, and evaluation, prediction and Serve
load the best checkpoint from its URI: fetched into each process's own cache and verified.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    REPO,
    TINY_ARGS,
    Running,
    _free_port,
    flip_bytes,
    run_script,
    start_head,
    untrained_checkpoint,
)

MOTO_VENV = Path(os.environ.get("MOTO_VENV") or Path(sys.executable).parents[2] / "moto-venv")
MOTO_SERVER = MOTO_VENV / "bin" / "moto_server"
BUCKET = "placesnet"
EPOCHS = 5


class S3Server:
    """``moto_server`` on a free port of 127.0.0.1, in its own session; state in memory only."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "moto_server exited"
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"moto_server not ready in {timeout}s")

    def filesystem(self):
        from pyarrow import fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            allow_bucket_creation=True,
        )

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.log.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The S3 server with bucket ``placesnet``; this process has its AWS_* variables meanwhile."""
    if not MOTO_SERVER.exists():
        pytest.skip(f"no moto S3 server at {MOTO_SERVER}: scripts/setup.sh (run by make test) builds it")
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env}
    try:
        server.wait_ready()
        server.filesystem().create_dir(BUCKET)
        os.environ.update(server.env)
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def s3_head(s3, tmp_path_factory):
    """A Ray head with the AWS_* variables (its workers, the Train controller, Tune trials and
    Serve replicas inherit them), and a cache directory of its own: a replica or worker that
    loads a checkpoint from s3:// must fetch it itself, not find this process's copy."""
    cache = tmp_path_factory.mktemp("head-cache")
    head = start_head(tmp_path_factory, env={**s3.env, "PLACESNET_CACHE": str(cache)})
    head.cache = cache
    try:
        yield head
    finally:
        head.stop()


# --- the run-dir repair and the checkpoint pick, through pyarrow.fs (no Ray) --------------------


def _checkpoint(run: Path, name: str, epoch: int, top1: float):
    from placesnet.checkpoint import save_checkpoint
    from placesnet.config import TrainConfig
    from placesnet.model import build_model

    metrics = {"epoch": epoch + 1, "val_top1": top1, "val_top5": 1.0, "val_loss": 1 - top1}
    cfg = TrainConfig(widths=(8, 16, 32), image_size=32)
    save_checkpoint(
        run / name,
        model=build_model(cfg, 4),
        config=cfg,
        classes=list("abcd"),
        epoch=epoch,
        metrics=metrics,
        history=[metrics],
    )
    return name, metrics


def _snapshot(run: Path, recorded: list[tuple[str, dict]]) -> None:
    from placesnet.config import SCORE, checkpoint_score
    from placesnet.launch.resume import SNAPSHOT

    results = [
        {"version": 0, "checkpoint_dir_name": n, "metrics": {**m, SCORE: checkpoint_score(m)}}
        for n, m in recorded
    ]
    state = {
        "ray_version": "2.60.0",
        "checkpoint_results": results,
        "checkpoint_report_indices": list(range(len(results))),
        "latest_checkpoint_result": results[-1],
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": len(results),
        "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [],
        "failed_validation_checkpoint_dir_names": [],
    }
    (run / SNAPSHOT).write_text(json.dumps(state))


def _ckpt_name(second: int) -> str:
    return f"checkpoint_2026-12-01_10-00-{second:02d}.000000"


def _upload(s3, local: Path, key: str) -> str:
    from pyarrow import fs as pafs

    pafs.copy_files(str(local), f"{BUCKET}/{key}", destination_filesystem=s3.filesystem())
    return f"s3://{BUCKET}/{key}"


def _write_object(s3, path: str, data: bytes) -> None:
    with s3.filesystem().open_output_stream(path) as f:
        f.write(data)


def _read_object(s3, path: str) -> bytes:
    with s3.filesystem().open_input_stream(path) as f:
        return f.read()


def _names(fs, path: str) -> list[str]:
    from pyarrow import fs as pafs

    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(filesystem, run dir on it, put(local dir)): a run dir on this machine or on S3."""
    from pyarrow import fs as pafs

    if request.param == "local":
        run = tmp_path / "store" / "run"
        return pafs.LocalFileSystem(), str(run), lambda src: shutil.copytree(src, run)
    s3 = request.getfixturevalue("s3")
    key = f"repair/{request.node.name.replace('[', '-').rstrip(']')}/run"
    return s3.filesystem(), f"{BUCKET}/{key}", lambda src: _upload(s3, src, key)


def test_a_lost_attempts_checkpoint_is_set_aside_not_adopted(store, tmp_path):
    """Ray recorded epochs 1-2; a lost attempt left an epoch-2 checkpoint Ray never recorded; a
    Ctrl-C left epoch 3's unrecorded: the rerun resumes from epoch 3, and epoch 2 is the recorded
    one, once (the lost attempt's is set aside as lost-<name>)."""
    from placesnet.launch.resume import SNAPSHOT, prepare_resume

    fs, run, put = store
    local = tmp_path / "run"
    e1, e2 = _checkpoint(local, _ckpt_name(1), 0, 0.5), _checkpoint(local, _ckpt_name(3), 1, 0.6)
    lost = _checkpoint(local, _ckpt_name(2), 1, 0.9)[0]  # the first attempt at epoch 2, unrecorded
    newer = _checkpoint(local, _ckpt_name(4), 2, 0.7)[0]  # committed, not recorded: a Ctrl-C
    _snapshot(local, [e1, e2])
    put(local)

    plan = prepare_resume(run, None if fs.type_name == "local" else fs)
    assert plan.checkpoint.name == newer and plan.epoch == 3
    assert plan.notes == [
        f"setting aside checkpoint {lost}: epoch 2 of a lost attempt (Ray recorded the run up to "
        f"epoch 2): moved to lost-{lost}",
        f"adding checkpoint {newer}: complete, but not yet recorded by Ray",
    ]
    with fs.open_input_stream(posixpath.join(run, SNAPSHOT)) as f:
        state = json.loads(f.read())
    assert [r["checkpoint_dir_name"] for r in state["checkpoint_results"]] == [e1[0], e2[0], newer]
    assert state["checkpoint_report_indices"] == [0, 1, 2]
    assert f"lost-{lost}" in _names(fs, run) and lost not in _names(fs, run)
    assert prepare_resume(run, None if fs.type_name == "local" else fs).notes == []  # once is enough


def test_the_repair_runs_on_s3(s3, tmp_path):
    """prepare_resume on s3://: a truncated newest checkpoint (by size) and then one whose bytes
    changed at the same size (by sha256, checked for the one resumed from) are set aside by copy
    and delete, and Ray's snapshot is rewritten there."""
    from placesnet.launch.driver import Driver, open_storage
    from placesnet.launch.resume import SNAPSHOT, prepare_resume

    local = tmp_path / "run"
    recorded = [_checkpoint(local, _ckpt_name(i), i, 0.5 + i / 10) for i in range(3)]
    _snapshot(local, recorded)
    _upload(s3, local, "repair-s3/run")
    storage = open_storage(f"s3://{BUCKET}/repair-s3")
    run, fs = storage.fs_path("run"), storage.filesystem
    names = [n for n, _ in recorded]
    model = posixpath.join(run, names[2], "model.pt")
    _write_object(s3, model, _read_object(s3, model)[:1000])

    # as train.py's rerun does it: the driver's storage, opened from the URI
    plan = Driver(None, storage, "run", None, None, None).resume()
    assert plan.checkpoint.name == names[1] and plan.epoch == 2
    assert plan.notes == [
        f"skipping checkpoint {names[2]}: model.pt has 1000 bytes, "
        f"{(local / names[2] / 'model.pt').stat().st_size} were written (truncated?) "
        f"(moved to broken-{names[2]})"
    ]
    assert _names(fs, run) == sorted([*names[:2], f"broken-{names[2]}", SNAPSHOT, f"{SNAPSHOT}.broken"])
    assert _names(fs, posixpath.join(run, f"broken-{names[2]}")) == _names(fs, posixpath.join(run, names[1]))

    model = posixpath.join(run, names[1], "model.pt")
    data = bytearray(_read_object(s3, model))
    data[len(data) // 2] ^= 0xFF  # same size, other contents
    _write_object(s3, model, bytes(data))
    plan = prepare_resume(run, fs)
    assert plan.checkpoint.name == names[0] and plan.epoch == 1
    assert len(plan.notes) == 1 and "model.pt does not match its sha256" in plan.notes[0], plan.notes
    with fs.open_input_stream(posixpath.join(run, SNAPSHOT)) as f:
        state = json.loads(f.read())
    assert [r["checkpoint_dir_name"] for r in state["checkpoint_results"]] == names[:1]
    assert prepare_resume(run, fs).notes == []


def test_a_checkpoint_on_s3_is_found_fetched_and_verified(s3, tmp_path):
    from placesnet.checkpoint import load_checkpoint, locate_checkpoint, resolve_checkpoint
    from placesnet.config import CACHE_DIR, UserError

    local = tmp_path / "runs" / "run"
    names = [_checkpoint(local, _ckpt_name(i), i, top1)[0] for i, top1 in enumerate((0.5, 0.9, 0.7))]
    uri = _upload(s3, local, "fetch/run")
    # a run dir without summary.json: its best checkpoint by the scores in meta.json
    assert locate_checkpoint(uri) == f"{uri}/{names[1]}"
    path = resolve_checkpoint(uri)
    assert path.is_relative_to(CACHE_DIR) and path.name == names[1] and path.parent.name == "run"
    for f in ("model.pt", "train_state.pt", "config.json", "meta.json"):
        assert (path / f).read_bytes() == (local / names[1] / f).read_bytes()
    # a summary.json naming another one (as train.py writes it: a URI without the query)
    _write_object(
        s3, f"{BUCKET}/fetch/run/summary.json", json.dumps({"best_checkpoint": f"{uri}/{names[2]}"}).encode()
    )
    assert locate_checkpoint(f"{uri}/summary.json") == f"{uri}/{names[2]}"
    assert locate_checkpoint(f"latest:s3://{BUCKET}/fetch") == f"{uri}/{names[2]}"
    # the same store given by the URI's query instead of AWS_ENDPOINT_URL
    query = f"endpoint_override=127.0.0.1:{s3.port}&scheme=http"
    assert locate_checkpoint(f"{uri}?{query}") == f"{uri}/{names[2]}?{query}"
    assert load_checkpoint(f"{uri}/summary.json").meta["epoch"] == 2

    # a damaged copy in the cache is fetched again, not loaded
    cached = resolve_checkpoint(f"{uri}/{names[1]}")
    flip_bytes(cached / "model.pt")
    assert resolve_checkpoint(f"{uri}/{names[1]}") == cached
    assert load_checkpoint(cached).epoch == 1
    # a checkpoint changed on the store is refused, naming its URI
    model = f"{BUCKET}/fetch/run/{names[0]}/model.pt"
    data = bytearray(_read_object(s3, model))
    data[len(data) // 2] ^= 0xFF
    _write_object(s3, model, bytes(data))
    with pytest.raises(
        UserError,
        match=rf"corrupt checkpoint: {re.escape(uri)}/{names[0]}: model.pt "
        "does not match its sha256",
    ):
        resolve_checkpoint(f"{uri}/{names[0]}")
    with pytest.raises(UserError, match=f"checkpoint not found: s3://{BUCKET}/fetch/nope"):
        resolve_checkpoint(f"s3://{BUCKET}/fetch/nope")


# --- training, a sweep, evaluation, prediction and Serve on a Ray head with the AWS_* variables ---


def _train(head, log: Path, *extra) -> Running:
    return Running(
        "rayjobs/train.py",
        *TINY_ARGS,
        "--epochs",
        EPOCHS,
        "--num-workers",
        2,
        "--cpus-per-worker",
        1,
        "--storage-path",
        f"s3://{BUCKET}/runs",
        "--name",
        "r",
        *extra,
        env=head.env,
        log=log,
    )


def _worker_pids(head) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(
        address=head.dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    return [a.pid for a in actors]


@pytest.fixture(scope="module")
def s3_run(s3, s3_head, tmp_path_factory):
    """train.py on s3://placesnet/runs/r: Ctrl-C after epoch 2, the same command again (resumed
    through the repair on S3) with a worker SIGKILLed in its first epoch: (outputs, epoch resumed at)."""
    logs = tmp_path_factory.mktemp("s3-train")
    first = _train(s3_head, logs / "1.log")
    first.wait_for(f"epoch 2/{EPOCHS} train_loss")
    first.proc.send_signal(signal.SIGINT)
    assert first.finish(120) == 130, first.text()[-3000:]

    second = _train(s3_head, logs / "2.log")
    second.wait_for(f"resuming run s3://{BUCKET}/runs/r from checkpoint_")
    resumed_at = int(re.search(r"from checkpoint_\S+ \(epoch (\d+)\)", second.text()).group(1))
    second.wait_for(f"at epoch {resumed_at + 1}/{EPOCHS}")  # Ray resumes where the driver said
    pids, deadline = [], time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:
        pids = _worker_pids(s3_head)
    assert len(pids) == 2 and second.proc.poll() is None, second.text()[-3000:]
    killed = time.monotonic()
    os.kill(pids[-1], signal.SIGKILL)
    n = second.text().count("resuming from")
    deadline = time.monotonic() + 300
    while second.text().count("resuming from") == n and second.proc.poll() is None:
        assert time.monotonic() < deadline, second.text()[-3000:]
        time.sleep(0.2)
    training_again = time.monotonic() - killed
    assert second.finish(600) == 0, second.text()[-4000:]
    ended = time.monotonic() - killed
    print(f"\ns3 run: worker SIGKILL -> training again {training_again:.1f} s, -> run ended {ended:.1f} s")
    return first.text(), second.text(), resumed_at


@pytest.mark.slow
def test_training_on_s3_is_interrupted_killed_and_resumed(s3, s3_run, tmp_path):
    import pandas as pd

    from placesnet.checkpoint import verify_checkpoint
    from placesnet.remote import checkpoint_dirs

    first, second, resumed_at = s3_run
    assert "train.py: interrupted by SIGINT: resume with the same command" in first
    assert resumed_at >= 2 and "Traceback" not in second
    fs, run = s3.filesystem(), f"{BUCKET}/runs/r"
    with fs.open_input_stream(f"{run}/metrics.csv") as f:
        metrics = pd.read_csv(f)
    assert list(metrics["epoch"]) == list(range(1, EPOCHS + 1))  # no epoch lost, none twice
    summary = json.loads(_read_object(s3, f"{run}/summary.json"))
    assert summary["best_checkpoint"].startswith(f"s3://{run}/checkpoint_")
    assert summary["epochs_completed"] == EPOCHS
    checkpoints = checkpoint_dirs(fs, run)
    epochs = [json.loads(_read_object(s3, f"{d}/meta.json"))["epoch"] for d in checkpoints]
    assert len(epochs) == len(set(epochs)) and EPOCHS - 1 in epochs  # one per epoch, the last among them
    assert all(verify_checkpoint(d, fs) is None for d in checkpoints)
    assert f"serve run --name placesnet serving.app:build_app checkpoint=s3://{run}" in second
    # TensorBoard cannot read s3://: the printed command copies the event files here first
    (command,) = re.findall(r"^tensorboard: +(.+)$", second, re.M)
    *copy, view = command.split(" && ")
    assert view == "tensorboard --logdir r-tensorboard", command
    local = tmp_path / "tb"
    local.mkdir()
    env = {**os.environ, **s3.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        " && ".join(copy), shell=True, cwd=local, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((local / "r-tensorboard").glob("events.out.tfevents.*")), proc.stdout


@pytest.mark.slow
def test_a_sweep_on_s3_names_its_best_checkpoint_by_uri(s3, s3_head):
    args = [
        *TINY_ARGS[: TINY_ARGS.index("--batch-size")],
        *("--epochs", "1", "--grid", "--batch-sizes", "32", "--lrs", "0.05,0.01"),
        *("--cpus-per-worker", "0.5", "--max-concurrent", "2"),
    ]
    proc = run_script(
        "tuning/sweep.py",
        *args,
        "--storage-path",
        f"s3://{BUCKET}/sweeps",
        "--name",
        "s",
        env=s3_head.env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    best = json.loads(_read_object(s3, f"{BUCKET}/sweeps/s/best.json"))
    assert best["best_checkpoint"].startswith(f"s3://{BUCKET}/sweeps/s/train/")
    from placesnet.checkpoint import load_checkpoint

    assert load_checkpoint(f"s3://{BUCKET}/sweeps/s/best.json").meta["metrics"]["val_top1"] == pytest.approx(
        best["val_top1"]
    )


@pytest.mark.slow
def test_predict_and_evaluate_load_the_best_checkpoint_from_s3(s3, s3_head, s3_run, tiny_root, tmp_path):
    summary = json.loads(_read_object(s3, f"{BUCKET}/runs/r/summary.json"))
    image = next((tiny_root / "val_256").glob("*.jpg"))
    proc = run_script(
        "rayjobs/predict.py",
        "--checkpoint",
        f"s3://{BUCKET}/runs/r",
        "--json",
        image,
        env=s3_head.env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["checkpoint"] == summary["best_checkpoint"]
    # on 2 Ray Train workers, each fetching the URI into the head's cache
    out = tmp_path / "eval"
    proc = run_script(
        "rayjobs/evaluate.py",
        *("--checkpoint", f"s3://{BUCKET}/runs/r/summary.json", "--num-workers", "2", "--out", out),
        env=s3_head.env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["checkpoint"] == summary["best_checkpoint"] and report["val_images"] == 48
    assert list(s3_head.cache.glob("checkpoints/*/r/checkpoint_*/model.pt"))  # the workers' own copy


@pytest.mark.slow
def test_batch_prediction_reads_and_writes_s3(s3, s3_head, tiny_root, tiny_config, tmp_path):
    """rayjobs/batch_predict.py with the checkpoint, the photos and the output all on S3: the decode
    tasks read the objects, the parts are written there, and the same command then finds the
    output complete."""
    import io

    import pandas as pd

    checkpoint = _upload(s3, untrained_checkpoint(tmp_path / "ckpt", tiny_config), "batch/ckpt")
    photos = _upload(s3, tiny_root / "val_256", "photos")
    args = ["--checkpoint", checkpoint, "--input", photos, "--out", f"s3://{BUCKET}/scenes"]
    proc = run_script("rayjobs/batch_predict.py", *args, "--shard-size", 20, env=s3_head.env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "predicted 48 images" in proc.stdout, proc.stdout
    parts = [n for n in _names(s3.filesystem(), f"{BUCKET}/scenes") if n.startswith("part-")]
    assert parts == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    table = pd.concat(pd.read_parquet(io.BytesIO(_read_object(s3, f"{BUCKET}/scenes/{n}"))) for n in parts)
    assert sorted(table["index"]) == list(range(48)) and table["error"].isna().all()
    assert all(path.startswith(f"s3://{BUCKET}/photos/") for path in table["path"])
    again = run_script("rayjobs/batch_predict.py", *args, "--shard-size", 20, env=s3_head.env, timeout=300)
    assert again.returncode == 0 and "is complete: 48 images" in again.stdout, again.stdout


@pytest.mark.slow
def test_serve_gives_its_replicas_the_uri_and_each_fetches_it(s3, s3_head, s3_run, tiny_root):
    import ray
    from ray import serve

    from placesnet.checkpoint import verify_checkpoint

    summary = json.loads(_read_object(s3, f"{BUCKET}/runs/r/summary.json"))
    ray.init(
        address=s3_head.address,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env={"py_modules": [str(REPO / "placesnet"), str(REPO / "serving")]},
    )
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from serving.app import build_app

        app = build_app(
            {
                "checkpoint": f"s3://{BUCKET}/runs/r/summary.json",
                "min_replicas": 1,
                "max_replicas": 1,
                "num_cpus": 0.5,
            }
        )
        serve.run(app, name="placesnet", route_prefix="/")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=30) as r:
            info = json.loads(r.read())
        served = Path(info["checkpoint"])
        # the replica's own copy, in its node's cache (not this process's), verified
        assert (
            served.is_relative_to(s3_head.cache)
            and served.name == summary["best_checkpoint"].rsplit("/", 1)[1]
        )
        assert verify_checkpoint(served) is None
        data = (next((tiny_root / "val_256").glob("*.jpg"))).read_bytes()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", data=data, headers={"Content-Type": "image/jpeg"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["predictions"]
        from ray.serve.context import _get_global_client

        config = _get_global_client().get_serve_details()
        user_config = config["applications"]["placesnet"]["deployments"]["SceneClassifier"][
            "deployment_config"
        ]["user_config"]
        assert user_config == {"checkpoint": summary["best_checkpoint"]}
    finally:
        serve.shutdown()
        ray.shutdown()
