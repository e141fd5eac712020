"""Faults around extraction: concurrent runs, a full disk, a read-only cache directory."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fxtl
from fxtl.cli import cli
from fxtl.data.samples import write_shapes
from fxtl.features.store import load_features


@contextlib.contextmanager
def small_fs(path: Path, size: str):
    """A real tmpfs of ``size`` mounted at ``path`` (needs root, as in CI; else skip)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the fault needs a real small disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_two_extracts_at_once_one_waits(tmp_path):
    data = write_shapes(tmp_path / "d", per_class=4)
    code = ("import sys, json, fxtl; r = fxtl.extract(sys.argv[1], cache_dir=sys.argv[2], "
            "progress=False, workers=0); print(json.dumps(r.to_dict()))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(data), str(tmp_path / "c")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert results[0]["cache"] == results[1]["cache"]
    assert sorted(r["cache_hit"] for r in results) == [False, True]  # one computed, one reused
    fc = load_features(results[0]["cache"])
    assert fc.n == 16 and fc.attrs["complete"]
    leftovers = [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith((".h5", ".lock"))]
    assert leftovers == []


def test_disk_full_keeps_previous_cache(tmp_path):
    data = write_shapes(tmp_path / "d", per_class=6)
    with small_fs(tmp_path / "disk", "580k") as disk:
        old = fxtl.extract(data, cache_dir=disk, precision="fp32", progress=False)
        before = load_features(old.cache).features.copy()
        r = CliRunner().invoke(cli, ["extract", str(data), "--cache-dir", str(disk),
                                     "--precision", "bf16"])
        assert r.exit_code == 1, r.output
        line = [l for l in r.output.splitlines() if l.startswith("fxtl: error:")]
        assert len(line) == 1 and "No space left" in line[0], r.output
        assert "Traceback" not in r.output
        np.testing.assert_array_equal(load_features(old.cache).features, before)
        assert not [p for p in disk.iterdir() if p.name.endswith(".partial")]


def test_read_only_cache_dir_is_clear_error(tmp_path):
    data = write_shapes(tmp_path / "d", per_class=3)
    with small_fs(tmp_path / "ro", "2m") as disk:
        old = fxtl.extract(data, cache_dir=disk, precision="fp32", progress=False)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        r = CliRunner().invoke(cli, ["extract", str(data), "--cache-dir", str(disk), "--precision", "bf16"])
        assert r.exit_code == 1
        assert "not writable" in r.output and "--cache-dir" in r.output
        assert "Traceback" not in r.output
        # the existing cache is still served from the read-only place
        hit = fxtl.extract(data, cache_dir=disk, precision="fp32", progress=False)
        assert hit.cache_hit and hit.cache == old.cache
