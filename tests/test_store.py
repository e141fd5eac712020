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
