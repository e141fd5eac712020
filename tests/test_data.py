"""Dataset discovery, manifests, splits, fingerprints and robust decoding."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fxtl.data.discovery import discover, fingerprint
from fxtl.errors import DataError
from fxtl.data.images import EvalTransform, ImageDecodeError, Preprocessing, open_image

from . import _images as img


def _tree(root: Path, files: dict[str, int]) -> Path:
    for rel, seed in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.photo(seed=seed).save(p)
    return root


def test_class_folders_are_train_split(tmp_path):
    _tree(tmp_path, {"cat/a.jpg": 0, "cat/b.png": 1, "dog/c.jpg": 2})
    s = discover(tmp_path)
    assert s.class_names == ["cat", "dog"]
    assert s.layout == "classes"
    assert [(x.path, x.label, x.split) for x in s.samples] == [
        ("cat/a.jpg", 0, "train"), ("cat/b.png", 0, "train"), ("dog/c.jpg", 1, "train")]


def test_split_folders_and_aliases(tmp_path):
    _tree(tmp_path, {"train/a/1.jpg": 0, "train/b/2.jpg": 1, "valid/a/3.jpg": 2,
                     "testing/b/4.jpg": 3})
    s = discover(tmp_path)
    assert s.layout == "splits"
    assert s.splits == {"train": 2, "val": 1, "test": 1}
    assert {x.path: x.split for x in s.samples}["valid/a/3.jpg"] == "val"


def test_hidden_and_non_image_files_ignored(tmp_path):
    _tree(tmp_path, {"a/1.jpg": 0, "b/2.jpg": 1, "a/.ipynb_checkpoints/x.jpg": 2, "a/.hidden.jpg": 3})
    (tmp_path / "a" / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "a" / "notes.txt").write_text("hi")
    (tmp_path / ".git").mkdir()
    s = discover(tmp_path)
    assert sorted(x.path for x in s.samples) == ["a/1.jpg", "b/2.jpg"]


def test_symlink_loop_does_not_hang(tmp_path):
    _tree(tmp_path, {"a/1.jpg": 0, "b/2.jpg": 1})
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    s = discover(tmp_path)
    assert [x.path for x in s.samples if x.label == 0] == ["a/1.jpg"]


@pytest.mark.parametrize("make, message", [
    (lambda r: (r / "a").mkdir() or _tree(r, {"b/1.jpg": 0}), "holds no images"),
    (lambda r: None, "holds no images"),
    (lambda r: _tree(r, {"1.jpg": 0}), "no class folders"),
    (lambda r: _tree(r, {"only/1.jpg": 0}), "at least 2"),
    (lambda r: _tree(r, {"train/a/1.jpg": 0, "train/b/1.jpg": 0, "val/a/1.jpg": 0, "valid/b/1.jpg": 0}), "two folders"),
    (lambda r: _tree(r, {"train/a/1.jpg": 0, "train/b/1.jpg": 0, "extra/a/1.jpg": 0}), "mixes split folders"),
    (lambda r: _tree(r, {"train/a/1.jpg": 0, "train/b/1.jpg": 0, "val/c/1.jpg": 0}), "none in"),
])
def test_bad_layouts_are_clear_errors(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message) as exc:
        discover(tmp_path)
    assert "\n" not in str(exc.value)


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        discover(tmp_path / "nope")


def test_manifest(tmp_path):
    _tree(tmp_path, {"imgs/1.jpg": 0, "imgs/2.jpg": 1, "imgs/3.jpg": 2, "imgs/4.jpg": 3})
    m = tmp_path / "set.csv"
    m.write_text("path,label,split\nimgs/1.jpg,cat,train\nimgs/2.jpg,dog,train\n"
                 "imgs/3.jpg,cat,val\nimgs/4.jpg,dog,test\n")
    s = discover(m)
    assert s.layout == "manifest" and s.class_names == ["cat", "dog"]
    assert s.splits == {"train": 2, "val": 1, "test": 1}
    assert s.name == "set"


@pytest.mark.parametrize("rows, message", [
    ("imgs/1.jpg,cat\nimgs/missing.jpg,dog\n", "line 2: file 'imgs/missing.jpg' not found"),
    ("imgs/1.jpg,cat\n../escape.jpg,dog\n", "escapes"),
    ("imgs/1.jpg,cat\n/etc/passwd,dog\n", "escapes"),
    ("imgs/1.jpg,cat\nimgs/2.jpg,dog\nimgs/3.jpg,bird,val\n", "label 'bird'"),
    ("imgs/1.jpg,cat\nimgs/2.jpg,\n", "needs a label"),
    ("imgs/1.jpg,cat,holdout\n", "unknown split"),
])
def test_bad_manifest(tmp_path, rows, message):
    _tree(tmp_path, {"imgs/1.jpg": 0, "imgs/2.jpg": 1, "imgs/3.jpg": 2})
    (tmp_path.parent / "escape.jpg").write_bytes(b"x")
    m = tmp_path / "m.csv"
    m.write_text(rows)
    with pytest.raises(DataError, match=message) as exc:
        discover(m)
    assert str(m) in str(exc.value)


def test_fingerprint_changes_with_files_and_parts(tmp_path):
    _tree(tmp_path, {"a/1.jpg": 0, "b/2.jpg": 1})
    fp = fingerprint(discover(tmp_path), backbone="lite0")
    assert fp == fingerprint(discover(tmp_path), backbone="lite0")
    assert fp != fingerprint(discover(tmp_path), backbone="resnet50")
    _tree(tmp_path, {"a/3.jpg": 2})  # added
    fp_added = fingerprint(discover(tmp_path), backbone="lite0")
    assert fp_added != fp
    p = tmp_path / "a" / "3.jpg"
    st = p.stat()
    img.photo(seed=9).save(p)  # modified (content and mtime)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert fingerprint(discover(tmp_path), backbone="lite0") != fp_added
    p.unlink()  # removed
    assert fingerprint(discover(tmp_path), backbone="lite0") == fp


# ----------------------------------------------------------------------------- decoding
def test_grayscale_becomes_rgb(tmp_path):
    im = open_image(img.write_grayscale(tmp_path / "g.png", 90))
    assert im.mode == "RGB" and im.getpixel((5, 5)) == (90, 90, 90)


def test_palette_becomes_rgb(tmp_path):
    im = open_image(img.write_palette(tmp_path / "p.png"))
    assert im.mode == "RGB"
    assert np.allclose(im.getpixel((5, 5)), (200, 30, 40), atol=8)


def test_rgba_composited_on_white(tmp_path):
    im = open_image(img.write_rgba(tmp_path / "a.png"))
    assert im.getpixel((5, 5)) == (0, 0, 255)
    assert im.getpixel((35, 5)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    im = open_image(img.write_cmyk_jpeg(tmp_path / "c.jpg"))
    assert im.mode == "RGB"
    r, g, b = im.getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_scaled_not_clipped(tmp_path):
    im = open_image(img.write_16bit_png(tmp_path / "d.png"))
    assert im.getpixel((5, 5)) == (255, 255, 255)
    assert im.getpixel((35, 5)) == (128, 128, 128)


def test_exif_rotation_applied(tmp_path):
    im = open_image(img.write_exif_rotated(tmp_path / "r.jpg"))
    assert im.size == (20, 40)  # was stored 40 wide, 20 high
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("writer, reason", [
    (img.write_zero_bytes, "empty file"),
    (img.write_truncated_jpeg, "truncated"),
    (img.write_text_as_jpg, "not an image"),
    (img.write_bomb, "decompression bomb"),
])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, below ours
def test_bad_files_refused_with_reason(tmp_path, writer, reason):
    path = writer(tmp_path / ("x.png" if writer is img.write_bomb else "x.jpg"))
    with pytest.raises(ImageDecodeError, match=reason):
        open_image(path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.jpg"
    img.photo().save(path)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads everything: simulate the OS refusing the open
        import PIL.Image

        real_open = PIL.Image.open

        def deny(fp, *a, **k):
            if str(fp) == str(path):
                raise PermissionError(13, "Permission denied", str(fp))
            return real_open(fp, *a, **k)

        monkeypatch.setattr(PIL.Image, "open", deny)
    with pytest.raises(ImageDecodeError, match="permission denied"):
        open_image(path)


def test_eval_transform_matches_resize_then_crop(tmp_path):
    from PIL import Image

    im = img.photo((300, 200), seed=3)
    pre = Preprocessing(resize=128, crop=112, interpolation="bicubic")
    got = EvalTransform(pre)(im).permute(1, 2, 0).numpy().astype(int)
    w, h = im.size
    s = 128 / min(w, h)
    nw, nh = round(w * s), round(h * s)
    ref = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - 112) // 2, (nh - 112) // 2
    ref = np.asarray(ref.crop((left, top, left + 112, top + 112))).astype(int)
    assert got.shape == (112, 112, 3)
    assert np.abs(got - ref).mean() < 0.5
