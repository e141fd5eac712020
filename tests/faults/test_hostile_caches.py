"""A cache someone shares reads nothing outside itself and cannot make a reader allocate or block.

docs/cache-format.md, "File" and "Checks on open": external raw storage, external links and
virtual datasets are refused by every reader before any data is read; a dataset may declare at
most MAX_EXPANSION times what the file stores; only regular files are opened (a FIFO is refused
after an ``os.stat``, never opened); class names are unique. Issue 21, items 2, 3, 4, 17 and 21.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from fxtl.cli import cli
from fxtl.errors import CacheError
from fxtl.features.spec import MAX_EXPANSION
from fxtl.features.store import iter_feature_chunks, load_features, read_attrs, summarize

from ..test_heads import write_synthetic_cache
from ._cli import ROOT, assert_one_line_error, run_fxtl

SECRET = b"root:x:0:0:TOPSECRET:/root:/bin/bash\n"


def _rebuild(src: Path, dst: Path, make, *, skip: str = "features") -> Path:
    """A copy of the cache ``src`` whose dataset ``skip`` is made by ``make(dst_file, original)``."""
    with h5py.File(src, "r") as s, h5py.File(dst, "w") as d:
        for key, value in s.attrs.items():
            d.attrs[key] = value
        for name in s:
            if name != skip:
                s.copy(s[name], d, name=name)
        make(d, s[skip])
    return dst


def _secret(tmp_path: Path, nbytes: int) -> Path:
    path = tmp_path / "passwd"
    path.write_bytes((SECRET * (nbytes // len(SECRET) + 1))[:nbytes])
    return path


def _external_storage(tmp_path: Path, cache: Path, *, skip: str = "features") -> Path:
    def make(d, orig):
        nbytes = int(np.prod(orig.shape)) * orig.dtype.itemsize
        d.create_dataset(skip, shape=orig.shape, dtype=orig.dtype,
                         external=[(str(_secret(tmp_path, nbytes)), 0, nbytes)])
    return _rebuild(cache, tmp_path / f"external-{skip}.h5", make, skip=skip)


def _external_link(tmp_path: Path, cache: Path) -> Path:
    other = shutil.copy(cache, tmp_path / "other.h5")
    return _rebuild(cache, tmp_path / "link.h5",
                    lambda d, orig: d.__setitem__("features", h5py.ExternalLink(str(other), "/features")))


def _virtual(tmp_path: Path, cache: Path) -> Path:
    other = shutil.copy(cache, tmp_path / "other.h5")

    def make(d, orig):
        layout = h5py.VirtualLayout(shape=orig.shape, dtype=orig.dtype)
        layout[...] = h5py.VirtualSource(str(other), "features", shape=orig.shape)
        d.create_virtual_dataset("features", layout)
    return _rebuild(cache, tmp_path / "virtual.h5", make)


def _extra_external(tmp_path: Path, cache: Path) -> Path:
    """A dataset no reader of fxtl reads, kept outside the file: still refused."""
    path = tmp_path / "extra.h5"
    shutil.copy(cache, path)
    with h5py.File(path, "a") as f:
        f.create_dataset("notes", shape=(len(SECRET),), dtype="u1",
                         external=[(str(_secret(tmp_path, len(SECRET))), 0, len(SECRET))])
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("hostile") / "blobs.h5")


HOSTILE = {"external storage": (_external_storage, "keeps its data in external files"),
           "external link": (_external_link, "is an external link"),
           "virtual dataset": (_virtual, "is a virtual dataset"),
           "external /labels": (lambda t, c: _external_storage(t, c, skip="labels"),
                                "/labels keeps its data in external files"),
           "external unread dataset": (_extra_external, "/notes keeps its data in external files")}


@pytest.mark.parametrize("kind", list(HOSTILE))
@pytest.mark.parametrize("isolate", [True, False])
def test_every_library_reader_refuses_data_outside_the_file(tmp_path, cache, kind, isolate):
    make, what = HOSTILE[kind]
    bad = make(tmp_path, cache)
    readers = [lambda: load_features(bad, isolate=isolate), lambda: read_attrs(bad, isolate=isolate),
               lambda: summarize(bad, isolate=isolate),
               lambda: list(iter_feature_chunks(bad, isolate=isolate))]
    for read in readers:
        with pytest.raises(CacheError) as exc:
            read()
        msg = str(exc.value)
        assert what in msg and str(bad) in msg and "must hold all its data itself" in msg, msg
        assert "\n" not in msg and "TOPSECRET" not in msg


def test_the_same_file_with_its_data_inside_is_read(tmp_path, cache):
    """The refusals above are about where the data is, not about the rebuilt copy."""
    good = _rebuild(cache, tmp_path / "inside.h5", lambda d, orig: orig.parent.copy(orig, d, "features"))
    np.testing.assert_array_equal(load_features(good).features, load_features(cache).features)


def test_every_command_refuses_external_storage_and_writes_nothing(tmp_path, cache):
    bad = _external_storage(tmp_path, cache)
    out = tmp_path / "o.npz"
    home = tmp_path / "home"
    run = CliRunner().invoke(cli, ["fit-head", str(cache), "--model", "logreg", "--no-search",
                                   "--cache-dir", str(home), "--json"])
    assert run.exit_code == 0, run.output[-2000:]
    run_dir = next((home / "runs").iterdir())
    for args in (["info", str(bad)], ["export", str(bad), "--format", "npz", "-o", str(out)],
                 ["fit-head", str(bad), "--model", "logreg", "--cache-dir", str(home)],
                 ["predict", str(run_dir), str(bad)]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1, (args, r.output[-2000:])
        assert "keeps its data in external files" in r.output and "TOPSECRET" not in r.output, r.output
    assert not out.exists()
    assert len(list((home / "runs").iterdir())) == 1  # the refused fit-head left no run


def test_a_declared_shape_beyond_the_stored_bytes_is_refused_before_reading(tmp_path, cache):
    """15 KB declaring (400000, 1280) float32 (about 2 GB of fill value): refused from metadata."""
    def make(d, orig):
        d.create_dataset("features", shape=(400000, 1280), dtype="<f4", chunks=(200, 1280),
                         fillvalue=0.5)
    bomb = tmp_path / "bomb.h5"
    with h5py.File(cache, "r") as s, h5py.File(bomb, "w") as d:
        for key, value in s.attrs.items():
            d.attrs[key] = value
        d.attrs["n"], d.attrs["dim"] = np.int64(400000), np.int64(1280)
        make(d, None)
        d.create_dataset("labels", data=np.zeros(400000, dtype="<i8"), compression="gzip")
        for name in ("paths", "split"):
            d.create_dataset(name, data=np.array([b"train"] * 400000, dtype="S5"),
                             compression="gzip")
    assert bomb.stat().st_size < 200_000
    with pytest.raises(CacheError, match=r"/features declares shape \[400000, 1280\]"):
        load_features(bomb, isolate=False)
    # From the command line, in a process whose peak memory is measured.
    proc = subprocess.run([sys.executable, "-c", (
        "import resource, subprocess, sys\n"
        "p = subprocess.run([sys.executable, '-m', 'fxtl', 'info', sys.argv[1]], capture_output=True, text=True)\n"
        "print(p.returncode); print(p.stderr.strip().splitlines()[-1])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"), str(bomb)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    rc, line, peak_kb = proc.stdout.strip().splitlines()
    assert rc == "1" and "declares shape [400000, 1280]" in line, proc.stdout + proc.stderr
    assert int(peak_kb) < 400_000, f"peak {int(peak_kb) / 1024:.0f} MiB reading a refused file"


def test_a_compressed_dataset_within_the_stated_limit_is_read(tmp_path, cache):
    """The limit is a ratio (MAX_EXPANSION): another writer's gzip on the features still reads."""
    def make(d, orig):
        d.create_dataset("features", data=orig[...], chunks=True, compression="gzip")
    gz = _rebuild(cache, tmp_path / "gzip.h5", make)
    assert MAX_EXPANSION >= 8
    np.testing.assert_array_equal(load_features(gz).features, load_features(cache).features)


@pytest.mark.parametrize("command", [["info"], ["export", "--format", "npz", "-o", "{tmp}/o.npz"],
                                     ["fit-head", "--model", "logreg", "--cache-dir", "{tmp}/h"]])
def test_a_fifo_is_refused_without_blocking(tmp_path, command):
    fifo = tmp_path / "ff.h5"
    os.mkfifo(fifo)
    args = [a.format(tmp=tmp_path) for a in command]
    r = run_fxtl(args[0], fifo, *args[1:], timeout=120)  # a blocked open would time out here
    assert_one_line_error(r.returncode, r.stderr, str(fifo), "not a regular file")


def test_a_fifo_is_refused_by_the_library_readers(tmp_path):
    fifo = tmp_path / "ff.h5"
    os.mkfifo(fifo)
    code = ("import sys\nfrom fxtl.errors import CacheError\n"
            "from fxtl.features.store import load_features, read_attrs\n"
            "for read in (load_features, read_attrs):\n"
            "    try:\n        read(sys.argv[1])\n    except CacheError as exc:\n"
            "        print(exc)\n")
    r = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.stdout.count("is not a regular file") == 2, r.stdout + r.stderr


def test_duplicate_class_names_are_refused_on_read(tmp_path, cache):
    dup = tmp_path / "dup.h5"
    shutil.copy(cache, dup)
    with h5py.File(dup, "a") as f:
        f.attrs["class_names"] = np.array(["same", "same", "other"], dtype=h5py.string_dtype())
    with pytest.raises(CacheError, match="class_names holds 'same' twice"):
        load_features(dup)
    r = CliRunner().invoke(cli, ["info", str(dup)])
    assert r.exit_code == 1 and "class_names holds 'same' twice" in r.output


def test_predict_says_why_a_pipe_is_not_an_image(tmp_path):
    """`fxtl predict RUN <(cat a.jpg)`: the pipe exists; the message says what it is and the fix."""
    from fxtl.inference import collect_images

    fifo = tmp_path / "a.jpg"
    os.mkfifo(fifo)
    images, caches, errors = collect_images([fifo, tmp_path / "missing.jpg"])
    assert images == [] and caches == []
    assert errors[0] == {"path": str(fifo), "reason": "is a pipe, device or socket, not a regular "
                                                      "file; save the image to a file and pass that"}
    assert errors[1]["reason"] == "no such file or folder"
