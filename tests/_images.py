"""Builders for the awkward image files users have (shared by data and fault tests)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


def write_grayscale(path: Path, value: int = 90) -> Path:
    Image.new("L", (40, 30), value).save(path)
    return path


def write_palette(path: Path) -> Path:
    im = Image.new("RGB", (40, 30), (200, 30, 40)).convert("P", palette=Image.Palette.ADAPTIVE)
    im.save(path)
    return path


def write_rgba(path: Path) -> Path:
    """Left half opaque blue, right half fully transparent (must become white)."""
    arr = np.zeros((30, 40, 4), dtype=np.uint8)
    arr[:, :20] = (0, 0, 255, 255)
    arr[:, 20:] = (255, 0, 0, 0)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def write_cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # pure red
    return path


def write_16bit_png(path: Path) -> Path:
    """Left half 65535 (white), right half 32896 (mid grey: 128 in 8 bits)."""
    arr = np.zeros((30, 40), dtype=np.uint16)
    arr[:, :20] = 65535
    arr[:, 20:] = 32896
    Image.fromarray(arr).save(path)
    return path


def write_exif_rotated(path: Path) -> Path:
    """Stored 40x20 with the left half red; EXIF orientation 6 (display rotated 90 deg clockwise)."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, "JPEG", quality=95, exif=exif)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    photo((120, 90)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_text_as_jpg(path: Path) -> Path:
    path.write_text("this is not an image\n")
    return path


def write_zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_bomb(path: Path) -> Path:
    """A 14 KB PNG that decodes to 120 megapixels."""
    Image.new("1", (12000, 10000)).save(path)
    return path
