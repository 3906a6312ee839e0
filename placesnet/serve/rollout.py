"""The endpoint's life on a cluster, from the operator's side (where ``serve`` and
serving/promote.py run, never in a replica): which checkpoint to serve, resolved once and verified
before anything is deployed; the guard that keeps a ``serve run`` off a live endpoint (it would
shut the whole Serve instance down when it ends); and :func:`promote`, which swaps a checkpoint
into the running app in place, through Serve's REST API as ``serve deploy`` does."""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from ray.serve.exceptions import RayServeException

from placesnet.config import UserError

APP = "placesnet"  # the app's name and route prefix in serving/config.yaml and the README's serve run
DEPLOYMENT = "SceneClassifier"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class Refused(RayServeException, ValueError):
    """build_app's refusal, in one line. A RayServeException, so that ``serve status`` shows the
    message alone (Serve prints a traceback for other exceptions of an app builder); a
    ValueError, as callers of build_app catch."""


def checkpoint_to_serve(spec: str) -> str:
    """The checkpoint directory ``spec`` names (a checkpoint, a run directory, a summary/best JSON,
    ``latest[:STORAGE_PATH]``, resolved now), after the checks every replica repeats: sizes and
    sha256, ``weights_only`` loading, weights that fit the architecture. UserError if it fails.

    What the replicas get: its absolute path, or on object storage its URI (``s3://...``): each
    replica fetches it onto its own node (a copy in this machine's cache would not be on theirs)."""
    from placesnet.checkpoint import load_checkpoint, locate_checkpoint

    path = locate_checkpoint(os.path.expanduser(spec))
    load_checkpoint(path)  # on object storage: fetched here first, and verified after the download
    return path


def refuse_serve_run_over_a_live_endpoint() -> None:
    """Inside ``serve run`` (which builds the app before it connects to Ray): Refused when the
    cluster it will connect to (RAY_ADDRESS, or the one ``ray start`` recorded) already serves
    apps. ``serve run`` shuts the whole Serve instance down when it ends, Ctrl-C included, and
    when its deploy fails, taking every running app with it."""
    if Path(sys.argv[0]).name != "serve" or sys.argv[1:2] != ["run"]:
        return
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError):
        return  # no cluster yet: serve run starts its own
    try:
        from ray import serve

        try:
            running = sorted(serve.status().applications)
        except RayServeException:  # Serve is not running there
            running = []
    finally:
        ray.shutdown()
    if running:
        raise Refused(
            f"this cluster already serves {', '.join(running)}: `serve run` would shut it down when it "
            "ends. Swap its checkpoint in place with `python serving/promote.py CHECKPOINT` (an app "
            "started by `serve deploy`), or stop it first: `serve shutdown -y`"
        )


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` did: the checkpoint it swapped in and the one before it, the replicas
    that now answer from it, and the seconds from the request to the last of them."""

    checkpoint: str  # a path, or a URI on object storage
    previous: str | None
    replicas: int
    seconds: float


def dashboard_address(address: str | None) -> str:
    """--address, else $RAY_DASHBOARD_ADDRESS (as the serve CLIs), else the local dashboard."""
    return address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD


def promote(
    spec: str,
    *,
    address: str,
    app: str = APP,
    url: str | None = None,
    timeout: float = 120.0,
    say: Callable[[str], None] = print,
) -> Promotion:
    """Swap the running ``app``'s checkpoint for ``spec``'s, in place: resolved and verified here
    first (a broken checkpoint is refused before anything is sent), then the app's deployed config
    with only its user_config changed, sent as ``serve deploy`` sends it; the replicas load, verify
    and probe it and swap it in without restarting (Replica.use_checkpoint), and until then answer
    from the old one. Waits (at most ``timeout`` s) until every replica's /healthz, at ``url``
    (default: the app's route on the Serve HTTP port of the dashboard's host), names the new
    checkpoint. UserError for what cannot be promoted, with what to do."""
    from placesnet.checkpoint import read_meta, resolve_checkpoint
    from placesnet.checkpoint_files import model_fingerprint

    client = _client(address)
    details = client.get_serve_details()
    apps = details.get("applications") or {}
    if app not in apps:
        raise UserError(
            f"no app {app!r} is running on the cluster at {address} "
            f"(running: {', '.join(apps) or 'none'}); start it with `serve deploy serving/config.yaml`"
        )
    if not apps[app].get("deployed_app_config"):
        raise UserError(
            f"app {app!r} was started by `serve run`, which cannot be updated in place (and takes "
            "Serve down when it ends): start it with `serve deploy serving/config.yaml`"
        )
    deployment = apps[app]["deployments"][DEPLOYMENT]
    previous = (deployment["deployment_config"].get("user_config") or {}).get("checkpoint")
    path = checkpoint_to_serve(spec)  # after the cluster's state: latest means now
    fingerprint = model_fingerprint(read_meta(resolve_checkpoint(path)))  # (a URI: the copy fetched now)
    started = time.monotonic()
    client.deploy_applications(_with_checkpoint(details, app, path))
    say(f"promote: {app} -> {path} (was {previous}); waiting for its replicas to swap")
    base = url or _endpoint_url(address, details, apps[app])
    replicas = _wait_for_swap(client, app, base, fingerprint, started + timeout)
    return Promotion(path, previous, replicas, time.monotonic() - started)


def _client(address: str):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        return ServeSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot reach the Ray dashboard at {address}: {str(e).splitlines()[0]}") from None


def _with_checkpoint(details: dict, app: str, path: str) -> dict:
    """The cluster's Serve config as ``serve deploy`` sends it, every app as deployed, with
    ``app``'s SceneClassifier user_config set to ``path`` (its other overrides kept)."""
    apps = []
    for name, info in details["applications"].items():
        config = info.get("deployed_app_config")
        if not config:  # an app of `serve run`: not ours to redeploy
            continue
        if name == app:
            others = [d for d in config.get("deployments") or [] if d.get("name") != DEPLOYMENT]
            own = next((d for d in config.get("deployments") or [] if d.get("name") == DEPLOYMENT), {})
            own = {**own, "name": DEPLOYMENT, "user_config": {"checkpoint": str(path)}}
            config = {**config, "deployments": [*others, own]}
        apps.append(config)
    deploy = {"applications": apps}
    for key in ("proxy_location", "http_options", "grpc_options"):
        if details.get(key) is not None:
            deploy[key] = details[key]
    return deploy


def _endpoint_url(address: str, details: dict, app: dict) -> str:
    """The app's HTTP route on the dashboard's host (127.0.0.1 for 0.0.0.0)."""
    host = urlsplit(address).hostname or "127.0.0.1"
    port = (details.get("http_options") or {}).get("port", 8000)
    return f"http://{host}:{port}{(app.get('route_prefix') or '/').rstrip('/')}"


def _wait_for_swap(client, app: str, base: str, fingerprint: str | None, deadline: float) -> int:
    """Until ``deadline``: the deployment RUNNING with no replica starting or updating, then
    /healthz answering from ``fingerprint`` (model.pt's sha256 prefix) as many times in a row as
    there are replicas, twice over (requests go to replicas at random). The number of replicas."""
    refused, problem = False, ""
    while time.monotonic() < deadline:
        app_details = client.get_serve_details().get("applications", {}).get(app) or {}
        deployment = app_details.get("deployments", {}).get(DEPLOYMENT) or {}
        states = [r["state"] for r in deployment.get("replicas", [])]
        if deployment.get("status") == "HEALTHY" and states and set(states) == {"RUNNING"}:
            need, streak = 2 * len(states) + 2, 0
            while streak < need and time.monotonic() < deadline:
                answer, problem = _healthz(base)
                streak = streak + 1 if answer.get("checkpoint_sha256") == fingerprint else 0
                refused = refused or answer.get("rejected") is True
                if streak == 0:
                    time.sleep(0.2)
            if streak >= need:
                return len(states)
        time.sleep(0.2)
    raise UserError(
        f"not every replica of {app} answers from the new checkpoint after the timeout"
        + (": a replica refused it and still serves the old one (GET /model says why)" if refused else "")
        + (f"; last /healthz: {problem}" if problem else "")
    )


def _healthz(base: str) -> tuple[dict, str]:
    """/healthz's answer, or {} and what went wrong (a replica being replaced, a wrong --url)."""
    import json

    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            return json.loads(r.read()), ""
    except (urllib.error.URLError, OSError, ValueError) as e:
        return {}, f"{base}/healthz: {e} (the endpoint's URL: --url)"
