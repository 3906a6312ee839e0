"""Batch prediction: predict.py's loop (one process, every image decoded into memory first)
against rayjobs/batch_predict.py (Ray Data decode tasks and 1 or 2 model actors), on the same
files, one run each, with images/s, the ratio to predict.py and peak memory (RSS): of the driver,
and of the largest Ray worker (a decode task or a model actor). Then the Ray Data path on --large
images: its peak memory at --images and at --large should be about the same (streaming).

    python benchmarks/batch_predict.py                     # 2,000 and 20,000 images, CPU
    python benchmarks/batch_predict.py --images 500 --large 0

The images are hard links to the tiny sample's val JPEGs resized to --size (256: Places365's
small images), in a temporary directory; the model is an untrained DeepCNN at --image-size (its
speed does not depend on its weights). Each Ray Data run starts a local Ray of its own, as the
command does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import print_table, ratio

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, count: int, size: int) -> list[Path]:
    """``count`` JPEGs under ``root``: 48 distinct sample images at ``size``, hard-linked."""
    from PIL import Image

    from placesnet.config import TrainConfig
    from placesnet.data.places import resolve_data_root

    src = resolve_data_root(TrainConfig(sample_classes=4, sample_train_per_class=40, sample_val_per_class=12))
    root.mkdir(parents=True)
    bases = []
    for i, image in enumerate(sorted((src / "val_256").glob("*.jpg"))):
        path = root / f"base{i:02d}.jpg"
        Image.open(image).convert("RGB").resize((size, size)).save(path, quality=90)
        bases.append(path)
    out = []
    for i in range(count):
        folder = root / "photos" / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:07d}.jpg"
        os.link(bases[i % len(bases)], path)
        out.append(path)
    return out


class PeakRss:
    """Samples, every 0.2 s while running, the private memory (RSS less shared pages: Ray's object
    store is shared memory, counted in the RSS of every process that touched it) of process
    ``pid`` (the driver) and the largest of any Ray worker process (``ray::`` in its name)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.driver, self.worker = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _private(info) -> int:
        return info.rss - getattr(info, "shared", 0)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self._private(psutil.Process(self.pid).memory_info()))
            except psutil.NoSuchProcess:
                pass
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                text = (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])[:200]
                if (
                    "ray::" in text
                    and p.info["memory_info"]
                    and self._private(p.info["memory_info"]) > self.worker
                ):
                    self.worker, self.largest = self._private(p.info["memory_info"]), text.split()[0][:60]
            time.sleep(0.2)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.driver / 2**20, self.worker / 2**20


def run(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(seconds, driver peak private MB, largest Ray worker peak private MB) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = PeakRss(proc.pid)
    out, err = proc.communicate()
    seconds = time.perf_counter() - start
    driver, worker = peak.stop()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{out[-2000:]}\n{err[-2000:]}")
    return seconds, driver, worker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000, help="images for the memory check (0: skip it)")
    p.add_argument("--size", type=int, default=256, help="the JPEGs' side in pixels")
    p.add_argument("--image-size", type=int, default=128, help="the model's input size")
    args = p.parse_args()

    from placesnet.checkpoint import save_checkpoint
    from placesnet.config import TrainConfig
    from placesnet.model import build_model

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        tmp = Path(tmp)
        cfg = TrainConfig(image_size=args.image_size)
        save_checkpoint(
            tmp / "ckpt",
            model=build_model(cfg, 365),
            config=cfg,
            classes=[f"/c/class{i}" for i in range(365)],
            epoch=0,
            metrics={"epoch": 1, "val_top1": 0.0},
            history=[],
        )
        images = make_images(tmp / "small", args.images, args.size)
        py = sys.executable
        rows = []
        seconds, driver, _ = run(
            [py, "rayjobs/predict.py", "--checkpoint", str(tmp / "ckpt"), "--json", *map(str, images)], env
        )
        base = args.images / seconds
        rows.append(
            {
                "path": "predict.py (one process)",
                "images": args.images,
                "seconds": seconds,
                "images/s": base,
                "vs predict.py": "1.00x",
                "driver peak private MB": driver,
                "largest worker private MB": "",
            }
        )
        for actors in (1, 2):
            out = tmp / f"out{actors}"
            cmd = [py, "rayjobs/batch_predict.py", "--checkpoint", str(tmp / "ckpt"), "--input"]
            cmd += [str(tmp / "small/photos"), "--out", str(out), "--num-workers", str(actors)]
            seconds, driver, worker = run(cmd, env)
            rows.append(
                {
                    "path": f"batch_predict.py, {actors} CPU actor(s)",
                    "images": args.images,
                    "seconds": seconds,
                    "images/s": args.images / seconds,
                    "vs predict.py": ratio(args.images / seconds, base),
                    "driver peak private MB": driver,
                    "largest worker private MB": worker,
                }
            )
        note = (
            "seconds: the whole command (a local Ray started, actors up, every image out); "
            "one run each, same files."
        )
        print_table(
            f"Batch prediction, {args.images:,} JPEGs of {args.size} px, DeepCNN at {args.image_size} px",
            rows,
            note,
        )
        if args.large:
            make_images(tmp / "large", args.large, args.size)
            out = tmp / "out-large"
            cmd = [py, "rayjobs/batch_predict.py", "--checkpoint", str(tmp / "ckpt"), "--input"]
            cmd += [str(tmp / "large/photos"), "--out", str(out), "--num-workers", "1"]
            seconds, driver, worker = run(cmd, env)
            small = rows[1]
            print_table(
                "Memory as the input grows (batch_predict.py, 1 CPU actor)",
                [
                    {
                        "images": args.images,
                        "driver peak private MB": small["driver peak private MB"],
                        "largest worker private MB": small["largest worker private MB"],
                    },
                    {
                        "images": args.large,
                        "driver peak private MB": driver,
                        "largest worker private MB": worker,
                    },
                    {
                        "images": "ratio",
                        "driver peak private MB": ratio(driver, small["driver peak private MB"]),
                        "largest worker private MB": ratio(worker, small["largest worker private MB"]),
                    },
                ],
                f"{args.large:,} images in {seconds:.0f} s ({args.large / seconds:.0f} images/s)",
            )


if __name__ == "__main__":
    main()
