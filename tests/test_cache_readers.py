"""The cache opens in every common HDF5 reader: the snippets of docs/cache-format.md, run.

One small cache is written by ``fxtl extract`` (the ``tiny`` backbone) from a folder whose names
are awkward on purpose: a non-ASCII class folder, a name holding a backslash, and a file name
that is not UTF-8. Each reader's documented snippet must give back the same features, labels,
paths, splits and class names as fxtl, and the paths must open the images.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fxtl.cli import cli
from fxtl.features.store import FORMAT_VERSION, load_features

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"
BAD_NAME = b"bad\xff\xfe.png"        # not UTF-8
ODD_NAME = "é\\x41.png".encode()     # UTF-8, with a backslash that looks like an escape


def _snippets() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- tested: (\S+) -->\s*```python\n(.*?)```", text, flags=re.S))


def _make_folder(root: Path, *, non_utf8: bool) -> Path:
    from fxtl.data.samples import write_shapes

    write_shapes(root, per_class=2, size=32)
    for split in ("train", "val"):
        os.rename(root / split / "square", root / split / "carré")
    circle = os.fsencode(root / "train" / "circle")
    first, second = sorted(os.listdir(circle))
    os.rename(os.path.join(circle, first), os.path.join(circle, ODD_NAME))
    if non_utf8:
        os.rename(os.path.join(circle, second), os.path.join(circle, BAD_NAME))
    return root


def _extract(data: Path, tiny: str, cache_dir: Path) -> Path:
    r = CliRunner().invoke(cli, ["extract", str(data), "-b", tiny, "--cache-dir", str(cache_dir),
                                 "--json", "--batch-size", "8", "--workers", "0"])
    assert r.exit_code == 0, r.output
    return Path(json.loads(r.stdout)["cache"])


@pytest.fixture(scope="module")
def awkward_cache(tmp_path_factory, tiny) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("awkward")
    data = _make_folder(root / "data", non_utf8=True)
    return _extract(data, tiny, root / "cache"), data


def test_extract_keeps_names_that_are_not_utf8(awkward_cache):
    cache, data = awkward_cache
    fc = load_features(cache)
    assert fc.attrs["format_version"] == FORMAT_VERSION == 3
    names = {os.fsencode(p).rsplit(b"/", 1)[-1] for p in fc.paths}
    assert {BAD_NAME, ODD_NAME} <= names
    for p in fc.paths:  # every stored path opens its image, byte for byte
        assert os.path.isfile(os.path.join(os.fsencode(data), os.fsencode(p))), p
    assert fc.class_names == ["carré", "circle"]
    assert fc.splits == {"train": 4, "val": 4}


@pytest.mark.parametrize("reader, module", [("h5py", "h5py"), ("pytables", "tables"),
                                            ("netcdf4", "netCDF4"), ("xarray", "h5netcdf")])
def test_every_reader_gets_what_fxtl_gets(awkward_cache, reader, module, tmp_path):
    pytest.importorskip(module)
    if reader == "xarray":
        pytest.importorskip("xarray")
    cache, _ = awkward_cache
    snippets = _snippets()
    local = tmp_path / "cache.h5"  # the snippets name the file cache.h5
    shutil.copyfile(cache, local)
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(snippets["unescape"], scope)
        exec(snippets[reader], scope)
    finally:
        os.chdir(cwd)
    fc = load_features(cache)
    np.testing.assert_array_equal(np.asarray(scope["X"]), fc.features)
    assert np.asarray(scope["X"]).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(scope["y"]), fc.labels)
    assert list(scope["paths"]) == fc.paths
    assert [str(s) for s in scope["split"]] == list(fc.split)
    assert list(scope["classes"]) == fc.class_names


def test_doc_has_a_snippet_per_reader_and_r_matlab_notes():
    assert {"unescape", "h5py", "pytables", "netcdf4", "xarray"} <= set(_snippets())
    text = DOC.read_text(encoding="utf-8")
    assert "```r\nlibrary(rhdf5)" in text and "h5read(f, '/features')'" in text
