"""A head and a fine-tune of the same data learn from, select on and report on the same images.

Both plan their rows with :func:`fxtl.data.splits.plan_splits`; a head sees the cache (which lacks
the images that failed to decode) and a fine-tune the folder (it learns which images are unreadable
while it trains). Every layout, with and without unreadable files: the report rows are the same
images, so are the rows each learned from, and neither lists an unreadable file.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

import fxtl
from fxtl.data.splits import leaked_rows, load_rows
from fxtl.heads.fitting import fit_head
from fxtl.training.loop import finetune

CLASSES = ("ants", "bees", "grüne Käfer")
TINY = dict(image_size=32, batch_size=4, workers=0, progress=False, precision="fp32")
# (split folder or None, images per class) per layout; "manifest" writes a CSV instead.
LAYOUTS = {
    "class folders": ((None, 13),),
    "train/val": (("train", 8), ("val", 4)),
    "train/val/test": (("train", 8), ("val", 4), ("test", 4)),
    "manifest": ((None, 13),),
}


def _image(path: Path, cls: int, i: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(100 * cls + i)
    arr = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
    arr[8:32, 8:32, cls] = 200  # one colour per class: learnable
    Image.fromarray(arr).save(path)


def _dataset(root: Path, layout: str, *, broken: bool) -> tuple[Path, set[str]]:
    """The dataset (a folder or a CSV) and the relative paths of its unreadable files."""
    unreadable: set[str] = set()
    rows = []
    for split, n in LAYOUTS[layout]:
        for c, name in enumerate(CLASSES):
            folder = root / "images" if layout == "manifest" else \
                root.joinpath(*([split] if split else []), name)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                f = folder / f"{name.replace(' ', '_')}_{split or 'all'}_{i}.jpg"
                _image(f, c, i)
                rows.append((f, name))
            if broken and split in (None, "train"):  # one unreadable file in each class folder
                f = folder / f"broken_{c}.jpg"
                f.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
                rows.append((f, name))
                unreadable.add(f.relative_to(root).as_posix())
    if layout != "manifest":
        return root, unreadable
    manifest = root / "labels.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for f, name in rows:
            w.writerow([f.relative_to(root).as_posix(), name])
    return manifest, unreadable


@pytest.mark.parametrize("broken", [False, True], ids=["clean", "3 unreadable"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_head_and_finetune_see_the_same_rows(tmp_path, tiny, layout, broken):
    data, unreadable = _dataset(tmp_path / "data", layout, broken=broken)
    home = tmp_path / "home"
    ext = fxtl.extract(data, backbone=tiny, precision="fp32", cache_dir=home, progress=False)
    head = load_rows(fit_head(ext.cache, model="logreg", search=False, cache_dir=home).run_dir)
    ft = load_rows(finetune(data, backbone=tiny, epochs=1, cache_dir=home, seed=0, **TINY).run_dir)

    assert head.data_fingerprint == ft.data_fingerprint  # else leaked_rows compares nothing
    assert head.report.split == ft.report.split
    assert set(head.report.paths) == set(ft.report.paths) and head.report.paths
    assert head.learned_from() == ft.learned_from()
    assert not leaked_rows(head, ft) and not leaked_rows(ft, head)
    for rows in (head, ft):
        listed = set(rows.train.paths) | set(rows.report.paths) | \
            set(rows.selection.paths if rows.selection else ())
        assert not listed & unreadable, "an unreadable file is listed as used"
    n_readable = sum(n for _, n in LAYOUTS[layout]) * len(CLASSES)
    assert len(head.learned_from() | set(head.report.paths)) == n_readable
