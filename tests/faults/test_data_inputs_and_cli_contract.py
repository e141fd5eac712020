"""Faults in what fxtl reads and how it answers: fxtl's own artifacts inside a data folder,
manifests, bit depths, stray files, the CLI's ``--json`` failure contract, file modes of atomic
writes and messages that name Python parameters. docs/reliability.md cites each test by name.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fxtl.cli import cli
from fxtl.data.discovery import discover
from fxtl.errors import DataError, FxtlWarning

from .. import _images as img


def _tree(root: Path, files: list[str]) -> Path:
    for i, rel in enumerate(files):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img.photo(seed=i, size=(40, 32)).save(p)
    return root


# ------------------------------------------------------------------ 4: fxtl's output is not data
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_extract_fit_head_extract_inside_the_data_folder_keeps_two_classes(tmp_path, tiny,
                                                                           monkeypatch, umask_022):
    data = _tree(tmp_path / "data", [f"{c}/{i}.png" for c in ("ants", "bees") for i in range(4)])
    monkeypatch.chdir(data)
    monkeypatch.delenv("FXTL_CACHE")  # the default ./cache, inside the data folder
    runner = CliRunner()
    first = runner.invoke(cli, ["extract", ".", "-b", tiny, "--workers", "0", "--json"])
    assert first.exit_code == 0, first.output
    cache = json.loads(first.stdout)["cache"]
    assert Path(cache).resolve().parent == (data / "cache").resolve()
    fit = runner.invoke(cli, ["fit-head", cache, "--model", "logreg", "--json"])
    assert fit.exit_code == 0, fit.output
    assert list((data / "cache").rglob("*.png")), "fit-head wrote no PNG: the case is not tested"
    # 17: the cache and every file of the run get 0o666 less the umask, as any new file would
    written = [p for p in (data / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert {p.stat().st_mode & 0o777 for p in written} == {0o644}, written
    again = runner.invoke(cli, ["extract", ".", "-b", tiny, "--workers", "0", "--json"])
    assert again.exit_code == 0, again.output
    out = json.loads(again.stdout)
    assert out["n"] == 8 and out["cache_hit"] is True
    assert again.stderr.count("fxtl output") == 1, again.stderr


@pytest.mark.parametrize("artifact", ["head.json", "fxtl-model.json", "metrics.json", "rows.json",
                                      "x.h5.lock", "cache.h5"])
def test_a_folder_holding_an_fxtl_artifact_is_skipped_and_named_once(tmp_path, artifact):
    root = _tree(tmp_path, ["train/a/1.png", "train/b/2.png", "val/a/3.png", "val/b/4.png",
                            "out/run/confusion.png", "train/a/run/x.png"])
    for folder in (root / "out" / "run", root / "train" / "a" / "run"):
        if artifact == "cache.h5":
            import h5py

            with h5py.File(folder / artifact, "w") as f:
                f.attrs["format"] = "fxtl-features"
        else:
            (folder / artifact).write_text("{}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = discover(root)
    assert s.class_names == ["a", "b"] and len(s) == 4
    assert sorted(x.path for x in s.samples) == ["train/a/1.png", "train/b/2.png",
                                                 "val/a/3.png", "val/b/4.png"]
    mine = [w for w in caught if issubclass(w.category, FxtlWarning)]
    assert len(mine) == 1 and "2 folder(s)" in str(mine[0].message)


def test_an_hdf5_file_that_is_not_fxtl_does_not_hide_a_class(tmp_path):
    import h5py

    root = _tree(tmp_path, ["a/1.png", "b/2.png"])
    with h5py.File(root / "a" / "annotations.h5", "w") as f:
        f["boxes"] = np.zeros(3)
    assert discover(root).class_names == ["a", "b"]


# ------------------------------------------------------- 5: one image twice in a CSV manifest
def _manifest(root: Path, body: str) -> Path:
    _tree(root, ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.jpg", "imgs/d.jpg"])
    m = root / "set.csv"
    m.write_text(body)
    return m


@pytest.mark.parametrize("second", [
    "imgs/a.jpg,cat,val",             # the same image in train and val: val would leak
    "imgs/./../imgs/a.jpg,cat,val",   # the same, spelled another way
    "imgs/a.jpg,dog,train",           # the same image under two labels
    "alias.jpg,cat,test",             # the same file through a link
])
def test_manifest_conflicting_duplicate_is_refused_with_both_row_numbers(tmp_path, second):
    m = _manifest(tmp_path, f"path,label,split\nimgs/a.jpg,cat,train\nimgs/b.jpg,dog,train\n"
                            f"imgs/c.jpg,cat,val\n{second}\n")
    os.symlink(tmp_path / "imgs" / "a.jpg", tmp_path / "alias.jpg")
    with pytest.raises(DataError, match=r"lines 2 and 5 list the same image \(?'imgs/a.jpg'") as exc:
        discover(m)
    assert str(m) in str(exc.value) and "\n" not in str(exc.value)


def test_manifest_exact_duplicate_is_dropped_with_one_warning(tmp_path):
    m = _manifest(tmp_path, "imgs/a.jpg,cat\nimgs/b.jpg,dog\nimgs/./a.jpg,cat,train\n"
                            "imgs/b.jpg,dog\nimgs/c.jpg,cat,val\n")
    with pytest.warns(FxtlWarning, match=r"dropped 2 duplicate row\(s\) \(line 3 repeats line 1, "
                                         r"line 4 repeats line 2\)"):
        s = discover(m)
    assert [(x.path, x.split) for x in s.samples] == [("imgs/a.jpg", "train"),
                                                     ("imgs/b.jpg", "train"), ("imgs/c.jpg", "val")]


# ------------------------------------------------------------- 18: manifest columns by name
def test_manifest_header_in_another_order_is_read_by_column_names(tmp_path):
    m = _manifest(tmp_path, "label,path,split\ncat,imgs/a.jpg,train\ndog,imgs/b.jpg,train\n"
                            "cat,imgs/c.jpg,val\ndog,imgs/d.jpg,test\n")
    s = discover(m)
    assert s.class_names == ["cat", "dog"]
    assert [(x.path, s.class_names[x.label], x.split) for x in s.samples] == [
        ("imgs/a.jpg", "cat", "train"), ("imgs/b.jpg", "dog", "train"),
        ("imgs/c.jpg", "cat", "val"), ("imgs/d.jpg", "dog", "test")]
    m.write_text("split,path\ntrain,imgs/a.jpg\n")
    with pytest.raises(DataError, match="line 1: the header names no `label` column"):
        discover(m)


# ----------------------------------------------------- 7: 16-bit images scale by their depth
@pytest.mark.parametrize("brightest", [200, 300, 65535])
def test_16bit_png_is_scaled_by_its_bit_depth_not_by_its_content(tmp_path, brightest):
    from fxtl.data.images import open_image

    arr = np.zeros((8, 8), dtype=np.uint16)
    arr[:, :4] = brightest
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (8, 8, 3)
    assert rgb[0, 0, 0] == round(brightest / 257) and rgb[0, 7, 0] == 0


def test_32bit_tiff_is_scaled_by_its_bit_depth(tmp_path):
    from fxtl.data.images import open_image

    path = tmp_path / "deep.tif"
    Image.fromarray(np.full((4, 4), 2 ** 30, dtype=np.int32)).save(path)
    assert np.asarray(open_image(path))[0, 0, 0] == 128  # half of the signed 31-bit range


# ---------------------------------------- #11 item 5: no process-wide Pillow setting per call
def test_decoding_leaves_pillows_pixel_limit_to_the_caller(tmp_path, monkeypatch):
    from fxtl.data.images import ImageDecodeError, open_image

    path = tmp_path / "p.png"
    img.photo(size=(64, 48)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the caller's stricter policy
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        open_image(path)
    assert Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the caller's "no limit": ours holds
    with pytest.raises(ImageDecodeError, match=r"64x48 pixels exceeds 1000 \(refused\)"):
        open_image(path, max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS is None
    assert np.asarray(open_image(path)).shape == (48, 64, 3)


# ------------------------------------------------ 15: under --json every failure is one object
@pytest.mark.parametrize("args, code, fragment", [
    (["extract", "{empty}", "--json"], 1, "holds no images"),                  # FxtlError
    (["info", "{notcache}", "--json"], 1, "notcache.h5"),                       # a bad file
    (["extract", "{empty}", "--batch-size", "-1", "--json"], 2, "--batch-size"),  # click's range
    (["info", "--json"], 2, "Missing argument 'CACHE'"),                      # click's parser
    (["info", "{notcache}", "--json", "--bogus"], 2, "--bogus"),
    (["no-such-command", "--json"], 2, "no-such-command"),
])
def test_json_failure_prints_exactly_one_error_object(tmp_path, args, code, fragment):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "notcache.h5").write_text("not hdf5")
    args = [a.format(empty=tmp_path / "empty", notcache=tmp_path / "notcache.h5") for a in args]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == code, r.output
    out = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert set(out) == {"error", "exit_code"} and out["exit_code"] == code
    assert fragment in out["error"], out
    assert "Traceback" not in r.output and fragment in r.stderr  # the human line stays on stderr


def test_json_failure_contract_holds_from_the_command_line(tmp_path):
    from ._cli import run_fxtl

    for args, code in [(["info", str(tmp_path / "gone.h5"), "--json"], 2),
                       (["fit-head", str(tmp_path), "--model", "forest", "--json"], 2)]:
        r = run_fxtl(*args)
        assert r.returncode == code, r.stderr
        assert json.loads(r.stdout)["exit_code"] == code
    (tmp_path / "bad.h5").write_text("x")
    r = run_fxtl("info", tmp_path / "bad.h5", "--json")
    assert r.returncode == 1 and json.loads(r.stdout) == {
        "error": json.loads(r.stdout)["error"], "exit_code": 1}
    assert r.stderr.strip().startswith("fxtl: error:") and str(tmp_path / "bad.h5") in r.stderr


# ------------------------------------------------------- 17: artifacts respect the umask
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    from fxtl._util import atomic_path, atomic_write_json, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_json(tmp_path / "metrics.json", {"a": 1})
        with atomic_path(tmp_path / "x.h5") as tmp:
            tmp.write_bytes(b"data")
    finally:
        os.umask(old)
    for name in ("metrics.json", "x.h5"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


# ------------------------------------------------------------------- 18: no quiet drops
def test_images_outside_any_class_folder_are_named_not_dropped_silently(tmp_path):
    root = _tree(tmp_path, ["train/a/1.png", "train/b/2.png", "train/stray.png", "train/x.jpg",
                            "val/a/3.png", "val/b/4.png"])
    with pytest.warns(FxtlWarning, match=r"train: ignored 2 image\(s\) outside any class folder "
                                         r"\(stray.png, x.jpg\); move them into .*train/<class>/"):
        s = discover(root)
    assert len(s) == 4
    flat = _tree(tmp_path / "flat", ["a/1.png", "b/2.png", "loose.png"])
    with pytest.warns(FxtlWarning, match=r"ignored 1 image\(s\) outside any class folder"):
        assert len(discover(flat)) == 2


def test_jfif_and_avif_are_images_and_undecodable_endings_are_named(tmp_path):
    from fxtl.data.images import IMAGE_EXTENSIONS, open_image

    root = _tree(tmp_path, ["a/1.png", "b/2.png"])
    img.photo(seed=5).save(root / "a" / "3.jfif", "JPEG")
    expected = ["a/1.png", "a/3.jfif", "b/2.png"]
    if ".avif" in IMAGE_EXTENSIONS:  # this Pillow decodes AVIF
        img.photo(seed=6).save(root / "b" / "4.avif", "AVIF")
        expected.append("b/4.avif")
    (root / "b" / "5.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.warns(FxtlWarning, match=r"ignored 1 \.heic file\(s\) this Pillow cannot decode "
                                         r"\(.*5\.heic\); convert them"):
        s = discover(root)
    assert sorted(x.path for x in s.samples) == expected
    for p in expected:  # and they decode
        assert open_image(root / p).size == Image.open(root / p).size


# ---------------------------------------- #11 item 4: the library speaks Python, the CLI flags
def test_data_and_util_messages_name_parameters_and_the_cli_shows_options(tmp_path, tiny):
    import ast

    from fxtl import _util, errors
    from fxtl._util import ensure_dir
    from fxtl.data import discovery, images, samples
    from fxtl.errors import FxtlError

    for module in (discovery, images, samples, _util, errors):
        tree = ast.parse(Path(module.__file__).read_text())
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        flags = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
                 and isinstance(n.value, str) and id(n) not in docstrings
                 and re.search(r"(?<![\w-])--[a-z]", n.value)]
        assert flags == [], f"{module.__name__} speaks CLI: {flags}"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FxtlError, match=r"; choose a writable place with cache_dir$") as exc:
        ensure_dir(tmp_path / "file" / "cache")
    assert exc.value.param == "cache_dir"
    data = _tree(tmp_path / "data", ["a/1.png", "b/2.png"])
    r = CliRunner().invoke(cli, ["extract", str(data), "-b", tiny, "--workers", "0",
                                 "--cache-dir", str(tmp_path / "file" / "cache")])
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().endswith("choose a writable place with --cache-dir"), r.stderr
    assert str(tmp_path / "file" / "cache") in r.stderr  # the path is left as it is
