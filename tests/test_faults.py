"""Fault injection on a real local Ray: what a user or an operator does to a run, and what the
product promises then (docs/reliability.md lists each fault with its test here).

Runs are shared where a fault allows it: one run directory goes through Ctrl-C, a SIGKILLed
driver, a corrupted newest checkpoint and a SIGKILLed worker, and must end with every epoch
exactly once.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from conftest import REPO, TINY_ARGS, Running, _free_port

pytestmark = pytest.mark.slow

P365 = ["--dataset", "places365", "--skip-verify"]


def _train(ray_head, storage, name, log, *extra, epochs=6):
    return Running(
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
        log=log,
    )


def _train_worker_pids(ray_head) -> list[int]:
    """PIDs of the live Ray Train workers on the session's head."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray_head.dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    return [a.pid for a in actors]


def _epochs(run_dir: Path) -> list[int]:
    return list(pd.read_csv(run_dir / "metrics.csv")["epoch"])


def test_interrupt_driver_kill_corrupt_checkpoint_and_worker_kill_lose_no_epoch(ray_head, tmp_path):
    run_dir = tmp_path / "f"
    # 1. Ctrl-C after epoch 2: the workers stop, exit 130, one line saying how to go on.
    first = _train(ray_head, tmp_path, "f", tmp_path / "1.log")
    first.wait_for("epoch 2/6")
    first.proc.send_signal(signal.SIGINT)
    assert first.finish(120) == 130, first.text()[-3000:]
    assert "train.py: interrupted by SIGINT: resume with the same command" in first.text()
    assert "Traceback" not in first.text()
    # Checkpoints of epochs 1-2 are written; Ray may not have recorded them, nor metrics.csv, when
    # the signal came: the rerun must still resume from them.
    assert [d for d in run_dir.glob("checkpoint_*") if d.is_dir()]

    # 2. The same command resumes; SIGKILL its driver after one more epoch (no chance to clean up).
    second = _train(ray_head, tmp_path, "f", tmp_path / "2.log")
    second.wait_for(f"resuming run {run_dir} from checkpoint_")
    epoch = int(re.search(r"resuming run \S+ from checkpoint_\S+ \(epoch (\d+)\)", second.text()).group(1))
    second.wait_for(f"at epoch {epoch + 1}/6")  # Ray resumes where the driver said it would
    second.wait_for("val_top1")  # an epoch trained in this run
    second.proc.kill()
    second.finish(60)
    for _ in range(60):  # the job's workers go with their driver
        if not _train_worker_pids(ray_head):
            break
        time.sleep(1)
    assert not _train_worker_pids(ray_head)

    # 3. Corrupt the newest checkpoint (truncated weights), as a crash during a copy would.
    newest = max((d for d in run_dir.glob("checkpoint_*") if d.is_dir()), key=lambda d: d.name)
    model = newest / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])

    # 4. The same command resumes from the newest intact checkpoint; a worker SIGKILLed mid-run
    #    is restarted from the latest checkpoint (a lost worker does use a --max-failures retry).
    third = _train(ray_head, tmp_path, "f", tmp_path / "3.log")
    third.wait_for(f"skipping checkpoint {newest.name}: model.pt has 1000 bytes")
    third.wait_for("resuming from")
    third.wait_for("val_top1")  # one epoch done in this run
    # metrics.csv is kept up to date during the run: the epoch just logged appears while it goes on
    logged = int(re.findall(r"epoch (\d+)/6 train_loss", third.text())[-1])
    seen = []
    for _ in range(60):
        try:
            seen = _epochs(run_dir)
        except (OSError, ValueError, KeyError):  # absent or being rewritten
            seen = []
        if logged in seen:
            break
        time.sleep(0.5)
    assert logged in seen and third.proc.poll() is None, (logged, seen)
    pids = _train_worker_pids(ray_head)
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    assert third.finish(600) == 0, third.text()[-4000:]
    out = third.text()
    assert out.count("resuming from") >= 2, out[-4000:]  # the rerun, then the restart after the kill
    assert (run_dir / f"broken-{newest.name}").is_dir()  # set aside, not deleted
    assert _epochs(run_dir) == [1, 2, 3, 4, 5, 6]  # no epoch lost, none twice
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["val_top1"].notna().all()


def test_an_undecodable_image_stops_at_once_without_retries(ray_head, tmp_path, broken_copy):
    root, bad = broken_copy
    run = _train(
        ray_head,
        tmp_path,
        "bad",
        tmp_path / "bad.log",
        *P365,
        "--data-root",
        root,
        "--max-failures",
        2,
        epochs=2,
    )
    assert run.finish(300) == 2
    out = run.text()
    errors = [line for line in out.splitlines() if "train.py: error:" in line]
    assert len(errors) == 1, out[-3000:]
    assert str(bad) in errors[0] and "line 10 of" in errors[0] and "--bad-images skip" in errors[0]
    assert "Traceback" not in out
    assert out.count("rank 0/2 on node") == 1  # one attempt: the worker group was not restarted


def test_skipped_images_are_logged_and_counted(ray_head, tmp_path, broken_copy):
    root, bad = broken_copy
    run = _train(
        ray_head,
        tmp_path,
        "skip",
        tmp_path / "skip.log",
        *P365,
        "--data-root",
        root,
        "--bad-images",
        "skip",
        epochs=2,
    )
    assert run.finish(300) == 0, run.text()[-3000:]
    out = run.text()
    assert f"skipping a bad image: cannot decode image {bad}" in out
    assert "Places365_val_00000002.jpg (line 2 of" in out
    assert "note: 2 image(s) per epoch could not be decoded and were skipped" in out
    metrics = pd.read_csv(tmp_path / "skip" / "metrics.csv")
    assert list(metrics["skipped_images"]) == [2, 2]  # one train + one val image, every epoch
    # every val image counted once, none padded in (DistributedSampler would count 48): 47 - 1 bad
    assert list(metrics["train_images"]) == [159, 159] and list(metrics["val_images"]) == [46, 46]


SWEEP = [
    *TINY_ARGS[: TINY_ARGS.index("--batch-size")],
    "--epochs",
    "3",
    "--grid",
    "--batch-sizes",
    "32",
    "--lrs",
    "0.05",
    "--cpus-per-worker",
    "0.5",
    "--max-concurrent",
    "1",
    "--scheduler",
    "none",
]


def test_an_interrupted_sweep_says_so_and_resumes(ray_head, tmp_path):
    exp = tmp_path / "s"
    first = Running(
        "tuning/sweep.py",
        *SWEEP,
        "--storage-path",
        tmp_path,
        "--name",
        "s",
        env=ray_head.env,
        log=tmp_path / "s1.log",
    )
    first.wait_for("epoch 1/3")
    first.proc.send_signal(signal.SIGINT)
    assert first.finish(180) == 130, first.text()[-3000:]
    out = first.text()
    assert "sweep.py: interrupted by SIGINT with 0 of 1 trial(s) done: resume with the same command" in out
    assert "best:" not in out and "serve it:" not in out
    table = pd.read_csv(exp / "results.csv", keep_default_na=False)
    assert list(table["status"]) == ["interrupted"]
    assert not (exp / "best.json").exists()

    second = Running(
        "tuning/sweep.py",
        *SWEEP,
        "--storage-path",
        tmp_path,
        "--name",
        "s",
        env=ray_head.env,
        log=tmp_path / "s2.log",
    )
    assert second.finish(600) == 0, second.text()[-3000:]
    assert "resuming sweep" in second.text() and "best:" in second.text()
    table = pd.read_csv(exp / "results.csv", keep_default_na=False)
    assert list(table["status"]) == ["finished"] and list(table["epochs_run"]) == [3]
    assert (exp / "best.json").is_file()


def test_replicas_scale_up_under_load_and_a_killed_one_costs_only_its_requests(
    ray_head, trained_run, tiny_root
):
    """docs/serving.md: replicas autoscale on ongoing requests (here from 1 to 2 under a load of 8 clients,
    target 2 per replica, no upscale delay); then one of the two is SIGKILLed under that load:
    only the requests it held fail, the other serves on. Also: min_replicas defaults to 2 where
    the cluster has room."""
    import ray
    from ray import serve
    from ray.util.state import list_actors

    run_dir, _ = trained_run
    ray.init(
        address=ray_head.address,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env={"py_modules": [str(REPO / "placesnet"), str(REPO / "serving")]},
    )
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        from serving.app import build_app

        default = build_app({"checkpoint": str(run_dir), "num_cpus": 0.5})
        assert default._bound_deployment._deployment_config.autoscaling_config.min_replicas == 2
        app = build_app(
            {
                "checkpoint": str(run_dir),
                "num_cpus": 0.5,
                "max_batch_size": 4,
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 2,
                "upscale_delay_s": 0,
            }
        )
        serve.run(app, name="placesnet", route_prefix="/")
        jpeg = (tiny_root / "val_256/Places365_val_00000001.jpg").read_bytes()
        for method, path, status in (("GET", "/nope", 404), ("GET", "/predict", 405)):
            r = httpx.request(method, f"{base}{path}", timeout=30)
            assert r.status_code == status and "error" in r.json(), r.text

        def running() -> int:
            states = serve.status().applications["placesnet"].deployments["SceneClassifier"].replica_states
            return states.get("RUNNING", 0)

        def alive() -> list:
            return [
                a
                for a in list_actors(address=ray_head.dashboard, filters=[("state", "=", "ALIVE")])
                if a.class_name.startswith("ServeReplica:placesnet")
            ]

        assert running() == 1 and len(alive()) == 1
        concurrency, results, stop = 8, [], [time.monotonic() + 120]

        async def load():
            async with httpx.AsyncClient(timeout=60) as client:

                async def one_client():
                    while time.monotonic() < stop[0]:
                        r = await client.post(
                            f"{base}/predict", content=jpeg, headers={"Content-Type": "image/jpeg"}
                        )
                        results.append((time.monotonic(), r.status_code, r.headers.get("content-type", "")))

                await asyncio.gather(*[one_client() for _ in range(concurrency)])

        async def scenario():
            task = asyncio.create_task(load())
            while await asyncio.to_thread(running) < 2:  # Serve adds the second replica under load
                assert time.monotonic() < stop[0] - 10, "no second replica after 110 s of load"
                await asyncio.sleep(0.5)
            replicas = await asyncio.to_thread(alive)
            assert len(replicas) == 2
            await asyncio.sleep(1)
            os.kill(replicas[0].pid, signal.SIGKILL)
            killed = time.monotonic()
            stop[0] = killed + 8
            await task
            return killed

        killed = asyncio.run(scenario())
        failed = [r for r in results if r[1] != 200]
        assert len(failed) <= concurrency, failed  # only requests in flight on that replica
        assert all(status in (500, 502, 503) for _, status, _ in failed), failed
        after = [r for r in results if r[0] > killed + 2]
        assert after and all(status == 200 for _, status, _ in after)  # the other replica serves on
        assert sum(1 for r in results if r[1] == 200) > 20
    finally:
        serve.shutdown()
        ray.shutdown()
