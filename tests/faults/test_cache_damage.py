"""Damaged caches (issue 14, items 1, 9, 10, 11): one line naming the file and the fix, never a
traceback, a crash, a giant allocation or a silently wrong result; and a seeded fuzz test over
the reader."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from fxtl.cli import cli
from fxtl.errors import CacheError
from fxtl.features.store import load_features, open_cache, write_cache

from ._cli import ROOT, assert_one_line_error

ATTRS = {"backbone": "synthetic", "weights_sha256": "0" * 64, "preprocessing": {"crop": 8},
         "precision": "fp32", "layer": "pooled", "fingerprint": "f" * 64, "created": "now",
         "fxtl_version": "test", "timings": {"compute_seconds": 1.0}}


def _valid(path: Path, *, n: int = 8, dim: int = 3) -> Path:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    labels = [i % 2 for i in range(n)]
    split = ["train"] * (n // 2) + ["val"] * (n - n // 2)
    return write_cache(path, chunks=[X], n=n, dim=dim, labels=labels,
                       paths=[f"c{i % 2}/{i}.png" for i in range(n)], split=split,
                       class_names=["ants", "bees"], errors=[("bad.png", "truncated")], attrs=ATTRS)


def _edit(path: Path, fn) -> Path:
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


def _replace(name: str, data):
    def fn(f):
        del f[name]
        f[name] = data
    return fn


def _set(key: str, value):
    def fn(f):
        f.attrs[key] = value
    return fn


def _features_as_group(f):
    del f["features"]
    f.create_group("features").create_dataset("x", data=np.zeros((8, 3), np.float32))


def _nan_rows(f):
    X = f["features"][...]
    X[[1, 5]] = np.nan
    X[6, 0] = np.inf
    f["features"][...] = X


DAMAGE = {
    "labels out of range": (_replace("labels", np.array([0, 1, 5, 1, 0, 1, 0, 1])), "holds 5"),
    "label 2**40": (_replace("labels", np.array([0, 1, 2 ** 40, 1, 0, 1, 0, 1])), "class_names has 2"),
    "label below -1": (_replace("labels", np.array([0, -7, 0, 1, 0, 1, 0, 1])), "holds -7"),
    "fewer class names than labels": (_set("class_names", np.array(["ants"], dtype=object)),
                                      "class_names has 1 name"),
    "features stored as a group": (_features_as_group, "/features is a group"),
    "zero-width features": (_replace("features", np.zeros((8, 0), np.float32)), "zero columns"),
    "class_names as one string": (_set("class_names", "ants"), "class_names is one string"),
    "format_version as a string": (_set("format_version", "1"), "format_version is stored as text"),
    "complete is 'no'": (_set("complete", "no"), "complete is 'no'"),
    "complete is 0": (_set("complete", np.uint8(0)), "incomplete"),
    "split outside train/val/test": (_replace("split", np.array([b"train"] * 7 + [b"holdout"])),
                                     "'holdout'"),
    "features as integers": (_replace("features", np.zeros((8, 3), np.int32)), "the spec says float32"),
    "n disagrees": (_set("n", 99), "attribute n is 99"),
    "broken JSON": (_set("preprocessing", "{oops"), "not JSON"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damage_is_one_line_naming_file_and_fix(tmp_path, case):
    damage, fragment = DAMAGE[case]
    path = _edit(_valid(tmp_path / "c.h5"), damage)
    with pytest.raises(CacheError) as info:
        load_features(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and fragment in msg, msg
    assert "fxtl extract" in msg
    with pytest.raises(CacheError):  # refused on open, before any value is used
        open_cache(path)
    r = CliRunner().invoke(cli, ["info", str(path)])
    assert_one_line_error(r.exit_code, r.stderr, str(path))


def test_nonfinite_rows_refused_by_name_or_dropped(tmp_path):
    path = _edit(_valid(tmp_path / "c.h5"), _nan_rows)
    with pytest.raises(CacheError, match=r"3 of 8 feature rows hold NaN or infinity \(rows 1 \(c1/1.png\), "
                                         r"5 \(c1/5.png\), 6 \(c0/6.png\)\)"):
        load_features(path)
    with pytest.warns(UserWarning, match="left out 3 feature rows"):
        fc = load_features(path, nonfinite="drop")
    assert fc.n == 5 and np.isfinite(fc.features).all()
    assert fc.paths == ["c0/0.png", "c0/2.png", "c1/3.png", "c0/4.png", "c1/7.png"]
    assert list(fc.labels) == [0, 0, 1, 0, 1] and list(fc.split) == ["train"] * 3 + ["val"] * 2
    from fxtl.features.store import iter_feature_chunks

    with pytest.raises(CacheError, match=r"1 of 8 feature rows .*\(rows 1 \(c1/1.png\)\)"):
        list(iter_feature_chunks(path, rows=4))
    got = list(iter_feature_chunks(path, rows=4, nonfinite="drop", split="train"))
    assert sum(len(y) for _, y in got) == 3
    for args in (["fit-head", str(path), "--model", "knn", "--no-search", "--jobs", "1",
                  "--cache-dir", str(tmp_path / "home")], ["export", str(path), "-o",
                                                            str(tmp_path / "o.csv"), "--format", "csv"]):
        r = CliRunner().invoke(cli, args)
        assert_one_line_error(r.exit_code, r.stderr, "NaN or infinity", "rows 1")


def test_streamed_cache_refuses_nonfinite_rows_by_row_and_path(tmp_path):
    """Above large_threshold a cache is streamed block by block; each block is checked as it is
    read and a NaN/inf row is refused by row and path, as the in-memory path refuses it."""
    from fxtl.heads.source import open_source

    clean = _valid(tmp_path / "clean.h5")
    src = open_source(clean, large_threshold=2)
    assert src.features is None  # streamed from the file
    got = np.concatenate([X for _, X, _ in src.blocks(np.arange(8), block_rows=3)])
    np.testing.assert_array_equal(got, load_features(clean).features)
    batches = list(src.shuffled_batches(np.arange(8), rng=np.random.default_rng(0), block_rows=3))
    assert sorted(np.concatenate([y for _, y in batches]).tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]

    path = _edit(_valid(tmp_path / "c.h5"), _nan_rows)
    src = open_source(path, large_threshold=2)
    with pytest.raises(CacheError, match=r"c.h5 is damaged: 1 of 8 feature rows hold NaN or "
                                         r"infinity \(rows 1 \(c1/1.png\)\)"):
        list(src.blocks(np.arange(8), block_rows=4))
    with pytest.raises(CacheError, match=r"rows 5 \(c1/5.png\), 6 \(c0/6.png\)"):
        list(src.shuffled_batches(np.array([4, 5, 6, 7]), rng=np.random.default_rng(0), block_rows=4))
    r = CliRunner().invoke(cli, ["fit-head", str(path), "--model", "logreg", "--no-search", "--large-threshold", "2",
                                 "--cache-dir", str(tmp_path / "home")])
    assert_one_line_error(r.exit_code, r.stderr, str(path), "NaN or infinity", "rows 1 (c1/1.png)")


def test_predict_refuses_a_cache_with_nonfinite_rows_by_row_and_path(tmp_path, genuine):
    """`predict RUN CACHE` on a cache with 3 NaN/inf rows: one line naming them, no prediction
    for the others (fxtl never scores a damaged cache), exit 1; the genuine cache still works."""
    run_dir, cache = genuine
    ok = CliRunner().invoke(cli, ["predict", str(run_dir), str(cache), "--json"])
    assert ok.exit_code == 0 and len(json.loads(ok.stdout)["predictions"]) == 120, ok.output
    damaged = Path(shutil.copy(cache, tmp_path / "nan.h5"))

    def nan_rows(f):
        X = f["features"][...]
        X[[3, 70]] = np.nan
        X[100, 2] = -np.inf
        f["features"][...] = X
    _edit(damaged, nan_rows)
    r = CliRunner().invoke(cli, ["predict", str(run_dir), str(damaged), "--json"])
    line = assert_one_line_error(r.exit_code, r.stderr, str(damaged), "3 of 120 feature rows hold "
                                 "NaN or infinity (rows 3 (train/c0/3.png), 70 (val/c1/10.png), "
                                 "100 (test/c1/10.png))", "re-create it with `fxtl extract`")
    assert json.loads(r.stdout) == {"error": line[len("fxtl: error: "):], "exit_code": 1}


def test_export_refuses_fewer_class_names_than_labels(tmp_path):
    """Rows whose label has no name would otherwise be written as ``<unlabelled>``, silently."""
    path = _edit(_valid(tmp_path / "c.h5"), _set("class_names", np.array(["ants"], dtype=object)))
    r = CliRunner().invoke(cli, ["export", str(path), "--format", "csv", "-o", str(tmp_path / "o.csv")])
    assert_one_line_error(r.exit_code, r.stderr, "class_names has 1 name")
    assert not (tmp_path / "o.csv").exists()


# ----------------------------------------------------------------------------- fuzz
_FUZZ_READER = r"""
import json, sys
from fxtl.errors import FxtlError
from fxtl.features.store import iter_feature_chunks, load_features, read_attrs, read_errors, summarize
for name in sys.argv[1:]:
    print(json.dumps({"file": name, "start": True}), flush=True)
    out = {"file": name}
    try:
        fc = load_features(name)
        summarize(name); read_attrs(name); read_errors(name)
        sum(len(X) for X, _ in iter_feature_chunks(name, rows=3, split="train"))
        out["outcome"] = "ok"
        out["n"] = fc.n
    except FxtlError as exc:
        out["outcome"] = "error"
        out["message"] = str(exc)
    except BaseException as exc:
        out["outcome"] = "other"
        out["message"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out), flush=True)
"""


def _damage_randomly(data: bytes, path: Path, rng: np.random.Generator) -> str:
    kind = rng.choice(["truncate", "flip", "delete", "retype_dataset", "retype_attr"])
    if kind == "truncate":
        path.write_bytes(data[: int(rng.integers(0, len(data)))])
    elif kind == "flip":
        buf = bytearray(data)
        for i in rng.integers(0, len(buf), size=int(rng.integers(1, 40))):
            buf[i] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(buf))
    else:
        path.write_bytes(data)
        with h5py.File(path, "r+") as f:
            names = ["features", "labels", "paths", "split", "errors", "errors/path", "errors/reason"]
            attrs = list(f.attrs)
            values = [np.float64(2.5), "text", np.array([1, 2, 3]), np.int64(-3), np.array([], "f4"),
                      np.array(["a", "b"], dtype=object), np.zeros((2, 2)), np.uint8(1), 10 ** 12]
            if kind == "delete":
                if rng.random() < 0.5:
                    del f[names[int(rng.integers(len(names)))]]
                else:
                    del f.attrs[attrs[int(rng.integers(len(attrs)))]]
            elif kind == "retype_dataset":
                name = names[int(rng.integers(len(names)))]
                del f[name]
                f[name] = values[int(rng.integers(len(values)))]
            else:
                f.attrs[attrs[int(rng.integers(len(attrs)))]] = values[int(rng.integers(len(values)))]
    return str(kind)


def test_fuzz_the_reader_every_outcome_is_a_result_or_one_line(tmp_path):
    data = _valid(tmp_path / "valid.h5").read_bytes()
    rng = np.random.default_rng(1234)
    files, kinds = [], {}
    for i in range(120):
        p = tmp_path / f"fuzz{i:03d}.h5"
        kinds[p.name] = _damage_randomly(data, p, rng)
        files.append(str(p))
    # A crash (segfault in HDF5) is possible, so the reader runs in its own process.
    proc = subprocess.run([sys.executable, "-c", _FUZZ_READER, *files], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = [r for r in records if "outcome" in r]
    last = records[-1]["file"] if records else None
    assert proc.returncode == 0, f"reader died (rc {proc.returncode}) on {last}: {proc.stderr[-2000:]}"
    assert len(done) == len(files)
    bad = [r for r in done if r["outcome"] == "other" or "\n" in r.get("message", "")]
    assert not bad, [(Path(r["file"]).name, kinds[Path(r["file"]).name], r["message"]) for r in bad]
    outcomes = {r["outcome"] for r in done}
    assert outcomes == {"ok", "error"}  # both happen: the damage is not all fatal, nor all harmless
    for r in done:
        if r["outcome"] == "error":
            assert Path(r["file"]).name in r["message"]


# ----------------------------------------------------------------------------- item 1: export
@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hard link", "default"])
def test_export_never_replaces_the_cache(tmp_path, how):
    cache = _valid(tmp_path / ("c.npz" if how == "default" else "c.h5"))
    before = cache.read_bytes()
    out = {"same path": cache, "other spelling": tmp_path / "." / ".." / tmp_path.name / "c.h5",
           "symlink": tmp_path / "link.npz", "hard link": tmp_path / "hard.npz", "default": None}[how]
    if how == "symlink":
        out.symlink_to(cache)
    if how == "hard link":
        os.link(cache, out)
    args = ["export", str(cache), "--format", "npz"] + ([] if out is None else ["-o", str(out)])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert "is the cache being exported" in r.output and "Traceback" not in r.output
    assert cache.read_bytes() == before
    load_features(cache)


def test_export_to_another_file_writes_it(tmp_path):
    """The refusal above is for the cache's own file only."""
    cache = _valid(tmp_path / "c.h5")
    r = CliRunner().invoke(cli, ["export", str(cache), "--format", "npz", "-o", str(tmp_path / "o.npz")])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "o.npz") as z:
        assert z["features"].shape == (8, 3) and list(z["class_names"]) == ["ants", "bees"]


# ----------------------------------------------------------------------------- item 9: no space
_FSIZE_CHILD = r"""
import resource, sys
import numpy as np
from fxtl.errors import FxtlError
from fxtl.features.store import load_features, write_cache
sys.path.insert(0, sys.argv[2])
from tests.faults.test_cache_damage import ATTRS
path = sys.argv[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (200 << 10, 200 << 10))  # like `ulimit -f 200`
n, dim = 1000, 256  # about 1 MiB: over the limit
X = np.ones((n, dim), np.float32)
try:
    write_cache(path, chunks=[X[i:i + 100] for i in range(0, n, 100)], n=n, dim=dim, labels=[0] * n,
                paths=[f"{i}.png" for i in range(n)], split=["train"] * n, class_names=["a", "b"],
                errors=[], attrs=ATTRS)
    print("WROTE")
except FxtlError as exc:
    print("ERROR", type(exc).__name__, exc)
print("OLD ROWS", load_features(path).n)
"""


def test_file_size_limit_is_one_line_and_keeps_the_old_cache(tmp_path):
    cache = _valid(tmp_path / "c.h5")
    before = cache.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _FSIZE_CHILD, str(cache), str(ROOT)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # no segfault (was 139)
    out = proc.stdout.splitlines()
    assert out[0].startswith("ERROR CacheError") and "no space" in out[0] and str(cache) in out[0], out
    assert "File too large" in out[0]
    assert out[1] == "OLD ROWS 8"
    assert cache.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]  # no temporary left behind


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')"),
    OSError(errno.EFBIG, "File too large"),
])
def test_disk_full_while_writing_is_one_cache_error(tmp_path, failure):
    cache = _valid(tmp_path / "c.h5")
    before = cache.read_bytes()

    def chunks():
        yield np.zeros((4, 3), np.float32)
        raise failure

    with pytest.raises(CacheError) as info:
        write_cache(cache, chunks=chunks(), n=8, dim=3, labels=[0] * 8, paths=["a"] * 8,
                    split=["train"] * 8, class_names=["a"], errors=[], attrs=ATTRS)
    msg = str(info.value)
    assert "no space" in msg and str(cache) in msg and "\n" not in msg
    assert cache.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


def test_no_room_to_reserve_is_refused_before_hdf5_writes(tmp_path, monkeypatch):
    cache = _valid(tmp_path / "c.h5")
    before = cache.read_bytes()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(CacheError, match=r"no space \(No space left on device\)"):
        _valid(cache)
    assert cache.read_bytes() == before


# ----------------------------------------------------------------------------- item 10
def test_non_utf8_name_round_trips_through_export(tmp_path):
    bad = os.fsdecode(b"ants/bad\xff\xfe.jpg")
    cache = tmp_path / "c.h5"
    write_cache(cache, chunks=[np.ones((2, 2), np.float32)], n=2, dim=2, labels=[0, 1],
                paths=[bad, "bees/b.jpg"], split=["train", "val"], class_names=["ants", "bees"],
                errors=[], attrs=ATTRS)
    assert load_features(cache).paths == [bad, "bees/b.jpg"]
    r = CliRunner().invoke(cli, ["export", str(cache), "--format", "csv", "-o", str(tmp_path / "o.csv")])
    assert r.exit_code == 0, r.output
    assert b"ants/bad\xff\xfe.jpg," in (tmp_path / "o.csv").read_bytes()
    r = CliRunner().invoke(cli, ["export", str(cache), "--format", "npz", "-o", str(tmp_path / "o.npz")])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "o.npz") as z:
        assert list(z["paths"]) == [bad, "bees/b.jpg"]
