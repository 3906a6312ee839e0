"""Untrusted image bytes: every valid mode converts to RGB, every bad input is one BadImage."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from placesnet.images import BadImage, decode_image, load_image_file


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGB", "JPEG"),
        ("L", "JPEG"),
        ("CMYK", "JPEG"),
        ("RGB", "PNG"),
        ("L", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("I;16", "PNG"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
    ],
)
def test_valid_modes_become_rgb(mode, fmt):
    img = Image.new(mode, (37, 23))
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (37, 23)


def test_16bit_png_keeps_its_range():
    a = (np.linspace(0, 65535, 64 * 8).reshape(8, 64)).astype(np.uint16)
    out = np.asarray(decode_image(_encode(Image.fromarray(a), "PNG")))
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255  # not clipped to white


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(_encode(img, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width, height):
    """A tiny file that claims width x height pixels: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised image"),
        (_png_header_only(100_000, 100_000), "pixels"),  # decompression bomb: refused before decoding
        (_png_header_only(9_000, 9_000), "pixels"),  # over our 40 MP limit, under PIL's own
    ],
)
def test_bad_bytes(data, message):
    with pytest.raises(BadImage, match=message):
        decode_image(data)


def test_truncated_jpeg():
    data = _encode(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    with pytest.raises(BadImage, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_files(tmp_path):
    with pytest.raises(BadImage, match="cannot read"):
        load_image_file(str(tmp_path / "missing.jpg"))
    with pytest.raises(BadImage, match="directory"):
        load_image_file(str(tmp_path))
