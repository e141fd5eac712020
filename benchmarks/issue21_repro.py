"""Issue 21's items that a command line shows, run against any checkout of fxtl.

    PYTHONPATH=CHECKOUT .venv/bin/python benchmarks/issue21_repro.py OUTDIR > result.json

Builds a tiny split dataset (classes `ants`, `bees`, `=1+2`), extracts it with lite0 and tries
items 2, 4, 7, 8, 9, 10, 11, 14, 15 and 17 of issue 21; each entry is the exit status and the
last stderr line (or whether a file was written wrongly). Run on 889f149 and on main, it shows
that each item failed before and holds now (benchmarks/results/issue21_repro.json); the test
suite holds the same behaviours (tests/faults/test_round3.py, test_hostile_caches.py).
"""
import json, os, subprocess, sys, shutil
from pathlib import Path
import numpy as np
from PIL import Image
import h5py

out = Path(sys.argv[1]); shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
rng = np.random.default_rng(0)
data = out / "data"
for split, n in (("train", 8), ("val", 4)):
    for c in ("ants", "bees", "=1+2"):
        d = data / split / c; d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
py = sys.executable
def F(*a, timeout=120, **kw):
    try:
        r = subprocess.run([py, "-m", "fxtl", *map(str, a)], capture_output=True, text=True, timeout=timeout, cwd=out)
        return r.returncode, (r.stderr.strip().splitlines() or [""])[-1][:160]
    except subprocess.TimeoutExpired:
        return "TIMEOUT", ""
res = {}
rc, _ = F("extract", data, "--cache-dir", out / "cache", "--json")
cache = next((out / "cache").glob("*.h5"))
# 2 external storage
ext = out / "ext.h5"; shutil.copy(cache, ext)
with h5py.File(ext, "a") as f:
    shape = f["features"].shape; del f["features"]
    Path(out / "secret.bin").write_bytes(b"S" * (shape[0] * shape[1] * 4))
    f.create_dataset("features", shape=shape, dtype="<f4", external=[(str(out / "secret.bin"), 0, shape[0]*shape[1]*4)])
res["2 external storage export"] = F("export", ext, "--format", "npz", "-o", out / "o.npz")
# 4 fifo
os.mkfifo(out / "ff.h5"); res["4 fifo info"] = F("info", out / "ff.h5", timeout=20)
# 7 export over another cache
other = out / "other.h5"; shutil.copy(cache, other)
res["7 export over a cache"] = F("export", cache, "--format", "npz", "-o", other)
# 8 suffix mismatch
rc8 = F("export", cache, "-o", out / "x.csv")
res["8 -o x.csv no format"] = (rc8, (out / "x.csv").exists() and (out / "x.csv").read_bytes()[:2] == b"PK")
# 9 csv injection
F("export", cache, "--format", "csv", "-o", out / "e.csv")
txt = (out / "e.csv").read_text() if (out / "e.csv").exists() else ""
res["9 raw =1+2 in export csv"] = ",=1+2" in txt or "\n=1+2" in txt
# 10 run name traversal
res["10 run-name ../../x"] = F("fit-head", cache, "--run-name", "../../x", "--cache-dir", out / "c2", "--no-search")
res["10 escaped run exists"] = (out / "x").exists() or (out.parent / "x").exists()
# 11 advise one image per class
one = out / "one"
for c in ("a", "b"):
    (one / c).mkdir(parents=True); shutil.copy(next((data / "train" / "ants").glob("*.jpg")), one / c / "0.jpg")
res["11 advise 1/class"] = F("advise", one, "--json")
# 14 params
res["14 penalty=l1"] = F("fit-head", cache, "--param", "penalty=l1", "--cache-dir", out / "c3")
res["14 gamma=-1"] = F("fit-head", cache, "-m", "svm", "--param", "gamma=-1", "--cache-dir", out / "c3")
# 15 seed -1
res["15 seed -1"] = F("fit-head", cache, "--seed", "-1", "--cache-dir", out / "c3")
# 17 duplicate class names
dup = out / "dup.h5"; shutil.copy(cache, dup)
with h5py.File(dup, "a") as f:
    names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["class_names"]]
    f.attrs["class_names"] = np.array(["same", "same", "other"][:len(names)], dtype=h5py.string_dtype())
res["17 duplicate names fit-head"] = F("fit-head", dup, "--cache-dir", out / "c4")
print(json.dumps({k: v for k, v in res.items()}, indent=1, default=str))
