"""The endpoint in production (docs/serving.md#updating-a-running-endpoint): started with
`serve deploy` of a config, a checkpoint promoted in place under load with no failed request and
no answer mixing two models, broken checkpoints refused (by serving/promote.py, by the replicas,
by the app builder) while the running model serves on, and `serve run` kept off a live endpoint.

A real Serve on the session head: `serve deploy`, serving/promote.py and `serve run` as
subprocesses, a load of 8 concurrent clients over HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import BIN, REPO, _free_port, flip_bytes, run_script, transplant_weights, untrained_checkpoint

pytestmark = pytest.mark.slow

IMAGES = 6  # of the tiny val set, each answered with all 4 classes


@dataclass
class Endpoint:
    base: str
    dashboard: str
    env: dict
    config: dict
    logs: Path  # the session's Serve logs (the replicas' included)
    checkpoints: dict[str, Path]
    expected: dict[str, dict[str, list[tuple[str, float]]]]  # checkpoint name -> image -> top-4
    images: dict[str, bytes] = field(default_factory=dict)


def _expected(checkpoint: Path, images: dict[str, bytes]) -> dict[str, list[tuple[str, float]]]:
    """What a replica of ``checkpoint`` answers for each image (all 4 classes, best first)."""
    from placesnet.serve.options import ServeOptions
    from placesnet.serve.replica import Replica, Upload

    replica = Replica(str(checkpoint), ServeOptions(num_cpus=1))
    answer = asyncio.run(replica.predict([Upload(n, d) for n, d in images.items()], 4))
    return {r.name: [(p["label"], p["probability"]) for p in r.predictions] for r in answer.results}


def _serve(cli_args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "serve"), *cli_args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _deploy(endpoint_or_env, config: dict, path: Path, dashboard: str) -> None:
    path.write_text(yaml.safe_dump(config))
    proc = _serve(["deploy", str(path), "-a", dashboard], endpoint_or_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _details(dashboard: str) -> dict:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard).get_serve_details()


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _healthz(base: str) -> dict | None:
    try:
        r = httpx.get(f"{base}/healthz", timeout=5)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def endpoint(ray_head, tiny_config, tiny_root, tmp_path_factory):
    """The app as an operator starts it: `serve deploy` of serving/config.yaml with checkpoint a,
    2 replicas. Yields an Endpoint; Serve is shut down afterwards."""
    from dataclasses import replace

    tmp = tmp_path_factory.mktemp("rollout")
    a = untrained_checkpoint(tmp / "runs/a/checkpoint_000000", tiny_config, seed=0)
    b = untrained_checkpoint(tmp / "runs/b/checkpoint_000000", tiny_config, seed=1)
    wide = untrained_checkpoint(tmp / "wide", replace(tiny_config, widths=(16, 32, 64)))
    flipped, truncated, other = (
        tmp / "runs" / name / "checkpoint_000000" for name in ("flip", "trunc", "arch")
    )
    for broken in (flipped, truncated, other):
        shutil.copytree(b, broken)
    flip_bytes(flipped / "model.pt")
    (truncated / "model.pt").write_bytes((truncated / "model.pt").read_bytes()[:-1000])
    transplant_weights(other, wide)
    val = sorted((tiny_root / "val_256").glob("*.jpg"))[:IMAGES]
    images = {p.name: p.read_bytes() for p in val}
    expected = {"a": _expected(a, images), "b": _expected(b, images)}
    for name in images:  # every image tells a from b
        assert abs(expected["a"][name][0][1] - expected["b"][name][0][1]) > 1e-3 or [
            label for label, _ in expected["a"][name]
        ] != [label for label, _ in expected["b"][name]]

    config = yaml.safe_load((REPO / "serving/config.yaml").read_text())
    port = _free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"].update(
        checkpoint=str(a), num_cpus=0.5, min_replicas=2, max_replicas=2, max_batch_size=8, top_k=4
    )
    base = f"http://127.0.0.1:{port}"
    _deploy(ray_head.env, config, tmp / "serve.yaml", ray_head.dashboard)
    try:
        _wait_for(lambda: (_healthz(base) or {}).get("status") == "ok", 240, "the endpoint")
        _wait_for(
            lambda: _details(ray_head.dashboard)["applications"]["placesnet"]["status"] == "RUNNING",
            240,
            "the app to run",
        )
        yield Endpoint(
            base=base,
            dashboard=ray_head.dashboard,
            env=ray_head.env,
            config=config,
            logs=ray_head.ray_dir / "session_latest/logs/serve",
            checkpoints={"a": a, "b": b, "flipped": flipped, "truncated": truncated, "other": other},
            expected=expected,
            images=images,
        )
    finally:
        _serve(["shutdown", "-y", "-a", ray_head.dashboard], ray_head.env)


# --- the load: 8 clients, single- and multi-image requests ------------------------------------------


@dataclass
class Reply:
    start: float
    end: float
    status: int
    checkpoint: str | None
    source: str | None  # "a" / "b" when every image's answer is exactly that model's, else None


class Load:
    """8 threads sending /predict (every third request 3 images at once) until stopped; each reply
    is recorded with which model produced it, judged from the probabilities themselves."""

    def __init__(self, endpoint: Endpoint, clients: int = 8) -> None:
        self.endpoint, self.replies, self.stop = endpoint, [], threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def _source(self, answers: dict[str, list[dict]]) -> str | None:
        for name in ("a", "b"):
            expected = self.endpoint.expected[name]
            if all(
                [p["label"] for p in preds] == [label for label, _ in expected[image]]
                and all(abs(p["probability"] - q) < 1e-4 for p, (_, q) in zip(preds, expected[image]))
                for image, preds in answers.items()
            ):
                return name
        return None

    def _client(self, index: int) -> None:
        names = list(self.endpoint.images)
        n = index
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                n += 1
                chosen = [names[(n + i) % len(names)] for i in range(3 if n % 3 == 0 else 1)]
                start = time.monotonic()
                try:
                    if len(chosen) == 1:
                        r = client.post(
                            f"{self.endpoint.base}/predict",
                            content=self.endpoint.images[chosen[0]],
                            headers={"Content-Type": "image/jpeg"},
                        )
                    else:
                        files = [("file", (c, self.endpoint.images[c], "image/jpeg")) for c in chosen]
                        r = client.post(f"{self.endpoint.base}/predict", files=files)
                except httpx.HTTPError as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                    continue
                end = time.monotonic()
                if r.status_code != 200:
                    self.replies.append(Reply(start, end, r.status_code, None, None))
                    self.errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                body = r.json()
                if "results" in body:
                    answers = {res["file"]: res["predictions"] for res in body["results"]}
                else:
                    answers = {chosen[0]: body["predictions"]}
                assert body["checkpoint"] == r.headers["X-Checkpoint"]
                self.replies.append(Reply(start, end, 200, body["checkpoint"], self._source(answers)))

    def check(self) -> None:
        """No failed request; every reply entirely one model's, the one its checkpoint names."""
        assert not self.errors, self.errors[:5]
        assert self.replies
        names = {str(path): name for name, path in self.endpoint.checkpoints.items()}
        for reply in self.replies:
            assert reply.source is not None, reply  # mixed, or some other model's
            assert names[reply.checkpoint] == reply.source, reply


def _promote(endpoint: Endpoint, checkpoint, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_script(
        "serving/promote.py",
        checkpoint,
        "--address",
        endpoint.dashboard,
        "--url",
        endpoint.base,
        env=endpoint.env,
        timeout=timeout,
    )


def _serving(endpoint: Endpoint) -> str:
    """The checkpoint name ("a"/"b") every replica serves now (checked by promote.py)."""
    answer = httpx.get(f"{endpoint.base}/model", timeout=10).json()
    return {str(p): n for n, p in endpoint.checkpoints.items()}[answer["checkpoint"]]


def test_promotion_under_load_drops_nothing(endpoint):
    """serving/promote.py b under a load of 8 clients: 0 failed requests, no answer mixing a and b,
    every request sent after promote.py returned answered by b; then back to a through a run
    directory (its best checkpoint)."""
    assert _serving(endpoint) == "a"
    with Load(endpoint) as load:
        time.sleep(2)
        sent = time.monotonic()
        proc = _promote(endpoint, endpoint.checkpoints["b"])
        returned = time.monotonic()
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every replica (2) of placesnet answers from" in proc.stdout, proc.stdout
    load.check()
    sources = [r.source for r in load.replies]
    assert "a" in sources and "b" in sources
    assert all(r.source == "b" for r in load.replies if r.start > returned)
    last_a = max(r.end for r in load.replies if r.source == "a")
    print(f"cut-over: last answer from a {last_a - sent:.2f} s after the promotion was requested")
    print(proc.stdout)

    # back to a, in-process: when promote() returns, every replica already answers from a
    from placesnet.checkpoint import read_meta
    from placesnet.serve.rollout import promote

    done = promote(
        str(endpoint.checkpoints["a"].parent),  # a run dir: its best checkpoint
        address=endpoint.dashboard,
        url=endpoint.base,
        say=lambda line: None,
    )
    fingerprint = read_meta(endpoint.checkpoints["a"])["files"]["model.pt"]["sha256"][:12]
    answers = [_healthz(endpoint.base) for _ in range(8)]
    assert [a["checkpoint_sha256"] for a in answers] == [fingerprint] * 8
    assert (done.checkpoint, done.replicas) == (str(endpoint.checkpoints["a"]), 2)
    assert done.previous == str(endpoint.checkpoints["b"])


@pytest.mark.parametrize(
    "broken, says",
    [
        ("flipped", "model.pt does not match its sha256"),
        ("truncated", "model.pt has"),
        ("other", "do not fit a deepcnn"),
    ],
)
def test_promote_refuses_a_broken_checkpoint_and_the_model_serves_on(endpoint, broken, says):
    before = _serving(endpoint)
    with Load(endpoint) as load:
        proc = _promote(endpoint, endpoint.checkpoints[broken], timeout=60)
        time.sleep(1)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert str(endpoint.checkpoints[broken]) in errors[0]
    load.check()
    assert {r.source for r in load.replies} == {before}


def test_the_replicas_refuse_a_broken_checkpoint_deployed_by_hand(endpoint, tmp_path):
    """A config whose user_config names a checkpoint with flipped bytes, deployed without
    promote.py: each replica verifies it, refuses it in one log line, and serves on; /model says
    what it refused. Then a good checkpoint clears it."""
    before = _serving(endpoint)
    flipped = str(endpoint.checkpoints["flipped"])
    config = json.loads(json.dumps(endpoint.config))
    config["applications"][0]["deployments"] = [
        {"name": "SceneClassifier", "user_config": {"checkpoint": flipped}}
    ]
    with Load(endpoint) as load:
        _deploy(endpoint.env, config, tmp_path / "by-hand.yaml", endpoint.dashboard)

        def refused_everywhere():
            deployment = _details(endpoint.dashboard)["applications"]["placesnet"]["deployments"][
                "SceneClassifier"
            ]
            if deployment["deployment_config"].get("user_config") != {"checkpoint": flipped}:
                return False
            if {r["state"] for r in deployment["replicas"]} != {"RUNNING"}:
                return False
            lines = [
                line
                for log in endpoint.logs.glob("replica_placesnet_SceneClassifier_*.log")
                for line in log.read_text(errors="replace").splitlines()
                if f"placesnet: refused checkpoint {flipped}" in line
            ]
            return len(lines) == 2 and lines  # one line per replica

        lines = _wait_for(refused_everywhere, 120, "both replicas to refuse the checkpoint")
        time.sleep(1)
    assert all("model.pt does not match its sha256" in line for line in lines), lines
    load.check()
    assert {r.source for r in load.replies} == {before}
    model = httpx.get(f"{endpoint.base}/model", timeout=10).json()
    assert model["rejected"]["checkpoint"] == flipped and "sha256" in model["rejected"]["error"]
    assert _healthz(endpoint.base)["rejected"] is True

    proc = _promote(endpoint, endpoint.checkpoints[before])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert httpx.get(f"{endpoint.base}/model", timeout=10).json()["rejected"] is None


def test_a_config_with_a_broken_checkpoint_fails_in_one_line_and_the_app_serves_on(endpoint, tmp_path):
    """`serve deploy` of the config with a truncated checkpoint in args: the app builder refuses it,
    `serve status` says why in one line, and the running replicas keep answering."""
    before = _serving(endpoint)
    config = json.loads(json.dumps(endpoint.config))
    config["applications"][0]["args"]["checkpoint"] = str(endpoint.checkpoints["truncated"])
    with Load(endpoint) as load:
        _deploy(endpoint.env, config, tmp_path / "broken.yaml", endpoint.dashboard)
        app = _wait_for(
            lambda: (
                (a := _details(endpoint.dashboard)["applications"]["placesnet"])["status"] == "DEPLOY_FAILED"
                and a
            ),
            120,
            "the deploy to fail",
        )
        time.sleep(2)
    header, *message = app["message"].splitlines()
    assert header == "Deploying app 'placesnet' failed with exception:", app["message"]
    assert len(message) == 1 and "model.pt has" in message[0], app["message"]
    load.check()
    assert {r.source for r in load.replies} == {before}
    _deploy(endpoint.env, endpoint.config, tmp_path / "good.yaml", endpoint.dashboard)  # back to a
    _wait_for(
        lambda: _details(endpoint.dashboard)["applications"]["placesnet"]["status"] == "RUNNING", 180, "a"
    )


def test_serve_run_over_a_live_endpoint_is_refused(endpoint):
    """The README's `serve run` against a cluster that already serves the app: refused in one line
    before it connects, and the endpoint serves on (before: Serve shut down, every request failed)."""
    before = _serving(endpoint)
    with Load(endpoint) as load:
        proc = _serve(
            [
                "run",
                "--name",
                "placesnet",
                "serving.app:build_app",
                f"checkpoint={endpoint.checkpoints['b']}",
            ],
            endpoint.env,
            timeout=120,
        )
        time.sleep(2)
    assert proc.returncode != 0
    assert "this cluster already serves placesnet" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    load.check()
    assert {r.source for r in load.replies} == {before}
    assert _healthz(endpoint.base)["status"] == "ok"


def test_promote_latest_is_the_newest_run_at_promotion_time(endpoint):
    """`promote.py latest:STORAGE` resolves when it runs: the run that finished last, each time."""
    import os

    storage = endpoint.checkpoints["a"].parents[1]
    for name in ("a", "b"):
        checkpoint = endpoint.checkpoints[name]
        (checkpoint.parent / "summary.json").write_text(json.dumps({"best_checkpoint": str(checkpoint)}))
    for newest in ("b", "a"):
        summary = endpoint.checkpoints[newest].parent / "summary.json"
        os.utime(summary, (time.time() + 10, time.time() + 10))  # it finished last
        proc = _promote(endpoint, f"latest:{storage}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _serving(endpoint) == newest
