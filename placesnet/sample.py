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
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .config import CACHE_DIR

SIZE = 128  # drawing resolution; pictures are upscaled to OUT_SIZE (drawing at 256 is 4x slower)
OUT_SIZE = 256  # the "small" (256x256) Places365 images
FORMAT_VERSION = 2  # bump when drawing changes, so caches regenerate
HARD_FORMAT_VERSION = 1  # the same for sample_hard.py


def official_categories() -> list[str]:
    """The 365 official category names, in index order (from the bundled, byte-identical file)."""
    text = resources.files("placesnet.assets").joinpath("categories_places365.txt").read_text()
    return [line.split()[0] for line in text.splitlines() if line.strip()]


# --- drawing helpers: float32 images in [0, 1], shape (S, S, 3) ----------------------------------

def _gradient(rng, top, bottom, s=SIZE) -> np.ndarray:
    t = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    top, bottom = _jitter(rng, top), _jitter(rng, bottom)
    return np.broadcast_to(top * (1 - t) + bottom * t, (s, s, 3)).copy()


def _jitter(rng, colour, amount=0.06) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


def _noise(rng, scale: int, s=SIZE) -> np.ndarray:
    """Smooth value noise in [-1, 1], (s, s, 1): coarse random grid upsampled."""
    coarse = rng.uniform(-1, 1, (scale, scale)).astype(np.float32)
    img = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize((s, s), Image.BICUBIC)
    return (np.asarray(img, np.float32) / 127.5 - 1)[:, :, None]


def _horizon(rng, level, wobble=0.03, waves=2.0, s=SIZE) -> np.ndarray:
    """Row index of the horizon for each column, (s,)."""
    x = np.linspace(0, 2 * np.pi * waves, s)
    phase = rng.uniform(0, 2 * np.pi)
    rows = (level + rng.uniform(-0.15, 0.15) + wobble * np.sin(x + phase)) * s
    return rows.astype(np.float32)


def _below(horizon: np.ndarray, s=SIZE) -> np.ndarray:
    """Mask (s, s, 1) of pixels below the horizon."""
    return (np.arange(s, dtype=np.float32)[:, None] > horizon[None, :])[:, :, None]


def _blobs(rng, img, n, colour, radius, rows=(0.0, 1.0), s=SIZE) -> np.ndarray:
    """Paint ``n`` discs of ``colour`` (radius as a fraction of s) with centres in ``rows``."""
    for _ in range(n):
        cy, cx = rng.uniform(*rows) * s, rng.uniform(0, 1) * s
        r = max(rng.uniform(*radius) * s, 1.0)
        y0, y1 = int(max(cy - r, 0)), int(min(cy + r + 1, s))
        x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, s))
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[:, :, None]
        img[y0:y1, x0:x1] = np.where(mask, _jitter(rng, colour, 0.04), img[y0:y1, x0:x1])
    return img


# --- one function per scene class --------------------------------------------------------------

def _beach(rng):
    img = _gradient(rng, (0.35, 0.6, 0.95), (0.7, 0.85, 1.0))
    sea, sand = _horizon(rng, 0.4, 0.0), _horizon(rng, 0.62, 0.04, 1.5)
    img = np.where(_below(sea), _gradient(rng, (0.1, 0.4, 0.7), (0.2, 0.55, 0.75)), img)
    ground = _gradient(rng, (0.9, 0.8, 0.6), (0.85, 0.72, 0.5)) + 0.05 * _noise(rng, 64)
    return np.where(_below(sand), ground, img)


def _desert(rng):
    img = _gradient(rng, (0.75, 0.85, 0.95), (0.95, 0.9, 0.8))
    dunes = _horizon(rng, 0.45, 0.08, 1.2)
    ground = _gradient(rng, (0.9, 0.65, 0.35), (0.8, 0.5, 0.25))
    ripples = np.sin(np.linspace(0, 60, SIZE))[:, None, None].astype(np.float32)
    return np.where(_below(dunes), ground + 0.04 * ripples + 0.05 * _noise(rng, 16), img)


def _forest(rng):
    img = _gradient(rng, (0.15, 0.35, 0.12), (0.08, 0.22, 0.06)) + 0.12 * _noise(rng, 48)
    for _ in range(rng.integers(4, 9)):  # dark trunks
        x, w = rng.integers(0, SIZE), rng.integers(2, 7)
        img[:, x:x + w] = _jitter(rng, (0.25, 0.17, 0.1), 0.04)
    return _blobs(rng, img, rng.integers(3, 8), (0.25, 0.5, 0.15), (0.05, 0.12), (0.0, 0.5))


def _field(rng):
    img = _gradient(rng, (0.3, 0.55, 0.95), (0.65, 0.8, 1.0))
    ground = _gradient(rng, (0.45, 0.7, 0.25), (0.3, 0.55, 0.15)) + 0.1 * _noise(rng, 96)
    img = np.where(_below(_horizon(rng, 0.5, 0.02)), ground, img)
    return _blobs(rng, img, rng.integers(10, 30), (0.95, 0.9, 0.3), (0.005, 0.012), (0.6, 1.0))


def _ocean(rng):
    img = _gradient(rng, (0.45, 0.65, 0.9), (0.8, 0.88, 0.95))
    water = _gradient(rng, (0.05, 0.25, 0.5), (0.02, 0.12, 0.35))
    waves = np.sin(np.linspace(0, 80, SIZE) + rng.uniform(0, 6))[:, None, None].astype(np.float32)
    return np.where(_below(_horizon(rng, 0.35, 0.0)), water + 0.05 * waves, img)


def _snowfield(rng):
    img = _gradient(rng, (0.75, 0.78, 0.85), (0.88, 0.9, 0.93))
    snow = _gradient(rng, (0.95, 0.96, 0.98), (0.85, 0.9, 0.97)) + 0.03 * _noise(rng, 32)
    return np.where(_below(_horizon(rng, 0.45, 0.03)), snow, img)


def _sky(rng):
    img = _gradient(rng, (0.2, 0.45, 0.9), (0.55, 0.75, 1.0))
    return _blobs(rng, img, rng.integers(3, 9), (0.97, 0.97, 0.98), (0.05, 0.14))


def _volcano(rng):
    img = _gradient(rng, (0.35, 0.1, 0.08), (0.95, 0.5, 0.2))
    peak_x, peak_y = rng.uniform(0.35, 0.65) * SIZE, rng.uniform(0.25, 0.4) * SIZE
    slope = rng.uniform(0.9, 1.4)
    cols = np.arange(SIZE, dtype=np.float32)
    ridge = peak_y + slope * np.abs(cols - peak_x)
    mountain = _gradient(rng, (0.22, 0.18, 0.17), (0.1, 0.08, 0.08)) + 0.05 * _noise(rng, 24)
    img = np.where(_below(ridge), mountain, img)
    return _blobs(rng, img, 1, (1.0, 0.35, 0.05), (0.03, 0.05), (peak_y / SIZE, peak_y / SIZE))


# Official category name -> drawing function, in the official (alphabetical) order, which also
# fixes the sample dataset's class indices.
SCENES: dict[str, Callable] = {
    "/b/beach": _beach,
    "/d/desert/sand": _desert,
    "/f/field/wild": _field,
    "/f/forest/broadleaf": _forest,
    "/o/ocean": _ocean,
    "/s/sky": _sky,
    "/s/snowfield": _snowfield,
    "/v/volcano": _volcano,
}


def draw_scene(category: str, rng: np.random.Generator) -> Image.Image:
    """One OUT_SIZE x OUT_SIZE RGB picture of ``category`` with random layout, colour, light and noise."""
    img = SCENES[category](rng)
    # Distractors and photometric changes, so that no single pixel statistic gives the class away.
    img = _blobs(rng, img, rng.integers(0, 4), rng.uniform(0, 1, 3), (0.03, 0.12))
    img = img * rng.uniform(0.6, 1.3) + rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * rng.uniform(0.3, 1.3)  # saturation
    img = img + rng.normal(0, 0.06, img.shape).astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]  # mirror
    pic = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return pic.resize((OUT_SIZE, OUT_SIZE), Image.BILINEAR)


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
        from . import sample_hard

        return sample_hard.SCENES, sample_hard.draw_scene
    raise ValueError(f"unknown sample difficulty {difficulty!r}; choose one of {', '.join(DIFFICULTIES)}")


def write_sample(root: Path, classes: int, train_per_class: int, val_per_class: int,
                 seed: int = 0, difficulty: str = "easy") -> Path:
    """Write the sample dataset into ``root`` (which must not exist yet) and return it."""
    table, draw = scenes(difficulty)
    if not 2 <= classes <= len(table):
        raise ValueError(f"the {difficulty} sample dataset has 2 to {len(table)} classes, "
                         f"asked for {classes}")
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


def sample_root(classes: int, train_per_class: int, val_per_class: int, seed: int = 0,
                base: Path | None = None, difficulty: str = "easy") -> Path:
    """The cache directory for one set of sample parameters."""
    version = f"v{FORMAT_VERSION}" if difficulty == "easy" else f"{difficulty}-v{HARD_FORMAT_VERSION}"
    key = f"{version}-c{classes}-t{train_per_class}-v{val_per_class}-s{seed}"
    return Path(base or CACHE_DIR / "sample") / key


def ensure_sample(classes: int = 8, train_per_class: int = 150, val_per_class: int = 40,
                  seed: int = 0, base: Path | None = None, difficulty: str = "easy") -> Path:
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
