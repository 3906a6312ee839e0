"""`serve run` as a user types it: it answers over HTTP and shuts down cleanly on Ctrl-C.

`serve run` shuts the whole Serve instance down when it exits, so these run after test_serve.py
has shut its own instance down (modules run in name order).
"""

import json
import os
import signal
import subprocess
import time

import httpx
import pytest
import yaml
from conftest import BIN, REPO, _free_port, ray_driver

pytestmark = pytest.mark.slow


def _start_serve_run(args, env) -> subprocess.Popen:
    """`serve run ARGS` in its own process group, its output captured. A suite started in the
    background (`make test &`) inherits SIGINT as ignored, and Python then never raises
    KeyboardInterrupt; `serve run` gets the default, as in a terminal."""
    return subprocess.Popen(
        [str(BIN / "serve"), "run", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _serve_run(args, env, url, image, dashboard, grpc_target=None):
    proc = _start_serve_run(args, env)
    try:
        deadline, status = time.time() + 240, None
        while time.time() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"{url}/healthz", timeout=5).status_code
                if status == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else "never became ready"
        r = httpx.post(
            f"{url}/predict", content=image.read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=60
        )
        assert r.status_code == 200 and r.json()["predictions"], r.text
        if grpc_target:  # serving/grpc_client.py against the same app, through Serve's gRPC proxy
            client = subprocess.run(
                [
                    str(BIN / "python"),
                    "serving/grpc_client.py",
                    str(image),
                    "--target",
                    grpc_target,
                    "--json",
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert client.returncode == 0, client.stdout + client.stderr
            grpc_answer = json.loads(client.stdout)["results"][0]["predictions"]
            assert [p["label"] for p in grpc_answer] == [p["label"] for p in r.json()["predictions"]]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            # A killed `serve run` leaves its app deployed; remove it so later tests start clean.
            subprocess.run(
                [str(BIN / "serve"), "shutdown", "-y", "-a", dashboard],
                env=env,
                capture_output=True,
                timeout=180,
            )
    with pytest.raises(httpx.ConnectError):  # the endpoint is gone
        httpx.get(f"{url}/healthz", timeout=5)


def test_serve_run_config_file(ray_head, trained_run, tiny_root, tmp_path):
    run_dir, _ = trained_run
    config = yaml.safe_load((REPO / "serving/config.yaml").read_text())
    port = _free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    # gRPC as the config's comment turns it on (its servicer line, uncommented), on a free port
    servicer = next(
        line.split("- ", 1)[1].strip()
        for line in (REPO / "serving/config.yaml").read_text().splitlines()
        if "add_SceneClassifierServicer_to_server" in line
    )
    grpc_port = _free_port()
    config["grpc_options"] = {"port": grpc_port, "grpc_servicer_functions": [servicer]}
    app = config["applications"][0]
    app["args"].update(checkpoint=str(run_dir / "summary.json"), num_cpus=0.5, max_replicas=1)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    _serve_run(
        [str(path)],
        ray_head.env,
        f"http://127.0.0.1:{port}",
        tiny_root / "val_256/Places365_val_00000001.jpg",
        ray_head.dashboard,
        grpc_target=f"127.0.0.1:{grpc_port}",
    )


def test_serve_run_documented_command(ray_head, trained_run, tiny_root):
    """The README's `serve run serving.app:build_app checkpoint=...`, word for word. It would take
    port 8000, which another program on the machine may hold; a Serve instance started first on a
    free port is the one it deploys to (Serve keeps a running instance's HTTP options)."""
    from ray import serve

    run_dir, _ = trained_run
    port = _free_port()
    with ray_driver(ray_head.address):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    _serve_run(
        ["serving.app:build_app", f"checkpoint={run_dir}", "num_cpus=0.5"],
        ray_head.env,
        f"http://127.0.0.1:{port}",
        tiny_root / "val_256/Places365_val_00000002.jpg",
        ray_head.dashboard,
    )


def test_serve_run_key_from_the_deploying_shell(ray_head, trained_run, tiny_root):
    """docs/serving.md#a-key: `export PLACESNET_API_KEY=...; serve run ... api_key_env=...` on a
    running cluster whose nodes never saw the variable: the replicas get the key from the shell
    that built the app (before: they could not start). The key shows in no Serve status or config
    and in no log of the cluster."""
    from ray import serve

    run_dir, _ = trained_run
    port = _free_port()
    with ray_driver(ray_head.address):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    key = "k3y-" + os.urandom(12).hex()
    env = {**ray_head.env, "PLACESNET_TEST_KEY": key}
    url = f"http://127.0.0.1:{port}"
    image = (tiny_root / "val_256/Places365_val_00000003.jpg").read_bytes()
    proc = _start_serve_run(
        ["--name", "placesnet", "serving.app:build_app", f"checkpoint={run_dir}", "num_cpus=0.5"]
        + ["api_key_env=PLACESNET_TEST_KEY"],
        env,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        headers = {"Content-Type": "image/jpeg"}
        assert httpx.post(f"{url}/predict", content=image, headers=headers, timeout=60).status_code == 401
        ok = httpx.post(
            f"{url}/predict", content=image, headers={**headers, "Authorization": f"Bearer {key}"}, timeout=60
        )
        assert ok.status_code == 200 and ok.json()["predictions"], ok.text
        shown = subprocess.run(
            f"{BIN}/serve status -a {ray_head.dashboard}; {BIN}/serve config -a {ray_head.dashboard}",
            shell=True,
            env=ray_head.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "placesnet" in shown.stdout and key not in shown.stdout + shown.stderr
        logs = [
            p for p in ray_head.ray_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")
        ]
        assert logs and not [p for p in logs if key in p.read_text(errors="replace")]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert key not in out
