"""The cache format: readable with plain h5py, versioned, and refused when foreign."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from fxtl.errors import CacheError
from fxtl.features.store import FORMAT_VERSION, load_features, write_cache


def _write(path, n=5, dim=4, **over):
    attrs = {"backbone": "lite0", "weights_sha256": "0" * 64, "preprocessing": {"crop": 224},
             "precision": "fp32", "layer": "pooled", "fingerprint": "f" * 64, "created": "now",
             "fxtl_version": "0.1.0"}
    attrs.update(over)
    feats = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    write_cache(path, chunks=[feats[:2], feats[2:]], n=n, dim=dim, labels=[0, 1, 0, 1, 1][:n],
                paths=[f"img{i}.jpg" for i in range(n)], split=["train"] * 3 + ["val"] * (n - 3),
                class_names=["ants", "bees"], errors=[("bad.jpg", "truncated image")], attrs=attrs)
    return feats


def test_plain_h5py_reads_the_spec(tmp_path):
    path = tmp_path / "c.h5"
    feats = _write(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "fxtl-features"
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert f["features"].dtype == np.float32 and f["features"].shape == (5, 4)
        assert f["features"].chunks is not None
        np.testing.assert_array_equal(f["features"][...], feats)
        assert f["labels"].dtype == np.int64
        assert [p.decode() for p in f["paths"][...]] == [f"img{i}.jpg" for i in range(5)]
        assert [s.decode() for s in f["split"][...]] == ["train"] * 3 + ["val"] * 2
        assert list(f.attrs["class_names"]) == ["ants", "bees"]
        assert json.loads(f.attrs["preprocessing"]) == {"crop": 224}
        assert f.attrs["complete"]
        assert f["errors/path"][0].decode() == "bad.jpg"
        assert f["errors/reason"][0].decode() == "truncated image"
        assert f["features"].attrs["encoding-type"] == "dense-array"


def test_round_trip(tmp_path):
    path = tmp_path / "c.h5"
    feats = _write(path)
    fc = load_features(path)
    np.testing.assert_array_equal(fc.features, feats)
    assert fc.splits == {"train": 3, "val": 2}
    assert fc.class_names == ["ants", "bees"]
    assert fc.errors == [("bad.jpg", "truncated image")]
    X, y = fc.subset("val")
    assert X.shape == (2, 4) and list(y) == [1, 1]
    assert fc.provenance["backbone"] == "lite0"


def test_not_hdf5_refused(tmp_path):
    p = tmp_path / "x.h5"
    p.write_text("hello")
    with pytest.raises(CacheError, match="not an HDF5 file"):
        load_features(p)


def test_other_hdf5_refused(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(CacheError, match="not an fxtl feature cache"):
        load_features(p)


def test_newer_version_refused(tmp_path):
    p = tmp_path / "c.h5"
    _write(p)
    with h5py.File(p, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(CacheError, match="upgrade fxtl"):
        load_features(p)


def test_incomplete_refused(tmp_path):
    p = tmp_path / "c.h5"
    _write(p)
    with h5py.File(p, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match="incomplete"):
        load_features(p)


def test_failed_write_leaves_old_file(tmp_path):
    p = tmp_path / "c.h5"
    old = _write(p)

    def bad_chunks():
        yield np.zeros((2, 4), np.float32)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_cache(p, chunks=bad_chunks(), n=5, dim=4, labels=[0] * 5, paths=["a"] * 5,
                    split=["train"] * 5, class_names=["a", "b"], errors=[], attrs={})
    np.testing.assert_array_equal(load_features(p).features, old)
    assert [x.name for x in tmp_path.iterdir()] == ["c.h5"]


# ----------------------------------------------------------------------------- format version 1
def write_v1_cache(path, *, n=5, dim=4):
    """A cache written the way fxtl wrote version 1: variable-length strings, boolean complete."""
    str_dt = h5py.string_dtype("utf-8")
    feats = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, chunks=(n, dim))
        f.create_dataset("labels", data=np.array([0, 1, 0, 1, -1][:n], dtype=np.int64))
        f.create_dataset("paths", data=[f"é{i}.jpg" for i in range(n)], dtype=str_dt)
        f.create_dataset("split", data=["train"] * 3 + ["val"] * (n - 3), dtype=str_dt)
        g = f.create_group("errors")
        g.create_dataset("path", data=["bad.jpg"], dtype=str_dt, shape=(1,))
        g.create_dataset("reason", data=["truncated image"], dtype=str_dt, shape=(1,))
        for obj in (f["features"], f["labels"], f["paths"], f["split"], g):
            obj.attrs["encoding-type"] = "x"
            obj.attrs["encoding-version"] = "1"
        attrs = {"backbone": "lite0", "weights_sha256": "0" * 64,
                 "preprocessing": json.dumps({"crop": 224}), "precision": "fp32", "layer": "pooled",
                 "fingerprint": "f" * 64, "created": "now", "fxtl_version": "0.1.0",
                 "versions": json.dumps({"h5py": "3"})}
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["class_names"] = np.array(["ants", "bées"], dtype=object)
        f.attrs["format"] = "fxtl-features"
        f.attrs["format_version"] = 1
        f.attrs["n"], f.attrs["dim"] = n, dim
        f.attrs["complete"] = True
    return feats


def test_version_1_files_stay_readable(tmp_path):
    from fxtl.features.store import iter_feature_chunks, read_errors, summarize

    p = tmp_path / "v1.h5"
    feats = write_v1_cache(p)
    fc = load_features(p)
    np.testing.assert_array_equal(fc.features, feats)
    assert fc.paths == [f"é{i}.jpg" for i in range(5)]
    assert fc.class_names == ["ants", "bées"]
    assert list(fc.labels) == [0, 1, 0, 1, -1]
    assert fc.attrs["format_version"] == 1 and fc.attrs["complete"] is True
    assert fc.attrs["preprocessing"] == {"crop": 224}
    assert read_errors(p) == [{"path": "bad.jpg", "reason": "truncated image"}]
    assert summarize(p)["splits"] == {"train": 3, "val": 2}
    assert sum(len(X) for X, _ in iter_feature_chunks(p, rows=2, split="train")) == 3


def test_version_2_storage_types(tmp_path):
    """Fixed-length UTF-8 strings, uint8 booleans, stamps: what PyTables needs (issue 16)."""
    p = tmp_path / "c.h5"
    _write(p, data_fingerprint="ab" * 32, flag=True)
    with h5py.File(p, "r") as f:
        for name in ("paths", "split", "errors/path", "errors/reason"):
            ds = f[name]
            tid = ds.id.get_type()
            assert not tid.is_variable_str() and tid.get_cset() == h5py.h5t.CSET_UTF8, name
            assert ds.attrs["encoding-type"] == "string-array" and ds.attrs["encoding-version"] == "2"
            assert ds.attrs["_Encoding"] == "utf-8"
        assert f["paths"].dtype.itemsize == len("img0.jpg")  # sized to the longest value
        assert f.attrs["complete"].dtype == np.uint8 and f.attrs["flag"].dtype == np.uint8
        assert f.attrs["format_version"] == 3
        assert "escaped" not in f.attrs
    assert load_features(p).attrs["data_fingerprint"] == "ab" * 32


def test_names_that_are_not_utf8_round_trip(tmp_path):
    import os

    from fxtl.features.cache_text import escape, unescape
    from fxtl.features.store import read_attrs, read_errors

    bad = os.fsdecode(b"ants/bad\xff\xfe.jpg")
    tricky = ["a\\b.jpg", "x\\xff.jpg", "é.jpg", bad, "\\\\", ""]
    assert [unescape(escape(t)) for t in tricky] == tricky
    p = tmp_path / "c.h5"
    paths = [bad, "a\\b.jpg", "x\\xff.jpg", "é.jpg", "ok.jpg"]
    root = os.fsdecode(b"/data/r\xe9union")
    feats = np.ones((5, 2), np.float32)
    write_cache(p, chunks=[feats], n=5, dim=2, labels=[0, 1, 0, 1, 0], paths=paths,
                split=["train"] * 5, class_names=["a", os.fsdecode(b"caf\xe9")],
                errors=[(bad, f"cannot identify image file {bad}")],
                attrs={"dataset_root": root, "backbone": "b", "weights_sha256": "0",
                       "preprocessing": {"note": bad}, "precision": "fp32", "layer": "pooled",
                       "fingerprint": "f", "created": "now", "fxtl_version": "t"})
    fc = load_features(p)
    assert fc.paths == paths
    assert fc.class_names == ["a", os.fsdecode(b"caf\xe9")]
    assert fc.attrs["dataset_root"] == root and fc.attrs["preprocessing"] == {"note": bad}
    assert read_errors(p) == [{"path": bad, "reason": f"cannot identify image file {bad}"}]
    assert "escaped" not in read_attrs(p)
    with h5py.File(p, "r") as f:  # what a reader without fxtl sees: valid UTF-8, escaped
        assert set(f.attrs["escaped"]) == {"/paths", "/errors/path", "/errors/reason",
                                           "@dataset_root", "@class_names"}
        assert f["paths"].asstr()[0] == "ants/bad\\xff\\xfe.jpg"
        assert f["paths"].asstr()[1] == "a\\\\b.jpg"
        assert f["split"].asstr()[0] == "train"  # elements without such names stay plain


def test_public_readers_for_errors_and_provenance(tmp_path):
    from fxtl.features.store import PROVENANCE_KEYS, provenance, read_attrs, read_errors

    p = tmp_path / "c.h5"
    _write(p, data_fingerprint="cd" * 32)
    assert read_errors(p) == [{"path": "bad.jpg", "reason": "truncated image"}]
    prov = provenance(read_attrs(p))
    assert prov == {"backbone": "lite0", "weights_sha256": "0" * 64, "preprocessing": {"crop": 224},
                    "precision": "fp32", "layer": "pooled", "fingerprint": "f" * 64,
                    "data_fingerprint": "cd" * 32, "fxtl_version": "0.1.0", "created": "now"}
    assert set(prov) <= set(PROVENANCE_KEYS)
    assert load_features(p).provenance == prov
