"""Preprocessing recipes and the robust image decoder.

A :class:`Preprocessing` is a value (a recipe, not a built transform) that travels with every
artifact, so the exact same transform can be rebuilt for prediction months later. Images are
decoded to RGB by :func:`open_image`, which turns every mode users meet in the wild (grayscale,
palette, RGBA, CMYK, 16-bit, EXIF-rotated) into correct RGB, and refuses what cannot be used
with a short reason instead of crashing the run.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import FxtlWarning

__all__ = ["Preprocessing", "open_image", "to_rgb", "EvalTransform", "ImageDecodeError", "MAX_PIXELS",
           "IMAGE_EXTENSIONS", "UNDECODABLE_EXTENSIONS", "to_chw", "stack_images", "collate_images"]


def _avif_decodable() -> bool:
    try:
        from PIL import features

        return bool(features.check_module("avif"))
    except (ImportError, ValueError):  # a Pillow without the AVIF plugin
        return False


# Files with these endings are images to fxtl (case-insensitive); others in a DATA_DIR are ignored.
# AVIF counts only where this Pillow decodes it; elsewhere it joins UNDECODABLE_EXTENSIONS.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp", ".ppm", ".pgm", ".pbm") + ((".avif",) if _avif_decodable() else ())
# Image endings this Pillow cannot decode: such files are named in a warning, never dropped silently.
UNDECODABLE_EXTENSIONS = (".heic", ".heif", ".jxl") + (() if ".avif" in IMAGE_EXTENSIONS
                                                       else (".avif",))
# Larger images are refused as decompression bombs (Pillow's own default warns at ~89 Mpx).
MAX_PIXELS = 100_000_000
# Largest resize/crop side a recorded recipe may name (far above any network's input).
MAX_SIDE = 8192

INTERPOLATION = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
           "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation preprocessing: resize the shorter side, center crop, normalise.

    Parameters
    ----------
    resize : int
        Shorter side after resizing (``crop / crop_pct``).
    crop : int
        Side of the center crop fed to the network.
    interpolation : str
        ``bicubic``, ``bilinear``, ``nearest`` or ``lanczos``.
    mean, std : tuple of float
        Per-channel normalisation applied to ``[0, 1]`` pixels (inside the network wrapper).
    jpeg_draft : bool
        Let libjpeg decode large JPEGs at 1/2, 1/4 or 1/8 scale when the result is still at
        least ``resize`` on both sides (much faster, visually identical after resizing).
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    jpeg_draft: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["resize_mode"] = "shorter_side"
        d["alpha"] = "composite_on_white"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        """The recipe a file recorded; :class:`ValueError` naming the first field that is not
        usable (a file's metadata is input like any other: never a KeyError or TypeError)."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("resize", "crop", "interpolation", "mean", "std") if k not in d]
        if missing:
            raise ValueError(f"preprocessing has no {missing[0]!r}")
        for key in ("resize", "crop"):
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_SIDE:
                raise ValueError(f"preprocessing {key} must be a whole number of pixels in "
                                 f"1..{MAX_SIDE}, got {v!r:.40}")
        if d["interpolation"] not in INTERPOLATION:
            raise ValueError(f"preprocessing interpolation must be one of {', '.join(INTERPOLATION)}, "
                             f"got {d['interpolation']!r:.40}")
        for key in ("mean", "std"):
            v = d[key]
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    and (key == "mean" or x > 0) for x in v):
                raise ValueError(f"preprocessing {key} must be 3 finite numbers"
                                 f"{' above 0' if key == 'std' else ''}, got {v!r:.60}")
        return cls(resize=d["resize"], crop=d["crop"], interpolation=d["interpolation"],
                   mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                   jpeg_draft=bool(d.get("jpeg_draft", True)))

    def with_crop(self, crop: int) -> "Preprocessing":
        """The same recipe at another input size, keeping the crop ratio."""
        ratio = self.crop / self.resize
        return replace(self, crop=crop, resize=int(round(crop / ratio)))


class ImageDecodeError(Exception):
    """An image file that cannot be used; ``str(exc)`` is the short reason."""


def open_image(path: str | Path, *, draft_size: int | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``path`` to an 8-bit RGB image, or raise :class:`ImageDecodeError`.

    Handles EXIF orientation, grayscale, palette (with transparency), RGBA/LA (composited on
    white), CMYK, 16-bit and 32-bit integer images. ``draft_size`` lets JPEGs decode at reduced
    scale while staying at least that large on both sides.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        # Pillow's own bomb check (Image.MAX_IMAGE_PIXELS) is the caller's process-wide policy:
        # it is left as it is; ours reads the size from the header, before any pixel is decoded.
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"decompression bomb: {w}x{h} pixels exceeds "
                                       f"{max_pixels} (refused)")
            if draft_size and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
                im.draft(im.mode, (draft_size, draft_size))
            bits = _bit_depth(im)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, bits=bits, where=path)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb (refused): {exc}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except PermissionError:
        raise ImageDecodeError("permission denied (not readable)") from None
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            raise ImageDecodeError(f"truncated image ({msg})") from None
        raise ImageDecodeError(f"cannot decode ({msg})") from None


def _scale_float(arr: np.ndarray, where: Path | None) -> np.ndarray:
    """A float image stretched to 0..255 over its finite values; NaN and infinite pixels are
    kept as black, with one warning saying so (numpy's own RuntimeWarnings would say nothing
    of which file, nor of what was kept)."""
    finite = np.isfinite(arr)
    bad = int(arr.size - finite.sum())
    if bad:
        kept = "the whole image is black" if bad == arr.size else "the rest is scaled as usual"
        warnings.warn(f"{where or 'a float image'}: {bad} of {arr.size} pixels are NaN or "
                      f"infinite; kept as black ({kept})", FxtlWarning, stacklevel=2)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.float64)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    return np.where(finite, (arr.astype(np.float64) - lo) / (hi - lo or 1.0) * 255.0, 0.0)


def to_rgb(im: Image.Image) -> Image.Image:
    """An image already in memory as 8-bit RGB, converted exactly as :func:`open_image` converts
    a file's pixels (EXIF orientation, grayscale, palette, alpha on white, 16-bit...)."""
    return _to_rgb(ImageOps.exif_transpose(im), bits=_bit_depth(im))


def _bit_depth(im: Image.Image) -> int:
    """Bits per sample of an integer grayscale image, from its mode and header, never its pixels.

    16-bit PNGs and TIFFs open as ``I;16*`` (or ``I`` in some Pillow versions); a 32-bit TIFF
    says its depth in BitsPerSample. Signed samples count one bit less (the sign).
    """
    if im.mode.startswith("I;16"):
        return 16
    if im.mode != "I":
        return 8
    if im.format == "PNG":  # PNG samples are at most 16 bits
        return 16
    tags = getattr(im, "tag_v2", None)
    try:
        bits = int((tags or {}).get(258, (32,))[0])
        signed = int((tags or {}).get(339, (1,))[0]) == 2
    except (TypeError, ValueError, IndexError):
        bits, signed = 32, True
    return bits - 1 if signed else bits


def _to_rgb(im: Image.Image, *, bits: int = 8, where: Path | None = None) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        if arr.dtype.kind == "f":
            arr = _scale_float(arr, where)
        else:
            # Full scale of the file's bit depth is white: 0..65535 -> 0..255 for 16 bits,
            # whatever the brightest pixel happens to be.
            arr = arr.astype(np.float64) * (255.0 / (2.0 ** bits - 1))
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def to_chw(im: Image.Image):
    """PIL RGB image -> uint8 tensor ``[3, H, W]``, a view of the ``H, W, 3`` pixels.

    No torch kernel runs per image: a ``.contiguous()`` here starts an OpenMP region for 150 KB,
    which cost 3-7 ms per 224 px image on 2 busy cores (0.3 ms single-threaded). Batches are
    stacked as ``N, H, W, 3`` (:func:`stack_images`), which *is* channels_last ``N, 3, H, W``.
    """
    import torch

    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def stack_images(images):
    """Per-image tensors from :func:`to_chw` -> one channels_last uint8 batch (numpy copies)."""
    import torch

    hwc = np.stack([x.permute(1, 2, 0).numpy() for x in images])
    return torch.from_numpy(hwc).permute(0, 3, 1, 2)


def collate_images(batch):
    """DataLoader ``collate_fn`` for ``(image, index, error)`` items: a channels_last batch."""
    import torch

    return (stack_images([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64),
            [b[2] for b in batch])


class EvalTransform:
    """PIL image -> uint8 tensor ``[3, crop, crop]`` (normalisation happens in the network).

    Keeping uint8 until the model makes worker -> main-process transfer 4x smaller.
    """

    def __init__(self, pre: Preprocessing):
        self.pre = pre
        self._interp = INTERPOLATION[pre.interpolation]

    def __call__(self, im: Image.Image):
        pre = self.pre
        w, h = im.size
        scale = pre.resize / min(w, h)
        nw, nh = max(pre.crop, round(w * scale)), max(pre.crop, round(h * scale))
        left, top = (nw - pre.crop) // 2, (nh - pre.crop) // 2
        sx, sy = nw / w, nh / h
        # Resize only the center-crop region, straight to crop x crop: the same pixels as
        # "resize the shorter side, then center crop" (within rounding) at half the cost.
        box = (left / sx, top / sy, (left + pre.crop) / sx, (top + pre.crop) / sy)
        return to_chw(im.resize((pre.crop, pre.crop), self._interp, box=box, reducing_gap=None))

    def load(self, path: str | Path):
        """Decode ``path`` robustly and transform it."""
        return self(open_image(path, draft_size=self.pre.resize if self.pre.jpeg_draft else None))
