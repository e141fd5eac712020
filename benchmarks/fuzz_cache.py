"""A large, seeded fuzz of fxtl's cache reader (issue 14, item 11): every outcome must be a result
or one line naming the file, never a traceback, a crash or a hang.

A small valid cache (written by ``fxtl.features.store.write_cache``) is damaged ``--n`` times,
reproducibly from ``--seed``:

* ``flip_superblock``: bytes flipped in the first 96 bytes (the HDF5 superblock);
* ``flip_metadata``: bytes flipped in HDF5's own structures (object headers, B-tree nodes, heaps:
  every byte that is not a dataset's raw data, half of the time next to a ``TREE``/``HEAP``/
  ``SNOD``/``GCOL``/``OHDR`` signature);
* ``flip_any``: bytes flipped anywhere; ``truncate``: the file cut short;
* ``delete``/``retype_dataset``/``retype_attr``: a dataset or attribute removed or rewritten
  with another type (h5py, so the file stays valid HDF5).

Worker processes read each file with every reader fxtl has (``load_features``, ``summarize``,
``read_attrs``, ``read_errors``, ``iter_feature_chunks``, and the streamed head source's
``blocks`` and ``shuffled_batches``). Each outcome is classified:

* ``result``: read without error; ``error``: one ``FxtlError`` line naming the file;
* ``traceback``: any other exception, or a message of several lines or not naming the file;
* ``crash``: the worker died (a signal such as SIGSEGV, or an abort inside libhdf5);
* ``hang``: no outcome within ``--hang-seconds``.

A crash or hang restarts the worker at the next file. Usage::

    python benchmarks/fuzz_cache.py [--n 2000] [--seed 14] [-o benchmarks/results/fuzz_cache.json]

``--no-guard`` shows what the readers do without fxtl's crash guard (``isolate=False``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIGNATURES = (b"TREE", b"HEAP", b"SNOD", b"GCOL", b"OHDR", b"OCHK", b"BTHD", b"BTLF", b"FRHP")
KINDS = ("flip_superblock", "flip_metadata", "flip_any", "truncate", "delete", "retype_dataset",
         "retype_attr")
# Flips are most of the draw: they are what reach libhdf5's parsers.
WEIGHTS = (0.2, 0.35, 0.15, 0.1, 0.06, 0.07, 0.07)

WORKER = r"""
import json, sys
import numpy as np
from fxtl.errors import FxtlError
from fxtl.features.cache_guard import CacheGuard
from fxtl.features.store import iter_feature_chunks, load_features, read_attrs, read_errors, summarize
from fxtl.heads.source import open_source

ISOLATE = sys.argv[1] == "on"

def read_all(name):
    with CacheGuard(isolate=ISOLATE):  # as the fxtl command: one probe per file at most
        return _read_all(name)

def _read_all(name):
    fc = load_features(name)
    summarize(name); read_attrs(name); read_errors(name)
    sum(len(X) for X, _ in iter_feature_chunks(name, rows=7, split="train"))
    src = open_source(name, large_threshold=1)
    rows = np.arange(src.n)
    sum(len(X) for _, X, _ in src.blocks(rows, block_rows=7))
    sum(len(X) for X, _ in src.shuffled_batches(rows, rng=np.random.default_rng(0), block_rows=7))
    return fc.n

for line in sys.stdin:
    name = line.strip()
    print(json.dumps({"file": name, "start": True}), flush=True)
    out = {"file": name}
    try:
        out["n"] = read_all(name)
        out["outcome"] = "result"
    except FxtlError as exc:
        text = str(exc)
        one = "\n" not in text.strip() and name in text
        out["outcome"] = "error" if one else "traceback"
        out["message"] = text
    except BaseException as exc:
        out["outcome"] = "traceback"
        out["message"] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps(out), flush=True)
"""


def valid_cache(path: Path) -> Path:
    from fxtl.features.store import write_cache

    rng = np.random.default_rng(0)
    n, dim = 40, 16
    return write_cache(path, chunks=[rng.normal(size=(n, dim)).astype(np.float32)], n=n, dim=dim,
                       labels=[i % 3 for i in range(n)], paths=[f"c{i % 3}/{i}.png" for i in range(n)],
                       split=["train"] * 24 + ["val"] * 8 + ["test"] * 8,
                       class_names=["ants", "bees", "wasps"], errors=[("bad.png", "truncated")],
                       attrs={"backbone": "synthetic", "weights_sha256": "0" * 64,
                              "preprocessing": {"crop": 8}, "precision": "fp32", "layer": "pooled",
                              "fingerprint": "f" * 64, "created": "now", "fxtl_version": "fuzz"})


def metadata_offsets(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets of HDF5's own structures (not raw data), and those next to a signature."""
    import h5py

    raw = np.zeros(size, dtype=bool)
    with h5py.File(path, "r") as f:
        def mark(name, obj):
            if not isinstance(obj, h5py.Dataset):
                return
            dsid = obj.id
            if obj.chunks:
                for i in range(dsid.get_num_chunks()):
                    info = dsid.get_chunk_info(i)
                    raw[info.byte_offset:info.byte_offset + info.size] = True
            elif dsid.get_offset() is not None:
                raw[dsid.get_offset():dsid.get_offset() + dsid.get_storage_size()] = True
        f.visititems(mark)
    data = path.read_bytes()
    near = np.zeros(size, dtype=bool)
    for sig in SIGNATURES:
        at = data.find(sig)
        while at >= 0:
            near[at:at + 64] = True
            at = data.find(sig, at + 1)
    meta = np.flatnonzero(~raw[:size])
    return meta, np.flatnonzero(near & ~raw)


def damage(data: bytes, out: Path, kind: str, rng: np.random.Generator, meta, near) -> None:
    import h5py

    if kind.startswith("flip"):
        buf = bytearray(data)
        if kind == "flip_superblock":
            where = rng.integers(0, 96, size=int(rng.integers(1, 4)))
        elif kind == "flip_metadata":
            pool = near if (len(near) and rng.random() < 0.5) else meta
            where = pool[rng.integers(0, len(pool), size=int(rng.integers(1, 6)))]
        else:
            where = rng.integers(0, len(buf), size=int(rng.integers(1, 40)))
        for i in where:
            buf[int(i)] ^= int(rng.integers(1, 256))
        out.write_bytes(bytes(buf))
    elif kind == "truncate":
        out.write_bytes(data[:int(rng.integers(0, len(data)))])
    else:
        out.write_bytes(data)
        names = ["features", "labels", "paths", "split", "errors", "errors/path", "errors/reason"]
        values = [np.float64(2.5), "text", np.array([1, 2, 3]), np.int64(-3), np.array([], "f4"),
                  np.array(["a", "b"], dtype=object), np.zeros((2, 2)), np.uint8(1), 10 ** 12,
                  np.full((40, 16), np.nan, np.float32)]
        with h5py.File(out, "r+") as f:
            attrs = list(f.attrs)
            if kind == "delete":
                if rng.random() < 0.5:
                    del f[names[int(rng.integers(len(names)))]]
                else:
                    del f.attrs[attrs[int(rng.integers(len(attrs)))]]
            elif kind == "retype_dataset":
                name = names[int(rng.integers(len(names)))]
                del f[name]
                f[name] = values[int(rng.integers(len(values)))]
            else:
                f.attrs[attrs[int(rng.integers(len(attrs)))]] = values[int(rng.integers(len(values)))]


def run_workers(files: list[Path], *, hang_seconds: float, guard: bool = True) -> dict[str, dict]:
    """Each file's outcome; a worker that dies or stalls is replaced at the next file."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results: dict[str, dict] = {}
    todo = [str(f) for f in files]
    while todo:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, "on" if guard else "off"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        proc.stdin.write("".join(t + "\n" for t in todo).encode())
        proc.stdin.close()
        # Raw reads with our own line buffer: select() on a buffered reader would miss lines
        # already buffered and wait for ever on a hung worker.
        fd, pending, current, deadline = proc.stdout.fileno(), b"", None, None
        while True:
            if b"\n" not in pending:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([fd], [], [], wait)
                if not ready:  # nothing within hang_seconds: the current file hangs the reader
                    proc.kill()
                    proc.wait()
                    results[current] = {"outcome": "hang"}
                    break
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    rc = proc.wait()
                    if current is not None and current not in results:
                        results[current] = {"outcome": "crash", "returncode": rc}
                    break
                pending += chunk
                continue
            line, pending = pending.split(b"\n", 1)
            rec = json.loads(line)
            if rec.get("start"):
                current, deadline = rec["file"], time.monotonic() + hang_seconds
            else:
                results[rec.pop("file")] = rec
                deadline = None
        proc.stdout.close()
        todo = [t for t in todo if t not in results]
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--hang-seconds", type=float, default=60.0)
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks/results/fuzz_cache.json")
    ap.add_argument("--no-guard", action="store_true", help="read in-process, without the child")
    ap.add_argument("--keep", type=Path, help="copy files whose outcome is not result/error here")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = valid_cache(tmp / "valid.h5")
        data = base.read_bytes()
        meta, near = metadata_offsets(base, len(data))
        files, kinds = [], {}
        for i in range(args.n):
            kind = str(rng.choice(KINDS, p=WEIGHTS))
            f = tmp / f"d{i:05d}.h5"
            damage(data, f, kind, rng, meta, near)
            files.append(f)
            kinds[str(f)] = kind
        results = run_workers(files, hang_seconds=args.hang_seconds, guard=not args.no_guard)
        bad = {k: v for k, v in results.items() if v["outcome"] not in ("result", "error")}
        if args.keep and bad:
            args.keep.mkdir(parents=True, exist_ok=True)
            for k in bad:
                (args.keep / Path(k).name).write_bytes(Path(k).read_bytes())
    by_kind: dict[str, Counter] = {}
    for k, v in results.items():
        by_kind.setdefault(kinds[k], Counter())[v["outcome"]] += 1
    totals = Counter(v["outcome"] for v in results.values())
    report = {
        "what": "seeded damages of a valid 40x16 cache, each read by every fxtl cache reader",
        "command": f"python benchmarks/fuzz_cache.py --n {args.n} --seed {args.seed}",
        "guard": "off" if args.no_guard else "on",
        "n": args.n, "seed": args.seed, "cache_bytes": len(data),
        "metadata_bytes": int(len(meta)), "hang_seconds": args.hang_seconds,
        "totals": {k: totals.get(k, 0) for k in ("result", "error", "traceback", "crash", "hang")},
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "not_result_or_error": [{"file": Path(k).name, "kind": kinds[k], **v}
                                for k, v in sorted(bad.items())][:50],
        "error_examples": sorted({v["message"].split(": ", 1)[-1][:120] for v in results.values()
                                  if v["outcome"] == "error"})[:25],
        # One letter per damaged file, in order (Result, Error, Traceback, Crash, Hang), to diff runs.
        "outcomes": "".join(results[str(f)]["outcome"][0].upper() for f in files),
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"totals": report["totals"], "seconds": report["seconds"]}))


if __name__ == "__main__":
    main()
