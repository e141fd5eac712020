"""Several layers in one cache (`extract --layers`): the spec's datasets and attributes, a plain
h5py reader, reuse and resume, `info`, and the reader's lazy access."""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import fxtl
from fxtl.cli import cli
from fxtl.errors import ParameterError
from fxtl.features.extraction import parse_layers
from fxtl.features.store import FORMAT_VERSION, load_features, read_layer, summarize

DOC = Path(__file__).resolve().parents[1] / "docs" / "cache-format.md"
# timm's test_efficientnet (the `tiny` fixture): its stages at stride >= 8, and their widths
AUTO = {"blocks.2": 32, "blocks.3": 48, "blocks.4": 64}
KW = dict(batch_size=4, chunk_batches=1, workers=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from fxtl.data.samples import write_shapes

    return write_shapes(tmp_path_factory.mktemp("layers-data"), per_class=3, size=32)


@pytest.fixture(scope="module")
def layered(data, tiny, tmp_path_factory):
    """``extract --layers auto --json`` on 12 images with the tiny backbone."""
    cache_dir = tmp_path_factory.mktemp("layers-cache")
    r = CliRunner().invoke(cli, ["extract", str(data), "-b", tiny, "--layers", "auto",
                                 "--cache-dir", str(cache_dir), "--batch-size", "4",
                                 "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_auto_stores_the_later_stages_as_the_spec_says(layered):
    assert layered["layers"] == AUTO and layered["dim"] == 256 and layered["n"] == 12
    with h5py.File(layered["cache"], "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION == 3
        assert list(f.attrs["layers"]) == list(AUTO)
        g = f["layers"]
        assert isinstance(g, h5py.Group)
        assert (g.attrs["encoding-type"], g.attrs["encoding-version"]) == ("layer-set", "1")
        assert list(g.attrs["names"]) == list(AUTO)
        for name, dim in AUTO.items():
            ds = g[name]
            assert ds.shape == (12, dim) and ds.dtype == np.dtype("<f4")
            assert ds.chunks is not None and ds.chunks[1] == dim
            assert (ds.attrs["encoding-type"], ds.attrs["pooling"]) == ("dense-array", "global-average")
            assert np.isfinite(ds[...]).all() and ds[...].std() > 0
        assert f["features"].shape == (12, 256)  # /features is still the penultimate features


def test_layers_come_from_the_same_pass_as_single_layer_extraction(layered, data, tiny, tmp_path):
    """Each stored layer equals extracting that layer alone, and /features equals a plain cache."""
    fc = load_features(layered["cache"])
    plain = fxtl.extract(data, backbone=tiny, cache_dir=tmp_path, **KW)
    assert plain.cache != Path(layered["cache"]) and plain.layers == {}
    np.testing.assert_array_equal(load_features(plain.cache).features, fc.features)
    alone = fxtl.extract(data, backbone=tiny, layer="blocks.3", cache_dir=tmp_path, **KW)
    np.testing.assert_allclose(load_features(alone.cache).features, fc.layer("blocks.3"),
                               rtol=1e-5, atol=1e-6)


def test_a_plain_h5py_reader_gets_what_fxtl_gets(layered, tmp_path, monkeypatch):
    snippet = dict(re.findall(r"<!-- tested: (\S+) -->\s*```python\n(.*?)```",
                              DOC.read_text(encoding="utf-8"), flags=re.S))["h5py-layers"]
    (tmp_path / "cache.h5").write_bytes(Path(layered["cache"]).read_bytes())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet, scope)
    fc = load_features(layered["cache"])
    assert scope["names"] == fc.layer_names == list(AUTO)
    for name in AUTO:
        np.testing.assert_array_equal(scope["layers"][name], fc.layers[name])


def test_reader_reads_layers_lazily_and_names_what_is_missing(layered, monkeypatch):
    import fxtl.features.store as store

    reads: list[str] = []
    real = store.read_layer
    monkeypatch.setattr(store, "read_layer", lambda path, name: reads.append(name) or real(path, name))
    fc = load_features(layered["cache"])
    assert reads == [] and fc.layer_names == list(AUTO)  # loading reads no layer
    X = fc.layer("blocks.4")
    assert X.shape == (12, 64) and reads == ["blocks.4"]
    assert fc.layer("blocks.4") is X and reads == ["blocks.4"]  # read once
    np.testing.assert_array_equal(X, read_layer(layered["cache"], "blocks.4"))
    with pytest.raises(ParameterError, match=r"stores no layer 'blocks.9'.*blocks.2, blocks.3"):
        fc.layer("blocks.9")
    assert summarize(layered["cache"])["layers"] == AUTO


def test_a_named_list_keeps_its_order_and_gets_its_own_cache(data, tiny, tmp_path, layered):
    res = fxtl.extract(data, backbone=tiny, layers="blocks.4, blocks.2", cache_dir=tmp_path, **KW)
    assert list(res.layers) == ["blocks.4", "blocks.2"]
    assert res.fingerprint != layered["fingerprint"]
    fc = load_features(res.cache)
    np.testing.assert_array_equal(fc.layer("blocks.2"), load_features(layered["cache"]).layer("blocks.2"))
    with pytest.raises(fxtl.BackboneError, match="no layer 'blocks.99'"):
        fxtl.extract(data, backbone=tiny, layers=["blocks.99"], cache_dir=tmp_path, **KW)


def test_reuse_needs_no_network_and_matches_the_layer_list(layered, data, tiny, monkeypatch,
                                                          tmp_path):
    import fxtl.backbones.registry as registry
    import fxtl.features.extraction as extraction

    hit = fxtl.extract(data, backbone=tiny, layers="auto", cache_dir=Path(layered["cache"]).parent, **KW)
    assert hit.cache_hit and str(hit.cache) == layered["cache"] and hit.layers == AUTO
    # lite0's weights and preprocessing are known without a network, and "auto" is a named rule:
    # a hit with layers builds nothing
    first = fxtl.extract(data, layers="auto", cache_dir=tmp_path, **KW)
    assert list(first.layers) == [f"blocks.{i}" for i in range(2, 7)]

    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit built the network")

    monkeypatch.setattr(extraction, "load_backbone", no_build)
    monkeypatch.setattr(registry, "load_backbone", no_build)
    again = fxtl.extract(data, layers="auto", cache_dir=tmp_path, **KW)
    assert again.cache_hit and again.cache == first.cache and again.layers == first.layers
    with pytest.raises(AssertionError, match="built the network"):  # another list: not a hit
        fxtl.extract(data, layers="blocks.2", cache_dir=tmp_path, **KW)


def test_a_killed_run_resumes_with_its_layers(data, tiny, tmp_path, monkeypatch, layered):
    import fxtl.features.chunks as chunks
    import fxtl.features.extraction as extraction

    def fail(*args, **kwargs):
        raise RuntimeError("killed before the cache was written")

    monkeypatch.setattr(extraction, "write_rows", fail)
    with pytest.raises(RuntimeError, match="killed"):
        fxtl.extract(data, backbone=tiny, layers="auto", cache_dir=tmp_path, **KW)
    parts = next(tmp_path.glob("*.parts"))
    with np.load(parts / "chunk-000000.npz") as z:
        assert sorted(k for k in z.files if k.startswith("layer__")) == [f"layer__{n}" for n in AUTO]
    monkeypatch.setattr(extraction, "write_rows", chunks.write_rows)
    res = fxtl.extract(data, backbone=tiny, layers="auto", cache_dir=tmp_path, **KW)
    assert res.resumed_rows == 12 and not res.cache_hit and res.layers == AUTO
    ref = load_features(layered["cache"])
    for name in AUTO:
        np.testing.assert_array_equal(load_features(res.cache).layer(name), ref.layer(name))


def test_info_shows_the_layers(layered):
    r = CliRunner().invoke(cli, ["info", layered["cache"], "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["layers"] == list(AUTO) and d["layer_dims"] == AUTO and d["format_version"] == 3
    text = CliRunner().invoke(cli, ["info", layered["cache"]]).output
    assert "layers         blocks.2 (32), blocks.3 (48), blocks.4 (64)" in text


def test_a_version_2_cache_still_reads(layered, tmp_path):
    """A cache written before layers existed: version 2, no /layers."""
    old = tmp_path / "v2.h5"
    old.write_bytes(Path(layered["cache"]).read_bytes())
    with h5py.File(old, "r+") as f:
        del f["layers"]
        del f.attrs["layers"]
        f.attrs["format_version"] = np.int64(2)
    fc = load_features(old)
    assert fc.attrs["format_version"] == 2 and fc.layer_names == [] and fc.layers == {}
    np.testing.assert_array_equal(fc.features, load_features(layered["cache"]).features)


def test_parse_layers_and_what_cannot_combine(data, tiny, tmp_path):
    assert parse_layers("auto") == ("auto",)
    assert parse_layers(["blocks.2", "penultimate", "blocks.2"]) == ("blocks.2",)
    with pytest.raises(ParameterError, match="alone"):
        parse_layers("auto,blocks.2")
    with pytest.raises(ParameterError, match="shard or torchrun"):
        fxtl.extract(data, backbone=tiny, layers="auto", shard=(0, 2), cache_dir=tmp_path, **KW)
