"""``fxtl demo``: the whole job on the embedded default, offline, in a few minutes on a CPU.

Builds a small real dataset without network (scikit-learn's bundled handwritten digits written
as PNG class folders with train/val/test splits), then runs advise -> extract -> every head ->
a short fine-tune -> compare, as advise recommends, and writes a report that points at every
artifact (metrics, confusion matrices, learning curves, embedding map, comparison chart), with
95% intervals and the paired test of the best head against the fine-tune. Digits are scenario 3
(small, different): advise recommends the heads on the layers they choose, and runs beside them,
as the comparison, a fine-tune of the last two blocks from a fitted logistic-regression head
(LP-FT, see :func:`fxtl.plan.run_plan`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ._util import atomic_write_bytes, atomic_write_json, default_cache_dir

__all__ = ["run_demo", "summary_text"]


def run_demo(*, cache_dir: str | Path | None = None, per_class: int = 60, epochs: int = 2,
             image_size: int = 128, seed: int = 0, device: str = "auto", precision: str = "auto",
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the demo; returns the report (also written to ``<cache-dir>/demo/report.json``).

    Parameters
    ----------
    per_class : int
        Digits per class (10 classes); half train, a quarter val, a quarter test.
    epochs : int
        Length of the short fine-tune (kept small so the demo takes minutes).
    image_size : int
        Input size of a fine-tune from a zero classifier. Scenario 3's LP-FT fine-tune runs
        at the size the head's features were extracted at (224 for lite0) instead: the
        head is only valid there.
    """
    from .advice import advise
    from .data.samples import write_digits
    from .plan import run_plan
    from .report.plots import plot_embedding

    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    home = Path(cache_dir) if cache_dir else default_cache_dir()
    demo = home / "demo"
    data = demo / f"digits-{per_class}"
    if not (data / "train").exists():
        log(f"fxtl demo: writing scikit-learn's handwritten digits as PNG folders to {data}")
        write_digits(data, classes=10, per_class=per_class, val_fraction=0.25, test_fraction=0.25,
                     seed=seed)
    log("fxtl demo: 1/4 advise: how big is the data, how similar to ImageNet?")
    # One backbone: the demo stays a few minutes on a CPU (`fxtl advise` compares lite1/lite2)
    advice = advise(data, backbones=["lite0"], sample=min(240, per_class * 10 // 2), seed=seed,
                    device=device, precision=precision, cache_dir=home, progress=True)
    log(f"fxtl demo: scenario {advice.scenario}: {advice.explanation}")
    log("fxtl demo: 2/4 extract + heads, 3/4 fine-tune, 4/4 compare")
    plan = run_plan(advice, cache_dir=home, device=device, precision=precision, seed=seed,
                    epochs=epochs, image_size=image_size, log=log)
    emb = plot_embedding(plan["cache"], output=demo / "embedding.png", seed=seed)
    report = {"data": str(data), "advice": advice.to_dict(), "plan": plan,
              "embedding_png": str(emb.plot), "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(demo / "report.json", report)
    atomic_write_bytes(demo / "report.md", _markdown(report).encode())
    report["report"] = str(demo / "report.md")
    return report


def summary_text(report: dict[str, Any]) -> str:
    """What ``fxtl demo`` prints: the methods' table, the verdict and where the files are.

    ``report`` is :func:`run_demo`'s return value (``fxtl demo --json``); the README's demo
    block is this text of a stored report (``benchmarks/demo_table.py``).
    """
    r = report
    lines = ["", f"fxtl demo: scenario {r['advice']['scenario']} "
                 f"({r['advice']['size']['category']}, {r['advice']['similarity']['category']}) "
                 f"in {r['seconds']} s", ""]
    names = [("head " if run["kind"] == "head" else "") + run["model"] for run in r["plan"]["runs"]]
    w = max([22, *map(len, names)])
    lines.append(f"  {'method':<{w}} {'split':<6} {'accuracy [95% CI]':>22} {'macro-F1':>8}")
    for name, run in zip(names, r["plan"]["runs"]):
        ci = run.get("accuracy_ci95")
        ci = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        lines.append(f"  {name:<{w}} {run['split']:<6} "
                     f"{run['accuracy']:>7.3f} {ci:>14} {run['macro_f1']:>8.3f}")
    if r["plan"].get("verdict"):
        lines += ["", r["plan"]["verdict"]["text"]]
    lines += ["", f"Report: {r['report']}", f"Embedding map: {r['embedding_png']}"]
    chart = r["plan"].get("compare", {}).get("chart")
    if chart:
        lines.append(f"Comparison chart: {chart}")
    lines.append("Run folders (metrics.json, confusion.png, learning_curves.png):")
    lines += [f"  {run['run_dir']}" for run in r["plan"]["runs"]]
    return "\n".join(lines)


def _ci(v: Any) -> str:
    return f"{v[0]:.3f}-{v[1]:.3f}" if isinstance(v, (list, tuple)) and len(v) == 2 else "-"


def _markdown(r: dict[str, Any]) -> str:
    a = r["advice"]
    plan = r["plan"]
    comp = plan.get("compare", {})
    lines = ["# fxtl demo report", "",
             f"Data: `{r['data']}` (scikit-learn handwritten digits as PNG folders)", "",
             f"## Advice: scenario {a['scenario']}", "", a["explanation"], ""]
    rec = a.get("recommendation")
    if rec:
        against = rec.get("comparison")
        lines += [f"Recommended: {rec['what']}"
                  + (f"; compared with: {against['what']}" if against else "") + ".", ""]
    lines += ["## Results (same splits for every method; 95% intervals)", "",
              "| method | split | accuracy | 95% interval | macro-F1 | 95% interval | run folder |",
              "|---|---|---|---|---|---|---|"]
    for run in plan["runs"]:
        lines.append(f"| {run['kind']} {run['model']} | {run['split']} | {run['accuracy']:.3f} | "
                     f"{_ci(run.get('accuracy_ci95'))} | {run['macro_f1']:.3f} | "
                     f"{_ci(run.get('macro_f1_ci95'))} | `{run['run_dir']}` |")
    lines += ["", "Accuracy intervals: Wilson; macro-F1: bootstrap over the evaluated images.", "",
              "## Best head against the fine-tune (exact McNemar test, same images)", ""]
    pair = plan.get("paired")
    if pair and pair.get("p_value") is not None:
        lines.append(pair["text"])
    lines += ["", plan.get("verdict", {}).get("text", "No fine-tune: nothing to test."),
              "", "## Plots", "", f"- embedding map: `{r['embedding_png']}`"]
    if comp.get("chart"):
        lines.append(f"- comparison chart (95% error bars): `{comp['chart']}`")
    for run in plan["runs"]:
        for png in ("confusion.png", "learning_curves.png"):
            p = Path(run["run_dir"]) / png
            if p.exists():
                lines.append(f"- {run['model']} {png[:-4].replace('_', ' ')}: `{p}`")
    lines += ["", f"Total time: {r['seconds']} s", ""]
    return "\n".join(lines)
