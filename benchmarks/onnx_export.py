"""ONNX export on hymenoptera (issue 15's measurements): same answers as `fxtl predict`, and speed.

    .venv/bin/python benchmarks/onnx_export.py [--data ../shared/datasets/hymenoptera]

1. ``fxtl.extract`` the dataset with lite0 at fp32 (reused when the cache exists), fit every
   head kind (logreg, linear-svm, mlp, svm, knn), and fine-tune lite0 for ``--epochs`` epochs.
2. ``fxtl.deploy.export_model`` each run to ``.onnx``.
3. On val (153 images): ``fxtl.predict(run, [val], precision="fp32")`` and
   ``fxtl.deploy.predict_onnx(file, [val])``, both at batch 32 on CPU: top-1 label equal for
   every image, max |probability difference| over all classes.
4. Speed at batch 32: end to end (the predict call: model load, decode, resize, score) and
   model only (a preprocessed uint8 batch of 32 through fxtl's torch backbone + head, or
   through onnxruntime; median of ``--repeats``).

Targets (issue 15): every label equal, probabilities within 1e-3. Speeds are measured on a
2-core machine shared with other jobs; they are comparable side by side, not absolute.
Writes benchmarks/results/onnx_export.json (or --output).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "hymenoptera"
TOLERANCE = 1e-3


def probs_by_path(res) -> dict[str, dict[str, float]]:
    """path -> {class: probability} from a predict result made with top_k = n classes."""
    return {p["path"]: {t["label"]: t["probability"] for t in p["top_k"]} for p in res.predictions}


def model_only(fn, x, repeats: int) -> float:
    """Images/s of ``fn(x)`` (one warm-up call, median of ``repeats``)."""
    fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def torch_scorer(run: Path):
    """fxtl's own path (what `fxtl predict` runs after decoding), at fp32."""
    from fxtl.backbones.registry import MODEL_MANIFEST
    from fxtl.deploy.sources import load_run

    src = load_run(run, manifest_name=MODEL_MANIFEST)
    return src.scores


def compare_run(name: str, run: Path, onnx_file: Path, val: Path, images: np.ndarray,
                repeats: int) -> dict:
    import fxtl
    from fxtl.deploy import load_onnx, predict_onnx

    ref = fxtl.predict(run, [val], top_k=2, device="cpu", precision="fp32", batch_size=32)
    got = predict_onnx(onnx_file, [val], top_k=2, batch_size=32)
    a, b = probs_by_path(ref), probs_by_path(got)
    la = {p["path"]: p["label"] for p in ref.predictions}
    lb = {p["path"]: p["label"] for p in got.predictions}
    assert a.keys() == b.keys(), "the two predict calls saw different images"
    diff = max(abs(a[p][c] - b[p].get(c, 0.0)) for p in a for c in a[p])
    same = sum(la[p] == lb[p] for p in la)
    scorer = torch_scorer(run)
    net = load_onnx(onnx_file)
    row = {"model": name, "run": str(run), "onnx": str(onnx_file), "bytes": onnx_file.stat().st_size,
           "n": len(la), "same_top1": same, "all_same_top1": same == len(la),
           "max_abs_prob_diff": diff, "within_tolerance": diff <= TOLERANCE,
           "fxtl_predict_images_per_second": round(ref.images_per_second, 2),
           "onnx_predict_images_per_second": round(got.images_per_second, 2),
           "fxtl_model_only_images_per_second": round(model_only(scorer, images, repeats), 2),
           "onnx_model_only_images_per_second": round(model_only(net.scores, images, repeats), 2)}
    print(json.dumps(row), flush=True)
    return row


def make_runs(data: Path, cache_dir: Path, epochs: int) -> dict[str, Path]:
    import fxtl

    ext = fxtl.extract(data, backbone="lite0", precision="fp32", cache_dir=cache_dir, progress=False)
    runs = {}
    for model in ("logreg", "linear-svm", "mlp", "svm", "knn"):
        runs[model] = fxtl.fit_head(ext.cache, model=model, cache_dir=cache_dir, jobs=1).run_dir
    ft = fxtl.finetune(data, backbone="lite0", epochs=epochs, cache_dir=cache_dir, progress=False,
                       device="cpu", precision="fp32")
    runs[f"finetune-{epochs}ep"] = ft.run_dir
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache-dir", type=Path, default=REPO / "cache" / "bench-onnx")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", type=Path, default=HERE / "results" / "onnx_export.json")
    args = ap.parse_args()
    from fxtl.data.images import EvalTransform, Preprocessing
    from fxtl.deploy import export_model

    t0 = time.perf_counter()
    runs = make_runs(args.data, args.cache_dir, args.epochs)
    val = args.data / "val"
    paths = sorted(p for p in val.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:32]
    rows, exports = [], []
    for name, run in runs.items():
        res = export_model(run, output=args.cache_dir / f"{name}.onnx")
        exports.append({"model": name, **{k: v for k, v in res.to_dict().items()
                                          if k in ("converter", "max_abs_diff", "seconds", "opset")}})
        tf = EvalTransform(Preprocessing.from_dict(json.loads(
            (res.sidecar).read_text())["preprocessing"]))
        batch = np.stack([tf.load(p).numpy() for p in paths])
        rows.append(compare_run(name, run, res.output, val, batch, args.repeats))
    out = {"benchmark": "onnx_export", "data": str(args.data), "split": "val", "batch_size": 32,
           "tolerance": TOLERANCE, "rows": rows, "exports": exports,
           "all_pass": all(r["all_same_top1"] and r["within_tolerance"] for r in rows),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "load_average_at_end": os.getloadavg(),
                       "note": "2-core machine shared with other jobs: speeds are under load"},
           "seconds": round(time.perf_counter() - t0, 1)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}; all pass: {out['all_pass']}")


if __name__ == "__main__":
    main()
