"""Helpers shared by the benchmark scripts: tables, timing, data. No Ray here (gpu_train.py runs
on machines without it)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable


def machine() -> str:
    """One line naming the machine, for the tables in docs/benchmarks.md."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )


def print_table(title: str, rows: list[dict], note: str = "") -> None:
    """A Markdown table (pastes straight into docs/benchmarks.md)."""
    cols = list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    print(f"\n{machine()}" + (f"\n{note}" if note else ""), flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x" if baseline > 0 else "n/a"


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds ``fn`` takes, after ``sync`` (e.g. torch.cuda.synchronize) on both ends."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def busy_cpu_seconds() -> float | None:
    """CPU seconds this machine has spent busy (all processes, all cores) since boot, from
    /proc/stat; None where there is no /proc (the column is then left empty)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy
    ticks = [int(v) for v in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def sample_root(classes: int, per_class: int) -> Path:
    """A generated Places365-layout dataset of 256x256 JPEGs (cached under PLACESNET_CACHE)."""
    from placesnet.data.sample import ensure_sample

    return ensure_sample(classes, per_class, max(per_class // 4, 1), 0, None)
