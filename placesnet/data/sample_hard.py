"""The "hard" sample scenes: 16 real Places365 categories drawn from the 8 easy scene kinds.

The easy sample (``sample.py``) reaches 99 % with almost any recipe, so it cannot tell a good
training recipe from a bad one. Here each kind is split into look-alike categories that differ in
one detail (a beach and a rocky coast, bare and shrubby desert, wild and ploughed fields, a forest
with and without a path, the open ocean and a lake with a far shore, snowfield and glacier,
volcano and bare or snowy mountains), and every picture then goes through zoom and shift,
occluding rectangles, strong colour changes and noise. Generation is deterministic and offline,
in the same Places365 on-disk layout (see :func:`sample.write_sample`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from placesnet.data.scenes import (
    OUT_SIZE,
    SIZE,
    add_blobs,
    beach_scene,
    below_mask,
    desert_scene,
    field_scene,
    fill_gradient,
    forest_scene,
    horizon_line,
    jitter_colour,
    noise_field,
    ocean_scene,
    sky_scene,
    snowfield_scene,
)


def _cliff(rng, img):
    """A dark rock face on the left or right edge, with boulders along its foot."""
    side = rng.integers(0, 2)
    rows = np.arange(SIZE, dtype=np.float32)[:, None]
    cols = np.arange(SIZE, dtype=np.float32)[None, :]
    width = rng.uniform(0.18, 0.4) * SIZE
    edge = width * (0.6 + 0.4 * rows / SIZE) + 6 * np.sin(rows / rng.uniform(5, 12))
    mask = ((cols < edge) if side == 0 else (cols > SIZE - edge))[:, :, None]
    rock = fill_gradient(rng, (0.4, 0.36, 0.32), (0.25, 0.22, 0.2)) + 0.12 * noise_field(rng, 40)
    img = np.where(mask, rock, img)
    return add_blobs(rng, img, rng.integers(3, 8), (0.3, 0.28, 0.26), (0.015, 0.04), (0.6, 0.95))


def _coast(rng):
    return _cliff(rng, beach_scene(rng))


def _desert_vegetation(rng):
    img = desert_scene(rng)
    return add_blobs(rng, img, rng.integers(8, 22), (0.35, 0.4, 0.18), (0.01, 0.03), (0.55, 1.0))


def _field_cultivated(rng):
    img = field_scene(rng)
    horizon = horizon_line(rng, 0.5, 0.02)
    rows = np.arange(SIZE, dtype=np.float32)[:, None]
    cols = np.arange(SIZE, dtype=np.float32)[None, :]
    vanish = rng.uniform(0.2, 0.8) * SIZE
    depth = np.maximum(rows - horizon.mean(), 1.0)
    stripes = np.sin((cols - vanish) / depth * rng.uniform(8, 14))[:, :, None]  # furrows
    ground = fill_gradient(rng, (0.5, 0.42, 0.25), (0.4, 0.32, 0.18)) + 0.1 * stripes
    return np.where(below_mask(horizon), ground, img)


def _forest_path(rng):
    img = forest_scene(rng)
    rows = np.arange(SIZE, dtype=np.float32)[:, None]
    cols = np.arange(SIZE, dtype=np.float32)[None, :]
    top, centre = rng.uniform(0.4, 0.6) * SIZE, rng.uniform(0.35, 0.65) * SIZE
    half = np.clip((rows - top) / (SIZE - top), 0, 1) * rng.uniform(0.2, 0.35) * SIZE
    mask = (np.abs(cols - centre) < half)[:, :, None]
    path = fill_gradient(rng, (0.55, 0.45, 0.3), (0.5, 0.4, 0.28)) + 0.08 * noise_field(rng, 32)
    return np.where(mask, path, img)


def _lake(rng):
    img = ocean_scene(rng)
    water_line = horizon_line(rng, 0.35, 0.0)
    shore_top = water_line - rng.uniform(0.05, 0.12) * SIZE * (1 + 0.5 * noise_field(rng, 12)[0, :, 0])
    band = below_mask(shore_top) * (1 - below_mask(water_line))
    trees = fill_gradient(rng, (0.12, 0.3, 0.12), (0.08, 0.2, 0.08)) + 0.1 * noise_field(rng, 48)
    return np.where(band > 0, trees, img)


def _glacier(rng):
    img = fill_gradient(rng, (0.45, 0.6, 0.85), (0.75, 0.82, 0.9))
    ice = fill_gradient(rng, (0.7, 0.85, 0.95), (0.55, 0.75, 0.9)) + 0.05 * noise_field(rng, 32)
    img = np.where(below_mask(horizon_line(rng, 0.4, 0.05)), ice, img)
    for _ in range(rng.integers(3, 7)):  # dark crevasses
        y, x0 = rng.uniform(0.5, 0.95) * SIZE, rng.integers(0, SIZE - 20)
        length, slope = rng.integers(15, 50), rng.uniform(-0.3, 0.3)
        for dx in range(length):
            yy = int(y + slope * dx)
            if 0 <= yy < SIZE - 1 and x0 + dx < SIZE:
                img[yy : yy + 2, x0 + dx] = jitter_colour(rng, (0.15, 0.25, 0.4), 0.03)
    return img


def _ridge(rng, sky_top, sky_bottom, snow: bool, lava: bool):
    img = fill_gradient(rng, sky_top, sky_bottom)
    cols = np.arange(SIZE, dtype=np.float32)
    ridge = np.full(SIZE, float(SIZE))
    for _ in range(rng.integers(1, 4)):  # one or more peaks
        peak_x, peak_y = rng.uniform(0.15, 0.85) * SIZE, rng.uniform(0.2, 0.45) * SIZE
        ridge = np.minimum(ridge, peak_y + rng.uniform(0.7, 1.5) * np.abs(cols - peak_x))
    mountain = fill_gradient(rng, (0.3, 0.27, 0.25), (0.15, 0.13, 0.12)) + 0.06 * noise_field(rng, 24)
    img = np.where(below_mask(ridge), mountain, img)
    if snow:  # a white cap above the snow line
        line = ridge.min() + rng.uniform(0.08, 0.15) * SIZE
        rows = np.arange(SIZE, dtype=np.float32)[:, None, None]
        cap = below_mask(ridge) * (rows < line)
        img = np.where(cap > 0, jitter_colour(rng, (0.93, 0.94, 0.97), 0.03), img)
    if lava:
        top = ridge.min()
        img = add_blobs(
            rng,
            img,
            rng.integers(1, 3),
            (1.0, 0.35, 0.05),
            (0.02, 0.05),
            (top / SIZE, min(top / SIZE + 0.1, 1.0)),
        )
    return img


def _volcano_hard(rng):
    return _ridge(rng, (0.35, 0.1, 0.08), (0.95, 0.5, 0.2), snow=False, lava=True)


def _mountain(rng):
    return _ridge(rng, (0.35, 0.5, 0.8), (0.7, 0.75, 0.85), snow=False, lava=False)


def _mountain_snowy(rng):
    return _ridge(rng, (0.35, 0.5, 0.8), (0.7, 0.75, 0.85), snow=True, lava=False)


# Official category names in official (alphabetical) order, which fixes the class indices.
SCENES = {
    "/b/beach": beach_scene,
    "/c/coast": _coast,
    "/d/desert/sand": desert_scene,
    "/d/desert/vegetation": _desert_vegetation,
    "/f/field/cultivated": _field_cultivated,
    "/f/field/wild": field_scene,
    "/f/forest/broadleaf": forest_scene,
    "/f/forest_path": _forest_path,
    "/g/glacier": _glacier,
    "/l/lake/natural": _lake,
    "/m/mountain": _mountain,
    "/m/mountain_snowy": _mountain_snowy,
    "/o/ocean": ocean_scene,
    "/s/sky": sky_scene,
    "/s/snowfield": snowfield_scene,
    "/v/volcano": _volcano_hard,
}


def _zoom(rng, img):
    """A random crop of 55-100 % of the side, scaled back up: the scene's scale and framing change."""
    side = int(rng.uniform(0.55, 1.0) * SIZE)
    y, x = rng.integers(0, SIZE - side + 1), rng.integers(0, SIZE - side + 1)
    crop = (np.clip(img[y : y + side, x : x + side], 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255


def _occlude(rng, img):
    """1-3 rectangles of random colour and texture over the scene (people, cars, signs...)."""
    for _ in range(rng.integers(1, 4)):
        h, w = (rng.uniform(0.12, 0.35, 2) * SIZE).astype(int)
        y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
        patch = rng.uniform(0, 1, 3).astype(np.float32) + 0.15 * noise_field(rng, 8, s=SIZE)[:h, :w]
        img[y : y + h, x : x + w] = patch
    return img


def draw_scene(category: str, rng: np.random.Generator) -> Image.Image:
    """One OUT_SIZE x OUT_SIZE RGB picture of a hard-sample ``category``."""
    img = _zoom(rng, SCENES[category](rng))
    img = add_blobs(rng, img, rng.integers(0, 5), rng.uniform(0, 1, 3), (0.03, 0.12))
    img = _occlude(rng, img)
    # Colour: brightness, per-channel gains (white balance), offset and saturation.
    img = img * rng.uniform(0.5, 1.4) * rng.uniform(0.75, 1.25, 3).astype(np.float32)
    img = img + rng.uniform(-0.15, 0.15, 3).astype(np.float32)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * rng.uniform(0.2, 1.4)
    img = img + rng.normal(0, rng.uniform(0.03, 0.12), img.shape).astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    pic = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return pic.resize((OUT_SIZE, OUT_SIZE), Image.BILINEAR)
