"""Each benchmark runs on tiny settings and prints its table (no timing is asserted: benchmarks
measure, tests only check they work)."""

import re
import shutil

import pytest
from conftest import _free_port, run_script


def _table(proc, *rows):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "\n### " in out and "|---" in out, out
    for row in rows:
        assert re.search(rf"^\| {re.escape(row)}\s+\|", out, re.M), (row, out)
    return out


def _cells(out, row):
    line = next(line for line in out.splitlines() if line.startswith(f"| {row} "))
    return [c.strip() for c in line.strip("|").split("|")]


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("x"))


def _check_ratios(out, first_col: str, value_col: str, ratio_col: str, base: str, rows) -> None:
    """Each row's ratio cell is its value over the baseline row's, as printed (so a ratio taken
    against the wrong row, or the baseline against itself everywhere, fails)."""
    header = _cells(out, first_col)
    table = {r: dict(zip(header, _cells(out, r))) for r in (base, *rows)}
    assert table[base][ratio_col] == "1.00x"
    for r in rows:
        expected = _number(table[r][value_col]) / _number(table[base][value_col])
        assert _number(table[r][ratio_col]) == pytest.approx(expected, rel=0.02, abs=0.011), (r, table[r])


def test_input_benchmark_prints_ratios_against_the_workshop():
    out = _table(
        run_script("benchmarks/input.py", "--images", 32, "--batch-size", 8, "--repeats", 1, "--ray-data"),
        "workshop",
        "project",
        "ray data",
    )
    workshop, project, ray_data = _cells(out, "workshop"), _cells(out, "project"), _cells(out, "ray data")
    assert workshop[-1] == "1.00x" and workshop[-2] == "1.00x"
    assert project[-1] == ray_data[-1] == "0.25x"  # uint8 batches: a quarter of float32's bytes
    assert _number(project[-2]) > 0 and _number(ray_data[-2]) > 0
    _check_ratios(out, "pipeline", "images/s", "speed vs workshop", "workshop", ["project", "ray data"])
    _check_ratios(out, "pipeline", "MiB per batch", "bytes vs workshop", "workshop", ["project", "ray data"])


def test_compute_benchmark_refuses_zero_threads():
    proc = run_script("benchmarks/compute.py", "--device", "cpu", "--threads", 0)
    assert proc.returncode == 2 and "--threads must be >= 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_benchmark_refuses_gpus_it_cannot_have():
    import torch

    negative = run_script("benchmarks/serve.py", "--gpus", -1)
    assert negative.returncode == 2 and "--gpus must be >= 0, got -1" in negative.stderr
    if not torch.cuda.is_available():  # refused before Ray starts, not after minutes of deploying
        proc = run_script("benchmarks/serve.py", "--gpus", 0.25)
        assert proc.returncode == 2 and "--gpus 0.25 needs a CUDA GPU here" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_compute_benchmark_reports_a_fraction_of_the_matmul_peak():
    out = _table(
        run_script(
            "benchmarks/compute.py",
            "--device",
            "cpu",
            "--image-size",
            32,
            "--batch-size",
            2,
            "--steps",
            1,
            "--matmul-size",
            256,
            "--widths",
            "8,16",
            "--threads",
            1,
        ),
        "fp32",
    )
    assert "inference (fp32), 32 px, cpu, 1 thread(s)" in out
    cells = _cells(out, "fp32")
    assert _number(cells[2]) > 0 and cells[4].endswith("%")  # step GFLOP counted, % of peak
    assert _cells(out, "1")[-1] == "1.00x" and _cells(out, "16")[-1].endswith("x")  # inference


def test_gpu_train_benchmark_skips_without_cuda_and_runs_on_cpu():
    import torch

    if not torch.cuda.is_available():
        proc = run_script("benchmarks/gpu_train.py")
        assert proc.returncode == 0 and "skipped: no CUDA device" in proc.stdout
    out = _table(
        run_script(
            "benchmarks/gpu_train.py",
            "--device",
            "cpu",
            "--image-size",
            32,
            "--batch-size",
            4,
            "--steps",
            2,
            "--widths",
            "8,16",
            "--no-compile",
            "--input-images",
            16,
            "--ray-data",
        ),
        "fp32",
        "amp",
        "amp + channels_last",
        "amp + channels_last, host sync every step",
        "workshop",
        "project",
    )
    _check_ratios(
        out,
        "mode",
        "images/s",
        "vs fp32",
        "fp32",
        ["amp", "amp + channels_last", "amp + channels_last, host sync every step"],
    )
    assert re.search(r"read at check points / host sync every step: \d+\.\d\dx", out), out
    # end to end: the synthetic row's step fed by each of train.py's input modes, real JPEGs
    e2e = [
        "real JPEGs: loader, --decode cpu",
        "real JPEGs: loader, --decode gpu",
        "real JPEGs: --input ray-data",
    ]
    _check_ratios(
        out, "input", "images/s", "vs synthetic", "synthetic batches on the device (amp + channels_last)", e2e
    )
    assert "4 steps of real 256 px JPEGs per epoch" in out  # 16 images, batch 4


@pytest.mark.slow
def test_train_overhead_benchmark_compares_ray_with_plain(ray_head):
    out = _table(
        run_script(
            "benchmarks/train_overhead.py",
            "--address",
            ray_head.address,
            "--cpus",
            1,
            "--epochs",
            2,
            "--image-size",
            32,
            "--widths",
            "8,16",
            "--batch-size",
            16,
            "--sample-classes",
            2,
            "--sample-train-per-class",
            16,
            env=ray_head.env,
        ),
        "plain (before)",
        "ray train",
        "plain (after)",
    )
    header = _cells(out, "loop")
    rows = {r: dict(zip(header, _cells(out, r))) for r in ("plain (before)", "ray train", "plain (after)")}
    rate = {r: _number(c["steady train images/s"]) for r, c in rows.items()}
    fastest_plain = max(rate["plain (before)"], rate["plain (after)"])  # the baseline, as the note says
    for r, c in rows.items():
        assert re.fullmatch(r"\d+\.\d\dx", c["vs plain"]), c
        assert _number(c["vs plain"]) == pytest.approx(rate[r] / fastest_plain, rel=0.02, abs=0.011), (r, c)


ROLL, IN_PLACE = "roll (serve deploy, new args.checkpoint)", "in place (promote)"


@pytest.mark.slow
def test_serve_benchmark_compares_batching_and_plain_fastapi(ray_head):
    """Every server's row, the CPU stages, wrk (when installed), and the rollout table: a -> b
    under load in place and by rolling the replicas, with no failed request either way."""
    out = _table(
        run_script(
            "benchmarks/serve.py",
            "--address",
            ray_head.address,
            "--port",
            _free_port(),
            "--plain-port",
            _free_port(),
            "--requests",
            8,
            "--concurrency",
            "4",
            "--image-size",
            32,
            "--cpus",
            0.5,
            "--per-request",
            4,
            "--wrk-seconds",
            1,
            "--grpc-port",
            _free_port(),
            env=ray_head.env,
        ),
        "serve, batching (max 16)",
        "serve, batching off",
        "plain FastAPI + uvicorn",
        "serve, echo (no model)",
        "serve, batching, always queued (adaptive_batching=0)",
        "serve, batching, 4 images per request",
        "serve, batching, gRPC",
        "serve, batching, gRPC, 4 images per call",
    )
    out, _, rollout = out.partition("### serve rollout: checkpoint a -> b under load")
    _check_rollout(rollout)
    assert "### serve: where the CPU of a request goes" in out
    out, stages = out.split("### serve: where the CPU of a request goes")
    stages, _, wrk = stages.partition("### serve under wrk")
    if shutil.which("wrk"):  # scripts/bench_tools.sh installs it (make bench)
        cols = [
            c.strip()
            for c in next(line for line in wrk.splitlines() if line.startswith("| server"))
            .strip("|")
            .split("|")
        ]
        wrk_rows = [
            dict(zip(cols, [c.strip() for c in line.strip("|").split("|")]))
            for line in wrk.splitlines()
            if line.startswith(("| serve,", "| plain"))
        ]
        assert len(wrk_rows) == 5, wrk  # every server with one image per request
        for r in wrk_rows:
            assert _number(r["requests/s"]) > 0 and r["errors"] == "0", r
            assert re.fullmatch(r"\d+\.\d\dx", r["wrk / httpx req/s"]), r
    else:
        assert "wrk is not installed" in stages
    lines = out.splitlines()
    header = [
        c.strip() for c in next(line for line in lines if line.startswith("| server")).strip("|").split("|")
    ]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in lines
        if line.startswith(("| serve,", "| plain"))
    ]
    assert len(rows) == 8
    for row in rows:
        cell = dict(zip(header, row))
        assert cell["errors"] == "0", row  # no failed requests
        assert _number(cell["CPU ms/req"]) > 0, row  # busy CPU (Linux /proc/stat); "1,040" when busy
    assert re.search(r"ceiling .* echo / batching off = \d+\.\d\dx", out), out
    # where a request's CPU goes: echo's proxy + ingress, decode + resize, model, the rest, total
    stage = {
        tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
        for line in stages.splitlines()
        if line.startswith("| serve, batching")
    }
    for endpoint in ("serve, batching off", "serve, batching (max 16)"):
        for part in (
            "proxy + ingress (echo)",
            "decode + resize",
            "model",
            "response, batching, rest",
            "total (measured)",
        ):
            assert (endpoint, part) in stage, (endpoint, part)
    # 4 images per request: images/s = 4 x requests/s
    multi = dict(zip(header, [c for c in rows if c[0].startswith("serve, batching, 4 images")][0]))
    assert _number(multi["images/s"]) == pytest.approx(4 * _number(multi["requests/s"]), rel=0.05)
    assert "p50 vs batching off" in header and all(
        re.fullmatch(r"\d+\.\d\dx", dict(zip(header, r))["p50 vs batching off"]) for r in rows
    )


def _check_rollout(table: str) -> None:
    """The rollout table: both methods answered from a, then from b, with no failed request; the
    promotion replaced no replica and the roll both; cut-over ratios against the roll's."""
    assert "2 replicas of 0.5 CPU, concurrency 8" in table, table
    header = _cells(table, "method")
    rows = {r: dict(zip(header, _cells(table, r))) for r in (ROLL, IN_PLACE)}
    for name, row in rows.items():
        assert int(row["requests"]) > 0 and row["failed"] == "0", (name, row)  # no failed request
        for col in ("first b s", "cut-over s", "done s", "longest gap s"):
            assert re.fullmatch(r"\d[\d,.]*", row[col]), (name, col, row)  # b answered, after a
    assert rows[IN_PLACE]["replicas replaced"] == "0", rows  # reconfigured, not restarted
    assert rows[ROLL]["replicas replaced"] == "2", rows
    _check_ratios(table, "method", "cut-over s", "cut-over vs roll", ROLL, [IN_PLACE])
    assert "promote() called in this process" in table


def test_recipe_benchmark_compares_the_defaults_with_a_plain_reference():
    out = _table(run_script("benchmarks/recipe.py", "--quick", "--lrs", "0.1"), "quick-easy", "quick-hard")
    header = _cells(out, "row")
    for row in ("quick-easy", "quick-hard"):
        cells = dict(zip(header, _cells(out, row)))
        assert cells["steps/epoch"] == "3" and float(cells["lr"]) > 0
        ours, ref = float(cells["defaults top-1"]), float(cells["reference top-1"])
        assert cells["ratio"] == f"{ours / ref:.2f}"
        assert 0 <= float(cells["lr 0.1/256"]) <= 1 and float(cells["ep1 loss/start"]) > 0
        assert float(cells["before ep1 loss/start"]) > 0


def test_data_check_benchmark_times_the_check_against_a_sequential_loop(tmp_path):
    proc = run_script("benchmarks/data_check.py", "--lines", 2000, "--root", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {
        c[0]: c
        for c in (
            _cells(proc.stdout, name)
            for name in (
                "baseline: sequential parse + stat",
                "check_dataset (parse + 32 stat threads)",
                "check_dataset --no-check-files",
            )
        )
    }
    assert rows["baseline: sequential parse + stat"][2] == "1.00x"
    assert all(_number(c[2]) > 0 for c in rows.values())
    assert not list(tmp_path.iterdir())  # the generated dataset is removed


def test_explain_benchmark_prints_ratios_against_the_forward_pass():
    rows = ["deepcnn 64 px, batch 1", "deepcnn 224 px, batch 1", "resnet18 224 px, batch 1"]
    out = _table(run_script("benchmarks/explain.py", "--batches", 1, "--repeats", 1, "--threads", 1), *rows)
    header = _cells(out, "model, size, batch")
    for row in rows:
        cells = dict(zip(header, _cells(out, row)))
        expected = _number(cells["explain ms/image"]) / _number(cells["forward ms/image"])
        assert _number(cells["explain vs forward"]) == pytest.approx(expected, rel=0.02, abs=0.011), cells
        assert _number(cells["overlay PNG ms/image"]) > 0


@pytest.mark.slow
def test_batch_predict_benchmark_compares_ray_data_with_predict_py():
    rows = [
        "predict.py (one process)",
        "batch_predict.py, 1 CPU actor(s)",
        "batch_predict.py, 2 CPU actor(s)",
    ]
    proc = run_script("benchmarks/batch_predict.py", "--images", 48, "--large", 96, "--image-size", 32)
    out = _table(proc, *rows)
    _check_ratios(out, "path", "images/s", "vs predict.py", rows[0], rows[1:])
    assert "Memory as the input grows" in out and re.search(r"^\| 96 ", out, re.M), out
