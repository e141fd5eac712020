"""The dataset changes between runs: the fingerprint changes and a new cache is built; the old one
is never silently reused, and it is left intact for whoever still uses it.

tests/test_data.py checks the fingerprint itself and tests/test_extract.py an added file; here
`fxtl extract` runs after a file is modified, removed and renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from fxtl.cli import cli
from fxtl.data.samples import write_shapes
from fxtl.features.store import load_features


def _extract(data: Path, home: Path, *more: str) -> dict:
    r = CliRunner().invoke(cli, ["extract", str(data), "--cache-dir", str(home), "--json",
                                 "--workers", "0", "--precision", "fp32", *more])
    assert r.exit_code == 0, r.output[-3000:]
    return json.loads(r.stdout)


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_modified_removed_renamed_files_make_a_new_cache(tmp_path):
    data = write_shapes(tmp_path / "data", per_class=2)
    home = tmp_path / "home"
    first = _extract(data, home)
    assert not first["cache_hit"] and _extract(data, home)["cache_hit"]
    kept = {first["cache"]: _sha(first["cache"])}

    target = data / "train" / "circle" / "circle_0.png"
    st = target.stat()
    Image.new("RGB", (64, 64), (250, 20, 20)).save(target)  # other content, mtime moves on
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    modified = _extract(data, home)
    assert not modified["cache_hit"] and modified["cache"] not in kept and modified["n"] == first["n"]
    old, new = load_features(first["cache"]), load_features(modified["cache"])
    row = old.paths.index("train/circle/circle_0.png")
    assert not np.allclose(old.features[row], new.features[row])  # really re-extracted
    np.testing.assert_array_equal(np.delete(old.features, row, 0), np.delete(new.features, row, 0))
    kept[modified["cache"]] = _sha(modified["cache"])

    (data / "val" / "square" / "square_0.png").unlink()
    removed = _extract(data, home)
    assert not removed["cache_hit"] and removed["cache"] not in kept and removed["n"] == first["n"] - 1
    assert "val/square/square_0.png" not in load_features(removed["cache"]).paths
    kept[removed["cache"]] = _sha(removed["cache"])

    target.rename(target.with_name("renamed.png"))
    renamed = _extract(data, home)
    assert not renamed["cache_hit"] and renamed["cache"] not in kept
    assert "train/circle/renamed.png" in load_features(renamed["cache"]).paths

    for cache, digest in kept.items():  # every earlier cache is still there, byte for byte
        assert _sha(cache) == digest


def test_edit_that_keeps_size_and_mtime_needs_force(tmp_path):
    """The documented limit of a stat-based fingerprint (like make's): an edit that restores
    size and mtime is not seen. --force re-extracts; the features then follow the new pixels."""
    data = write_shapes(tmp_path / "data", per_class=2)
    home = tmp_path / "home"
    target = data / "train" / "circle" / "circle_0.png"
    Image.open(target).convert("RGB").save(target.with_suffix(".ppm"))  # raw: size fixed by w x h
    target.unlink()
    target = target.with_suffix(".ppm")
    first = _extract(data, home)
    old = load_features(first["cache"])
    row = old.paths.index("train/circle/circle_0.ppm")
    st = target.stat()
    Image.new("RGB", Image.open(target).size, (20, 20, 250)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size
    assert _extract(data, home)["cache_hit"]  # the limit, stated in docs/reliability.md
    forced = _extract(data, home, "--force")
    assert not forced["cache_hit"] and forced["cache"] == first["cache"]  # same inputs, same name
    assert not np.allclose(load_features(forced["cache"]).features[row], old.features[row])
