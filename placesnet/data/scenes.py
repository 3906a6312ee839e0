"""The "easy" sample scenes: 8 distinct scene kinds drawn with numpy, and the drawing helpers the
hard scenes (``sample_hard``) build on."""

from __future__ import annotations

from importlib import resources
from typing import Callable

import numpy as np
from PIL import Image

SIZE = 128  # drawing resolution; pictures are upscaled to OUT_SIZE (drawing at 256 is 4x slower)


OUT_SIZE = 256  # the "small" (256x256) Places365 images


def official_categories() -> list[str]:
    """The 365 official category names, in index order (from the bundled, byte-identical file)."""
    text = resources.files("placesnet.assets").joinpath("categories_places365.txt").read_text()
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def fill_gradient(rng, top, bottom, s=SIZE) -> np.ndarray:
    t = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
    top, bottom = jitter_colour(rng, top), jitter_colour(rng, bottom)
    return np.broadcast_to(top * (1 - t) + bottom * t, (s, s, 3)).copy()


def jitter_colour(rng, colour, amount=0.06) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


def noise_field(rng, scale: int, s=SIZE) -> np.ndarray:
    """Smooth value noise in [-1, 1], (s, s, 1): coarse random grid upsampled."""
    coarse = rng.uniform(-1, 1, (scale, scale)).astype(np.float32)
    img = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8)).resize((s, s), Image.BICUBIC)
    return (np.asarray(img, np.float32) / 127.5 - 1)[:, :, None]


def horizon_line(rng, level, wobble=0.03, waves=2.0, s=SIZE) -> np.ndarray:
    """Row index of the horizon for each column, (s,)."""
    x = np.linspace(0, 2 * np.pi * waves, s)
    phase = rng.uniform(0, 2 * np.pi)
    rows = (level + rng.uniform(-0.15, 0.15) + wobble * np.sin(x + phase)) * s
    return rows.astype(np.float32)


def below_mask(horizon: np.ndarray, s=SIZE) -> np.ndarray:
    """Mask (s, s, 1) of pixels below the horizon."""
    return (np.arange(s, dtype=np.float32)[:, None] > horizon[None, :])[:, :, None]


def add_blobs(rng, img, n, colour, radius, rows=(0.0, 1.0), s=SIZE) -> np.ndarray:
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
        img[y0:y1, x0:x1] = np.where(mask, jitter_colour(rng, colour, 0.04), img[y0:y1, x0:x1])
    return img


def beach_scene(rng):
    img = fill_gradient(rng, (0.35, 0.6, 0.95), (0.7, 0.85, 1.0))
    sea, sand = horizon_line(rng, 0.4, 0.0), horizon_line(rng, 0.62, 0.04, 1.5)
    img = np.where(below_mask(sea), fill_gradient(rng, (0.1, 0.4, 0.7), (0.2, 0.55, 0.75)), img)
    ground = fill_gradient(rng, (0.9, 0.8, 0.6), (0.85, 0.72, 0.5)) + 0.05 * noise_field(rng, 64)
    return np.where(below_mask(sand), ground, img)


def desert_scene(rng):
    img = fill_gradient(rng, (0.75, 0.85, 0.95), (0.95, 0.9, 0.8))
    dunes = horizon_line(rng, 0.45, 0.08, 1.2)
    ground = fill_gradient(rng, (0.9, 0.65, 0.35), (0.8, 0.5, 0.25))
    ripples = np.sin(np.linspace(0, 60, SIZE))[:, None, None].astype(np.float32)
    return np.where(below_mask(dunes), ground + 0.04 * ripples + 0.05 * noise_field(rng, 16), img)


def forest_scene(rng):
    img = fill_gradient(rng, (0.15, 0.35, 0.12), (0.08, 0.22, 0.06)) + 0.12 * noise_field(rng, 48)
    for _ in range(rng.integers(4, 9)):  # dark trunks
        x, w = rng.integers(0, SIZE), rng.integers(2, 7)
        img[:, x : x + w] = jitter_colour(rng, (0.25, 0.17, 0.1), 0.04)
    return add_blobs(rng, img, rng.integers(3, 8), (0.25, 0.5, 0.15), (0.05, 0.12), (0.0, 0.5))


def field_scene(rng):
    img = fill_gradient(rng, (0.3, 0.55, 0.95), (0.65, 0.8, 1.0))
    ground = fill_gradient(rng, (0.45, 0.7, 0.25), (0.3, 0.55, 0.15)) + 0.1 * noise_field(rng, 96)
    img = np.where(below_mask(horizon_line(rng, 0.5, 0.02)), ground, img)
    return add_blobs(rng, img, rng.integers(10, 30), (0.95, 0.9, 0.3), (0.005, 0.012), (0.6, 1.0))


def ocean_scene(rng):
    img = fill_gradient(rng, (0.45, 0.65, 0.9), (0.8, 0.88, 0.95))
    water = fill_gradient(rng, (0.05, 0.25, 0.5), (0.02, 0.12, 0.35))
    waves = np.sin(np.linspace(0, 80, SIZE) + rng.uniform(0, 6))[:, None, None].astype(np.float32)
    return np.where(below_mask(horizon_line(rng, 0.35, 0.0)), water + 0.05 * waves, img)


def snowfield_scene(rng):
    img = fill_gradient(rng, (0.75, 0.78, 0.85), (0.88, 0.9, 0.93))
    snow = fill_gradient(rng, (0.95, 0.96, 0.98), (0.85, 0.9, 0.97)) + 0.03 * noise_field(rng, 32)
    return np.where(below_mask(horizon_line(rng, 0.45, 0.03)), snow, img)


def sky_scene(rng):
    img = fill_gradient(rng, (0.2, 0.45, 0.9), (0.55, 0.75, 1.0))
    return add_blobs(rng, img, rng.integers(3, 9), (0.97, 0.97, 0.98), (0.05, 0.14))


def volcano_scene(rng):
    img = fill_gradient(rng, (0.35, 0.1, 0.08), (0.95, 0.5, 0.2))
    peak_x, peak_y = rng.uniform(0.35, 0.65) * SIZE, rng.uniform(0.25, 0.4) * SIZE
    slope = rng.uniform(0.9, 1.4)
    cols = np.arange(SIZE, dtype=np.float32)
    ridge = peak_y + slope * np.abs(cols - peak_x)
    mountain = fill_gradient(rng, (0.22, 0.18, 0.17), (0.1, 0.08, 0.08)) + 0.05 * noise_field(rng, 24)
    img = np.where(below_mask(ridge), mountain, img)
    return add_blobs(rng, img, 1, (1.0, 0.35, 0.05), (0.03, 0.05), (peak_y / SIZE, peak_y / SIZE))


# Official category name -> drawing function, in the official (alphabetical) order, which also
# fixes the sample dataset's class indices.
SCENES: dict[str, Callable] = {
    "/b/beach": beach_scene,
    "/d/desert/sand": desert_scene,
    "/f/field/wild": field_scene,
    "/f/forest/broadleaf": forest_scene,
    "/o/ocean": ocean_scene,
    "/s/sky": sky_scene,
    "/s/snowfield": snowfield_scene,
    "/v/volcano": volcano_scene,
}


def draw_scene(category: str, rng: np.random.Generator) -> Image.Image:
    """One OUT_SIZE x OUT_SIZE RGB picture of ``category`` with random layout, colour, light and noise."""
    img = SCENES[category](rng)
    # Distractors and photometric changes, so that no single pixel statistic gives the class away.
    img = add_blobs(rng, img, rng.integers(0, 4), rng.uniform(0, 1, 3), (0.03, 0.12))
    img = img * rng.uniform(0.6, 1.3) + rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * rng.uniform(0.3, 1.3)  # saturation
    img = img + rng.normal(0, 0.06, img.shape).astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]  # mirror
    pic = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return pic.resize((OUT_SIZE, OUT_SIZE), Image.BILINEAR)
