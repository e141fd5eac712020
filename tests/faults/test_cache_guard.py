"""A cache on which libhdf5 itself crashes (SIGSEGV) or loops for ever is refused with one line:
fxtl reads a cache in a child process first (fxtl/features/cache_guard.py, fxtl/_isolate.py)."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

import h5py
import pytest
from fxtl import _isolate
from fxtl.data import discovery
from fxtl.errors import CacheError
from fxtl.features import cache_guard, cache_probe
from fxtl.features.cache_guard import CacheGuard
from fxtl.features.store import load_features, read_attrs

# The fuzz benchmark's valid cache (format version 2, as benchmarks/fuzz_cache.py wrote it when
# the flips below were found), stored byte for byte: a newer writer lays the file out otherwise.
FUZZED = Path(__file__).parent / "data" / "fuzz-valid-v2.h5"
from benchmarks.fuzz_cache import valid_cache as _valid  # today's writer, for the other tests

from ._cli import assert_one_line_error, run_fxtl

# One byte flipped in this cache (found by benchmarks/fuzz_cache.py, seeds 1 and 14) makes
# HDF5 2.0 crash with SIGSEGV, or spin for ever, while h5py reads the root attributes.
CRASH_FLIP, HANG_FLIP = (13657, 247), (2057, 36)
# The HDF5 these flips were found with, and the stored file's sha256. Under another HDF5 the
# flips may damage the file differently: the crash and hang parts are then skipped, visibly.
LAYOUT_HDF5, LAYOUT_SHA256 = "2.0.0", "5e5d1d6581074042220f3525d09889356b990fa2c72dd50a68ab13ddfecda235"


def _flipped(tmp_path: Path, name: str, flip: tuple[int, int]) -> tuple[Path, bool]:
    """A copy of the valid cache with one byte flipped; True if it has the known layout.

    False when the file is not the one the flips were found in (see :func:`_skip_unless_known`).
    """
    data = bytearray(FUZZED.read_bytes())
    assert hashlib.sha256(data).hexdigest() == LAYOUT_SHA256, f"{FUZZED} was changed"
    known = h5py.version.hdf5_version == LAYOUT_HDF5
    data[flip[0]] ^= flip[1]
    out = tmp_path / name
    out.write_bytes(bytes(data))
    return out, known


def _skip_unless_known(known: bool, what: str) -> None:
    """Skip (visibly) the part of a test that needs the HDF5 the flips were found with."""
    if not known:
        pytest.skip(f"HDF5 {h5py.version.hdf5_version} is not HDF5 {LAYOUT_HDF5}, with which the "
                    f"flips were found (find them again with benchmarks/fuzz_cache.py): the {what} "
                    "was not tested")


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "re-create it with `fxtl extract`" in msg, msg
    return msg


@pytest.mark.parametrize("how", ["fork", "spawn"])
def test_a_cache_that_crashes_libhdf5_is_one_line(tmp_path, monkeypatch, how):
    bad, known = _flipped(tmp_path, "crash.h5", CRASH_FLIP)
    monkeypatch.setattr(_isolate, "_may_fork", lambda: how == "fork")
    with CacheGuard():
        t0 = time.monotonic()
        with pytest.raises(CacheError) as exc:
            load_features(bad)
        msg = _one_line(exc, bad)
        assert time.monotonic() - t0 < 10
        # The guard remembers the verdict: the same line again, without another child.
        monkeypatch.setattr(_isolate, "_probe_forked", None)
        monkeypatch.setattr(_isolate, "_probe_spawned", None)
        with pytest.raises(CacheError, match="re-create it"):
            read_attrs(bad)
    _skip_unless_known(known, "crash")
    assert "crashed the HDF5 library (SIGSEGV)" in msg


def test_a_cache_that_crashes_libhdf5_is_one_line_from_the_cli(tmp_path):
    bad, known = _flipped(tmp_path, "crash.h5", CRASH_FLIP)
    lines = []
    for command in (["info"], ["fit-head", "--model", "logreg", "--cache-dir", tmp_path / "c"],
                    ["export", "--format", "csv", "-o", tmp_path / "x.csv"]):
        r = run_fxtl(*command[:1], bad, *command[1:], timeout=120)
        lines.append(assert_one_line_error(r.returncode, r.stderr, str(bad), "fxtl extract"))
    _skip_unless_known(known, "crash")
    assert all("crashed the HDF5 library" in line for line in lines), lines


def test_a_cache_that_hangs_libhdf5_is_one_line_within_seconds(tmp_path, monkeypatch):
    bad, known = _flipped(tmp_path, "hang.h5", HANG_FLIP)
    monkeypatch.setattr(cache_guard, "PROBE_SECONDS", 2.0)
    monkeypatch.setattr(_isolate, "_may_fork", lambda: True)
    t0 = time.monotonic()
    with pytest.raises(CacheError) as exc:
        load_features(bad)
    msg = _one_line(exc, bad)
    assert time.monotonic() - t0 < 10
    _skip_unless_known(known, "hang")
    assert "did not finish in 2 s" in msg


@pytest.mark.parametrize("fault", ["segfault", "abort", "hang", "exception"])
def test_whatever_the_child_meets_is_one_line(tmp_path, monkeypatch, fault):
    """Injected into the child, so it holds whatever HDF5 does with a given file."""
    good = shutil.copy(_valid(tmp_path / "valid.h5"), tmp_path / "copy.h5")

    def reads(path, level):
        if fault == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif fault == "abort":
            os.abort()
        elif fault == "hang":
            time.sleep(60)
        raise RuntimeError("B-tree signature mismatch\nsecond line")

    monkeypatch.setattr(cache_probe, "read_for_probe", reads)
    monkeypatch.setattr(_isolate, "_may_fork", lambda: True)
    monkeypatch.setattr(cache_guard, "PROBE_SECONDS", 1.0)
    t0 = time.monotonic()
    with pytest.raises(CacheError) as exc:
        load_features(good)
    msg = _one_line(exc, Path(good))
    expected = {"segfault": "crashed the HDF5 library (SIGSEGV)",
                "abort": "crashed the HDF5 library (SIGABRT)",
                "hang": "did not finish in 1 s",
                "exception": "is damaged (B-tree signature mismatch)"}[fault]
    assert expected in msg
    assert time.monotonic() - t0 < 10


def test_a_guard_probes_once_per_file_and_never_for_a_cache_written_in_its_block(tmp_path, monkeypatch):
    calls = []
    real = _isolate._probe_forked

    def counted(target, path, level, limit, fix):
        calls.append((Path(path).name, level))
        return real(target, path, level, limit, fix)

    monkeypatch.setattr(_isolate, "_probe_forked", counted)
    monkeypatch.setattr(_isolate, "_may_fork", lambda: True)
    with CacheGuard():
        written = _valid(tmp_path / "valid.h5")
        assert load_features(written).n == 40 and calls == []  # written in this block: known good
        copy = Path(shutil.copy(written, tmp_path / "copy.h5"))
        read_attrs(copy)
        read_attrs(copy)
        assert calls == [("copy.h5", "meta")]  # attributes only: the features are not probed
        assert load_features(copy).n == 40
        assert load_features(copy).n == 40
        assert calls == [("copy.h5", "meta"), ("copy.h5", "all")]
        os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))  # it may be another file now
        read_attrs(copy)
        assert calls[-1] == ("copy.h5", "meta") and len(calls) == 3
    # The block is over: nothing is remembered, every read outside a guard probes.
    read_attrs(copy)
    read_attrs(copy)
    assert len(calls) == 5
    with CacheGuard():  # a new block knows nothing of the last one
        read_attrs(written)
    assert calls[-1] == ("valid.h5", "meta") and len(calls) == 6


def test_one_fit_heads_call_probes_its_cache_once_per_level(tmp_path, monkeypatch):
    """A head streamed from a large cache opens the file once per pass (16 for logreg here);
    the call probes it as one block does, and remembers nothing after it returns."""
    from fxtl.heads.fitting import fit_heads

    from ..test_heads import write_synthetic_cache

    children = []
    real = cache_guard.run_isolated
    monkeypatch.setattr(cache_guard, "run_isolated",
                        lambda *a, **k: children.append((Path(a[1]).name, a[2])) or real(*a, **k))
    big = write_synthetic_cache(tmp_path / "big.h5", splits=(("train", 600), ("val", 150)), dim=12)
    res = fit_heads(big, models=["logreg"], large_threshold=500, save=False)
    assert res[0].metrics["scalable"] is True
    assert children == [("big.h5", "meta"), ("big.h5", "all")]
    read_attrs(big)
    assert children[-1] == ("big.h5", "meta") and len(children) == 3
    with CacheGuard():  # inside the caller's block, the call uses that block's verdicts
        read_attrs(big)
        load_features(big)
        fit_heads(big, models=["logreg"], large_threshold=500, save=False)
    assert len(children) == 5


def _allocating_reader(path, level) -> None:
    """A reader that allocates as a real one does: enough objects for a garbage collection."""
    junk = [[i] for i in range(50_000)]
    assert len(junk) == 50_000


def test_a_forked_probe_finalizes_none_of_the_callers_garbage(tmp_path, monkeypatch):
    """Garbage the caller has not collected yet, whose finalizer waits for something only the
    caller's threads would give (an onnxruntime session in an old traceback waited on its
    thread pool): collected in the child, it hung every probe until the time limit."""
    import gc
    import threading

    monkeypatch.setattr(_isolate, "_may_fork", lambda: True)
    parent, held = os.getpid(), threading.Lock()
    held.acquire()

    class Waits:
        def __del__(self):
            if os.getpid() != parent:
                held.acquire()  # never released in the child: a hang if the child finalizes it

    path = _valid(tmp_path / "valid.h5")
    gc.collect()  # the next collection is hundreds of allocations away: in the child
    cycle = Waits()
    cycle.me = cycle
    del cycle
    t0 = time.monotonic()
    assert _isolate.run_isolated(f"{__name__}:_allocating_reader", path, "all", limit=5,
                                 fix="re-create it") is None
    assert time.monotonic() - t0 < 5
    gc.collect()


def test_isolate_false_reads_in_process(tmp_path, monkeypatch):
    children = []
    monkeypatch.setattr(cache_guard, "run_isolated", lambda *a, **k: children.append(a[1]))
    copy = shutil.copy(_valid(tmp_path / "valid.h5"), tmp_path / "copy.h5")
    assert load_features(copy, isolate=False).n == 40
    with CacheGuard(isolate=False):
        assert load_features(copy).n == 40
        assert read_attrs(copy)["format"] == "fxtl-features"
    assert children == []
    read_attrs(copy)  # outside a block the default isolates
    with CacheGuard(isolate=False):
        read_attrs(copy, isolate=True)  # and the caller's argument wins over the block's
    assert children == [Path(copy), Path(copy)]


def test_the_cli_probe_switch_comes_from_its_option_or_environment(tmp_path):
    """FXTL_CACHE_PROBE is read by the CLI (click's envvar) and passed down, never by the library."""
    bad, known = _flipped(tmp_path, "crash.h5", CRASH_FLIP)
    _skip_unless_known(known, "crash from the CLI without the probe")
    # In-process, the flip that crashes libhdf5 takes the process down: the switch reached it.
    assert run_fxtl("--no-cache-probe", "info", bad, timeout=120).returncode == -signal.SIGSEGV
    r = run_fxtl("info", bad, timeout=120, env={"FXTL_CACHE_PROBE": "off"})
    assert r.returncode == -signal.SIGSEGV
    r = run_fxtl("info", bad, timeout=120, env={"FXTL_CACHE_PROBE": "on"})
    assert r.returncode == 1 and "crashed the HDF5 library" in r.stderr
    src = (Path(cache_guard.__file__).read_text() + Path(_isolate.__file__).read_text())
    assert "environ.get" not in src and "getenv" not in src


def test_a_damaged_hdf5_file_in_a_data_folder_does_not_crash_discovery(tmp_path, monkeypatch):
    """Discovery opens every .h5 in a data folder to see whether fxtl wrote it (its folder is
    then skipped) after a child process read its `format`: a file on which that crashes is not
    provably fxtl's, and the walk goes on."""
    from fxtl.data.discovery import is_artifact_folder

    monkeypatch.setattr(discovery, "_FORMAT_PROBE_SECONDS", 2.0)
    # The crash flip spares `format` (fxtl's file: its folder is skipped); the hang flip makes
    # HDF5 loop while it opens the file (killed after 2 s: not provably fxtl's).
    seen, expected = {}, {"crash": True, "hang": False}
    for name, flip in (("crash", CRASH_FLIP), ("hang", HANG_FLIP)):
        damaged, known = _flipped(tmp_path, f"{name}.h5", flip)
        folder = tmp_path / name
        folder.mkdir()
        shutil.move(damaged, folder / "features.h5")
        # a forked child is killed after PROBE_SECONDS; a spawned one (another test left a
        # thread running in this process) also gets 10 s to start an interpreter
        bound = 10 if _isolate._may_fork() else 15
        t0 = time.monotonic()
        seen[name] = is_artifact_folder(folder)
        assert time.monotonic() - t0 < bound
    _valid(tmp_path / "valid.h5")
    assert is_artifact_folder(tmp_path) is True  # valid.h5: a cache fxtl wrote
    monkeypatch.setattr(_isolate, "_may_fork", lambda: True)
    monkeypatch.setattr(discovery, "require_fxtl_format",
                        lambda path, level: os.kill(os.getpid(), signal.SIGSEGV))
    assert is_artifact_folder(tmp_path / "crash") is False
    _skip_unless_known(known, "crash and hang during discovery")
    assert seen == expected
