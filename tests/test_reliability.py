"""Reliability without a cluster: the driver-side data check, the bad-image policy of the epoch
loop, checksummed checkpoints and the run-dir repair before a resume, the retry policy's verdict,
and the CLIs' refusals that come before Ray starts. The same faults end to end, on a real Ray, are
in test_faults.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_ARGS, assert_user_error, run_script, write_ray_snapshot
from torch import nn
from torch.utils.data import DataLoader

from placesnet.checkpoint import (
    MODEL_FILE,
    _best_in_run,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from placesnet.config import SCORE, TrainConfig, UserError, checkpoint_score
from placesnet.data.places import BadImageFile, BadImages, MarkBadImages, open_split
from placesnet.data.validate import DataError, check_dataset
from placesnet.launch.resume import SNAPSHOT, prepare_resume
from placesnet.train import engine

P365 = ["--dataset", "places365", "--skip-verify"]


@pytest.fixture
def copy(tiny_root, tmp_path):
    """A writable copy of the tiny sample in the Places365 layout."""
    root = tmp_path / "p365"
    shutil.copytree(tiny_root, root)
    return root


def _edit_line(path, number, text):
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = text
    path.write_text("".join(lines))


# --- the data check on the driver ------------------------------------------------------------


def test_a_sound_copy_passes_with_a_summary(copy):
    line = check_dataset(copy)
    assert "train 160 lines, val 48 lines, 4 classes" in line
    assert "every listed image present and non-empty" in line
    assert "not checked" in check_dataset(copy, files=False)


@pytest.mark.parametrize(
    "split,line,text,expected",
    [
        (
            "train",
            3,
            "/b/beach/00000003.jpg\n",
            "places365_train_standard.txt line 3: expected '<image> <label>', got 1 column",
        ),
        (
            "train",
            5,
            "/b/beach/00000005.jpg 4\n",
            "places365_train_standard.txt line 5: label 4 is out of range 0..3",
        ),
        ("train", 6, "/b/beach/00000006.jpg -1\n", "line 6: label -1 is out of range"),
        ("train", 7, "/b/beach/00000007.jpg two\n", "line 7: label 'two' is not an integer"),
        ("train", 8, "\n", "line 8: expected '<image> <label>', got an empty line"),
        ("train", 9, "/b/beach/00000001.jpg 0\n", "line 9: /b/beach/00000001.jpg is listed twice"),
        (
            "val",
            2,
            "Places365_val_00000002.jpg 0 extra\n",
            "places365_val.txt line 2: expected '<image> <label>', got 3 column",
        ),
    ],
)
def test_bad_list_lines_are_named_by_file_and_line(copy, split, line, text, expected):
    name = "places365_train_standard.txt" if split == "train" else "places365_val.txt"
    _edit_line(copy / name, line, text)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(".", r"\.")):
        check_dataset(copy)


def test_missing_and_empty_images_are_found_without_decoding(copy):
    (copy / "data_256_standard/b/beach/00000010.jpg").write_bytes(b"")
    (copy / "val_256/Places365_val_00000004.jpg").unlink()
    with pytest.raises(DataError) as e:
        check_dataset(copy)
    assert "places365_train_standard.txt line 10: image" in str(e.value)
    assert "00000010.jpg is empty (0 bytes)" in str(e.value)
    (copy / "data_256_standard/b/beach/00000010.jpg").write_bytes(b"\xff")
    with pytest.raises(
        DataError, match=r"places365_val.txt line 4: image .*Places365_val_00000004.jpg does not exist"
    ):
        check_dataset(copy)
    assert "lists well-formed" in check_dataset(copy, files=False)  # --no-check-files


def test_every_problem_is_counted_and_the_first_ones_shown(copy):
    lst = copy / "places365_train_standard.txt"
    for number in (2, 4, 6, 8, 10, 12, 14):
        _edit_line(lst, number, f"/b/beach/{number:08d}.jpg 99\n")
    with pytest.raises(DataError) as e:
        check_dataset(copy)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("places365_train_standard.txt line 2: label 99")
    assert "(and 6 more problem(s))" in message
    assert "line 10: label 99" in message and "line 12" not in message  # five shown


def test_malformed_categories_file(copy):
    cats = copy / "categories_places365.txt"
    cats.write_text(cats.read_text().replace(" 2\n", " 7\n"))
    with pytest.raises(DataError, match="indices must be 0..3"):
        check_dataset(copy)


def test_train_cli_refuses_bad_data_before_ray_starts(copy, tmp_path):
    _edit_line(copy / "places365_train_standard.txt", 3, "/b/beach/00000003.jpg\n")
    proc = run_script(
        "rayjobs/train.py",
        *TINY_ARGS,
        *P365,
        "--data-root",
        copy,
        "--storage-path",
        tmp_path / "runs",
        "--name",
        "bad",
        "--address",
        "127.0.0.1:1",
    )
    assert_user_error(proc, "places365_train_standard.txt line 3", str(copy))
    assert proc.returncode == 2
    assert "cannot connect" not in proc.stderr  # stopped before it tried the (absent) cluster
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.parametrize("storage", ["file_not_dir", "/proc/placesnet-runs"])
def test_unwritable_storage_path_is_one_line(tmp_path, storage):
    if storage == "file_not_dir":
        (tmp_path / "plain").write_text("x")
        storage = tmp_path / "plain" / "runs"
    proc = run_script(
        "rayjobs/train.py", *TINY_ARGS, "--storage-path", storage, "--name", "x", "--address", "127.0.0.1:1"
    )
    assert_user_error(proc, f"cannot write to --storage-path {storage}")
    assert proc.returncode == 2 and "cannot connect" not in proc.stderr


def test_bad_images_flag_reaches_the_config():
    proc = run_script("rayjobs/train.py", "--bad-images", "ignore")
    assert_user_error(proc, "invalid choice: 'ignore'")
    import argparse

    from placesnet.cli import add_data_args, add_model_args, config_from_args

    p = argparse.ArgumentParser()
    add_data_args(p)
    add_model_args(p)
    assert config_from_args(p.parse_args(["--bad-images", "skip"])).bad_images == "skip"
    assert config_from_args(p.parse_args([])).bad_images == "fail"
    with pytest.raises(UserError, match="--bad-images"):
        TrainConfig(bad_images="maybe").validate()


# --- bad images in the epoch loop --------------------------------------------------------------


def _corrupt(copy, index_in_train_list):
    line = (copy / "places365_train_standard.txt").read_text().splitlines()[index_in_train_list]
    path = copy / "data_256_standard" / line.split()[0].lstrip("/")
    path.write_bytes(path.read_bytes()[:200])  # a truncated JPEG: present, non-empty, undecodable
    return path


def _tiny_model(classes=4):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)
    )


def test_fail_policy_names_file_and_list_line(copy, tiny_config):
    bad = _corrupt(copy, 9)  # line 10
    ds = open_split(tiny_config.replace(dataset="places365", skip_verify=True), "train", copy)
    policy = BadImages("fail", ds, warn=lambda m: None)
    loader = DataLoader(MarkBadImages(ds, tiny_config.image_size), batch_size=32)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(BadImageFile) as e:
        engine.train_one_epoch(model, loader, opt, torch.device("cpu"), bad_images=policy)
    message = str(e.value)
    assert str(bad) in message and "line 10 of" in message and "places365_train_standard.txt" in message
    assert "--bad-images skip" in message and ".cpp" not in message


def test_skip_policy_leaves_bad_images_out_of_loss_and_counts(copy, tiny_config):
    _corrupt(copy, 9)
    _corrupt(copy, 20)
    cfg = tiny_config.replace(dataset="places365", skip_verify=True)
    ds = open_split(cfg, "train", copy)
    warned = []
    policy = BadImages("skip", ds, warn=warned.append)
    loader = DataLoader(MarkBadImages(ds, cfg.image_size), batch_size=32)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    row = engine.train_one_epoch(model, loader, opt, torch.device("cpu"), bad_images=policy)
    assert row["skipped_images"] == 2 and row["train_images"] == len(ds) - 2
    assert torch.isfinite(torch.tensor(row["train_loss"]))
    assert len(warned) == 2 and all("skipping a bad image" in w for w in warned)
    engine.train_one_epoch(model, loader, opt, torch.device("cpu"), bad_images=policy)
    assert len(warned) == 2  # each file is named once, not every epoch
    val = engine.evaluate(model, loader, torch.device("cpu"), num_classes=4, bad_images=policy)
    assert val["val_skipped"] == 2 and val["val_images"] == len(ds) - 2


def test_a_batch_of_only_bad_images_trains_on_without_nan(tiny_config):
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    targets = torch.tensor([-1, -2, -3, -4])

    class Names:
        imgs = [(f"/x/{i}.jpg", 0) for i in range(4)]
        root, split = "/x", "val"
        _FILE_LIST_META = {"val": ("places365_val.txt", "")}

    policy = BadImages("skip", Names(), warn=lambda m: None)
    model = _tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    row = engine.train_one_epoch(model, [(images, targets)], opt, torch.device("cpu"), bad_images=policy)
    assert row["skipped_images"] == 4 and row["train_images"] == 0 and row["train_loss"] == 0.0


# --- checkpoints: checksums and the repair before a resume --------------------------------------


def _run_dir(tmp_path, epochs=3, snapshot=True, top1=(0.5, 0.9, 0.7, 0.6), loss=None):
    """A run dir with one checkpoint per epoch and Ray 2.60's snapshot listing them (with the
    score train.py reports)."""
    run = tmp_path / "run"
    model = _tiny_model()
    cfg = TrainConfig()
    names, reported = [], []
    for epoch in range(epochs):
        name = f"checkpoint_2026-11-28_10-00-0{epoch}.000000"
        val_loss = loss[epoch] if loss else 1 - top1[epoch]
        metrics = {"epoch": epoch + 1, "val_top1": top1[epoch], "val_top5": 1.0, "val_loss": val_loss}
        save_checkpoint(
            run / name,
            model=model,
            config=cfg,
            classes=list("abcd"),
            epoch=epoch,
            metrics=metrics,
            history=[metrics],
        )
        names.append(name)
        reported.append(metrics)
    if snapshot:
        results = [
            {"version": 0, "checkpoint_dir_name": n, "metrics": {**m, SCORE: checkpoint_score(m)}}
            for n, m in zip(names, reported)
        ]
        write_ray_snapshot(run, results)
    return run, [run / n for n in names]


def test_checkpoints_carry_checksums_and_verify(tmp_path):
    run, ckpts = _run_dir(tmp_path, epochs=1)
    meta = json.loads((ckpts[0] / "meta.json").read_text())
    assert set(meta["files"]) == {"model.pt", "train_state.pt", "config.json"}
    assert verify_checkpoint(ckpts[0]) is None
    assert not list(ckpts[0].glob(".*.tmp"))  # written under temporary names, renamed into place
    data = (ckpts[0] / MODEL_FILE).read_bytes()
    (ckpts[0] / MODEL_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit
    assert "does not match its sha256" in verify_checkpoint(ckpts[0])
    (ckpts[0] / MODEL_FILE).write_bytes(data[:100])
    assert "truncated" in verify_checkpoint(ckpts[0])


def test_an_intact_run_is_left_as_it_is(tmp_path):
    run, ckpts = _run_dir(tmp_path)
    before = (run / SNAPSHOT).read_text()
    plan = prepare_resume(run)
    assert plan.checkpoint == ckpts[-1] and plan.epoch == 3 and not plan.notes
    assert (run / SNAPSHOT).read_text() == before
    assert prepare_resume(tmp_path / "new").checkpoint is None


@pytest.mark.parametrize(
    "damage,note",
    [
        (lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:64]), "model.pt has 64 bytes"),
        (lambda d: (d / "meta.json").write_text("{garbage"), "meta.json is not valid JSON"),
        (lambda d: (d / "config.json").write_text("{garbage"), "config.json has 8 bytes"),
        (lambda d: (d / "meta.json").unlink(), "no meta.json"),
        (lambda d: shutil.rmtree(d), "listed by Ray but its directory is gone"),
    ],
)
def test_a_broken_newest_checkpoint_resumes_from_the_one_before(tmp_path, damage, note):
    run, ckpts = _run_dir(tmp_path)
    damage(ckpts[-1])
    plan = prepare_resume(run)
    assert plan.checkpoint == ckpts[1] and plan.epoch == 2
    assert len(plan.notes) == 1 and note in plan.notes[0] and ckpts[-1].name in plan.notes[0]
    if ckpts[-1].exists() or (run / f"broken-{ckpts[-1].name}").exists():
        assert (run / f"broken-{ckpts[-1].name}").exists() and not ckpts[-1].exists()  # kept aside
    state = json.loads((run / SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in state["checkpoint_results"]] == [c.name for c in ckpts[:2]]
    assert state["latest_checkpoint_result"]["checkpoint_dir_name"] == ckpts[1].name
    assert state["checkpoint_report_indices"] == [0, 1] and state["current_report_index"] == 2
    assert (run / f"{SNAPSHOT}.broken").exists()
    # Ray 2.60 accepts the rewritten snapshot as its own
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    _CheckpointManagerState.parse_obj(state)
    assert prepare_resume(run).notes == []  # repaired once: a second look finds nothing wrong


def test_checkpoints_ray_had_not_recorded_are_resumed_from(tmp_path):
    # A run stopped after writing checkpoints but before Ray recorded them (or wrote its snapshot)
    run, ckpts = _run_dir(tmp_path, snapshot=False)
    plan = prepare_resume(run)
    assert plan.checkpoint == ckpts[-1] and plan.epoch == 3
    state = json.loads((run / SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in state["checkpoint_results"]] == [c.name for c in ckpts]
    # ... or recorded only some of them
    state["checkpoint_results"] = state["checkpoint_results"][:2]
    state["checkpoint_report_indices"] = [0, 1]
    state["latest_checkpoint_result"] = state["checkpoint_results"][1]
    (run / SNAPSHOT).write_text(json.dumps(state))
    plan = prepare_resume(run)
    assert plan.checkpoint == ckpts[-1] and plan.notes == [
        f"adding checkpoint {ckpts[-1].name}: complete, but not yet recorded by Ray"
    ]
    assert (
        json.loads((run / SNAPSHOT).read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
        == ckpts[-1].name
    )


def test_a_garbage_snapshot_is_rebuilt_from_the_checkpoints(tmp_path):
    run, ckpts = _run_dir(tmp_path)
    (run / SNAPSHOT).write_text("not json")
    plan = prepare_resume(run)
    assert plan.checkpoint == ckpts[-1] and "unreadable" in plan.notes[0]
    assert (
        json.loads((run / SNAPSHOT).read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
        == ckpts[-1].name
    )


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    run, ckpts = _run_dir(tmp_path, epochs=2)
    for d in ckpts:
        (d / "model.pt").write_bytes(b"")
    with pytest.raises(UserError, match="no intact checkpoint to resume in .*new --name"):
        prepare_resume(run)


def test_best_checkpoint_of_a_run_skips_broken_ones(tmp_path):
    run, ckpts = _run_dir(tmp_path)  # val top-1 0.5, 0.9, 0.7
    assert resolve_checkpoint(run) == ckpts[1]
    (ckpts[1] / "model.pt").write_bytes(b"x")
    assert _best_in_run(run) == ckpts[2]


# --- the retry policy ------------------------------------------------------------------------------


def test_user_errors_are_not_retried_and_lost_workers_are():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from placesnet.launch.trainer import StopOnUserErrors, failure_message

    policy = StopOnUserErrors(FailureConfig(max_failures=2))
    bad = WorkerGroupError(
        "rank 1 failed", {1: BadImageFile("cannot decode image /x.jpg"), 0: RuntimeError("gloo")}
    )
    assert policy.make_decision(training_failed_error=bad) == FailureDecision.RAISE
    assert failure_message(bad) == ("cannot decode image /x.jpg", True)
    lost = WorkerGroupError("rank 0 died", {0: RuntimeError("actor died")})
    assert [policy.make_decision(training_failed_error=lost) for _ in range(3)] == [
        FailureDecision.RETRY,
        FailureDecision.RETRY,
        FailureDecision.RAISE,
    ]
    assert failure_message(lost)[1] is False


def test_interrupted_cli_says_how_to_resume():
    code = (
        "import os, signal\n"
        "from placesnet.cli import run_cli\n"
        "def main():\n    os.kill(os.getpid(), signal.SIGTERM)\n    import time; time.sleep(30)\n"
        "run_cli(main, resumable=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130
    assert proc.stderr.strip().endswith("interrupted: resume with the same command")


def test_the_summary_names_the_best_epoch_not_the_latest(tmp_path):
    """summary.json's best checkpoint is the best val top-1 (0.9 at epoch 2), not the last epoch's."""
    import ray.train

    from placesnet.launch.outputs import summarize

    run, ckpts = _run_dir(tmp_path)  # val top-1 0.5, 0.9, 0.7
    summary, history = summarize(ray.train.Result.from_path(str(run)), str(tmp_path), "run")
    assert summary["best_epoch"] == 2 and summary["val_top1"] == 0.9
    assert summary["best_checkpoint"] == str(ckpts[1]) and summary["latest_checkpoint"] == str(ckpts[2])
    assert summary["epochs_completed"] == 3
    assert json.loads((run / "summary.json").read_text())["best_checkpoint"] == str(ckpts[1])


def test_tied_val_top1_goes_to_the_lower_val_loss(tmp_path):
    """Epochs 1-4 tie at val top-1 0.9; epoch 3 has the lowest val loss: the summary, a run dir
    without summary.json, and the history all pick epoch 3 (the tie-break of checkpoint_score)."""
    import ray.train

    from placesnet.config import best_epoch
    from placesnet.launch.outputs import summarize

    losses = (0.30, 0.20, 0.10, 0.15)
    run, ckpts = _run_dir(tmp_path, epochs=4, top1=(0.9,) * 4, loss=losses)
    assert _best_in_run(run) == ckpts[2]
    summary, history = summarize(ray.train.Result.from_path(str(run)), str(tmp_path), "run")
    assert summary["best_epoch"] == 3 and summary["val_loss"] == 0.10
    assert (
        best_epoch([{"epoch": e + 1, "val_top1": 0.9, "val_loss": v} for e, v in enumerate(losses)])["epoch"]
        == 3
    )
    # a higher val top-1 wins over any loss; a NaN loss ranks last among ties
    assert (
        best_epoch(
            [
                {"epoch": 1, "val_top1": 0.8, "val_loss": 0.01},
                {"epoch": 2, "val_top1": 0.81, "val_loss": 50.0},
            ]
        )["epoch"]
        == 2
    )
    assert (
        best_epoch(
            [
                {"epoch": 1, "val_top1": 0.8, "val_loss": float("nan")},
                {"epoch": 2, "val_top1": 0.8, "val_loss": 9.0},
            ]
        )["epoch"]
        == 2
    )


def test_checkpoint_latest_is_the_newest_finished_run(tmp_path, monkeypatch):
    import os

    old, _ = _run_dir(tmp_path / "a")
    new, new_ckpts = _run_dir(tmp_path / "b", epochs=2)
    storage = tmp_path / "storage"
    storage.mkdir()
    for name, run, when in (("old", old, 1_000), ("new", new, 2_000)):
        (storage / name).symlink_to(run)
        (run / "summary.json").write_text(json.dumps({"best_checkpoint": str(_best_in_run(run))}))
        os.utime(run / "summary.json", (when, when))
    assert resolve_checkpoint(f"latest:{storage}") == new_ckpts[1]  # epoch 2's 0.9, of the newer run
    (storage / "sweep").mkdir()
    (storage / "sweep" / "best.json").write_text(
        json.dumps({"best_checkpoint": str(old / "checkpoint_2026-11-28_10-00-02.000000")})
    )
    os.utime(storage / "sweep" / "best.json", (3_000, 3_000))
    assert resolve_checkpoint(f"latest:{storage}").name == "checkpoint_2026-11-28_10-00-02.000000"
    monkeypatch.setattr("placesnet.config.DEFAULT_STORAGE", str(storage))
    assert resolve_checkpoint("latest").name == "checkpoint_2026-11-28_10-00-02.000000"
    with pytest.raises(UserError, match="no finished run"):
        resolve_checkpoint(f"latest:{tmp_path / 'empty'}")
