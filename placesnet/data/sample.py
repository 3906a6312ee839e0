"""The embedded "sample scenes" dataset, written in exactly the Places365 on-disk layout.

Real Places365 is 26 GB; this writes a few MB of procedurally drawn scenes (sky, horizon,
ground, texture, colour) under real Places365 category names, so that the very same
``torchvision.datasets.Places365`` code path reads both::

    ROOT/categories_places365.txt                 "/b/beach 0" per line
    ROOT/places365_train_standard.txt             "/b/beach/00000001.jpg 0"
    ROOT/places365_val.txt                        "Places365_val_00000001.jpg 0"
    ROOT/data_256_standard/b/beach/00000001.jpg   256x256 RGB JPEG
    ROOT/val_256/Places365_val_00000001.jpg

Generation is deterministic (same arguments, same bytes) and atomic: it writes into a temporary
directory and renames it into place, so concurrent workers can all call :func:`ensure_sample`.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from placesnet.config import CACHE_DIR
from placesnet.data.scenes import SCENES, draw_scene, official_categories

FORMAT_VERSION = 2  # bump when drawing changes, so caches regenerate


HARD_FORMAT_VERSION = 1  # the same for sample_hard.py


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


DIFFICULTIES = ("easy", "hard")


def scenes(difficulty: str = "easy") -> tuple[dict[str, Callable], Callable]:
    """The (category -> drawing function) table and the picture function of a sample variant:
    "easy" (8 distinct scene kinds, about 99 % with any recipe) or "hard" (16 look-alike
    categories with occlusion, zoom, colour changes and noise; see ``sample_hard``)."""
    if difficulty == "easy":
        return SCENES, draw_scene
    if difficulty == "hard":
        from placesnet.data import sample_hard

        return sample_hard.SCENES, sample_hard.draw_scene
    raise ValueError(f"unknown sample difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")


def write_sample(
    root: Path,
    classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int = 0,
    difficulty: str = "easy",
) -> Path:
    """Write the sample dataset into ``root`` (which must not exist yet) and return it."""
    table, draw = scenes(difficulty)
    if not 2 <= classes <= len(table):
        raise ValueError(
            f"the {difficulty} sample dataset has 2 to {len(table)} classes, asked for {classes}"
        )
    names = list(table)[:classes]
    assert set(names) <= set(official_categories()), "sample classes must be official names"
    root = Path(root)
    root.mkdir(parents=True)
    (root / "categories_places365.txt").write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    train_lines, val_lines = [], []
    rng = np.random.default_rng(seed)
    for idx, name in enumerate(names):
        class_dir = root / "data_256_standard" / name.lstrip("/")
        class_dir.mkdir(parents=True)
        for j in range(1, train_per_class + 1):
            (class_dir / f"{j:08d}.jpg").write_bytes(_jpeg(draw(name, rng)))
            train_lines.append(f"{name}/{j:08d}.jpg {idx}\n")
    val_dir = root / "val_256"
    val_dir.mkdir()
    order = [i for i in range(classes) for _ in range(val_per_class)]
    rng.shuffle(order)  # the real val list is not grouped by class either
    for j, idx in enumerate(order, start=1):
        file = f"Places365_val_{j:08d}.jpg"
        (val_dir / file).write_bytes(_jpeg(draw(names[idx], rng)))
        val_lines.append(f"{file} {idx}\n")
    (root / "places365_train_standard.txt").write_text("".join(train_lines))
    (root / "places365_val.txt").write_text("".join(val_lines))
    return root


def sample_root(
    classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int = 0,
    base: Path | None = None,
    difficulty: str = "easy",
) -> Path:
    """The cache directory for one set of sample parameters."""
    version = f"v{FORMAT_VERSION}" if difficulty == "easy" else f"{difficulty}-v{HARD_FORMAT_VERSION}"
    key = f"{version}-c{classes}-t{train_per_class}-v{val_per_class}-s{seed}"
    return Path(base or CACHE_DIR / "sample") / key


def ensure_sample(
    classes: int = 8,
    train_per_class: int = 150,
    val_per_class: int = 40,
    seed: int = 0,
    base: Path | None = None,
    difficulty: str = "easy",
) -> Path:
    """Return the sample dataset's root, generating it first if it is not there yet."""
    root = sample_root(classes, train_per_class, val_per_class, seed, base, difficulty)
    if (root / "places365_val.txt").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        write_sample(tmp / "data", classes, train_per_class, val_per_class, seed, difficulty)
        try:
            os.rename(tmp / "data", root)  # atomic: readers never see half a dataset
        except OSError:
            if not (root / "places365_val.txt").exists():  # lost a race only if the winner is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def digest(root: Path) -> str:
    """md5 over the list files: identifies a generated dataset in tests and logs."""
    h = hashlib.md5()
    for name in ("categories_places365.txt", "places365_train_standard.txt", "places365_val.txt"):
        h.update((Path(root) / name).read_bytes())
    return h.hexdigest()
