"""rayjobs/lr_find.py: the LR range test as a command (no Ray), its outputs and its refusals."""

import json

import pandas as pd
from conftest import TINY_ARGS, assert_user_error, run_script

FLAGS = [a for a in TINY_ARGS if a not in ("--lr", "0.05")]  # the finder finds the lr


def test_lr_find_prints_a_suggestion_and_writes_the_plot(tmp_path):
    proc = run_script("rayjobs/lr_find.py", *FLAGS, "--steps", 60, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("suggested lr:"))
    suggestion = float(line.split()[2])
    assert f"--lr {suggestion:.3g} --batch-size 32" in line
    assert (tmp_path / "out" / "lr_find.png").read_bytes().startswith(b"\x89PNG")
    curve = pd.read_csv(tmp_path / "out" / "lr_find.csv")
    assert list(curve.columns) == ["lr", "loss", "smoothed_loss"]
    assert 10 <= len(curve) <= 60 and curve["lr"].is_monotonic_increasing
    assert curve["lr"].min() <= suggestion <= curve["lr"].max()
    machine = run_script(
        "rayjobs/lr_find.py",
        *FLAGS,
        "--steps",
        60,
        "--suggest",
        "valley",
        "--json",
        "--out",
        tmp_path / "json",
    )
    result = json.loads(machine.stdout)
    assert result["plot"] == str(tmp_path / "json" / "lr_find.png") and result["steps_run"] == len(curve)
    assert result["suggestion"] > 0


def test_lr_find_refusals(tmp_path):
    assert_user_error(run_script("rayjobs/lr_find.py", *FLAGS, "--lr", "0.1"), "--lr is what this finds")
    assert_user_error(
        run_script("rayjobs/lr_find.py", *FLAGS, "--min-lr", "1", "--max-lr", "0.1"), "--min-lr < --max-lr"
    )
    (tmp_path / "file").write_text("x")
    assert_user_error(run_script("rayjobs/lr_find.py", *FLAGS, "--out", tmp_path / "file"), "is a file")
