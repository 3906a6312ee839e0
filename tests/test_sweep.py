"""A tiny Ray Tune sweep on the sample data: ASHA, results.csv, best.json, sweep.png, resume."""

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_ARGS, assert_user_error, ray_driver, run_script

from placesnet.config import UserError

pytestmark = pytest.mark.slow

SHOWN = ("best checkpoint:", "results:", "best:", "plot:", "serve it:")  # where the outputs are

# --scale-lr 64 at batch 32: every trial trains at half the lr it is listed with.
SWEEP = [
    *TINY_ARGS[: TINY_ARGS.index("--batch-size")],
    "--epochs",
    "2",
    "--grid",
    "--batch-sizes",
    "32",
    "--lrs",
    "0.05,10000,0.000001",
    "--scale-lr",
    "64",
    "--cpus-per-worker",
    "0.5",
    "--workers-per-trial",
    "1-2",  # elastic trials: each starts on as many as fit (2)
    "--max-concurrent",
    "1",
    "--grace-period",
    "1",
    "--reduction-factor",
    "2",
]


@pytest.fixture(scope="module")
def sweep(ray_head, tmp_path_factory):
    """The sweep (and its rerun) with --storage-path given as a file:// URI: its outputs are read
    and written through the filesystem layer Ray uses, as for s3://. (A sweep on a plain local
    path: test_faults.py::test_an_interrupted_sweep_says_so_and_resumes.)"""
    storage = tmp_path_factory.mktemp("sweeps")
    uri = f"file://{storage}"
    proc = run_script("tuning/sweep.py", *SWEEP, "--storage-path", uri, "--name", "tiny", env=ray_head.env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return storage / "tiny", proc, uri


def test_results_table(sweep):
    exp, proc, _ = sweep
    table = pd.read_csv(exp / "results.csv")
    for col in [
        "trial_id",
        "batch_size",
        "lr",
        "epochs_run",
        "best_val_top1",
        "best_val_top5",
        "final_train_loss",
        "status",
        "best_checkpoint",
    ]:
        assert col in table.columns, col
    assert sorted(table["lr"]) == [0.000001, 0.05, 10000]
    assert set(table["status"]) <= {"finished", "stopped early", "errored"}
    assert (table["train_lr"] == table["lr"] / 2).all()  # --scale-lr 64 at batch 32
    # The grid runs in order, one at a time (no timing involved): when the lr=1e-6 trial (which
    # learns nothing) reaches epoch 1, the lr=0.05 one has finished far ahead; ASHA stops it.
    too_small = table[table["lr"] == 0.000001].iloc[0]
    assert too_small["status"] == "stopped early" and too_small["epochs_run"] == 1
    assert table[table["lr"] == 0.05].iloc[0]["status"] == "finished"
    assert "stopped early" in proc.stdout  # the printed table
    # one line per trial event instead of Tune's progress tables
    events = {
        tid: [
            line.split("): ", 1)[1]
            for line in proc.stdout.splitlines()
            if line.startswith(f"trial {tid} (bs 32 lr ")
        ]
        for tid in table["trial_id"]
    }
    by_lr = dict(zip(table["lr"], table["trial_id"]))
    good = events[by_lr[0.05]]
    assert len(good) == 4 and good[0] == "started" and good[3] == "finished after 2 epoch(s)"
    assert good[1].startswith("epoch 1/2 val top-1 0.") and good[2].startswith("epoch 2/2 val top-1 0.")
    assert (
        events[by_lr[0.000001]][0] == "started"
        and events[by_lr[0.000001]][-1] == "stopped early by ASHA after 1 epoch(s)"
    )
    assert events[by_lr[10000]] == ["started", "errored (see results.csv)"]
    assert "Trial status" not in proc.stdout + proc.stderr and "╭" not in proc.stdout
    # --workers-per-trial 1-2: elastic trials, each on the 2 workers the head holds, one line each
    assert "1 at a time, each 1-2 worker(s) x (0.5 CPU)" in proc.stdout, proc.stdout[:2000]
    assert proc.stdout.count("elastic run (1-2 workers) starts on 2 workers") == 3, proc.stdout[-4000:]


def test_a_diverging_trial_errors_without_stopping_the_sweep(sweep):
    exp, proc, _ = sweep  # the sweep exited 0 and its other trials are in the table
    table = pd.read_csv(exp / "results.csv", keep_default_na=False)
    too_big = table[table["lr"] == 10000].iloc[0]  # its loss becomes NaN within epoch 1
    assert too_big["status"] == "errored"
    assert "training diverged" in too_big["error"] and "epoch 1" in too_big["error"]
    assert too_big["best_checkpoint"] == "" and too_big["epochs_run"] == 0
    assert not list((exp / "train" / too_big["trial_id"]).glob("checkpoint_*"))  # no NaN weights
    assert (table["status"] != "errored").sum() == 2


def test_best_json_points_at_a_loadable_checkpoint(sweep):
    from placesnet.checkpoint import load_checkpoint

    exp, _, _ = sweep
    best = json.loads((exp / "best.json").read_text())
    table = pd.read_csv(exp / "results.csv")
    assert best["val_top1"] == pytest.approx(table["best_val_top1"].max())
    loaded = load_checkpoint(best["best_checkpoint"])
    assert loaded.meta["metrics"]["val_top1"] == pytest.approx(best["val_top1"])
    # The checkpoint trained at the scaled lr, and best.json's config says so.
    assert loaded.config.lr == best["train_lr"] == best["config"]["lr"] == pytest.approx(best["lr"] / 2)
    assert loaded.config.batch_size == best["batch_size"]
    assert load_checkpoint(exp / "best.json").path == loaded.path  # Serve takes best.json too
    assert (exp / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_printed_paths_are_local_ones_serve_can_read(sweep):
    """With a file:// storage path the printed outputs are local paths: the serve line's
    checkpoint resolves (as `serve run` resolves it) to best.json's best checkpoint."""
    from placesnet.checkpoint import resolve_checkpoint

    exp, proc, _ = sweep
    best = json.loads((exp / "best.json").read_text())
    assert Path(best["best_checkpoint"]).is_absolute() and Path(best["best_checkpoint"]).is_dir()
    shown = [line for line in proc.stdout.splitlines() if line.startswith(SHOWN)]
    lines = dict(line.split(":", 1) for line in shown if not line.startswith("best: batch"))
    assert {k: v.strip() for k, v in lines.items() if k != "serve it"} == {
        "best checkpoint": best["best_checkpoint"],
        "results": str(exp / "results.csv"),
        "best": str(exp / "best.json"),
        "plot": str(exp / "sweep.png"),
    }
    command = lines["serve it"].strip()
    assert command == f"serve run --name placesnet serving.app:build_app checkpoint={exp / 'best.json'}"
    assert resolve_checkpoint(command.split("checkpoint=", 1)[1]) == Path(best["best_checkpoint"])


def test_rerun_does_not_repeat_finished_trials(sweep, ray_head):
    exp, _, storage = sweep
    before = {p: p.stat().st_mtime for p in (exp / "train").glob("*/checkpoint_*/model.pt")}
    proc = run_script(
        "tuning/sweep.py", *SWEEP, "--storage-path", storage, "--name", "tiny", env=ray_head.env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming sweep" in proc.stdout
    after = {p: p.stat().st_mtime for p in (exp / "train").glob("*/checkpoint_*/model.pt")}
    assert after == before  # no trial trained again
    table = pd.read_csv(exp / "results.csv", keep_default_na=False)
    assert sorted(table["lr"]) == [0.000001, 0.05, 10000]  # Tune restores no config for
    errored = table[table["status"] == "errored"]  # the trial that never reported
    assert list(errored["lr"]) == [10000] and "training diverged" in errored["error"].iloc[0]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--lr-min", "0.1", "--lr-max", "0.01"], "--lr-min < --lr-max"),
        (["--lr-min", "0", "--lr-max", "0.1"], "--lr-min < --lr-max"),
        (["--batch-sizes", "0,32"], "positive"),
        (["--num-samples", "0"], "--num-samples"),
        (["--grid", "--batch-sizes", "32"], "no pairs"),
        (["--scale-lr", "0"], "--scale-lr must be a batch size"),
        (["--lr", "auto"], "--lr auto is for rayjobs/train.py"),
    ],
)
def test_bad_search_space(args, fragment, tmp_path):
    proc = run_script("tuning/sweep.py", *args, "--storage-path", tmp_path, "--name", "bad")
    assert_user_error(proc, fragment)
    assert not (tmp_path / "bad").exists()


def test_trial_that_cannot_fit(ray_head, tmp_path):
    proc = run_script(
        "tuning/sweep.py",
        *TINY_ARGS,
        "--workers-per-trial",
        "8",
        "--batch-sizes",
        "32",
        "--storage-path",
        tmp_path,
        "--name",
        "big",
        env=ray_head.env,
    )
    assert_user_error(proc, "more than the cluster")
    auto = run_script(
        "tuning/sweep.py", *TINY_ARGS, "--autoscale", "--storage-path", tmp_path, "--name", "auto"
    )  # refused before connecting to Ray
    assert_user_error(auto, "--max-concurrent")
    # The rest of the planning in-process (the CLI above shows how its refusals reach the user).
    from placesnet.launch.sweep import plan_sweep

    with ray_driver(ray_head.address):
        with pytest.raises(UserError, match="no node of the cluster has one"):
            plan_sweep(1, True, 1.0, None)
        assert plan_sweep(1, False, 0.5, None).max_concurrent == 7  # 4 CPUs: 0.5 + 0.01 each
        assert plan_sweep(2, False, 1.0, 5).max_concurrent == 1
        elastic = plan_sweep((1, 2), False, 1.0, None)  # as many trials as can start on 2 each
        assert elastic.max_concurrent == 1 and elastic.resources.workers_label() == "1-2"
        with pytest.raises(UserError, match=r"\(elastic\) needs --input loader"):
            plan_sweep((1, 2), False, 0.5, None, ray_data=True)
        assert plan_sweep(1, False, 0.5, None, ray_data=True).max_concurrent == 2  # + 1 CPU to decode
        with pytest.raises(UserError, match=r"1 worker\(s\) x \(3.5 CPU\) \+ 1 CPU for Ray Data"):
            plan_sweep(1, False, 3.5, None, ray_data=True)
        assert plan_sweep(1, True, 1.0, 3, autoscale=True).max_concurrent == 3  # no nodes yet
    assert not list(tmp_path.iterdir())
