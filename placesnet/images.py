"""Decode untrusted image bytes into RGB PIL images, or fail with one clear message.

Shared by ``rayjobs/predict.py`` and the Serve endpoint so both see identical pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from placesnet.config import UserError

MAX_PIXELS = 40_000_000  # a 40 MP photo is fine; a decompression bomb is not


class BadImage(UserError):
    """The bytes are not an image we can use (empty, not an image, truncated, too large)."""


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``data`` (JPEG, PNG, WebP, BMP, GIF, TIFF...) into an 8-bit RGB image.

    Grayscale, 16-bit, palette, CMYK and images with alpha (composited onto white) are converted.
    Raises BadImage for empty or truncated data, non-images and images over ``max_pixels``.
    """
    if not data:
        raise BadImage("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:  # checked before decoding a single pixel
                raise BadImage(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
                )
            img.load()  # decode now, so truncation shows here and not later
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"image has too many pixels (limit {max_pixels})") from None
    except UnidentifiedImageError:
        raise BadImage("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise BadImage(f"corrupt or truncated image ({str(e)[:120] or type(e).__name__})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grayscale: scale the full range to 8 bits (PIL's convert would clip at 255).
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = Image.fromarray((np.clip(a / hi, 0, 1) * 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image_file(path: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read and decode an image file; BadImage if it is missing, unreadable or not an image."""
    try:
        with open(path, "rb") as f:
            data = f.read(512 * 1024 * 1024 + 1)
    except IsADirectoryError:
        raise BadImage(f"{path} is a directory") from None
    except OSError as e:
        raise BadImage(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return decode_image(data, max_pixels)
    except BadImage as e:
        raise BadImage(f"{path}: {e}") from None
