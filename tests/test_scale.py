"""Extraction at scale: torchrun ranks and --shard I/N shards merge into the single-process cache."""
from __future__ import annotations

import importlib
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

import fxtl
from fxtl.cli import cli
from fxtl.distributed import TorchrunEnv, parse_shard, rank_budget, shard_rows, torchrun_env
from fxtl.errors import FxtlError
from fxtl.features.store import load_features

fx = importlib.import_module("fxtl.features.extraction")  # the module (``fxtl.extract`` is also the function)
ROOT = Path(__file__).resolve().parents[1]
# fp32 and a batch of 4 over 12 images: 3 batches, so shard 0/2 holds 1 batch and shard 1/2 two.
OPTS = ["--precision", "fp32", "--batch-size", "4", "--workers", "0"]
KW = dict(precision="fp32", batch_size=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from fxtl.data.samples import write_shapes

    return write_shapes(tmp_path_factory.mktemp("scale") / "d", per_class=3)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The single-process cache everything else must reproduce."""
    res = fxtl.extract(data, cache_dir=tmp_path_factory.mktemp("ref"), **KW)
    return load_features(res.cache)


@pytest.fixture(scope="module")
def shard_files(data, tmp_path_factory) -> list[Path]:
    """Shards 0/2 and 1/2 of ``data``, written once by the CLI; tests copy them."""
    cache = tmp_path_factory.mktemp("shards")
    out = []
    for i in (0, 1):
        r = CliRunner().invoke(cli, ["extract", str(data), "--cache-dir", str(cache), "--shard",
                                     f"{i}/2", "--json", *OPTS])
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["shard_index"] == i and d["shards"] == 2 and not Path(d["cache"]).exists()
        out.append(Path(d["shard_file"]))
    return out


def copy_shards(files: list[Path], dest: Path) -> Path:
    folder = dest / (files[0].parent.name)
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, folder / f.name)
    return folder


def assert_same_cache(merged, ref, *, exact: bool) -> None:
    assert merged.paths == ref.paths
    np.testing.assert_array_equal(merged.labels, ref.labels)
    np.testing.assert_array_equal(merged.split, ref.split)
    assert merged.class_names == ref.class_names and merged.errors == ref.errors
    for key in ("fingerprint", "backbone", "weights_sha256", "preprocessing", "precision", "layer",
                "dataset_root", "format", "format_version", "n", "dim", "complete"):
        assert merged.attrs[key] == ref.attrs[key], key
    if exact:  # same batches, same threads: the same floats
        np.testing.assert_array_equal(merged.features, ref.features)
    else:  # another thread count per rank may reorder float sums
        np.testing.assert_allclose(merged.features, ref.features, rtol=1e-4, atol=1e-4)
    with h5py.File(merged.path, "r") as f:  # one self-contained file, not virtual datasets
        assert not f["features"].is_virtual
        assert f.attrs["shards"] == 2


def torchrun(data: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fxtl", "extract", str(data), "--cache-dir", str(cache), "--json",
           "--precision", "fp32", "--batch-size", "4", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")})


# ----------------------------------------------------------------------------- plans
def test_shard_rows_are_disjoint_batch_aligned_and_cover():
    for n in (0, 1, 7, 12, 100, 1001):
        for count in (1, 2, 3, 8):
            rows = shard_rows(n, count, 4)
            assert rows[0][0] == 0 and rows[-1][1] == n and len(rows) == count
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))  # contiguous, disjoint
            assert all(lo % 4 == 0 for lo, _ in rows)  # batches are the single-process batches
            sizes = [hi - lo for lo, hi in rows]
            assert max(sizes) - min(sizes) <= 4 or n < 4 * count
    assert shard_rows(12, 2, 4) == [(0, 4), (4, 12)]


def test_parse_shard_and_torchrun_env():
    assert parse_shard("3/4") == (3, 4) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "1", "-1/2", "a/b", "1/0"):
        with pytest.raises(FxtlError):
            parse_shard(bad)
    assert torchrun_env({}) is None
    assert torchrun_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = torchrun_env({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
    assert env == TorchrunEnv(rank=5, world_size=8, local_rank=1, local_world_size=4)
    with pytest.raises(FxtlError, match="outside WORLD_SIZE"):
        torchrun_env({"WORLD_SIZE": "2", "RANK": "2"})
    # CPU ranks split the node's cores and decode in-process when their share is small
    assert rank_budget(TorchrunEnv(0, 2, 0, 2), cuda=False, cores=2) == (1, 0)
    assert rank_budget(TorchrunEnv(0, 2, 0, 2), cuda=False, cores=16) == (6, 2)


def test_shard_option_usage_errors(data):
    r = CliRunner().invoke(cli, ["extract", str(data), "--shard", "2/2"])
    assert r.exit_code == 2 and "0 <= I < N" in r.output


# ----------------------------------------------------------------------------- --shard + merge
def test_shards_merge_into_the_single_process_cache(shard_files, reference, tmp_path):
    folder = copy_shards(shard_files, tmp_path)
    r = CliRunner().invoke(cli, ["merge", str(folder), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    cache = Path(d["cache"])
    assert cache == tmp_path / shard_files[0].parent.name.removesuffix(".shards")
    assert d["n"] == 12 and d["shards"] == 2 and not d["cache_hit"]
    assert [s["rows"] for s in d["shard_runs"]] == [[0, 4], [4, 12]]
    assert_same_cache(load_features(cache), reference, exact=True)
    assert not folder.exists()  # merged shards are removed
    again = CliRunner().invoke(cli, ["merge", str(cache), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["cache_hit"] is True


def test_crashed_shard_resumes_only_its_missing_chunks(data, shard_files, reference, tmp_path,
                                                        monkeypatch):
    class Crash(Exception):
        pass

    import fxtl.features.chunks as chunks

    save = chunks.save_chunk

    def crash_after_first_chunk(parts, k, *args, **kwargs):
        save(parts, k, *args, **kwargs)
        if k == 0:
            raise Crash

    monkeypatch.setattr(chunks, "save_chunk", crash_after_first_chunk)
    kw = dict(KW, cache_dir=tmp_path, chunk_batches=1)  # shard 1/2 = 8 rows = 2 chunks of 4
    with pytest.raises(Crash):
        fxtl.extract(data, shard=(1, 2), **kw)
    monkeypatch.undo()
    res = fxtl.extract(data, shard=(1, 2), **kw)
    assert res.resumed_rows == 4 and res.shard_runs[0]["images_computed"] == 4
    assert not res.shard_file.with_name(res.shard_file.name + ".parts").exists()
    assert fxtl.extract(data, shard=(1, 2), **kw).cache_hit  # a complete shard is reused
    shutil.copy2(shard_files[0], res.shard_file.parent)
    merged = fx.merge_shards([res.cache])
    assert merged.cache == res.cache
    assert_same_cache(load_features(merged.cache), reference, exact=True)


def test_merge_refuses_a_missing_shard(shard_files, tmp_path):
    folder = copy_shards(shard_files[:1], tmp_path)
    r = CliRunner().invoke(cli, ["merge", str(folder)])
    assert r.exit_code == 1
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("fxtl: error: missing 1 of 2 shards")
    assert str(folder / "shard-00001-of-00002.h5") in lines[0] and "shard=(I, 2)" in lines[0]
    assert not list(tmp_path.glob("*.h5"))  # nothing written
    assert (folder / shard_files[0].name).exists()  # and nothing deleted


def test_merge_refuses_mismatched_shards(data, shard_files, tmp_path):
    # a shard of other inputs (as if extracted from a changed dataset)
    folder = copy_shards(shard_files, tmp_path / "a")
    odd = folder / shard_files[1].name
    with h5py.File(odd, "r+") as f:
        f.attrs["fingerprint"] = "0" * 64
    r = CliRunner().invoke(cli, ["merge", str(folder)])
    assert r.exit_code == 1 and str(odd) in r.output and "other images or options" in r.output
    assert len([l for l in r.output.splitlines() if l.strip()]) == 1
    # a shard cut with another batch size: same fingerprint, rows that do not tile
    other = fxtl.extract(data, shard=(1, 2), cache_dir=tmp_path / "b",
                         **dict(KW, batch_size=8))  # rows 8-12
    folder = copy_shards(shard_files[:1], tmp_path / "c")
    shutil.copy2(other.shard_file, folder)
    r = CliRunner().invoke(cli, ["merge", str(folder)])
    assert r.exit_code == 1 and "covers rows 8-12" in r.output and "batch size" in r.output
    # not a shard at all
    r = CliRunner().invoke(cli, ["merge", __file__])
    assert r.exit_code == 1 and "not an HDF5 file" in r.output


# ----------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_equal_single_process(data, reference, tmp_path):
    p = torchrun(data, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [l for l in p.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, p.stdout  # only rank 0 reports
    d = json.loads(lines[0])
    assert d["world_size"] == 2 and d["shards"] == 2 and d["n"] == 12 and not d["cache_hit"]
    assert [(s["index"], s["rows"], s["images_computed"]) for s in d["shard_runs"]] == \
        [(0, [0, 4], 4), (1, [4, 12], 8)]
    assert_same_cache(load_features(d["cache"]), reference, exact=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(d["cache"]).name]  # no .lock left


def test_torchrun_rerun_computes_only_the_missing_shard(data, shard_files, reference, tmp_path):
    """Rank 1's shard survived a crash of the job: the re-run computes only rank 0's rows."""
    copy_shards(shard_files[1:], tmp_path)
    p = torchrun(data, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout.strip().splitlines()[-1])
    runs = {s["index"]: s for s in d["shard_runs"]}
    assert runs[1]["reused"] and runs[0]["images_computed"] == 4 and not runs[0]["reused"]
    assert_same_cache(load_features(d["cache"]), reference, exact=False)
