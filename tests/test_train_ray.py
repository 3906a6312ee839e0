"""End-to-end training under a real local Ray: DDP on 2 workers, outputs, exact val metrics,
fault tolerance and resume, evaluate/predict CLIs, and `ray job submit` with token auth."""

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import BIN, REPO, TINY_ARGS, assert_user_error, ray_driver, run_script, train_cli

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


def train(ray_head, storage, name, *extra, epochs=3):
    return train_cli(ray_head, storage, name, *extra, epochs=epochs)


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run


def test_two_worker_ddp_learns_and_writes_outputs(run):
    run_dir, proc = run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 4
    assert summary["val_top1"] >= 0.6, summary  # chance is 0.25
    assert 0 <= summary["val_top1"] <= summary["val_top5"] <= 1
    best = Path(summary["best_checkpoint"])
    assert best.is_absolute() and (best / "model.pt").is_file()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3, 4]
    for col in [
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "val_top5",
        "images_per_s",
        "epoch_time_s",
        "lr",
        "num_workers",
    ]:
        assert col in metrics.columns, col
    assert (metrics["num_workers"] == 2).all() and (metrics["val_images"] == 48).all()
    # 160 images, global batch 32 = 16 per worker: 5 full steps on each worker's 80, none dropped
    assert (metrics["train_images"] == 160).all()
    assert metrics["val_top1"].max() == pytest.approx(summary["val_top1"])
    assert (run_dir / "curves.png").read_bytes().startswith(PNG)
    from test_workshop import read_scalars  # TensorBoard's own reader: every epoch once

    tb = read_scalars(run_dir / "tensorboard")
    assert [s for s, _ in tb["top1/val"]] == [1, 2, 3, 4]
    assert [v for _, v in tb["top1/val"]] == pytest.approx(list(metrics["val_top1"]))
    assert str(run_dir / "summary.json") in proc.stdout  # the job says where its outputs are
    assert "PreemptionWatcher" not in proc.stdout + proc.stderr  # Ray Train's watcher is off (quiet)
    # --keep-checkpoints 2: the best 2 by val top-1 plus the latest are kept, the others deleted
    kept = {
        json.loads((d / "meta.json").read_text())["metrics"]["epoch"]
        for d in run_dir.glob("checkpoint_*")
        if d.is_dir()
    }
    assert 4 in kept and 2 <= len(kept) <= 3, kept
    top1 = dict(zip(metrics["epoch"], metrics["val_top1"]))
    dropped = set(top1) - kept
    assert dropped and all(top1[k] >= top1[d] for k in kept - {4} for d in dropped), (kept, top1)


def test_val_metrics_identical_for_one_and_two_workers(run, ray_head, tmp_path):
    run_dir, _ = run
    one = run_script(
        "rayjobs/evaluate.py",
        "--checkpoint",
        run_dir,
        "--num-workers",
        1,
        "--json",
        "--gallery",
        6,
        env=ray_head.env,
    )  # default --out: RUN_DIR/eval_<checkpoint>
    two = run_script(
        "rayjobs/evaluate.py",
        "--checkpoint",
        run_dir,
        "--num-workers",
        2,
        "--json",
        "--gallery",
        6,
        "--out",
        tmp_path / "two",
        env=ray_head.env,
    )
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["val_images"] == b["val_images"] == 48  # no DistributedSampler padding counted
    assert a["val_top1"] == b["val_top1"] and a["val_top5"] == b["val_top5"]
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert a["val_top1"] == pytest.approx(summary["val_top1"])  # same number training reported
    out = Path(summary["best_checkpoint"]).parent / f"eval_{Path(summary['best_checkpoint']).name}"
    assert json.loads((out / "evaluation.json").read_text())["val_top1"] == a["val_top1"]
    table = pd.read_csv(out / "per_class.csv")
    assert len(table) == 4 and table["images"].sum() == 48
    assert table["correct"].sum() == round(a["val_top1"] * 48)
    for name in ("confused_pairs.png", "per_class.png", "misclassified.png"):
        assert (out / name).read_bytes().startswith(PNG), name
    # the gallery: the most confident mistakes, the same whichever the worker count
    wrong = 48 - table["correct"].sum()
    assert len(a["mistakes"]) == min(6, wrong)
    assert [(m["index"], m["predicted"]) for m in a["mistakes"]] == [
        (m["index"], m["predicted"]) for m in b["mistakes"]
    ]
    labels = dict(
        line.split() for line in (Path(a["data_root"]) / "places365_val.txt").read_text().splitlines()
    )
    classes = [
        line.split()[0][3:]
        for line in (Path(a["data_root"]) / "categories_places365.txt").read_text().splitlines()
    ]
    for m in a["mistakes"]:
        assert m["true"] != m["predicted"] and classes[int(labels[Path(m["image"]).name])] == m["true"]
    probs = [m["probability"] for m in a["mistakes"]]
    assert probs == sorted(probs, reverse=True)
    # the gallery's maps: each mistake's view's probability of its true class, the same on 2 workers
    assert [m["true_probability"] for m in b["mistakes"]] == pytest.approx(
        [m["true_probability"] for m in a["mistakes"]], abs=1e-6
    )
    assert all(0 <= m["true_probability"] <= m["probability"] + 1e-6 for m in a["mistakes"])


def test_predict_cli(run, tiny_root, tmp_path):
    run_dir, _ = run
    from PIL import Image

    rgba = tmp_path / "big_rgba.png"
    Image.open(tiny_root / "val_256/Places365_val_00000002.jpg").convert("RGBA").resize((611, 403)).save(rgba)
    gray = tmp_path / "gray.jpg"
    Image.open(tiny_root / "val_256/Places365_val_00000003.jpg").convert("L").save(gray)
    images = [tiny_root / "val_256/Places365_val_00000001.jpg", rgba, gray]
    proc = run_script("rayjobs/predict.py", "--checkpoint", run_dir, "--json", *images)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert "embedded sample data and knows only its 4 classes" in doc["note"]
    results = doc["results"]
    labels = {"beach", "desert/sand", "field/wild", "forest/broadleaf"}
    for r in results:
        preds = r["predictions"]
        assert len(preds) == 4  # top-5 capped at the number of classes
        probs = [p["probability"] for p in preds]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
        assert {p["label"] for p in preds} <= labels
    human = run_script(
        "rayjobs/predict.py",
        "--checkpoint",
        run_dir,
        "--top-k",
        "2",
        images[0],
        "--plot",
        tmp_path / "pred.png",
    )
    assert (tmp_path / "pred.png").read_bytes().startswith(PNG)
    assert human.returncode == 0 and results[0]["predictions"][0]["label"] in human.stdout
    assert human.stdout.startswith("note: this model was trained on the embedded sample data")
    latest = run_script("rayjobs/predict.py", "--checkpoint", f"latest:{run_dir.parent}", "--json", images[0])
    assert latest.returncode == 0, latest.stderr
    assert (
        json.loads(latest.stdout)["checkpoint"]
        == json.loads((run_dir / "summary.json").read_text())["best_checkpoint"]
    )
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(images[0].read_bytes()[:300])
    mixed = run_script("rayjobs/predict.py", "--checkpoint", run_dir, images[0], bad)
    assert mixed.returncode == 1 and "Traceback" not in mixed.stderr
    assert str(bad) in mixed.stderr and str(images[0]) in mixed.stdout  # the good one still predicted


def _schedule(lr, total, warmup, steps):
    """The lr of the last step of each epoch, from the schedule's formula (5 steps per epoch)."""
    from placesnet.train.optim import lr_factor

    return [lr * lr_factor(s, total, warmup, "cosine") for s in steps]


def test_lr_auto_then_crash_recovery_then_resume(ray_head, tmp_path):
    """One run for three promises (each Ray Train run costs ~40 s here): --lr auto runs the LR
    range test and trains with its suggestion; a worker process that dies after epoch 1, in the
    middle of an 8-step warmup (5 steps per epoch), is restarted from the latest checkpoint and
    the schedule goes on; rerunning the same name continues without a second range test. The
    storage path is a file:// URI: the driver setup resumes it as it does a local path, and
    the printed commands name local paths."""
    import re

    run_dir, storage = tmp_path / "ft", f"file://{tmp_path}"
    proc = train(
        ray_head,
        storage,
        "ft",
        "--lr",
        "auto",
        "--fail-after-epoch",
        1,
        "--max-failures",
        1,
        "--warmup-steps",
        8,
        epochs=2,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"suggested lr ([0-9.e-]+) \(plot: (\S+)\)", proc.stdout)
    assert found, proc.stdout
    suggestion = float(found.group(1))
    assert found.group(2) == f"{storage}/ft/lr_find.png"
    assert (run_dir / "lr_find.png").read_bytes().startswith(PNG)
    curve = pd.read_csv(run_dir / "lr_find.csv")
    assert list(curve.columns) == ["lr", "loss", "smoothed_loss"] and len(curve) >= 10
    assert f"lr {suggestion:.4g} (--lr auto: LR range test), warmup + cosine per step" in proc.stdout
    assert "fault injection" in proc.stdout
    assert "resuming from" in proc.stdout
    first = pd.read_csv(run_dir / "metrics.csv")
    assert list(first["epoch"]) == [1, 2]
    # The schedule went on from step 5, not from 0: epoch 2 ends at step 9 of 10, past the warmup.
    assert list(first["lr"]) == pytest.approx(_schedule(suggestion, 10, 8, [4, 9]), rel=1e-3)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((Path(summary["best_checkpoint"]) / "config.json").read_text())
    assert config["lr"] == pytest.approx(suggestion, rel=1e-3)  # trained with the suggestion
    serve = f"serve run --name placesnet serving.app:build_app checkpoint={run_dir}"
    assert f"serve it:        {serve}\n" in proc.stdout
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}\n" in proc.stdout
    # Re-running the same --storage-path/--name continues instead of starting over, keeps the lr
    # found when the run started (the schedule continues) and does not run the test again.
    stamp = (run_dir / "lr_find.csv").stat().st_mtime_ns
    again = train(ray_head, storage, "ft", "--lr", "auto", "--warmup-steps", 8, epochs=3)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from" in again.stdout and "at epoch 3/3" in again.stdout
    assert f"resuming run {storage}/ft from checkpoint_" in again.stdout  # the driver's resume check
    assert "--lr auto, found when the run started" in again.stdout
    assert "LR range test:" not in again.stdout
    assert (run_dir / "lr_find.csv").stat().st_mtime_ns == stamp
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(metrics.iloc[:2], first)  # earlier epochs were not re-run
    assert metrics["lr"].iloc[2] == pytest.approx(
        _schedule(suggestion, 15, 8, [14])[0], rel=1e-3
    )  # the new length
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == 3
    assert summary["val_top1"] > 0.25  # chance
    # ...but refuses to resume it as a different architecture.
    changed = train(ray_head, storage, "ft", "--model", "workshop", epochs=4)
    assert_user_error(changed, "different model")


def test_a_diverging_run_fails_at_once_and_keeps_the_epochs_before(ray_head, tmp_path):
    """A NaN loss in epoch 2 (fault injection; a too-high lr does it for real in test_engine and
    test_sweep): one error line, no restarts, epoch 1's checkpoint, summary and metrics kept."""
    proc = train(
        ray_head, tmp_path, "nan", "--diverge-at-epoch", 2, "--max-failures", 2, "--num-workers", 1, epochs=3
    )
    assert_user_error(
        proc, "training diverged: the loss is nan at epoch 2, step 1/", "lower --lr", "epoch 1 is kept"
    )
    assert proc.stdout.count("rank 0/1 on node") == 1  # Ray did not restart it to diverge again
    run_dir = tmp_path / "nan"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_completed"] == summary["best_epoch"] == 1
    assert f"the best checkpoint is {summary['best_checkpoint']}" in proc.stderr
    assert [d.name for d in run_dir.glob("checkpoint_*") if d.is_dir()] == [
        Path(summary["best_checkpoint"]).name
    ]
    assert list(pd.read_csv(run_dir / "metrics.csv")["epoch"]) == [1]  # no NaN epoch recorded


def test_cluster_cannot_place_the_request(ray_head, tmp_path):
    too_many = train(ray_head, tmp_path, "x", "--num-workers", 8, epochs=1)
    assert_user_error(too_many, "cannot place 8 workers")
    assert not (tmp_path / "x").exists()  # nothing half-written
    # The other refusals in-process (the CLI above shows how they reach the user).
    from placesnet.config import UserError
    from placesnet.launch.resources import plan_resources

    with ray_driver(ray_head.address):
        with pytest.raises(UserError, match="--gpu asked for GPUs but the cluster has none"):
            plan_resources(None, True, None, "PACK")
        with pytest.raises(UserError, match="--autoscale needs an explicit --num-workers"):
            plan_resources(None, True, None, "PACK", autoscale=True)
        assert plan_resources(2, True, None, "PACK", autoscale=True).use_gpu  # GPU nodes come later
        # --input ray-data: Ray Data's decode tasks need a CPU the workers do not hold (4 here).
        with pytest.raises(UserError, match="workers of 2 CPU leave 0 of the cluster's 4 CPUs"):
            plan_resources(2, False, 2.0, "PACK", ray_data=True)
        assert plan_resources(2, False, 1.5, "PACK", ray_data=True).cpus_per_worker == 1.5  # 1 left
        assert plan_resources(2, False, None, "PACK", ray_data=True).cpus_per_worker == 1.5  # default


def test_ray_job_submit_with_token_auth(ray_head, tmp_path):
    storage = tmp_path / "jobs"
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        ray_head.dashboard,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "rayjobs/train.py",
        *TINY_ARGS,
        "--epochs",
        "2",
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--storage-path",
        str(storage),
        "--name",
        "job",
    ]
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_ADDRESS"}
    for _ in range(5):  # the head's job agent can lag behind its dashboard on a busy machine
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(10)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = json.loads((storage / "job" / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and Path(summary["best_checkpoint"]).is_dir()
    # Token auth stays on: a client without the token is refused.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token to fall back on
    refused = subprocess.run(
        [str(BIN / "ray"), "job", "list", "--address", ray_head.dashboard],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower()
