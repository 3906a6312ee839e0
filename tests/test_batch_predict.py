"""rayjobs/batch_predict.py against the session's real Ray head: Ray Data decode tasks and model
actors over a photo collection, the same top-k as predict.py, Parquet / CSV / Places365 outputs,
--cam's overlay PNG for every predicted image (none for an unreadable one), bad input refused
before Ray, and a run SIGKILLed mid-way resumed with every input once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, assert_user_error, flip_bytes, run_script, untrained_checkpoint

pytestmark = pytest.mark.slow


def batch_predict(*args, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script("rayjobs/batch_predict.py", *args, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def photos(tiny_root, tmp_path_factory):
    """The tiny sample's 48 val images in nested folders, some with upper-case suffixes, one
    broken JPEG and a text file that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(sorted((tiny_root / "val_256").glob("*.jpg"))):
        folder = root / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / f"photo{i:02d}{'.JPG' if i % 5 == 0 else '.jpg'}")
    (root / "b/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (root / "a/notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tmp_path_factory):
    return untrained_checkpoint(tmp_path_factory.mktemp("bp") / "ckpt", tiny_config, seed=3)


def parts(out: Path) -> pd.DataFrame:
    files = sorted(out.glob("part-*"))
    read = pd.read_parquet if files[0].suffix == ".parquet" else pd.read_csv
    return pd.concat([read(f) for f in files], ignore_index=True)


def test_bad_input_is_one_line_before_ray_starts(photos, checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoint, corrupt)
    flip_bytes(corrupt / "model.pt")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for args, fragment in [
        (["--input", tmp_path / "nowhere"], "does not exist"),
        (["--input", empty], "holds no images"),
        (["--out", tmp_path / "file"], "is a file"),
        (["--out", "/proc/placesnet-out"], "cannot write to --out"),
        (["--out", other], "holds other files (mine.txt"),
        (["--cam", tmp_path / "file"], f"--cam {tmp_path / 'file'} is a file"),
        (["--checkpoint", corrupt], "corrupt checkpoint"),
        (["--format", "places365"], "needs the top 5 classes; this model has 4"),
    ]:
        given = dict(zip(args[::2], args[1::2]))
        argv = {"--checkpoint": checkpoint, "--input": photos, "--out": tmp_path / "out", **given}
        proc = batch_predict(*[x for kv in argv.items() for x in kv], env=env, timeout=120)
        assert_user_error(proc, fragment)
        assert "batch predict:" not in proc.stdout  # refused before Ray was started
    assert not (tmp_path / "out").exists() and list(other.iterdir()) == [other / "mine.txt"]


def test_top_k_equal_predict_py_in_parquet_and_csv_and_a_finished_output_is_not_redone(
    photos, checkpoint, ray_head, tmp_path
):
    out, cams = tmp_path / "out", tmp_path / "cams"
    common = ["--checkpoint", checkpoint, "--input", photos, "--top-k", 3, "--batch-size", 8]
    proc = batch_predict(*common, "--out", out, "--shard-size", 16, "--cam", cams, env=ray_head.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "predicted 49 images" in proc.stdout and "1 could not be read" in proc.stdout, proc.stdout
    assert f"48 overlays in {cams}" in proc.stdout, proc.stdout
    table = parts(out)
    assert len(list(out.glob("part-*.parquet"))) == 4  # 49 inputs in shards of 16
    assert sorted(table["index"]) == list(range(49))  # every input once
    images = sorted(str(p) for p in photos.rglob("*") if p.suffix.lower() == ".jpg")
    assert sorted(table["path"]) == images  # the text file is not an input; .JPG is
    # predict.py on the same files: the same top-3, the same probabilities
    reference = run_script("rayjobs/predict.py", "--checkpoint", checkpoint, "--json", "--top-k", 3, *images)
    expected = {r["image"]: r for r in json.loads(reference.stdout)["results"]}
    for row in table.itertuples():
        want = expected[row.path]
        if "error" in want:
            assert row.error and pd.isna(row.label) and row.labels is None, row
            assert want["error"].split(": ", 1)[-1] in row.error
            continue
        assert pd.isna(row.error) and list(row.labels) == [p["label"] for p in want["predictions"]]
        assert list(row.class_indices) == [p["class_index"] for p in want["predictions"]]
        assert list(row.probabilities) == pytest.approx(
            [p["probability"] for p in want["predictions"]], abs=1e-5
        )
        assert row.label == row.labels[0] and row.probability == row.probabilities[0]
        assert row.checkpoint == str(checkpoint)
    _check_overlays(cams, table, checkpoint)
    # The same command again: complete, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = batch_predict(*common, "--out", out, "--shard-size", 16, "--cam", cams, env=ray_head.env)
    assert again.returncode == 0 and "is complete: 49 images (1 could not be read)" in again.stdout, (
        again.stdout
    )
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # Other settings on the same --out: refused, unless --overwrite.
    other = batch_predict(
        *common[:-4], "--top-k", 2, "--out", out, "--shard-size", 16, "--cam", cams, env=ray_head.env
    )
    assert_user_error(other, "holds predictions of another run (its top_k differ)")
    # CSV: the same rows, the lists as JSON arrays.
    csv = tmp_path / "csv"
    proc = batch_predict(*common, "--out", csv, "--format", "csv", env=ray_head.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = parts(csv).sort_values("index")
    assert len(list(csv.glob("part-*.csv"))) == 1
    good = rows[rows["error"].isna()]
    assert [json.loads(v) for v in good["labels"]] == [
        list(v) for v in table.sort_values("index")[table.sort_values("index")["error"].isna()]["labels"]
    ]


def _check_overlays(cams: Path, table: pd.DataFrame, checkpoint: Path) -> None:
    """--cam: one PNG per predicted image and none for the unreadable one, named by its index
    and file name, of the view's size (the model's input); the first ones are the view blended
    with its top-1 class's map, as plots.overlay draws it."""
    import numpy as np
    from PIL import Image

    from placesnet.batch import overlay_name
    from placesnet.checkpoint import load_checkpoint
    from placesnet.data.views import single_view
    from placesnet.evaluation import batch_heatmaps
    from placesnet.images import load_image_file
    from placesnet.plots import overlay

    good = table[table["error"].isna()].sort_values("index")
    assert sorted(p.name for p in cams.iterdir()) == sorted(
        overlay_name(i, path) for i, path in zip(good["index"], good["path"])
    )
    loaded = load_checkpoint(checkpoint)
    size = loaded.config.image_size
    for row in list(good.itertuples())[:3]:
        with Image.open(cams / overlay_name(row.index, row.path)) as png:
            assert png.format == "PNG" and png.size == (size, size) and png.mode == "RGB"
            drawn = np.asarray(png, dtype=np.int16)
        view = single_view(loaded.config)(load_image_file(row.path))
        heatmap = batch_heatmaps(loaded, view[None], [int(row.class_indices[0])])[0]
        assert heatmap.max() == 1  # evidence somewhere: another class's map would look otherwise
        assert np.abs(drawn - overlay(view, heatmap).astype(np.int16)).max() <= 2


def test_places365_submission_follows_the_list_order(tiny_root, tiny_config, ray_head, tmp_path):
    """A Places365 list (``name label`` lines, relative to --root) and a model of 6 classes: the
    challenge file has one line per image in the list's order, its top-5 class indices."""
    import torch

    from placesnet.checkpoint import save_checkpoint
    from placesnet.model import build_model

    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "six",
        model=build_model(tiny_config, 6),
        config=tiny_config,
        classes=[f"/s/scene{i}" for i in range(6)],
        epoch=0,
        metrics={"epoch": 1, "val_top1": 0.0},
        history=[],
    )
    lines = (tiny_root / "places365_val.txt").read_text().splitlines()[::-1][:20]  # not sorted
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = batch_predict(
        "--checkpoint",
        ckpt,
        "--input",
        tmp_path / "list.txt",
        "--root",
        tiny_root / "val_256",
        "--format",
        "places365",
        "--out",
        out,
        env=ray_head.env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    submission = (out / "places365_submission.txt").read_text().splitlines()
    assert [s.split()[0] for s in submission] == [line.split()[0] for line in lines]
    table = parts(out).sort_values("index")
    assert [s.split()[1:] for s in submission] == [[str(c) for c in v] for v in table["class_indices"]]
    assert list(table["path"]) == [line.split()[0] for line in lines]


def test_a_killed_run_resumes_with_every_input_once(photos, checkpoint, ray_head, tmp_path):
    """SIGKILL of the driver once 3 shards are written; the same command predicts only the rest."""
    many = tmp_path / "many"
    for copy in range(4):
        shutil.copytree(photos, many / f"copy{copy}")
    out = tmp_path / "out"
    args = ["--checkpoint", checkpoint, "--input", many, "--out", out, "--shard-size", 8, "--batch-size", 4]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "rayjobs/batch_predict.py"), *map(str, args)],
        env=ray_head.env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None, "batch_predict.py ended before it was killed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 3 <= len(before) < 25, before  # killed mid-run: 196 inputs are 25 shards of 8
    again = batch_predict(*args, env=ray_head.env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    done = sum(min(8, 196 - 8 * int(name[5:11])) for name in before)  # part-NNNNNN: shard NNNNNN
    assert f"{done} of 196 images already predicted" in again.stdout, again.stdout
    # Only the missing shards were predicted: the parts written before the kill are untouched.
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    table = parts(out)
    assert len(list(out.glob("part-*.parquet"))) == 25 and not list(out.glob(".*tmp*"))
    assert sorted(table["index"]) == list(range(196))  # every input once: none lost, none twice
    assert table["path"].is_unique and table["error"].notna().sum() == 4
