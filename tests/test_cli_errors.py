"""Bad input to the CLIs: one clear error line, a non-zero exit, no traceback, nothing written.

All of these fail before Ray starts, so they need no cluster.
"""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY_ARGS, assert_user_error, run_script


def train(*args, tmp_path):
    return run_script("rayjobs/train.py", *args, "--storage-path", tmp_path / "runs", "--name", "bad")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--lr", "0"], "--lr: must be > 0"),
        (["--lr", "-0.1"], "--lr: must be > 0"),
        (["--lr", "fast"], "expected a number > 0 or 'auto'"),
        (["--sample-difficulty", "hard", "--sample-classes", "20"], "2 to 16 for the hard sample"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--batch-size", "2", "--num-workers", "4"], "smaller than --num-workers"),
        (["--batch-size", "2", "--num-workers", "1-4"], "smaller than --num-workers 4"),
        (["--num-workers", "3-1"], "MIN-MAX needs MIN <= MAX, got '3-1'"),
        (["--num-workers", "1-"], "expected N or MIN-MAX"),
        (["--num-workers", "0-2"], "must be >= 1"),
        (["--input", "ray-data", "--num-workers", "1-2"], "(elastic) needs --input loader"),
        (["--dataset", "imagenet"], "invalid choice"),
        (["--epochs", "0"], "must be >= 1"),
        (["--num-workers", "two"], "expected N or MIN-MAX (e.g. 2 or 1-4), got 'two'"),
        (["--widths", "8,-1"], "positive integers"),
        (["--decode", "gpu", "--cpu"], "--decode gpu decodes on the workers' GPUs, but --cpu"),
        (["--decode", "gpu", "--input", "ray-data"], "--decode gpu is for --input loader"),
        (["--input", "spark"], "invalid choice"),
        (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
        (["--label-smoothing", "-0.1"], "--label-smoothing must be in [0, 1)"),
        (["--fc-hidden", "0"], "--fc-hidden must be >= 1"),
    ],
)
def test_bad_flags(args, fragment, tmp_path):
    proc = train(*TINY_ARGS, *args, tmp_path=tmp_path)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "runs").exists()


def test_missing_data_root(tmp_path):
    proc = train("--dataset", "places365", "--data-root", tmp_path / "nowhere", tmp_path=tmp_path)
    assert_user_error(proc, "does not exist", "--download")


def test_missing_list_file(tiny_root, tmp_path):
    root = tmp_path / "p365"
    shutil.copytree(tiny_root, root)
    os.remove(root / "places365_train_standard.txt")
    proc = train("--dataset", "places365", "--data-root", root, "--skip-verify", tmp_path=tmp_path)
    assert_user_error(proc, "places365_train_standard.txt")


def test_derived_copy_needs_skip_verify(tiny_root, tmp_path):
    root = tmp_path / "p365"
    shutil.copytree(tiny_root, root)
    proc = train("--dataset", "places365", "--data-root", root, tmp_path=tmp_path)
    assert_user_error(proc, "--skip-verify")


@pytest.mark.parametrize("script", ["rayjobs/train.py", "tuning/sweep.py"])
def test_a_name_outside_the_storage_path_is_refused_before_ray(script, tmp_path):
    """--name is one directory under --storage-path (the shared driver setup checks it): refused
    first, before the storage is written, the data checked (a missing --data-root here) or Ray
    contacted (a dead address)."""
    extra = ["--grid", "--lrs", "0.1"] if "sweep" in script else []
    proc = run_script(
        script,
        *TINY_ARGS,
        *extra,
        "--dataset",
        "places365",
        "--data-root",
        tmp_path / "nowhere",
        "--storage-path",
        tmp_path / "runs",
        "--name",
        "../escape",
        "--address",
        "127.0.0.1:1",
    )
    assert_user_error(proc, "--name must be a plain directory name, got '../escape'")
    assert "cannot connect" not in proc.stderr
    assert not list(tmp_path.iterdir())  # neither the storage path nor ../escape beside it


@pytest.mark.parametrize("script,extra", [("rayjobs/evaluate.py", []), ("rayjobs/predict.py", ["x.jpg"])])
def test_missing_and_corrupt_checkpoints(script, extra, tmp_path):
    assert_user_error(run_script(script, "--checkpoint", tmp_path / "nope", *extra), "not found")
    ckpt = tmp_path / "checkpoint_0"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text('{"format": "placesnet-checkpoint/1", "classes": ["a"]}')
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.pt").write_bytes(b"\x00" * 64)
    assert_user_error(run_script(script, "--checkpoint", ckpt, *extra), "corrupt checkpoint")


def test_help_documents_the_flags():
    proc = subprocess.run(
        [sys.executable, str(REPO / "rayjobs/train.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for flag in [
        "--dataset",
        "--data-root",
        "--skip-verify",
        "--download",
        "--image-size",
        "--model",
        "--epochs",
        "--batch-size",
        "--lr",
        "--num-workers",
        "--gpu",
        "--cpu",
        "--loader-workers",
        "--storage-path",
        "--name",
        "--max-failures",
        "--seed",
        "--warmup-steps",
        "--clip-grad-norm",
        "--sample-difficulty",
        "'auto'",
        "linear scaling rule",
        "ray job submit",
        "--input",
        "ray-data",
        "--decode",
        "nvJPEG",
    ]:
        assert flag in proc.stdout, flag


SCRIPTS = [
    "rayjobs/train.py",
    "rayjobs/evaluate.py",
    "rayjobs/predict.py",
    "rayjobs/import_weights.py",
    "rayjobs/batch_predict.py",
    "rayjobs/lr_find.py",
    "rayjobs/inspect_data.py",
    "rayjobs/model_summary.py",
    "tuning/sweep.py",
    "serving/client.py",
    "scripts/ray_head.py",
]


def test_help_examples_keep_their_line_continuations():
    """A backslash-newline in a (non-raw) docstring joins the lines: `evaluate.py         --checkpoint`.
    Each script's --help is its module docstring, so this reads them without starting 9 Pythons."""
    import ast
    import re

    for script in SCRIPTS:
        source = (REPO / script).read_text()
        shown = ast.get_docstring(ast.parse(source), clean=False)  # what --help prints
        assert not re.search(r"\S {6,}--", shown), (script, re.search(r".*\S {6,}--.*", shown).group(0))
        written = source[source.index('"""') + 3 : source.index('"""', source.index('"""') + 3)]
        assert written.count("\\\n") == shown.count("\\\n"), f"{script}: a continuation was swallowed"


@pytest.mark.parametrize("script", ["rayjobs/train.py", "tuning/sweep.py"])
def test_speed_flags_reach_the_training_config(script):
    """The GPU fast path is on by default (bf16/fp16 AMP, channels_last), torch.compile is opt-in,
    and each has a flag that flips it in the TrainConfig the workers get."""
    import importlib.util

    from placesnet.cli import config_from_args

    spec = importlib.util.spec_from_file_location("entry", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    extra = ["--grid", "--lrs", "0.1"] if "sweep" in script else []
    default = config_from_args(module.parse_args(extra))
    assert (
        default.amp,
        default.channels_last,
        default.compile,
        default.loader_workers,
        default.input,
        default.decode,
    ) == (True, True, False, None, "loader", "auto")
    flipped = config_from_args(
        module.parse_args(
            [
                *extra,
                "--no-amp",
                "--no-channels-last",
                "--compile",
                "--loader-workers",
                "3",
                "--input",
                "ray-data",
                "--decode",
                "cpu",
            ]
        )
    )
    assert (
        flipped.amp,
        flipped.channels_last,
        flipped.compile,
        flipped.loader_workers,
        flipped.input,
        flipped.decode,
    ) == (False, False, True, 3, "ray-data", "cpu")
