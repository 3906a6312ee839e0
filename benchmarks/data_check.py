"""How long the driver-side data check (placesnet/data/validate.py) takes, per list line and per file.

Builds a dataset in the Places365 layout with --lines training images (hard links to one JPEG:
real directory entries to stat, no disk space) and times, in this process:

- baseline: a plain sequential loop that parses the list and stats each file (the naive check),
- check_dataset(files=True): the product's check (parse + 32 threads of stat),
- check_dataset(files=False): lists only (--no-check-files),

and prints each time, the ratio to the baseline, and the time extrapolated to Places365's
1,803,460 training lines. On a local disk with a warm cache stat is a syscall and threads gain
little; on a network filesystem (NFS, Lustre) each stat is a round trip and the threads overlap
them: measure there with --root on that filesystem.

    python benchmarks/data_check.py                       # 200,000 lines under /tmp
    python benchmarks/data_check.py --lines 50000 --root /scratch/$USER/check
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from placesnet.data.validate import check_dataset

PLACES365_TRAIN_LINES = 1_803_460


def build(root: Path, lines: int, classes: int = 365) -> None:
    from PIL import Image

    (root / "categories_places365.txt").write_text("".join(f"/c/class{i} {i}\n" for i in range(classes)))
    train, val = root / "data_256_standard", root / "val_256"
    val.mkdir(parents=True)
    Image.new("RGB", (32, 32), (90, 120, 150)).save(val / "Places365_val_00000001.jpg")
    with open(root / "places365_train_standard.txt", "w") as f:
        for i in range(lines):
            c = i % classes
            d = train / f"c/class{c}"
            if i < classes:  # one real file per class, the rest hard links to it (a link limit
                d.mkdir(parents=True)  # of 65,000 per file allows 23 M lines)
                shutil.copy(val / "Places365_val_00000001.jpg", d / "source.jpg")
            os.link(d / "source.jpg", d / f"{i:08d}.jpg")
            f.write(f"/c/class{c}/{i:08d}.jpg {c}\n")
    (root / "places365_val.txt").write_text("Places365_val_00000001.jpg 0\n")


def naive(root: Path) -> None:
    for line in open(root / "places365_train_standard.txt"):
        image, label = line.split()
        int(label)
        os.stat(root / "data_256_standard" / image.lstrip("/"))


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=200_000, help="training list lines (default: %(default)s)")
    p.add_argument("--root", help="a directory on the filesystem to measure (default: a temp dir)")
    args = p.parse_args()
    base = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="data-check-"))
    root = base / "places365"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        build(root, args.lines)
        rows = [
            ("baseline: sequential parse + stat", timed(lambda: naive(root))),
            ("check_dataset (parse + 32 stat threads)", timed(lambda: check_dataset(root, ("train",)))),
            ("check_dataset --no-check-files", timed(lambda: check_dataset(root, ("train",), files=False))),
        ]
        print(f"{args.lines:,} list lines on {base} (best of 3):")
        print("| check | seconds | vs baseline | lines/s | 1.8 M lines |\n|---|---|---|---|---|")
        for name, t in rows:
            print(
                f"| {name} | {t:.2f} | {t / rows[0][1]:.2f}x | {args.lines / t:,.0f} | "
                f"{PLACES365_TRAIN_LINES / (args.lines / t):.0f} s |"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if not args.root:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
