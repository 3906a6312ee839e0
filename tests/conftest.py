"""Shared fixtures: a tiny sample-data preset, and ONE real local Ray head per test session.

The head is started with ``ray start --head --block`` in its own process group (token auth on,
with a token of its own) and that group is ended at the end of the session: never ``ray stop``,
which would end every Ray process of the user on the machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin, where the `ray` CLI lives

# Generated sample data goes to a per-session directory, set before placesnet is imported.
_CACHE = Path(tempfile.mkdtemp(prefix="placesnet-test-cache-"))
os.environ["PLACESNET_CACHE"] = str(_CACHE)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Token auth for the session's Ray head, set before anything imports ray (which reads it once):
# the head, the CLIs the tests start, and in-process ray.init() all use this token.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

# Small images, few classes, a narrow model: every Ray test trains in seconds per epoch.
TINY = dict(
    sample_classes=4,
    sample_train_per_class=40,
    sample_val_per_class=12,
    image_size=32,
    widths=(8, 16, 32),
    batch_size=32,
    lr=0.05,
    epochs=3,
)
TINY_ARGS = [
    "--sample-classes",
    "4",
    "--sample-train-per-class",
    "40",
    "--sample-val-per-class",
    "12",
    "--image-size",
    "32",
    "--widths",
    "8,16,32",
    "--batch-size",
    "32",
    "--lr",
    "0.05",
]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


# `make test` runs the suite in 2 pytest-xdist processes (`-n 2 --dist loadgroup`): a tiny Ray
# run keeps 2 cores only ~60 % busy (process starts, polling), so a second process fills the gaps.
# Each process has its own session head. Tests that share an expensive fixture must run in the
# same process, or it is built twice: every test that uses `trained_run` is one group, every other
# file is a group of its own (its module fixtures built once). Groups start longest first (xdist
# hands out groups in collection order with `--no-loadscope-reorder`), the quick files last.
_LONGEST_FIRST = [
    "trained_run",
    "test_faults.py",
    "test_object_storage.py",
    "test_sweep.py",
    "test_recipe.py",
    "test_multinode.py",
    "test_node_loss.py",
    "test_benchmarks.py",
    "test_reliability.py",
    "test_cli_errors.py",
    "test_workshop.py",
]


def _group(item) -> str:
    return "trained_run" if "trained_run" in item.fixturenames else item.path.name


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: file order otherwise
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))


@pytest.fixture(scope="session")
def tiny_config():
    from placesnet.config import TrainConfig

    return TrainConfig(**TINY)


@pytest.fixture(scope="session")
def tiny_root(tiny_config):
    from placesnet.data.places import resolve_data_root

    return resolve_data_root(tiny_config)


@pytest.fixture
def broken_copy(tiny_root, tmp_path):
    """A Places365-layout copy of the tiny sample with an undecodable train image (line 10 of
    its list: truncated) and val image (line 2: not a JPEG), and 47 val images (shards of 24
    and 23 on 2 workers): (root, the broken train image)."""
    root = tmp_path / "p365"
    shutil.copytree(tiny_root, root)
    lines = (root / "places365_train_standard.txt").read_text().splitlines()
    bad = root / "data_256_standard" / lines[9].split()[0].lstrip("/")  # line 10
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: present and non-empty, not decodable
    (root / "val_256/Places365_val_00000002.jpg").write_bytes(b"not a jpeg at all")
    val = (root / "places365_val.txt").read_text().splitlines(keepends=True)
    (root / "places365_val.txt").write_text("".join(val[:-1]))
    return root, bad


@contextlib.contextmanager
def ray_driver(address: str):
    """This test process as a driver of the cluster at ``address`` (the CLIs' own ray_init), for
    checks run in-process; disconnected afterwards, the cluster left running."""
    import ray

    from placesnet.cli import ray_init

    ray_init(address)
    try:
        yield
    finally:
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """``ray start --head`` in its own process group. ``metrics_export_port``: the node's Prometheus
    endpoint (http://127.0.0.1:PORT/metrics); ``env``: variables for the head and the processes it
    starts, e.g. Ray's system config as ``RAY_<name>``, which a worker reads only from there."""

    def __init__(
        self,
        temp_dir: Path,
        num_cpus: int = 4,
        metrics_export_port: int | None = None,
        env: dict[str, str] | None = None,
    ):
        # Ray's unix sockets live under --temp-dir and must fit in 107 bytes: keep it short.
        self.ray_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = os.environ["RAY_AUTH_TOKEN"]
        self.temp_dir = temp_dir
        self.metrics_export_port = metrics_export_port
        self.env = {
            **os.environ,
            **(env or {}),
            "RAY_ADDRESS": self.address,
            "PATH": f"{BIN}:{os.environ['PATH']}",
        }
        self.log = open(temp_dir / "head.log", "w")
        self.proc = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--num-cpus",
                str(num_cpus),
                "--num-gpus",
                "0",
                "--port",
                str(self.port),
                "--dashboard-port",
                str(self.dashboard_port),
                "--dashboard-host",
                "127.0.0.1",
                "--include-dashboard",
                "true",
                # the job agent's port from the OS too: with Ray's fixed default (52365) a second
                # head on the machine has no job agent ("No available agent to submit job")
                "--dashboard-agent-listen-port",
                "0",
                "--temp-dir",
                str(self.ray_dir),
                "--disable-usage-stats",
                *(["--metrics-export-port", str(metrics_export_port)] if metrics_export_port else []),
            ],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray head exited: {(self.temp_dir / 'head.log').read_text()[-2000:]}")
            try:
                req = urllib.request.Request(
                    f"{self.dashboard}/api/version", headers={"Authorization": f"Bearer {self.token}"}
                )
                urllib.request.urlopen(req, timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError("ray head did not become ready")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.ray_dir, ignore_errors=True)


def worker_node_command(head: RayHead, temp_dir: Path | str, num_cpus: int = 1) -> list[str]:
    """`ray start --address --block` for a worker node of ``num_cpus`` CPUs (no GPUs) joining
    ``head``, its sockets under ``temp_dir`` (keep it short: Unix socket paths are limited)."""
    return [
        str(BIN / "ray"),
        "start",
        "--address",
        head.address,
        "--block",
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--disable-usage-stats",
        "--temp-dir",
        str(temp_dir),
        "--dashboard-agent-listen-port",
        "0",
    ]


def start_head(tmp_path_factory, **kwargs) -> RayHead:
    """A RayHead(**kwargs), ready. Its ports come from the OS and are free when picked, but another
    process may take one before Ray binds it: a head that fails to start is retried on new ports
    (3 tries; a ``metrics_export_port`` given too is picked again)."""
    for attempt in range(3):
        head = RayHead(tmp_path_factory.mktemp("rayhead"), **kwargs)
        try:
            head.wait_ready()
            return head
        except RuntimeError:
            head.stop()
            if attempt == 2:
                raise
            if kwargs.get("metrics_export_port"):
                kwargs["metrics_export_port"] = _free_port()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A real local Ray cluster (4 logical CPUs, dashboard + jobs API, token auth) for the session."""
    head = start_head(tmp_path_factory)
    try:
        yield head
    finally:
        head.stop()


def run_script(script: str, *args, env=None, timeout: float = 600, cwd=REPO) -> subprocess.CompletedProcess:
    """Run one of the repo's entry scripts with this interpreter; output captured as text."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)],
        env=env or os.environ,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A non-zero exit with one clear error line on stderr, and no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


def train_cli(ray_head, storage, name, *extra, epochs=3) -> subprocess.CompletedProcess:
    """rayjobs/train.py on the session head: tiny preset, 2 workers of 1 CPU."""
    return run_script(
        "rayjobs/train.py",
        *TINY_ARGS,
        "--epochs",
        epochs,
        "--num-workers",
        2,
        "--cpus-per-worker",
        1,
        "--storage-path",
        storage,
        "--name",
        name,
        *extra,
        env=ray_head.env,
    )


@pytest.fixture(scope="session")
def trained_run(ray_head, tmp_path_factory):
    """One 2-worker DDP training run on the tiny sample data: (run_dir, CompletedProcess)."""
    storage = tmp_path_factory.mktemp("runs")
    proc = train_cli(ray_head, storage, "ddp", epochs=4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "ddp", proc


def untrained_checkpoint(directory: Path, cfg, seed: int = 0, classes: list[str] | None = None) -> Path:
    """A checkpoint of ``cfg``'s model freshly initialised (``seed``) for the tiny data's 4
    classes (``classes``: other names, same count): for tests of loading, evaluating and serving
    that need no training."""
    import torch

    from placesnet.checkpoint import save_checkpoint
    from placesnet.model import build_model

    torch.manual_seed(seed)
    save_checkpoint(
        directory,
        model=build_model(cfg, 4),
        config=cfg,
        classes=classes or ["/b/beach", "/d/desert/sand", "/f/field/wild", "/f/forest/broadleaf"],
        epoch=0,
        metrics={"epoch": 1, "val_top1": 0.0},
        history=[],
    )
    return Path(directory)


def flip_bytes(path: Path) -> None:
    """4,096 bytes in the middle of the file at ``path`` inverted: same size, other contents (what
    a bad disk or a botched copy does)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + 4096] = bytes(255 - b for b in data[start : start + 4096])
    path.write_bytes(bytes(data))


def transplant_weights(directory: Path, donor: Path) -> None:
    """``donor``'s model.pt (another architecture) in ``directory``, with meta.json's size and
    sha256 updated to match: intact files whose weights do not fit the checkpoint's config."""
    import hashlib
    import json

    shutil.copy(donor / "model.pt", directory / "model.pt")
    meta = json.loads((directory / "meta.json").read_text())
    data = (directory / "model.pt").read_bytes()
    meta["files"]["model.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (directory / "meta.json").write_text(json.dumps(meta))


def post_request(headers: dict[str, str], body: bytes, path: str = "/predict"):
    """A Starlette POST ``path`` request with ``headers`` and ``body`` (one chunk), as Serve's
    proxy hands it to the app: for calling routes and body readers without a server."""
    from starlette.requests import Request

    chunks = [body]

    async def receive():
        return {"type": "http.request", "body": chunks.pop() if chunks else b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive)


class Running:
    """A CLI started in the background, its output in a file we can wait on."""

    def __init__(self, script: str, *args, env: dict, log: Path) -> None:
        self.log, self.out = log, open(log, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / script), *map(str, args)],
            env=env,
            cwd=REPO,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 300) -> float:
        """Seconds since the start when ``needle`` appeared."""
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, (
                f"exited {self.proc.returncode} before {needle!r}:\n{self.text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"no {needle!r} in {timeout}s:\n{self.text()[-3000:]}"
            time.sleep(0.2)
        return time.monotonic() - self.started

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.out.close()


def write_ray_snapshot(run: Path, results: list[dict]) -> None:
    """Ray Train 2.60's checkpoint_manager_snapshot.json in ``run``, recording ``results`` (one
    ``{"version", "checkpoint_dir_name", "metrics"}`` per epoch, in order), as Ray writes it."""
    import json

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
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(state))
