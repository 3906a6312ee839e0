"""Check a dataset on the driver before any worker starts: every line of the categories and split
lists, and (a stat per file, in parallel threads) that every listed image exists and is non-empty.

Without this, a bad line or a missing image is found inside a worker, possibly hours into an
epoch, and Ray restarts the run to meet it again. Decoding every image up front would take too
long for 1.8 M files: a file that exists but cannot be decoded is met during training and handled
by ``--bad-images`` (see :class:`data.BadImages`).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets import Places365

from placesnet.config import UserError
from placesnet.data.places import SPLITS

SHOWN = 5  # problems named in the error line; the count says how many there are in all
STAT_THREADS = 32  # stats are I/O bound: many in flight hide a network filesystem's latency
STAT_BATCH = 512  # files per thread task


class DataError(UserError):
    """The dataset's lists or files are broken: found before training, named by file and line."""


@dataclass
class SplitCheck:
    split: str
    list_file: Path
    images_dir: Path
    lines: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    def problem(self, line: int, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < SHOWN:
            self.problems.append(f"{self.list_file.name} line {line}: {text}")


def list_file(root: Path, split: str) -> Path:
    return root / Places365._FILE_LIST_META[SPLITS[split]][0]


def images_dir(root: Path, split: str) -> Path:
    """The image directory torchvision's Places365 (small=True) reads for ``split``."""
    name = SPLITS[split]
    return root / (
        f"data_256_{'challenge' if 'challenge' in name else 'standard'}"
        if name.startswith("train")
        else f"{name}_256"
    )


def read_categories(root: Path) -> int:
    """The number of classes in categories_places365.txt; DataError for a malformed line."""
    path = root / Places365._CATEGORIES_META[0]
    if not path.is_file():
        raise DataError(f"missing Places365 file: {path}")
    indices, problems = {}, []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if len(fields) != 2 or not _is_int(fields[1]):
                problems.append(f"line {number}: expected '<category> <index>', got {line.strip()!r}")
            elif fields[0] in indices:
                problems.append(f"line {number}: category {fields[0]} is listed twice")
            else:
                indices[fields[0]] = int(fields[1])
    if not problems and sorted(indices.values()) != list(range(len(indices))):
        problems.append(f"indices must be 0..{len(indices) - 1}, each once")
    if problems:
        raise DataError(f"{path}: {problems[0]}" + _more(len(problems)))
    return len(indices)


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _more(count: int) -> str:
    return f" (and {count - 1} more problem(s))" if count > 1 else ""


def check_split(
    root: Path, split: str, num_classes: int, *, files: bool = True, threads: int = STAT_THREADS
) -> SplitCheck:
    """Parse ``split``'s list file as torchvision does (whitespace-separated): two columns, an
    integer label in 0..num_classes-1, no image listed twice; with ``files``, stat every listed
    image (``threads`` at a time, in bounded chunks) for missing or empty files."""
    check = SplitCheck(split, list_file(root, split), images_dir(root, split))
    if not check.list_file.is_file():
        raise DataError(f"missing Places365 file: {check.list_file}")
    if files and not check.images_dir.is_dir():
        raise DataError(f"missing Places365 image directory: {check.images_dir}")
    seen: set[str] = set()
    chunk: list[tuple[int, str]] = []
    prefix = str(check.images_dir) + os.sep
    with ThreadPoolExecutor(threads) as pool, open(check.list_file, encoding="utf-8", errors="replace") as f:

        def stat_chunk() -> None:  # a few hundred stats per task: a future per file costs more
            paths = [p for _, p in chunk]
            parts = [paths[i : i + STAT_BATCH] for i in range(0, len(paths), STAT_BATCH)]
            verdicts = [v for part in pool.map(_stat_problems, parts) for v in part]
            for (number, path), verdict in zip(chunk, verdicts):
                if verdict:
                    check.problem(number, f"image {path} {verdict}")
            chunk.clear()

        for number, line in enumerate(f, start=1):
            check.lines = number
            fields = line.split()
            if len(fields) != 2:
                what = "an empty line" if not fields else f"{len(fields)} column(s) in {line.strip()[:80]!r}"
                check.problem(number, f"expected '<image> <label>', got {what}")
                continue
            image, label = fields
            if not _is_int(label):
                check.problem(number, f"label {label!r} is not an integer")
            elif not 0 <= int(label) < num_classes:
                check.problem(
                    number, f"label {label} is out of range 0..{num_classes - 1} ({num_classes} categories)"
                )
            if image in seen:
                check.problem(number, f"{image} is listed twice")
                continue
            seen.add(image)
            if files:
                chunk.append((number, prefix + image.lstrip("/")))
                if len(chunk) >= STAT_BATCH * STAT_THREADS:
                    stat_chunk()
        if chunk:
            stat_chunk()
    if check.lines == 0:
        check.problem(1, "the list is empty")
    return check


def _stat_problems(paths: list[str]) -> list[str | None]:
    return [_stat_problem(p) for p in paths]


def _stat_problem(path: str) -> str | None:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return "is empty (0 bytes)" if size == 0 else None


def check_dataset(root: Path, splits=("train", "val"), *, files: bool = True) -> str:
    """Check a dataset in the Places365 layout under ``root``; return a summary line, or raise
    one DataError naming the list file, line and problem (and how many problems there are)."""
    start = time.perf_counter()
    num_classes = read_categories(root)
    checks = []
    for split in splits:
        check = check_split(root, split, num_classes, files=files)
        if check.problem_count:
            raise DataError(
                f"{check.problems[0]} (in {check.list_file})"
                + _more(check.problem_count)
                + (f"; also: {'; '.join(check.problems[1:])}" if len(check.problems) > 1 else "")
            )
        checks.append(check)
    counts = ", ".join(f"{c.split} {c.lines:,} lines" for c in checks)
    what = "every listed image present and non-empty" if files else "image files not checked"
    return (
        f"data check: {counts}, {num_classes} classes: lists well-formed, {what} "
        f"({time.perf_counter() - start:.1f} s)"
    )


def fetch_and_check(cfg, root: Path, *, files: bool = True):
    """The driver's data step before any worker starts: with ``--download`` torchvision first
    fetches what is missing, then the copy is checked like any other (the summary is printed).
    Returns ``cfg`` with ``download`` off: workers only read."""
    from placesnet.data.places import open_split

    if cfg.download:
        open_split(cfg, "train", root), open_split(cfg, "val", root)
        cfg = cfg.replace(download=False)
    print(check_dataset(root, files=files))
    return cfg
