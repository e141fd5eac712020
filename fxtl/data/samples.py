"""Small real datasets fxtl can build offline, for the demo, tests and advice calibration."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_digits", "write_shapes"]


def write_digits(root: str | Path, *, classes: int = 10, per_class: int | None = None,
                 val_fraction: float = 0.3, test_fraction: float = 0.0, size: int = 64,
                 seed: int = 0) -> Path:
    """Write scikit-learn's bundled handwritten digits (8x8, 1,797 images) as PNG folders.

    Layout: ``root/{train,val[,test]}/<digit>/<i>.png``, grayscale upscaled to ``size`` pixels
    (nearest neighbour keeps the real 8x8 data visible). Splits are stratified and seeded.

    Returns
    -------
    Path
        ``root``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits(n_class=classes)
    rng = np.random.default_rng(seed)
    for label in range(classes):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        if per_class is not None:
            idx = idx[:per_class]
        n_val = int(round(len(idx) * val_fraction))
        n_test = int(round(len(idx) * test_fraction))
        parts = {"val": idx[:n_val], "test": idx[n_val:n_val + n_test], "train": idx[n_val + n_test:]}
        for split, members in parts.items():
            if not len(members):
                continue
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in members:
                img = (digits.images[i] / 16.0 * 255).astype(np.uint8)
                Image.fromarray(255 - img, "L").resize((size, size), Image.NEAREST).save(folder / f"{i}.png")
    return root


def write_shapes(root: str | Path, *, per_class: int = 6, splits: tuple[str, ...] = ("train", "val"),
                 size: int = 48, seed: int = 0) -> Path:
    """Tiny synthetic photos of two classes (``circle``, ``square``) on noisy backgrounds."""
    from PIL import Image, ImageDraw

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in ("circle", "square"):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                bg = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
                im = Image.fromarray(bg, "RGB")
                d = ImageDraw.Draw(im)
                r = int(rng.integers(size // 5, size // 3))
                cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
                colour = tuple(int(v) for v in rng.integers(150, 256, size=3))
                box = (cx - r, cy - r, cx + r, cy + r)
                (d.ellipse if cls == "circle" else d.rectangle)(box, fill=colour)
                im.save(folder / f"{cls}_{i}.{'jpg' if i % 2 else 'png'}")
    return root
