"""scripts/ray_head.py: a head of one's own on a shared machine, stopped without touching others."""

import socket
import subprocess
import sys
import urllib.request

import pytest
from conftest import BIN, REPO

pytestmark = pytest.mark.slow


def _script(*args, env):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ray_head.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _hold_port(port: int) -> socket.socket | None:
    """A listening socket on ``port`` (as another head's job agent would hold it), or None where
    something already holds it."""
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))
        s.listen()
        return s
    except OSError:
        s.close()
        return None


def test_own_head_starts_and_stops_without_touching_others(ray_head, tmp_path):
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    state = tmp_path / "state"
    held = _hold_port(52365)  # Ray's default job-agent port, taken as on a machine with another head
    try:
        _start_use_and_stop(ray_head, env, state, tmp_path)
    finally:
        if held:
            held.close()
        _script("stop", "--state", state, env=env)  # ends the head if an assert stopped the test


def _start_use_and_stop(ray_head, env, state, tmp_path):
    started = _script("start", "--state", state, "--num-cpus", "1", env=env)
    assert started.returncode == 0, started.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
    assert exports["RAY_ADDRESS"] != ray_head.address  # its own ports, not the defaults' or another's
    assert "127.0.0.1:6379" not in exports.values()
    again = _script("start", "--state", state, env=env)  # idempotent: reuses the running head
    assert again.returncode == 0 and again.stdout == started.stdout and "reusing" in again.stderr
    req = urllib.request.Request(
        f"{exports['PLACESNET_DASHBOARD']}/api/version", headers={"Authorization": f"Bearer {ray_head.token}"}
    )
    assert urllib.request.urlopen(req, timeout=10).status == 200
    # its job agent has a port of its own: jobs are accepted although 52365 was taken
    job = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            exports["PLACESNET_DASHBOARD"],
            "--",
            "python",
            "-c",
            "print('job ran')",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert job.returncode == 0 and "job ran" in job.stdout, job.stdout[-2000:] + job.stderr[-2000:]
    stopped = _script("stop", "--state", state, env=env)
    assert stopped.returncode == 0 and "other Ray instances untouched" in stopped.stderr
    assert _script("status", "--state", state, env=env).returncode == 1
    assert ray_head.proc.poll() is None  # the session's head still runs
    req = urllib.request.Request(
        f"{ray_head.dashboard}/api/version", headers={"Authorization": f"Bearer {ray_head.token}"}
    )
    assert urllib.request.urlopen(req, timeout=10).status == 200
