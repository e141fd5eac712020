"""Bad inputs, end to end through the CLI.

Every case: the documented exit status, one line that names the file at fault, no traceback,
and the good data kept (good images extracted, existing files untouched). The decoder itself is
unit-tested in tests/test_data.py; here the whole command runs, in a real process where the OS
refusal matters (an unreadable file is unreadable to the child even when CI runs as root).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fxtl.cli import cli
from fxtl.heads.fitting import fit_head
from fxtl.features.store import FORMAT_VERSION, load_features

from .. import _images as img
from ..test_heads import PRE, write_synthetic_cache
from ._cli import assert_one_line_error, lines, run_fxtl

# file in class folder a -> words its one-line reason must contain
BAD = {"zero.jpg": "empty file", "trunc.jpg": "truncated", "text.jpg": "not an image",
       "bomb.png": "decompression bomb", "locked.jpg": "permission denied"}
# awkward file in class folder b -> its correct RGB rendering, written as ref/<name>.png
AWKWARD = ("gray.png", "pal.png", "rgba.png", "cmyk.jpg", "deep.png", "rot.jpg")


def _reference_rgb(path: Path) -> Image.Image:
    """What each awkward file must look like, built without fxtl's decoder."""
    name = path.name
    if name == "gray.png":
        return Image.new("RGB", (40, 30), (90, 90, 90))
    if name == "rgba.png":  # blue half opaque, transparent half on white
        arr = np.full((30, 40, 3), 255, np.uint8)
        arr[:, :20] = (0, 0, 255)
        return Image.fromarray(arr, "RGB")
    if name == "deep.png":  # 65535 -> 255, 32896 -> 128
        arr = np.zeros((30, 40, 3), np.uint8)
        arr[:, :20], arr[:, 20:] = 255, 128
        return Image.fromarray(arr, "RGB")
    with Image.open(path) as im:
        if name == "rot.jpg":  # stored 40x20; EXIF orientation 6 = display turned 90 deg clockwise
            return im.convert("RGB").transpose(Image.Transpose.ROTATE_270)
        return im.convert("RGB")  # palette, CMYK: Pillow's own conversion of the decoded pixels


def _wrong_rgb(path: Path) -> Image.Image | None:
    """The rendering a naive decoder gives (to show the reference comparison can tell)."""
    with Image.open(path) as im:
        if path.name == "rot.jpg":
            return im.convert("RGB")  # EXIF ignored
        if path.name == "rgba.png":
            return im.convert("RGB")  # alpha dropped: the transparent half turns red
        if path.name == "deep.png":
            return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8)).convert("RGB")
    return None


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """A folder with every kind of bad and awkward file, extracted once by `fxtl extract`."""
    base = tmp_path_factory.mktemp("messy")
    root = base / "data"
    for cls in ("a", "b", "ref", "wrong"):
        (root / cls).mkdir(parents=True)
    for i in range(2):
        img.photo(seed=i).save(root / "a" / f"ok{i}.jpg")
    img.write_zero_bytes(root / "a" / "zero.jpg")
    img.write_truncated_jpeg(root / "a" / "trunc.jpg")
    img.write_text_as_jpg(root / "a" / "text.jpg")
    img.write_bomb(root / "a" / "bomb.png")
    img.photo(seed=7).save(root / "a" / "locked.jpg")
    (root / "a" / "locked.jpg").chmod(0)
    b = root / "b"
    img.write_grayscale(b / "gray.png", 90), img.write_palette(b / "pal.png"), img.write_rgba(b / "rgba.png")
    img.write_cmyk_jpeg(b / "cmyk.jpg"), img.write_16bit_png(b / "deep.png"), img.write_exif_rotated(b / "rot.jpg")
    for name in AWKWARD:
        _reference_rgb(b / name).save(root / "ref" / f"{Path(name).stem}.png")
        wrong = _wrong_rgb(b / name)
        if wrong is not None:
            wrong.save(root / "wrong" / f"{Path(name).stem}.png")
    proc = run_fxtl("extract", root, "--cache-dir", base / "cache", "--json", "--workers", "0",
                    "--precision", "fp32", "--batch-size", "8", unprivileged=True)
    return root, proc


def test_each_bad_file_is_one_line_naming_it_and_the_run_succeeds(messy):
    root, proc = messy
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    assert {e["path"]: e["reason"] for e in out["errors"]}.keys() == {f"a/{n}" for n in BAD}
    for name, reason in BAD.items():
        said = [line for line in lines(proc.stderr) if f"a/{name}" in line]
        assert len(said) == 1, (name, said)
        assert re.fullmatch(rf"fxtl: skipped a/{re.escape(name)}: .*{reason}.*", said[0]), said[0]


def test_good_and_awkward_images_are_kept(messy):
    root, proc = messy
    out = json.loads(proc.stdout)
    fc = load_features(out["cache"])
    expected = {p.relative_to(root).as_posix() for p in root.rglob("*.*")} - {f"a/{n}" for n in BAD}
    assert set(fc.paths) == expected and fc.n == out["n"] == len(expected)
    assert sorted(p for p, _ in fc.errors) == sorted(f"a/{n}" for n in BAD)
    assert np.isfinite(fc.features).all()


@pytest.mark.parametrize("name", AWKWARD)
def test_awkward_modes_give_the_features_of_their_correct_rgb(messy, name):
    """Grayscale, palette, RGBA, CMYK, 16-bit and EXIF-rotated files are converted, not rejected,
    and converted right: their features are those of the plain RGB image they show."""
    root, proc = messy
    fc = load_features(json.loads(proc.stdout)["cache"])
    row = {p: i for i, p in enumerate(fc.paths)}
    stem = Path(name).stem
    got, ref = fc.features[row[f"b/{name}"]], fc.features[row[f"ref/{stem}.png"]]
    scale = np.linalg.norm(ref)
    assert np.linalg.norm(got - ref) <= 1e-4 * scale, name
    if f"wrong/{stem}.png" in row:  # the naive rendering is far away: the check can tell
        assert np.linalg.norm(got - fc.features[row[f"wrong/{stem}.png"]]) > 0.05 * scale


# ----------------------------------------------------------------------------- datasets
def _tiny_tree(root: Path, files: list[str]) -> Path:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img.photo((24, 20), seed=len(rel)).save(root / rel)
    return root


def _dataset_empty_class(root: Path):
    _tiny_tree(root, ["a/1.png"])
    (root / "b").mkdir()
    return root, [str(root / "b"), "holds no images"]


def _dataset_without_images(root: Path):
    (root / "a").mkdir(parents=True)
    (root / "a" / "notes.txt").write_text("no pictures here\n")
    return root, [str(root), "holds no images"]


def _manifest(root: Path, body: bytes | str):
    _tiny_tree(root, ["imgs/1.png", "imgs/2.png", "imgs/3.png"])
    (root.parent / "outside.png").write_bytes((root / "imgs" / "1.png").read_bytes())
    m = root / "set.csv"
    m.write_bytes(body if isinstance(body, bytes) else body.encode())
    return m


DATASETS = {
    "empty class folder": _dataset_empty_class,
    "no images at all": _dataset_without_images,
    "manifest: missing file": lambda r: (m := _manifest(r, "imgs/1.png,cat\nimgs/gone.png,dog\n"),
                                         [str(m), "line 2", "'imgs/gone.png' not found"]),
    "manifest: unknown label": lambda r: (m := _manifest(r, "imgs/1.png,cat\nimgs/2.png,dog\nimgs/3.png,bird,val\n"),
                                          [str(m), "line 3", "label 'bird'"]),
    "manifest: one image in two splits": lambda r: (
        m := _manifest(r, "imgs/1.png,cat\nimgs/2.png,dog\nimgs/./../imgs/1.png,cat,val\n"),
        [str(m), "lines 1 and 3", "'imgs/1.png'"]),
    "manifest: ../ escapes": lambda r: (m := _manifest(r, "imgs/1.png,cat\nimgs/../../outside.png,dog\n"),
                                        [str(m), "line 2", "escapes"]),
    "manifest: absolute path": lambda r: (m := _manifest(r, f"imgs/1.png,cat\n{r.parent / 'outside.png'},dog\n"),
                                          [str(m), "line 2", "escapes"]),
    "manifest: NUL byte": lambda r: (m := _manifest(r, b"imgs/1.png,cat\nimgs/2\x00.png,dog\n"),
                                     [str(m), "line 2", "NUL"]),
    "manifest: not text": lambda r: (m := _manifest(r, b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01,\x02\n"),
                                     [str(m), "not UTF-8"]),
}


@pytest.mark.parametrize("case", DATASETS)
def test_unusable_dataset_is_one_line_and_writes_nothing(tmp_path, case):
    target, fragments = DATASETS[case](tmp_path / "data")
    cache = tmp_path / "cache"
    r = CliRunner().invoke(cli, ["extract", str(target), "--cache-dir", str(cache)])
    assert_one_line_error(r.exit_code, r.stderr, *fragments)
    assert not cache.exists()


@pytest.fixture()
def locked_subfolder(tmp_path):
    root = _tiny_tree(tmp_path / "data", ["a/1.png", "a/more/2.png", "b/1.png"])
    (root / "a" / "more").chmod(0)
    yield root
    (root / "a" / "more").chmod(0o755)


def test_unreadable_folder_is_named_not_silently_dropped(locked_subfolder, tmp_path):
    """Before: os.walk skipped the folder without a word, and its images were lost."""
    root = locked_subfolder
    proc = run_fxtl("extract", root, "--cache-dir", tmp_path / "cache", unprivileged=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, str(root / "a" / "more"), "Permission denied")
    assert not (tmp_path / "cache").exists()
    # predict walks folders too: there the folder is one reported input error, the rest goes on
    code = ("import json, sys; from fxtl.prediction import collect_images; "
            "imgs, _, errs = collect_images([sys.argv[1]]); "
            "print(json.dumps({'images': [str(p) for p in imgs], 'errors': errs}))")
    proc = run_fxtl(root, code=code, unprivileged=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["images"] == [str(root / "a" / "1.png"), str(root / "b" / "1.png")]
    assert [e["path"] for e in got["errors"]] == [str(root / "a" / "more")]
    assert "cannot read this folder" in got["errors"][0]["reason"]


# ----------------------------------------------------------------------------- caches
def _set_attr(path: Path, key: str, value) -> Path:
    with h5py.File(path, "a") as f:
        f.attrs[key] = value
    return path


def _replace(path: Path, name: str, data) -> Path:
    with h5py.File(path, "a") as f:
        del f[name]
        f[name] = data
    return path


def _text_file(path: Path) -> Path:
    path.write_text("hello\n")
    return path


def _truncated(path: Path) -> Path:  # a copy that stopped half way
    data = write_synthetic_cache(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _other_hdf5(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(10)
        f.attrs["format"] = "someone-elses"
    return path


BAD_CACHES = {
    "text file named .h5": (_text_file, "not an HDF5 file"),
    "HDF5 of another format": (_other_hdf5, "not an fxtl feature cache"),
    "newer format_version": (lambda p: _set_attr(write_synthetic_cache(p), "format_version",
                                                 FORMAT_VERSION + 1),
                             f"format_version {FORMAT_VERSION + 1}"),
    "incomplete": (lambda p: _set_attr(write_synthetic_cache(p), "complete", False), "incomplete"),
    "truncated copy": (_truncated, "truncated"),
    "rows disagree": (lambda p: _replace(write_synthetic_cache(p), "labels", [0, 1]), "damaged"),
    "broken JSON attribute": (lambda p: _set_attr(write_synthetic_cache(p), "preprocessing", "{oops"),
                              "damaged"),
}


@pytest.fixture(scope="module")
def head_run(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("head")
    return fit_head(write_synthetic_cache(home / "blobs.h5"), model="knn", search=False,
                    cache_dir=home).run_dir


@pytest.mark.parametrize("command", ["info", "export", "fit-head", "plot-embedding", "predict"])
@pytest.mark.parametrize("case", BAD_CACHES)
def test_bad_cache_is_one_line_naming_it_and_left_as_is(tmp_path, head_run, case, command):
    make, fragment = BAD_CACHES[case]
    path = make(tmp_path / "given.h5")
    before = path.read_bytes()
    args = {"info": ["info", path], "export": ["export", path, "-o", tmp_path / "out.npz"],
            "fit-head": ["fit-head", path, "--no-search", "--jobs", "1"],
            "plot-embedding": ["plot-embedding", path], "predict": ["predict", head_run, path]}[command]
    r = CliRunner().invoke(cli, [*map(str, args), "--cache-dir", str(tmp_path / "home")]
                           if command in ("fit-head", "plot-embedding", "predict") else list(map(str, args)))
    assert_one_line_error(r.exit_code, r.stderr, str(path), fragment)
    assert path.read_bytes() == before
    assert not (tmp_path / "out.npz").exists() and not (tmp_path / "home" / "runs").exists()


_FUZZ = r"""
import json, sys
from pathlib import Path
from fxtl.errors import CacheError
from fxtl.features.store import load_features
src = Path(sys.argv[1]); data = src.read_bytes(); stop = int(sys.argv[2])
outcomes = {}
for off in range(0, stop, 16):
    broken = bytearray(data)
    broken[off:off + 8] = bytes(b ^ 0xFF for b in broken[off:off + 8])
    p = src.with_name(f"flip-{off}.h5"); p.write_bytes(bytes(broken))
    try:
        load_features(p); kind = "read"
    except CacheError as exc:
        kind = "refused" if str(p) in str(exc) and "\n" not in str(exc) else "bad message: " + str(exc)
    except Exception as exc:
        kind = f"{type(exc).__name__}: {exc}"
    outcomes[off] = kind
    p.unlink()
print(json.dumps(outcomes))
"""


def test_damaged_cache_bytes_are_refused_not_a_traceback(tmp_path):
    """Bytes overwritten in a cache's metadata (superblock, object headers, attributes): the
    reader refuses the file by name instead of raising whatever HDF5 raised first. (Raw data
    has no checksum in format v1, so a flip there reads as other values; see
    docs/reliability.md.)"""
    cache = write_synthetic_cache(tmp_path / "c.h5", dim=64)
    with h5py.File(cache) as f:  # the metadata lies before the first raw data block
        raw = [f[k].id.get_offset() for k in ("labels", "paths", "split")]
        stop = min([o for o in raw if o is not None] + [f["features"].id.get_chunk_info(0).byte_offset])
    proc = run_fxtl(cache, stop, code=_FUZZ, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout)
    odd = {off: kind for off, kind in outcomes.items() if kind not in ("read", "refused")}
    assert not odd, odd
    assert sum(kind == "refused" for kind in outcomes.values()) >= 20, outcomes


@pytest.mark.parametrize("key, value", [
    ("backbone", "resnet50"), ("weights_sha256", "f" * 64), ("layer", "blocks.5"),
    ("preprocessing", json.dumps({**PRE, "crop": 192}))])
def test_head_on_features_of_another_backbone_is_refused(tmp_path, head_run, key, value):
    other = _set_attr(write_synthetic_cache(tmp_path / "other.h5"), key, value)
    r = CliRunner().invoke(cli, ["predict", str(head_run), str(other)])
    assert_one_line_error(r.exit_code, r.stderr, str(other), key)
    narrow = write_synthetic_cache(tmp_path / "narrow.h5", dim=5)
    r = CliRunner().invoke(cli, ["predict", str(head_run), str(narrow)])
    assert_one_line_error(r.exit_code, r.stderr, str(narrow), "8-d", "5-d")
