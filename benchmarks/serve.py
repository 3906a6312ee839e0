"""Serving: requests/s and p50/p99 latency at several concurrencies for the Ray Serve endpoint with
dynamic batching, the same endpoint with batching off, and a plain one-process FastAPI + uvicorn
app serving the same model.

    python benchmarks/serve.py                               # local Ray, a random-weight sample model
    python benchmarks/serve.py --checkpoint ~/ray_results/deepcnn-sample-... --requests 500
    python benchmarks/serve.py --address auto --concurrency 1,8,32,64
    python benchmarks/serve.py --gpus 0.25 --cpus 2 --image-size 256   # GPU replicas (and plain app)
    python benchmarks/serve.py --no-rollout                  # without the rollout table (about 30 s less)

Two more rows send the batched endpoint the same image over gRPC (serving/scene.proto through
Serve's gRPC proxy), one and --per-request images per call, next to HTTP. A fifth row is the
batched endpoint with ``adaptive_batching=0``: Serve's plain ``@serve.batch``, where even a lone
request waits ``batch_wait_timeout_s`` for company. The fourth row, an echo deployment that only
reads the body, is Serve's own per-request floor on this machine (proxy + ingress, no model): no
change on the model side can make batching beat batching off by more than echo does, and the table
prints that ceiling. Every server gets the same CPU budget (--cpus: one Serve replica with that
many CPUs, or that many torch threads in the plain app) and the same JPEG, and runs the project's
preprocessing (``decode_image`` + the checkpoint's eval transform + ``normalize``). All servers are
started first and then loaded one at a time (the others sit idle); the load comes from an asyncio
httpx client in this process, and needs 4x --cpus free CPUs on the cluster (6x with the rollout's).
Ratios are against batching off, measured in the same invocation.

The rollout table updates a running endpoint from checkpoint a to b (two random-weight models at
--image-size) under a load of --rollout-concurrency clients, both ways docs/serving.md describes, on
one app deployed as `serve deploy` does (serving/config.yaml's, 2 replicas of --cpus): in place
(placesnet.serve.rollout.promote, called in this process) and by deploying the config again with
the new ``args.checkpoint``, which rolls the replicas (the baseline). Per method: requests, failed
requests, the longest gap between two answers, and the cut-over (the last answer from a), against
the roll's. Where this script starts Serve, it starts it through the REST API too, as on a `ray
start` cluster (see deploy_declaratively). Its checkpoints are written on this machine: on a
multi-node cluster, --no-rollout."""

# No `from __future__ import annotations`: FastAPI must see the real Request type.
import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import busy_cpu_seconds, print_table, ratio, sample_root

REPO = Path(__file__).resolve().parents[1]
APP_NAME, ROUTE = "placesnet-bench", "/placesnet-bench"
GRPC_SERVICER = "serving.scene_pb2_grpc.add_SceneClassifierServicer_to_server"


def random_checkpoint(directory: Path, image_size: int, seed: int = 0) -> Path:
    """An untrained DeepCNN checkpoint (throughput does not depend on the weights); another
    ``seed``, other weights."""
    import torch

    from placesnet.checkpoint import save_checkpoint
    from placesnet.config import TrainConfig
    from placesnet.data.scenes import official_categories
    from placesnet.model import build_model

    cfg = TrainConfig(image_size=image_size)
    classes = official_categories()[: cfg.sample_classes]
    torch.manual_seed(seed)
    metrics = {"epoch": 1, "val_top1": 0.0, "val_top5": 0.0}
    return save_checkpoint(
        directory,
        model=build_model(cfg, len(classes)),
        config=cfg,
        classes=classes,
        epoch=0,
        metrics=metrics,
        history=[metrics],
    )


# --- the plain baseline: one process, FastAPI + uvicorn, same preprocessing and model -----------


def plain_server(checkpoint: str, port: int, threads: int, gpu: bool = False) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI, Request

    from placesnet.checkpoint import load_checkpoint
    from placesnet.evaluation import predict_images
    from placesnet.images import decode_image

    torch.set_num_threads(threads)
    loaded = load_checkpoint(checkpoint, torch.device("cuda" if gpu else "cpu"))
    app = FastAPI()

    @app.post(ROUTE + "/predict")
    async def predict(request: Request) -> dict:  # the same preprocessing as predict.py and Serve
        return {"predictions": predict_images(loaded, [decode_image(await request.body())])[0]}

    @app.get(ROUTE + "/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start_plain(checkpoint: str, port: int, threads: int, gpus: float = 0) -> subprocess.Popen:
    """The plain app in a subprocess; it starts while the Serve apps deploy."""
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--plain-server",
            str(port),
            "--checkpoint",
            checkpoint,
            "--cpus",
            str(threads),
            "--gpus",
            str(gpus),
        ]
    )


# --- Ray Serve -------------------------------------------------------------------------------


def deploy(app, name: str, port: int) -> str:
    """Deploy ``app`` under its own name and route (apps stay up until the end, so no waiting
    for deletions between servers); returns its base URL."""
    from ray import serve

    route = f"{ROUTE}-{name}"
    serve.run(app, name=f"{APP_NAME}-{name}", route_prefix=route)
    return f"http://127.0.0.1:{port}{route}"


def model_app(checkpoint: str, cpus: float, max_batch_size: int, adaptive: bool = True, gpus: float = 0):
    from serving.app import build_app

    return build_app(
        {
            "checkpoint": checkpoint,
            "min_replicas": 1,
            "max_replicas": 1,
            "num_cpus": cpus,
            "num_gpus": gpus,
            "max_batch_size": max_batch_size,
            "adaptive_batching": int(adaptive),
        }
    )


def echo_app(cpus: float):
    """Serve's own floor: the same proxy and FastAPI ingress, a handler that only reads the body."""
    from fastapi import FastAPI, Request
    from ray import serve

    echo = FastAPI()

    @serve.deployment(name="Echo", max_ongoing_requests=64, ray_actor_options={"num_cpus": cpus})
    @serve.ingress(echo)
    class Echo:
        @echo.post("/predict")
        async def predict(self, request: Request) -> dict:
            return {"bytes": len(await request.body())}

        @echo.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

    return Echo.bind()


def serve_running() -> bool:
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        return True
    except ValueError:
        return False


def wait_healthy(base: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{base} did not become healthy in {timeout:.0f}s")


# --- load --------------------------------------------------------------------------------------


async def _drive(send, concurrency: int, requests: int, per_request: int) -> dict:
    """``requests`` calls of ``send()`` (an async callable: True when the answer was an error),
    ``concurrency`` at a time after a short warm-up; throughput and latency percentiles."""
    latencies: list[float] = []
    errors = 0
    queue = iter(range(requests))

    async def one_client():
        nonlocal errors
        for _ in queue:
            t0 = time.perf_counter()
            errors += await send()
            latencies.append(time.perf_counter() - t0)

    for _ in range(min(concurrency, 4)):  # warm-up: connections, first batches
        await send()
    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: latencies[min(int(q * len(latencies)), len(latencies) - 1)] * 1000  # noqa: E731
    return {
        "requests/s": len(latencies) / wall,
        "images/s": len(latencies) * per_request / wall,
        "p50 ms": pick(0.50),
        "p99 ms": pick(0.99),
        "errors": errors,
    }


async def _load(url: str, body: bytes, concurrency: int, requests: int, per_request: int = 1) -> dict:
    import httpx

    if per_request > 1:  # several images per request: repeated multipart `file` fields
        files = [("file", (f"{i}.jpg", body, "image/jpeg")) for i in range(per_request)]
        kwargs = dict(files=files)
    else:
        kwargs = dict(content=body, headers={"Content-Type": "image/jpeg"})
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def send() -> bool:
            return (await client.post(url, **kwargs)).status_code != 200

        return await _drive(send, concurrency, requests, per_request)


WRK_SCRIPT = """
local f = assert(io.open(os.getenv("PLACESNET_WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "image/jpeg"
"""


async def _grpc_load(
    target: str, app: str, body: bytes, concurrency: int, requests: int, per_request: int = 1
) -> dict:
    """The same load over gRPC (serving/scene.proto): one channel, ``concurrency`` calls in flight."""
    import grpc

    from serving.grpc_client import metadata
    from serving.scene_pb2 import PredictRequest
    from serving.scene_pb2_grpc import SceneClassifierStub

    message = PredictRequest(images=[body] * per_request)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = SceneClassifierStub(channel)

        async def send() -> bool:
            try:
                reply = await stub.Predict(message, metadata=metadata(None, app), timeout=60)
            except grpc.aio.AioRpcError:
                return True
            return any(r.error for r in reply.results)

        return await _drive(send, concurrency, requests, per_request)


def grpc_load(
    target: str, app: str, body: bytes, concurrency: int, requests: int, per_request: int = 1
) -> dict:
    before = busy_cpu_seconds()
    out = asyncio.run(_grpc_load(target, app, body, concurrency, requests, per_request))
    after = busy_cpu_seconds()
    out["CPU ms/req"] = (after - before) * 1000 / requests if before is not None else ""
    return out


def _ms(text: str) -> float:
    units = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}
    number = text.rstrip("usm")
    return float(number) * units[text[len(number) :]]


def wrk_load(base: str, body: bytes, concurrency: int, seconds: float) -> dict | None:
    """The same POST from wrk, a compiled load generator (scripts/bench_tools.sh installs it):
    requests/s and p50/p99 with no Python client in the way. None when wrk is not installed."""
    import re
    import shutil

    wrk = shutil.which("wrk")
    if not wrk:
        return None
    with tempfile.TemporaryDirectory(prefix="placesnet-wrk-") as tmp:
        (Path(tmp) / "body.jpg").write_bytes(body)
        (Path(tmp) / "post.lua").write_text(WRK_SCRIPT)
        before = busy_cpu_seconds()
        out = subprocess.run(
            [
                wrk,
                "-t1",
                f"-c{concurrency}",
                f"-d{max(seconds, 1):.0f}s",
                "--latency",
                "-s",
                str(Path(tmp) / "post.lua"),
                f"{base}/predict",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            env={**os.environ, "PLACESNET_WRK_BODY": str(Path(tmp) / "body.jpg")},
        )
        after = busy_cpu_seconds()
    text = out.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if out.returncode != 0 or not rps or not total:
        raise RuntimeError(f"wrk failed: {out.stderr[-500:]}{text[-500:]}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    requests = int(total.group(1))
    return {
        "requests/s": float(rps.group(1)),
        "p50 ms": _ms(re.search(r"50%\s+(\S+)", text).group(1)),
        "p99 ms": _ms(re.search(r"99%\s+(\S+)", text).group(1)),
        "errors": int(bad.group(1)) if bad else 0,
        "CPU ms/req": (after - before) * 1000 / requests if before is not None and requests else "",
    }


def load(base: str, body: bytes, concurrency: int, requests: int, per_request: int = 1) -> dict:
    """Throughput and latency, plus this machine's busy CPU time per request (every process:
    client, proxy, replica, Ray), which shows where the ceiling is when everything shares it."""
    before = busy_cpu_seconds()
    result = asyncio.run(_load(f"{base}/predict", body, concurrency, requests, per_request))
    after = busy_cpu_seconds()
    result["CPU ms/req"] = (after - before) * 1000 / requests if before is not None else ""
    return result


# --- rollout: a new checkpoint under load, swapped in place vs the replicas rolled --------------

ROLLOUT_APP = f"{APP_NAME}-rollout"
ROLLOUT_TIMEOUT = 300  # seconds for the app to start, and for each update to finish
IN_PLACE, ROLL = "in place (promote)", "roll (serve deploy, new args.checkpoint)"


def rollout_app(checkpoint: Path, cpus: float, gpus: float, max_batch_size: int) -> dict:
    """serving/config.yaml's app as `serve deploy` sends it, under the benchmark's name and route,
    on ``checkpoint``, with 2 replicas of ``cpus`` CPUs (and ``gpus`` GPUs) each."""
    import yaml

    app = yaml.safe_load((REPO / "serving/config.yaml").read_text())["applications"][0]
    app.update(name=ROLLOUT_APP, route_prefix=f"{ROUTE}-rollout")
    app["args"].update(
        checkpoint=str(checkpoint),
        min_replicas=2,
        max_replicas=2,
        num_cpus=cpus,
        num_gpus=gpus,
        max_batch_size=max_batch_size,
    )
    return app


def deploy_declaratively(client, app: dict | None, start: dict | None = None) -> None:
    """Serve's running config (the apps `serve deploy` or the REST API started, as deployed, with
    Serve's HTTP and gRPC options) with ``app`` in place of the benchmark's own (None: without it),
    sent to the REST API as `serve deploy` sends it; ``start``: the http_options and grpc_options
    to start Serve with, where it is not running yet. The imperative apps (serve.run) are left as
    they are; promotion works only on apps deployed this way.

    Serve should not have been started by a driver with a runtime_env (this script's ray.init has
    one): its controller inherits it, so do the replicas of an app deployed this way, and the first
    config that overrides the deployment (promote's user_config) changes their runtime_env (Ray
    adds ``env_vars: {}``), which rolls them instead of reconfiguring them in place."""
    details = client.get_serve_details()
    apps = [
        info["deployed_app_config"]
        for name, info in (details.get("applications") or {}).items()
        if info.get("deployed_app_config") and name != ROLLOUT_APP
    ]
    config = {"applications": apps + ([app] if app else []), **(start or {})}
    for key in ("proxy_location", "http_options", "grpc_options"):
        if not start and details.get(key) is not None:
            config[key] = details[key]
    client.deploy_applications(config)


def wait_serving(client, checkpoint: Path, deadline: float) -> None:
    """Until Serve reports the benchmark's app RUNNING on ``checkpoint`` (its deployment's
    user_config) with every replica RUNNING and no other left: what `serve status` shows once a
    rolling update is over."""
    from placesnet.serve.rollout import DEPLOYMENT

    while time.monotonic() < deadline:
        app = (client.get_serve_details().get("applications") or {}).get(ROLLOUT_APP) or {}
        deployment = (app.get("deployments") or {}).get(DEPLOYMENT) or {}
        states = [r["state"] for r in deployment.get("replicas") or []]
        if (
            app.get("status") == "RUNNING"
            and deployment.get("status") == "HEALTHY"
            and (deployment["deployment_config"].get("user_config") or {}).get("checkpoint")
            == str(checkpoint)
            and states == ["RUNNING", "RUNNING"]
        ):
            return
        if app.get("status") == "DEPLOY_FAILED":
            raise RuntimeError(f"the rollout app failed to deploy: {app.get('message')}")
        time.sleep(0.2)
    raise RuntimeError(f"{ROLLOUT_APP} was not serving {checkpoint} after {ROLLOUT_TIMEOUT} s")


def progress(line: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


class RolloutLoad:
    """``concurrency`` clients POSTing ``body`` to ``url`` one request after another, in a thread of
    their own (the caller blocks on the update meanwhile), until the ``with`` block ends. Each
    answer is kept as (start, end, checkpoint): the checkpoint its JSON and its X-Checkpoint header
    both name, or None for a failed request (not 200, a connection error, the two disagreeing)."""

    def __init__(self, url: str, body: bytes, concurrency: int) -> None:
        self.url, self.body, self.concurrency = url, body, concurrency
        self.answers: list[tuple[float, float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> "RolloutLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)

    async def _run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:

            async def one_client() -> None:
                while not self._stop.is_set():
                    start, checkpoint = time.monotonic(), None
                    try:
                        r = await client.post(
                            self.url, content=self.body, headers={"Content-Type": "image/jpeg"}
                        )
                        if r.status_code == 200 and r.json().get("checkpoint") == r.headers.get(
                            "X-Checkpoint"
                        ):
                            checkpoint = r.headers["X-Checkpoint"]
                    except (httpx.HTTPError, ValueError):
                        pass
                    self.answers.append((start, time.monotonic(), checkpoint))

            await asyncio.gather(*(one_client() for _ in range(self.concurrency)))


def time_update(url: str, body: bytes, concurrency: int, update, a: Path, b: Path, replicas) -> dict:
    """``update()`` (it returns when its method says every replica serves ``b``) run under the
    load, which starts 1 s before and ends 2 s after it; what the clients saw, in seconds from the
    moment ``update`` was called, and how many of the replicas (``replicas()``: their ids) it
    replaced."""
    with RolloutLoad(url, body, concurrency) as load:
        time.sleep(1)  # the load at its steady state first
        before = replicas()
        t0 = time.monotonic()
        update()
        done = time.monotonic() - t0
        time.sleep(2)  # the answers in flight, and any straggler from a
    replaced = len(before - replicas())
    answers = load.answers
    ok = sorted(end for _, end, checkpoint in answers if checkpoint in (str(a), str(b)))
    from_a = [end - t0 for _, end, checkpoint in answers if checkpoint == str(a)]
    from_b = [end - t0 for _, end, checkpoint in answers if checkpoint == str(b) and end > t0]
    return {
        "requests": len(answers),
        "failed": len(answers) - len(ok),
        "longest gap s": max((y - x for x, y in zip(ok, ok[1:])), default=float("nan")),
        "first b s": min(from_b, default=float("nan")),
        "cut-over s": max(0.0, *from_a),  # the last answer from a
        "done s": done,
        "replicas replaced": replaced,
    }


def measure_rollout(client, dashboard: str, base: str, body: bytes, args, a: Path, b: Path) -> list[dict]:
    """a -> b under load twice on the app deployed on ``a``: in place (placesnet.serve.rollout's
    promote(), called here, so promote.py's Python start-up is not in the times), and by `serve
    deploy` of the same config with ``args.checkpoint`` b, which rolls the replicas (the baseline).
    The app goes back to a in place between the two, untimed. One row per method."""
    from placesnet.serve.rollout import DEPLOYMENT, promote

    wait_serving(client, a, time.monotonic() + ROLLOUT_TIMEOUT)
    wait_healthy(base)

    def replicas() -> set[str]:
        deployment = client.get_serve_details()["applications"][ROLLOUT_APP]["deployments"][DEPLOYMENT]
        return {r["replica_id"] for r in deployment["replicas"]}

    def in_place(checkpoint: Path):
        return lambda: promote(
            str(checkpoint),
            address=dashboard,
            app=ROLLOUT_APP,
            url=base,
            timeout=ROLLOUT_TIMEOUT,
            say=progress,
        )

    def roll() -> None:
        deploy_declaratively(client, rollout_app(b, args.cpus, args.gpus, args.max_batch_size))
        wait_serving(client, b, time.monotonic() + ROLLOUT_TIMEOUT)

    url, concurrency = f"{base}/predict", args.rollout_concurrency
    progress(f"rollout: a -> b in place, {concurrency} clients")
    promoted = time_update(url, body, concurrency, in_place(b), a, b, replicas)
    progress("rollout: back to a in place (untimed)")
    in_place(a)()
    progress(f"rollout: a -> b by a rolling update, {concurrency} clients")
    rolled = time_update(url, body, concurrency, roll, a, b, replicas)
    progress("rollout: done")
    return [
        {"method": ROLL, **rolled, "cut-over vs roll": ratio(rolled["cut-over s"], rolled["cut-over s"])},
        {
            "method": IN_PLACE,
            **promoted,
            "cut-over vs roll": ratio(promoted["cut-over s"], rolled["cut-over s"]),
        },
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="a running Ray cluster (default: start a local one)")
    p.add_argument(
        "--checkpoint",
        help="checkpoint, run dir or best.json (default: an untrained DeepCNN at --image-size)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=64,
        help="of the default model (default: %(default)s, the sample model's)",
    )
    p.add_argument("--concurrency", default="1,8,32", help="client concurrencies (default: %(default)s)")
    p.add_argument("--requests", type=int, default=300, help="per concurrency (default: %(default)s)")
    p.add_argument(
        "--cpus",
        type=float,
        default=1,
        help="CPUs per server, fractions allowed for the "
        "Serve replicas (the plain app gets max(1, int(CPUS)) threads; default: %(default)s)",
    )
    p.add_argument("--max-batch-size", type=int, default=16, help="batched server (default: %(default)s)")
    p.add_argument(
        "--wrk-seconds",
        type=float,
        default=5,
        help="seconds of wrk load per server at the top concurrency (0: no wrk rows; default: %(default)s)",
    )
    p.add_argument(
        "--per-request",
        type=int,
        default=16,
        help="images per request of the multi-image row (default: %(default)s)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=8000,
        help="Serve's HTTP port: the running Serve's, or the one to start it on (default: %(default)s)",
    )
    p.add_argument("--plain-port", type=int, default=8124, help="the plain app's port")
    p.add_argument(
        "--grpc-port",
        type=int,
        default=9124,
        help="Serve's gRPC port, when this run starts Serve (default: %(default)s)",
    )
    p.add_argument(
        "--gpus",
        type=float,
        default=0,
        help="GPU per model replica (fractions allowed; the three model apps share the "
        "GPUs) and the plain app on a GPU; 0: CPU only (default: %(default)s)",
    )
    p.add_argument(
        "--rollout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the rollout table: a new checkpoint swapped in place vs the replicas rolled, under load "
        "(about 30 s; default: on)",
    )
    p.add_argument(
        "--rollout-concurrency",
        type=int,
        default=8,
        help="clients sending requests during each rollout (default: %(default)s)",
    )
    p.add_argument("--plain-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_server:
        return plain_server(args.checkpoint, args.plain_server, max(1, int(args.cpus)), args.gpus > 0)
    if args.gpus < 0:
        p.error(f"--gpus must be >= 0, got {args.gpus:g}")
    if args.rollout_concurrency < 1:
        p.error(f"--rollout-concurrency must be >= 1, got {args.rollout_concurrency}")
    if args.gpus > 0 and not args.address:
        import torch

        if not torch.cuda.is_available():
            p.error(f"--gpus {args.gpus:g} needs a CUDA GPU here (or --address of a cluster with GPUs)")

    import ray
    from ray import serve

    levels = [int(c) for c in args.concurrency.split(",")]
    body = next((sample_root(8, 8) / "val_256").glob("*.jpg")).read_bytes()
    with tempfile.TemporaryDirectory(prefix="placesnet-serve-bench-") as tmp:
        checkpoint = str(
            Path(args.checkpoint).expanduser().resolve()
            if args.checkpoint
            else random_checkpoint(Path(tmp) / "ckpt", args.image_size)
        )
        context = ray.init(
            address=args.address,
            logging_level="WARNING",
            log_to_driver=False,
            # four Serve apps of one replica, and the rollout's two replicas
            num_cpus=None if args.address else math.ceil((6 if args.rollout else 4) * args.cpus) + 1,
            runtime_env={"py_modules": [str(REPO / "placesnet"), str(REPO / "serving")]},
        )
        started = not serve_running()
        options = {
            "http_options": {"host": "127.0.0.1", "port": args.port},
            "grpc_options": {"port": args.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]},
        }
        port = args.port
        rollout = None
        if args.rollout:  # deployed first: its replicas start while the other apps deploy
            from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

            dashboard = context.dashboard_url
            dashboard = dashboard if "://" in dashboard else f"http://{dashboard}"
            a, b = (
                random_checkpoint(Path(tmp) / n, args.image_size, seed).resolve()
                for n, seed in (("a", 0), ("b", 1))
            )
            client = ServeSubmissionClient(dashboard)
            # Serve started by the REST API, as `serve deploy` starts it on a `ray start` cluster: a
            # controller that serve.start() starts here inherits this driver's runtime_env, and Ray
            # 2.60 then rolls the replicas on the first user_config change (see deploy_declaratively)
            app = rollout_app(a, args.cpus, args.gpus, args.max_batch_size)
            deploy_declaratively(client, app, options if started else None)
        elif started:
            serve.start(**options)
        plain_proc = start_plain(checkpoint, args.plain_port, max(1, int(args.cpus)), args.gpus)
        names = [
            f"serve, batching (max {args.max_batch_size})",
            "serve, batching off",
            "plain FastAPI + uvicorn",
            "serve, echo (no model)",
            "serve, batching, always queued (adaptive_batching=0)",
            f"serve, batching, {args.per_request} images per request",
            "serve, batching, gRPC",
            f"serve, batching, gRPC, {args.per_request} images per call",
        ]
        grpc_rows = {names[6]: 1, names[7]: args.per_request} if started else {}
        results, wrk_results = {}, {}
        try:
            bases = {
                names[0]: deploy(
                    model_app(checkpoint, args.cpus, args.max_batch_size, gpus=args.gpus), "batched", port
                ),
                names[1]: deploy(model_app(checkpoint, args.cpus, 1, gpus=args.gpus), "unbatched", port),
                names[2]: f"http://127.0.0.1:{args.plain_port}{ROUTE}",
                names[3]: deploy(echo_app(args.cpus), "echo", port),
                names[4]: deploy(
                    model_app(checkpoint, args.cpus, args.max_batch_size, adaptive=False, gpus=args.gpus),
                    "queued",
                    port,
                ),
            }
            bases[names[5]] = bases[names[0]]  # the batched app, sent several images per request
            for name in grpc_rows:  # the batched app again, over gRPC
                bases[name] = bases[names[0]]
            target = f"127.0.0.1:{args.grpc_port}"
            for name, base in bases.items():  # one server under load at a time
                wait_healthy(base)
                n = args.per_request if name == names[5] else grpc_rows.get(name, 1)
                for c in levels:
                    if name in grpc_rows:
                        results[name, c] = grpc_load(
                            target, f"{APP_NAME}-batched", body, c, max(args.requests // n, 2), n
                        )
                    else:
                        results[name, c] = load(base, body, c, max(args.requests // n, 2), n)
                if n == 1 and args.wrk_seconds > 0 and name not in grpc_rows:
                    wrk_results[name] = wrk_load(base, body, max(levels), args.wrk_seconds)
                    print(
                        f"  {name} @ {c}: {results[name, c]['requests/s']:.0f} req/s",
                        file=sys.stderr,
                        flush=True,
                    )
            if args.rollout:
                rollout = measure_rollout(
                    client, dashboard, f"http://127.0.0.1:{port}{ROUTE}-rollout", body, args, a, b
                )
        finally:
            plain_proc.terminate()
            plain_proc.wait(timeout=30)
            if started:
                serve.shutdown()
            else:
                if args.rollout:
                    with contextlib.suppress(Exception):
                        deploy_declaratively(client, None)
                for app in ("batched", "unbatched", "echo", "queued"):
                    with contextlib.suppress(Exception):
                        serve.delete(f"{APP_NAME}-{app}")
            ray.shutdown()
        # the stage table splits CPU time: on GPU replicas the model's share is not CPU time
        costs = (
            None if args.gpus else stage_costs(checkpoint, body, max(1, int(args.cpus)), args.max_batch_size)
        )
    if not grpc_rows:
        print(
            "\ngRPC rows: left out, Serve was already running here without the project's gRPC "
            "servicer (start it with grpc_options, see serving/config.yaml)"
        )
    names = [n for n in names if n in bases]
    rows = []
    for c in levels:
        base = results["serve, batching off", c]
        for name in names:
            r = results[name, c]
            rows.append(
                {
                    "server": name,
                    "concurrency": c,
                    **r,
                    "vs batching off": ratio(r["requests/s"], base["requests/s"]),
                    "images/s vs batching off": ratio(r["images/s"], base["images/s"]),
                    "p50 vs batching off": ratio(r["p50 ms"], base["p50 ms"]),
                }
            )
    top = max(levels)
    ceiling = ratio(results[names[3], top]["requests/s"], results[names[1], top]["requests/s"])
    where = "this machine" if not args.address else "the client's machine only"
    print_table(
        f"serve: {len(body):,}-byte JPEG, model at {args.image_size if not args.checkpoint else 'ckpt'} px, "
        f"{args.cpus} CPU{f' + {args.gpus:g} GPU' if args.gpus else ''} per server, "
        f"{args.requests} requests per row",
        rows,
        note=f"goal: batching >= 2x batching off at concurrency 32; {args.per_request} images per "
        f"request >= 3x the images/s of one per request; at concurrency 1 batching's "
        f"p50 within 1.1x of batching off (adaptive: a lone request skips the batch wait; "
        f"'always queued' is Serve's plain @serve.batch)\n"
        f"ceiling for any model-side speed-up at concurrency {top}: echo / batching off = "
        f"{ceiling} (a model that cost nothing would still pay Serve's per-request "
        f"cost); CPU ms/req: busy CPU on {where} per request, all processes",
    )

    if costs:
        stages(costs, args, results, names, top)
    wrk_rows = [
        {
            "server": name,
            "concurrency": top,
            **r,
            "wrk / httpx req/s": ratio(r["requests/s"], results[name, top]["requests/s"]),
        }
        for name, r in wrk_results.items()
        if r
    ]
    if wrk_rows:
        print_table(
            f"serve under wrk (compiled load generator), concurrency {top}, {args.wrk_seconds:g} s each",
            wrk_rows,
            note="wrk / httpx: how much faster the endpoint answers a client that costs "
            "almost no CPU; if it is well above 1, the Python client was part of the "
            "ceiling in the table above",
        )
    elif args.wrk_seconds > 0:
        print("\nwrk rows: wrk is not installed (make bench-tools, or apt-get install wrk)")
    if rollout:
        print_table(
            f"serve rollout: checkpoint a -> b under load, 2 replicas of {args.cpus:g} CPU"
            f"{f' + {args.gpus:g} GPU' if args.gpus else ''}, concurrency {args.rollout_concurrency}",
            rollout,
            note="each method once, on one app deployed through Serve's REST API as `serve deploy` does "
            "(serving/config.yaml's), under the same single-image JPEG requests. In place: "
            "placesnet.serve.rollout.promote() called in this process with url= the endpoint, so "
            "promote.py's Python start-up is not counted; roll: the config deployed again with "
            "args.checkpoint = b, which Serve rolls out one replica at a time. Seconds from the update "
            "request: first b = the first answer from b, cut-over = the last answer from a, done = when "
            "the method said it had finished (in place: every replica's /healthz names b; roll: Serve "
            "reports the app RUNNING on b). Failed: not 200, a connection error, or an answer whose JSON "
            "and X-Checkpoint disagree; longest gap: between two successful answers; replicas replaced: "
            "replicas running before the update and gone after it",
        )


def stage_costs(checkpoint: str, body: bytes, threads: int, batch: int, repeats: int = 30) -> dict:
    """CPU ms of the replica's own work for one image, measured in this process with the
    replica's thread budget: decode + resize (decode_image + the checkpoint's single_view), and
    the model (normalize + forward + softmax) at batch 1 and per image at ``batch``."""
    import torch

    from placesnet.checkpoint import load_checkpoint
    from placesnet.data.transforms import normalize
    from placesnet.data.views import single_view
    from placesnet.images import decode_image

    torch.set_num_threads(threads)
    loaded = load_checkpoint(checkpoint)
    transform = single_view(loaded.config)  # the checkpoint's own eval transform, as the replica's

    def cpu_ms(fn, n: int) -> float:
        fn()  # warm-up
        start = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - start) * 1000 / n

    one = transform(decode_image(body))
    stacked = torch.stack([one] * batch)

    def model(x):
        with torch.inference_mode():
            torch.softmax(loaded.model(normalize(x)).float(), dim=1)

    return {
        "decode + resize": cpu_ms(lambda: transform(decode_image(body)), repeats),
        "model, batch 1": cpu_ms(lambda: model(one[None]), repeats),
        f"model per image, batch {batch}": cpu_ms(lambda: model(stacked), max(repeats // 4, 2)) / batch,
    }


def stages(costs: dict, args, results: dict, names: list[str], top: int) -> None:
    """Where a request's CPU goes: Serve's proxy + ingress (echo's CPU ms/request), the replica's
    decode + resize and model (measured in-process), and the rest (the response, batching's and
    the event loop's own work) as the difference to the whole endpoint's CPU ms/request."""
    echo = results[names[3], top].get("CPU ms/req")
    rows = []
    for name, model_key in (
        (names[1], "model, batch 1"),
        (names[0], f"model per image, batch {args.max_batch_size}"),
    ):
        total = results[name, top].get("CPU ms/req")
        if not isinstance(total, float) or not isinstance(echo, float):
            continue
        parts = {
            "proxy + ingress (echo)": echo,
            "decode + resize": costs["decode + resize"],
            "model": costs[model_key],
        }
        parts["response, batching, rest"] = total - sum(parts.values())
        rows += [
            {"endpoint": name, "stage": k, "CPU ms/request": v, "share": f"{v / total:.0%}"}
            for k, v in parts.items()
        ]
        rows.append({"endpoint": name, "stage": "total (measured)", "CPU ms/request": total, "share": "100%"})
    if rows:
        print_table(
            f"serve: where the CPU of a request goes, at concurrency {top}",
            rows,
            note="proxy + ingress: echo's CPU ms/request (Serve with no model); decode + resize "
            "and model: measured in this process with the replica's threads; rest: the "
            "endpoint's measured total minus those (the client's own CPU is in every "
            "total: it shares the machine)",
        )


if __name__ == "__main__":
    main()
