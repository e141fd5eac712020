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
        # leave less room than a second cache needs, whatever the format's size per row
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 48_000))
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


def test_output_holding_another_datasets_cache_is_refused(tmp_path):
    """extract OTHER -o X.h5 never silently replaces X.h5 when it caches another dataset."""
    first = write_shapes(tmp_path / "first", per_class=2)
    other = write_shapes(tmp_path / "other", per_class=3)
    target = tmp_path / "X.h5"
    fxtl.extract(first, output=target, progress=False, workers=0, precision="bf16")
    before = target.read_bytes()
    r = CliRunner().invoke(cli, ["extract", str(other), "-o", str(target)])
    assert r.exit_code == 2, r.output  # a usage error on --output
    assert "another dataset" in r.output and str(first) in r.output and "Traceback" not in r.output
    assert target.read_bytes() == before
    res = fxtl.extract(first, output=target, progress=False, workers=0, precision="fp32")
    assert not res.cache_hit  # the same dataset with other options may be replaced
    res = fxtl.extract(other, output=target, progress=False, workers=0, force=True)
    assert load_features(target).n == 12 and res.n == 12


def test_file_size_limit_is_one_line_and_keeps_the_old_cache(tmp_path):
    """`ulimit -f` during extract: one line saying the file is too large, the old cache intact."""
    import resource

    data = write_shapes(tmp_path / "d", per_class=6)
    home = tmp_path / "c"
    old = fxtl.extract(data, cache_dir=home, precision="fp32", progress=False, workers=0)
    before = Path(old.cache).read_bytes()
    limit = 60 * 1024  # below one cache of 24 x 1280 float32, above a chunk of 8 rows

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "fxtl", "extract", str(data), "--cache-dir",
                           str(home), "--precision", "bf16", "--workers", "0"],
                          preexec_fn=limited, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(fxtl.__file__).parents[1])})
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fxtl:")]
    assert len(lines) == 1 and "file too large" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and str(home) in lines[0]
    assert Path(old.cache).read_bytes() == before
    assert not [p for p in home.iterdir() if p.name.endswith((".partial", ".tmp"))]


_SLOWED_EXTRACT = r"""
import signal, sys, time
import fxtl.features.chunks as chunks

# Python leaves SIGINT ignored when it starts ignored (a shell's background job, nohup): this
# test is about what fxtl does on Ctrl-C, so the child takes Ctrl-C as a terminal's would.
signal.signal(signal.SIGINT, signal.default_int_handler)

stage = sys.argv[1]


def slowed(items):
    for item in items:
        print("fxtl-test: " + stage, file=sys.stderr, flush=True)
        time.sleep(60)  # the test interrupts us here
        yield item


name = "embed_paths" if stage == "computing" else "_kept_features"
original = getattr(chunks, name)
setattr(chunks, name, lambda *a, **k: slowed(original(*a, **k)))
from fxtl.cli import main

sys.argv = ["fxtl", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("stage", ["computing", "writing"])
def test_ctrl_c_during_extract_keeps_the_previous_cache(tmp_path, shapes_dir, tiny, stage):
    """SIGINT (Ctrl-C) while `extract --force` recomputes the features, or while it writes the
    new cache: one line, exit 130, the previous cache byte for byte, no temporary file."""
    import signal
    import time

    out = tmp_path / "c" / "shapes.h5"
    args = ["extract", str(shapes_dir), "--backbone", tiny, "-o", str(out), "--workers", "0",
            "--batch-size", "8"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    before = out.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _SLOWED_EXTRACT, stage, *args, "--force", "--json"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            if f"fxtl-test: {stage}" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "Traceback" not in rest
    message = "interrupted (work done so far is kept; run again to resume)"
    said = [x for x in rest.replace("\r", "\n").splitlines() if x.startswith("fxtl: ")]
    assert said == ["fxtl: " + message], rest  # (a progress bar may close after it)
    assert json.loads(stdout) == {"error": message, "exit_code": 130}
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir() if p.is_file()) == ["shapes.h5", "shapes.h5.lock"] \
        or sorted(p.name for p in out.parent.iterdir() if p.is_file()) == ["shapes.h5"]
    assert load_features(out).n == 24
