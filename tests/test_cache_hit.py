"""A cache hit answers from the cache alone: no network built, and the commands that only read a
cache never import torch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fxtl
from fxtl.data.discovery import discover, fingerprint
from fxtl.features.store import read_attrs


def test_cache_hit_never_builds_a_model(shapes_dir, shapes_cache, monkeypatch):
    import fxtl.backbones.registry as registry
    import fxtl.features.extraction as extraction

    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit built the network")

    monkeypatch.setattr(registry, "load_backbone", no_build)
    monkeypatch.setattr(extraction, "load_backbone", no_build)
    res = fxtl.extract(shapes_dir, cache_dir=shapes_cache.parent, progress=False)
    assert res.cache_hit and res.cache == shapes_cache
    assert res.n == 24 and res.dim == 1280 and res.splits == {"train": 12, "val": 12}
    assert res.backbone == "lite0" and res.layer == "pooled"


def test_new_caches_record_the_data_fingerprint(shapes_dir, shapes_cache):
    attrs = read_attrs(shapes_cache)
    assert attrs["data_fingerprint"] == fingerprint(discover(shapes_dir))  # no extra parts
    assert attrs["data_fingerprint"] != attrs["fingerprint"]


_NO_TORCH = """
import json, sys
from click.testing import CliRunner
from fxtl.cli import cli
out = {}
for name, args in json.loads(sys.argv[1]).items():
    r = CliRunner().invoke(cli, args)
    out[name] = {"exit": r.exit_code, "torch": "torch" in sys.modules,
                 "sklearn": "sklearn" in sys.modules, "output": r.output[-400:]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def reader_runs(shapes_dir, shapes_cache, tmp_path_factory):
    """Each command in its own fresh process (so one command's imports do not mask another's)."""
    tmp = tmp_path_factory.mktemp("reader")
    commands = {"info": ["info", str(shapes_cache), "--json"],
                "extract-hit": ["extract", str(shapes_dir), "--cache-dir", str(shapes_cache.parent),
                                "--json"],
                "export": ["export", str(shapes_cache), "--format", "npz", "-o", str(tmp / "f.npz")],
                "fit-head": ["fit-head", str(shapes_cache), "--model", "logreg", "--cache-dir",
                             str(tmp), "--json"],
                "compare": ["compare", "--cache-dir", str(tmp), "--json"]}
    runs = {}
    for name, args in commands.items():
        proc = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps({name: args})],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs


@pytest.mark.parametrize("command", ["info", "export", "extract-hit"])
def test_cache_readers_import_neither_torch_nor_sklearn(reader_runs, command):
    run = reader_runs[command]
    assert run["exit"] == 0, run["output"]
    assert run["torch"] is False and run["sklearn"] is False
    if command == "extract-hit":
        assert '"cache_hit": true' in run["output"]


def test_compare_does_not_import_torch(reader_runs):
    run = reader_runs["compare"]
    assert run["exit"] == 0, run["output"]
    assert '"skipped": [], "groups": ["' in run["output"]  # it compared the head fitted before
    assert run["torch"] is False


def test_fit_head_on_a_small_cache_does_not_import_torch(reader_runs):
    """Small data is fitted with scikit-learn (torch solvers start from TORCH_MIN_VALUES)."""
    run = reader_runs["fit-head"]
    assert run["exit"] == 0, run["output"]
    assert run["torch"] is False
