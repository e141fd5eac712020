"""``fxtl.embed`` vs ``fxtl extract`` on the same 398 hymenoptera images (issue 24's speed bar).

    PYTHONPATH=. .venv/bin/python benchmarks/embed_speed.py [--data DIR] [--rounds 2] [--output F]

Both run back to back in one process (the machine may be shared: alternate them and keep
every round), on the same lite0 network and precision, with the network built before the clock
starts (an ``Embedder``; ``extract``'s ``images_per_second`` likewise times only the embedding).
Also checks that the rows equal the cache's and that a second ``Embedder`` call builds nothing.
Writes benchmarks/results/embed_speed.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "datasets" / "hymenoptera"


def main() -> None:
    import fxtl
    from fxtl.runtime import keep_freed_memory

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--output", type=Path, default=HERE / "results" / "embed_speed.json")
    args = ap.parse_args()
    keep_freed_memory()  # what the `fxtl` command does for extract
    tmp = Path(tempfile.mkdtemp())
    emb = fxtl.Embedder("lite0", precision=args.precision)
    rounds = []
    for r in range(args.rounds):
        res = fxtl.extract(args.data, precision=emb.precision, cache_dir=tmp, force=True,
                           progress=False)
        cache = fxtl.load_features(res.cache)
        paths = [str(Path(cache.attrs.get("dataset_root", args.data)) / p) for p in cache.paths]
        t0 = time.perf_counter()
        X = emb(paths)
        embed_ips = len(paths) / (time.perf_counter() - t0)
        diff = float(np.abs(X - cache.features).max())
        rounds.append({"extract_images_per_second": round(res.images_per_second, 2),
                       "embed_images_per_second": round(embed_ips, 2),
                       "ratio": round(embed_ips / res.images_per_second, 3),
                       "max_abs_diff_vs_cache": diff, "n": len(paths)})
        print(json.dumps(rounds[-1]), flush=True)
    out = {"data": str(args.data), "precision": emb.precision, "device": emb.device,
           "batch_size": emb.batch_size, "machine": platform.processor() or platform.machine(),
           "rounds": rounds, "images_computed": emb.images_computed}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
