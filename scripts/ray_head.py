"""A Ray head of your own on a shared machine: its own temp dir and ports, and `stop` ends only it.

`ray start --head` takes the default ports (6379, 8265, and 52365 for the job agent: a second
head on the machine then refuses `ray job submit`) and /tmp/ray, and `ray stop` stops EVERY
Ray of your user on the machine, other people's jobs of the same account and your other clusters
included. This starts a head in its own process group with free ports and a private temp dir,
prints the environment to reach it, and stops exactly that process group.

    eval "$(python scripts/ray_head.py start)"      # exports RAY_ADDRESS and PLACESNET_DASHBOARD
    ray job submit --address "$PLACESNET_DASHBOARD" --working-dir . -- python rayjobs/train.py
    python scripts/ray_head.py status
    python scripts/ray_head.py stop

--state DIR (default ~/.cache/placesnet/head) keeps its pid, ports and log; use one per head.
Token authentication stays as Ray sets it: export RAY_AUTH_MODE=token first where it is on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _read(state: Path) -> dict | None:
    try:
        return json.loads((state / "head.json").read_text())
    except (OSError, ValueError):
        return None


def _exports(info: dict) -> str:
    return f"export RAY_ADDRESS={info['address']}\nexport PLACESNET_DASHBOARD={info['dashboard']}\n"


def _ready(info: dict, timeout: float) -> bool:
    token = os.environ.get("RAY_AUTH_TOKEN") or _token_file()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(info["pgid"]):
            return False
        try:
            urllib.request.urlopen(
                urllib.request.Request(f"{info['dashboard']}/api/version", headers=headers), timeout=2
            )
            return True
        except OSError:
            time.sleep(1)
    return False


def _token_file() -> str | None:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return path.read_text().strip() if path.is_file() else None


def start(state: Path, num_cpus: int | None, timeout: float) -> int:
    info = _read(state)
    if info and _alive(info["pgid"]):
        print(
            f"ray_head.py: a head is already running (process group {info['pgid']}); reusing it",
            file=sys.stderr,
        )
        print(_exports(info), end="")
        return 0
    state.mkdir(parents=True, exist_ok=True)
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if not ray:
        print(
            "ray_head.py: error: no `ray` command: activate the project's venv (make setup)", file=sys.stderr
        )
        return 2
    # Ray's unix sockets live under the temp dir and must fit in 107 bytes: keep it short.
    temp_dir = tempfile.mkdtemp(prefix=f"rh{os.getuid()}-", dir="/tmp")
    port, dashboard_port = _free_port(), _free_port()
    cmd = [
        ray,
        "start",
        "--head",
        "--block",
        "--port",
        str(port),
        "--dashboard-port",
        str(dashboard_port),
        "--dashboard-host",
        "127.0.0.1",
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
        # Ray's job agent listens on a fixed default port (52365): where another head holds it,
        # this head would refuse every `ray job submit` ("No available agent to submit job")
        "--dashboard-agent-listen-port",
        "0",
    ]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    log = open(state / "head.log", "w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )  # its own process group: stop ends only it
    info = {
        "pgid": proc.pid,
        "address": f"127.0.0.1:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "temp_dir": temp_dir,
    }
    (state / "head.json").write_text(json.dumps(info))
    if not _ready(info, timeout):
        tail = (state / "head.log").read_text()[-1500:]
        stop(state)
        print(f"ray_head.py: error: the head did not start within {timeout:.0f} s:\n{tail}", file=sys.stderr)
        return 1
    print(
        f"ray_head.py: head running: {info['address']}, dashboard {info['dashboard']}, "
        f"temp dir {temp_dir}; stop it with: python scripts/ray_head.py stop",
        file=sys.stderr,
    )
    print(_exports(info), end="")
    return 0


def stop(state: Path) -> int:
    info = _read(state)
    if not info:
        print(f"ray_head.py: no head recorded in {state}", file=sys.stderr)
        return 0
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        if not _alive(info["pgid"]):
            break
        os.killpg(info["pgid"], sig)
        deadline = time.time() + wait
        while _alive(info["pgid"]) and time.time() < deadline:
            time.sleep(0.2)
    shutil.rmtree(info.get("temp_dir", ""), ignore_errors=True)
    (state / "head.json").unlink(missing_ok=True)
    print(
        f"ray_head.py: stopped the head at {info['address']} (other Ray instances untouched)", file=sys.stderr
    )
    return 0


def status(state: Path) -> int:
    info = _read(state)
    if info and _alive(info["pgid"]):
        print(f"running: {info['address']}, dashboard {info['dashboard']}")
        print(_exports(info), end="")
        return 0
    print("not running")
    return 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument(
        "--state",
        default=str(Path.home() / ".cache" / "placesnet" / "head"),
        help="directory for the head's pid, ports and log (default: %(default)s)",
    )
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the head (default: Ray's: all)")
    p.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for it (default: %(default)s)"
    )
    args = p.parse_args(argv)
    state = Path(args.state).expanduser()
    if args.action == "start":
        return start(state, args.num_cpus, args.timeout)
    return stop(state) if args.action == "stop" else status(state)


if __name__ == "__main__":
    sys.exit(main())
