"""Heads at every size (issue 12): `fxtl fit-head --model all` wall time, peak RSS and accuracy per
head on REAL lite0 features, beside an exhaustive search of the same space on the same splits and a
plain StandardScaler + LogisticRegression with C chosen by 5-fold CV.

Sizes come from caches you extract first (no synthetic features):

* ~400 rows: ``fxtl extract ../shared/datasets/hymenoptera``;
* larger: augmented views of every image in ../shared/datasets (random resized crop, flip, colour
  jitter), all views of one source image in the same split, written as JPEGs outside the repo and
  extracted with ``fxtl extract`` (see ``make_views`` below); a cache can be cut to N rows by
  whole source images with ``NAME=CACHE:N``.

Usage::

    python benchmarks/heads_scale.py small=HYM.h5 medium=VIEWS.h5:3500 [large=VIEWS27K.h5] \\
        [--no-reference NAME ...] [-o benchmarks/results/heads_scale.json]

``NAME=CACHE*K`` is a timing/memory proxy (see :func:`tile_cache`), never an accuracy result.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"small": 10.0, "medium": 30.0, "large": 120.0}  # seconds for --model all (issue 12)


def make_views(src_root: Path, out: Path, views: int, seed: int = 0) -> int:
    """Write ``views`` augmented JPEG views of every image under ``src_root`` into
    ``out/{train,val,test}/<dataset>_<class>/s<id>_v<k>.jpg``; a source's views share a split."""
    import hashlib
    import random

    from PIL import Image, ImageEnhance, ImageOps

    n = 0
    srcs = [(f"{ds.name}_{p.parent.name}", p) for ds in sorted(src_root.iterdir()) if ds.is_dir()
            for p in sorted(ds.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    for i, (cls, p) in enumerate(srcs):
        h = int(hashlib.sha256(str(p).encode()).hexdigest(), 16) % 10
        split = "train" if h < 7 else ("val" if h < 8 else "test")
        d = out / split / cls
        d.mkdir(parents=True, exist_ok=True)
        im = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        rng = random.Random(seed * 1_000_003 + i)
        for k in range(views):
            w, hgt = im.size
            s, r = rng.uniform(0.35, 1.0), rng.uniform(3 / 4, 4 / 3)
            cw = min(w, int((s * w * hgt * r) ** 0.5))
            ch = min(hgt, int((s * w * hgt / r) ** 0.5))
            x, y = rng.randint(0, w - cw), rng.randint(0, hgt - ch)
            v = im.crop((x, y, x + cw, y + ch)).resize((240, 240), Image.BILINEAR)
            if rng.random() < 0.5:
                v = v.transpose(Image.FLIP_LEFT_RIGHT)
            for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                v = enh(v).enhance(rng.uniform(0.7, 1.3))
            v.save(d / f"s{i:05d}_v{k:02d}.jpg", quality=88)
            n += 1
    return n


def cut_cache(src: Path, rows: int, out: Path, seed: int = 0) -> Path:
    """A copy of ``src`` keeping about ``rows`` rows, dropping whole views (``_vNN``) of
    randomly chosen source images, so no source straddles splits."""
    from fxtl.features.store import load_features, write_cache

    c = load_features(src)
    view = np.array([int(Path(p).stem.rsplit("_v", 1)[1]) if "_v" in Path(p).stem else 0
                     for p in c.paths])
    source = np.array([Path(p).stem.rsplit("_v", 1)[0] for p in c.paths])
    keep = np.ones(c.n, dtype=bool)
    rng = np.random.default_rng(seed)
    for v in sorted(set(view.tolist()), reverse=True):
        if keep.sum() <= rows:
            break
        cand = np.unique(source[(view == v) & keep])
        excess = int(keep.sum() - rows)
        drop = set(rng.permutation(cand)[:excess].tolist())
        keep &= ~((view == v) & np.isin(source, list(drop)))
    idx = np.flatnonzero(keep)
    attrs = {k: v for k, v in c.attrs.items()
             if k not in ("format", "format_version", "n", "dim", "complete", "class_names")}
    attrs["fingerprint"] = f"{c.attrs.get('fingerprint')}-cut{len(idx)}"
    return write_cache(out, chunks=[c.features[idx]], n=len(idx), dim=c.dim,
                       labels=c.labels[idx].tolist(), paths=[c.paths[i] for i in idx],
                       split=[str(c.split[i]) for i in idx], class_names=list(c.class_names),
                       errors=[], attrs=attrs)


def tile_cache(src: Path, times: int, out: Path, seed: int = 0) -> Path:
    """A TIMING PROXY, not an accuracy set: every real row repeated ``times`` times (each copy in
    its source's split) with 5% per-feature jitter. Used only when a real set that large could not
    be extracted in time; its accuracies are inflated by near-duplicates and are not reported."""
    from fxtl.features.store import load_features, write_cache

    c = load_features(src)
    rng = np.random.default_rng(seed)
    std = c.features.std(axis=0, keepdims=True)
    X = np.concatenate([c.features] + [c.features + 0.05 * std * rng.standard_normal(c.features.shape,
                                                                                    dtype=np.float32)
                                       for _ in range(times - 1)]).astype(np.float32)
    reps = lambda seq: [x for _ in range(times) for x in seq]  # noqa: E731
    attrs = {k: v for k, v in c.attrs.items()
             if k not in ("format", "format_version", "n", "dim", "complete", "class_names")}
    attrs["fingerprint"] = f"{c.attrs.get('fingerprint')}-tile{times}"
    return write_cache(out, chunks=[X], n=len(X), dim=c.dim, labels=reps(c.labels.tolist()),
                       paths=[f"{k}/{p}" for k in range(times) for p in c.paths],
                       split=reps([str(x) for x in c.split]), class_names=list(c.class_names),
                       errors=[], attrs=attrs)


def run_cli(cache: Path, home: Path, budget: str | None = None) -> dict:
    """``fxtl fit-head CACHE --model all --json [--budget B]`` in a fresh process: wall, peak
    RSS, runs."""
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "fxtl", "fit-head",
           str(cache), "--model", "all", "--json", "--cache-dir", str(home),
           *(["--budget", budget] if budget else [])]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"fit-head failed: {p.stderr[-2000:]}")
    rss_kb = max(int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("MAXRSS_KB"))
    return {"wall_seconds": round(wall, 2), "peak_rss_mb": round(rss_kb / 1024, 1),
            "runs": json.loads(p.stdout)["runs"], "command": " ".join(cmd[3:])}


def exhaustive(cache: Path, model: str, solver: str = "auto") -> dict:
    """The same space searched exhaustively: k-fold CV on every fit row (or the val split as it
    is), no subsample, no warm start or early end of a path, no budget, the final fit on every
    row, calibrated by
    k-fold; the same solver (scikit-learn or torch) as the run it is compared with. The RBF SVM
    keeps its row cap (its candidates and final fit see at most ``max_fit_rows`` rows): beyond
    it a kernel matrix no longer fits in memory, which is why the head has the cap."""
    from fxtl.heads import fitting, search

    spec0 = fitting.get_head(model)
    saved = (search.CV_MAX_ROWS, search.PLENTY_PER_CLASS, search.CALIBRATION_SPLIT_ROWS, fitting.get_head)
    search.CV_MAX_ROWS = search.PLENTY_PER_CLASS = search.CALIBRATION_SPLIT_ROWS = 10 ** 12
    # scale_up stays: it sets fixed parameters (the MLP's batch size) from the rows fitted, which
    # are the same here; the searched space and the rows are what the reference widens.
    fitting.get_head = lambda name: replace(spec0, search_rows=spec0.max_fit_rows or 10 ** 12,
                                            path_param=None)
    try:
        t0 = time.perf_counter()
        res = fitting.fit_head(cache, model=model, jobs=-1, seed=0, solver=solver)
        wall = time.perf_counter() - t0
    finally:
        search.CV_MAX_ROWS, search.PLENTY_PER_CLASS, search.CALIBRATION_SPLIT_ROWS, fitting.get_head = saved
    m = res.metrics
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "seconds": round(wall, 2),
            "selection": m["selection"], "best_params": m["best_params"],
            "candidates": m["n_candidates"], "solver": m.get("solver"),
            "rows_searched": m["strategy"]["rows_searched"],
            "final_fit_rows": m["strategy"]["final_fit_rows"]}


def plain_logreg(cache: Path, shuffle_seed: int | None = None) -> dict:
    """StandardScaler + LogisticRegression, C by 5-fold CV on the fit rows (LogisticRegressionCV;
    its default folds are StratifiedKFold without shuffling, so they follow the cache's row order;
    ``shuffle_seed`` shuffles them instead)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fxtl.features.store import load_features
    from fxtl.heads.planning import plan_head

    c = load_features(cache)
    plan = plan_head(c.labels, c.split, paths=c.paths, seed=0)
    t0 = time.perf_counter()
    cv = 5 if shuffle_seed is None else StratifiedKFold(5, shuffle=True, random_state=shuffle_seed)
    pipe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=cv,
                                                                max_iter=2000, n_jobs=-1))
    pipe.fit(c.features[plan.fit_rows], c.labels[plan.fit_rows])
    acc = float((pipe.predict(c.features[plan.eval_rows]) == c.labels[plan.eval_rows]).mean())
    return {"accuracy": round(acc, 6), "seconds": round(time.perf_counter() - t0, 2),
            "C": float(pipe[-1].C_[0]), **({} if shuffle_seed is None else {"fold_seed": shuffle_seed})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="+", help="NAME=CACHE[:ROWS]")
    ap.add_argument("--no-reference", nargs="*", default=[], help="sizes without the exhaustive run")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks/results/heads_scale.json")
    ap.add_argument("--references-from", type=Path, default=None,
                    help="an earlier results JSON: sizes in --no-reference take their exhaustive "
                         "and plain-logreg references from it (same cache and rows; the "
                         "references do not depend on the head's own search settings)")
    ap.add_argument("--complete-references", action="store_true",
                    help="with --references-from: no new timing; add the exhaustive and plain-logreg "
                         "references that run lacks (e.g. ones stopped for time) and write it to -o")
    ap.add_argument("--lrcv-fold-seeds", type=int, nargs="*", default=[],
                    help="with --complete-references: also LogisticRegressionCV on shuffled folds, "
                         "one run per seed (how much its score owes to which rows share a fold)")
    ap.add_argument("--budget", help="passed to fit-head (e.g. 60s): the search stops between "
                                     "candidates once spent; final fits still run")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"benchmark": "heads_scale", "git_commit": commit, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "load_before": os.getloadavg(),
           "caveat": "times depend on what else ran: load_before/load_after give the machine's "
                     "load average around the run",
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "sizes": []}
    earlier = {}
    if args.references_from:
        prev = json.loads(args.references_from.read_text())
        prev["completed_by"] = commit
        earlier = {s["name"]: dict(s, git_commit=prev.get("git_commit")) for s in prev["sizes"]}
    if args.complete_references:
        complete_references(args, prev)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.sizes:
            name, _, spec = item.partition("=")
            spec, _, times = spec.partition("*")
            path, _, rows = spec.partition(":")
            cache = Path(path)
            if rows:
                cache = cut_cache(cache, int(rows), Path(tmp) / f"{name}.h5")
            if times:
                cache = tile_cache(cache, int(times), Path(tmp) / f"{name}-x{times}.h5")
            from fxtl.features.store import read_attrs

            n = int(read_attrs(cache)["n"])
            print(f"[{name}] {n} rows: fit-head --model all", file=sys.stderr)
            cli = run_cli(cache, Path(tmp) / name, args.budget)
            entry = {"name": name, "rows": n, "source": str(path), "target_seconds": TARGETS.get(name),
                     "timing_proxy": bool(times),
                     "fit_head_all": {k: cli[k] for k in ("wall_seconds", "peak_rss_mb", "command")},
                     "heads": []}
            out["sizes"].append(entry)
            for r in cli["runs"]:
                h = {"model": r["model"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                     "fit_seconds": r["fit_seconds"], "n_fit": r["n_fit"], "split": r["split"],
                     "solver": r.get("solver"), "estimator": r.get("estimator"),
                     "strategy": r["strategy"], "best_params": r["best_params"]}
                old = {o["model"]: o for o in earlier.get(name, {}).get("heads", [])
                       if earlier[name].get("rows") == n and "exhaustive" in o}
                if times:
                    h.pop("accuracy"), h.pop("macro_f1")  # near-duplicates: not an accuracy
                elif name in args.no_reference and r["model"] in old:
                    h["exhaustive"] = dict(old[r["model"]]["exhaustive"],
                                           from_run=earlier[name].get("git_commit"))
                    h["accuracy_gap_points"] = round(100 * (r["accuracy"] - h["exhaustive"]["accuracy"]), 2)
                elif name not in args.no_reference:
                    print(f"[{name}] exhaustive {r['model']}", file=sys.stderr)
                    h["exhaustive"] = exhaustive(cache, r["model"], r.get("solver") or "auto")
                    h["accuracy_gap_points"] = round(100 * (r["accuracy"] - h["exhaustive"]["accuracy"]), 2)
                entry["heads"].append(h)
                args.output.write_text(json.dumps(out, indent=2) + "\n")  # partial results survive
            if not times and name not in args.no_reference:
                entry["plain_logreg_cv5"] = plain_logreg(cache)
            elif earlier.get(name, {}).get("plain_logreg_cv5") and earlier[name].get("rows") == n:
                entry["plain_logreg_cv5"] = dict(earlier[name]["plain_logreg_cv5"],
                                                 from_run=earlier[name].get("git_commit"))
            out["load_after"] = os.getloadavg()
            args.output.write_text(json.dumps(out, indent=2) + "\n")
            print(json.dumps({"name": name, "rows": n, **entry["fit_head_all"],
                              "heads": {h["model"]: (h.get("accuracy"), h.get("exhaustive", {}).get("accuracy"))
                                        for h in entry["heads"]},
                              "plain_logreg": entry.get("plain_logreg_cv5", {}).get("accuracy")}),
                  file=sys.stderr)


def complete_references(args, prev: dict) -> None:
    """Fill in the references a results file lacks, for the sizes named (NAME=CACHE[:ROWS])."""
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.sizes:
            name, _, spec = item.partition("=")
            path, _, rows = spec.partition(":")
            cache = cut_cache(Path(path), int(rows), Path(tmp) / f"{name}.h5") if rows else Path(path)
            entry = next(s for s in prev["sizes"] if s["name"] == name)
            for h in entry["heads"]:
                if "exhaustive" not in h and "accuracy" in h:
                    print(f"[{name}] exhaustive {h['model']}", file=sys.stderr)
                    h["exhaustive"] = dict(exhaustive(cache, h["model"], h.get("solver") or "auto"),
                                           added_by=prev.get("completed_by"))
                    h["accuracy_gap_points"] = round(100 * (h["accuracy"] - h["exhaustive"]["accuracy"]), 2)
                    args.output.write_text(json.dumps(prev, indent=2) + "\n")
            if not entry.get("plain_logreg_cv5"):
                print(f"[{name}] plain LogisticRegressionCV", file=sys.stderr)
                entry["plain_logreg_cv5"] = dict(plain_logreg(cache), added_by=prev.get("completed_by"))
            done = {r["fold_seed"] for r in entry.get("plain_logreg_cv5_shuffled", [])}
            for seed in (s for s in args.lrcv_fold_seeds if s not in done):
                print(f"[{name}] LogisticRegressionCV, folds shuffled with seed {seed}", file=sys.stderr)
                entry.setdefault("plain_logreg_cv5_shuffled", []).append(
                    dict(plain_logreg(cache, seed), added_by=prev.get("completed_by")))
                args.output.write_text(json.dumps(prev, indent=2) + "\n")
            args.output.write_text(json.dumps(prev, indent=2) + "\n")


if __name__ == "__main__":
    main()
