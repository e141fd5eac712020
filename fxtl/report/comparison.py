"""Heads and fine-tunes of one dataset side by side (``fxtl compare``).

Every run folder under ``<cache-dir>/runs/`` holds a ``metrics.json`` in the schema of
:mod:`fxtl.evaluate` (``kind`` = ``head`` or ``finetune``). :func:`compare` collects them, makes
one row per run and draws a bar chart. The columns:

=======================  ====================================================================
``method``               ``head:<model>`` or ``finetune:<trainable>`` (``(LP-FT)`` when the
                         classifier started from a fitted head, ``--init-head``)
``trainable_params``     numbers the method learned (head coefficients; network weights)
``accuracy``, ``macro_f1``  on the run's reported split (``split``)
``train_seconds``        wall-clock training: for a head, the feature extraction (counted once,
                         the same cache serves every head) plus its own fit; for a fine-tune,
                         its epochs including their validation passes
``inference_images_per_second``  end to end (decode, network, head). For heads that did not
                         measure it, estimated from the cache's extraction speed plus the head's
                         own prediction time (``inference_estimated``)
=======================  ====================================================================

Rows are comparable when they share ``dataset`` and ``split``; :func:`compare` says so when they
do not.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .._util import default_cache_dir, save_figure
from ..errors import FxtlError

__all__ = ["collect_runs", "comparison_rows", "format_table", "plot_comparison", "compare",
           "CompareResult"]

_KINDS = ("head", "finetune")


def _read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"fxtl: skipped {path}: unreadable ({exc})", file=sys.stderr)
        return None
    if not isinstance(m, dict) or m.get("kind") not in _KINDS or "accuracy" not in m:
        return None
    m.setdefault("run_dir", str(path.parent))
    m["_metrics_path"] = str(path)
    return m


def collect_runs(*, cache_dir: str | Path | None = None, runs: Sequence[str | Path] = (),
                 dataset: str | None = None) -> list[dict[str, Any]]:
    """The ``metrics.json`` of the given run folders, or of every run under ``cache_dir/runs``.

    Parameters
    ----------
    cache_dir : path, optional
        Home of ``runs/`` (default ``./cache`` or ``$FXTL_CACHE``); ignored when ``runs`` is given.
    runs : sequence of paths
        Explicit run folders (or their ``metrics.json``).
    dataset : str, optional
        Keep runs whose dataset name equals this, or whose dataset fingerprint starts with it.

    Raises
    ------
    FxtlError
        An explicit run folder without a readable heads/fine-tune ``metrics.json``.
    """
    found: list[dict[str, Any]] = []
    if runs:
        for r in runs:
            path = Path(r)
            path = path if path.name == "metrics.json" else path / "metrics.json"
            m = _read_metrics(path) if path.is_file() else None
            if m is None:
                raise FxtlError(f"{path.parent} holds no metrics.json of a head or fine-tune run; "
                                "pass run folders written by fit-head or finetune")
            found.append(m)
    else:
        root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "runs"
        for path in sorted(root.glob("*/metrics.json")):
            m = _read_metrics(path)
            if m is not None:
                found.append(m)
    if dataset:
        found = [m for m in found if m.get("dataset") == dataset or any(
            str(m.get(k) or "").startswith(dataset) for k in ("dataset_fingerprint", "data_fingerprint"))]
    return found


def _head_inference_estimate(m: dict[str, Any]) -> float | None:
    """Images/s of backbone (the cache's extraction speed) + head (its predict time)."""
    from ..features.store import read_attrs

    cache = m.get("cache")
    if not cache or not Path(cache).is_file() or not m.get("n") or m.get("predict_seconds") is None:
        return None
    try:
        timings = read_attrs(Path(cache)).get("timings") or {}
    except FxtlError:
        return None
    images, seconds = timings.get("images_computed"), timings.get("compute_seconds")
    if not images or not seconds:
        return None
    per_image = seconds / images + float(m["predict_seconds"]) / int(m["n"])
    return 1.0 / per_image if per_image > 0 else None


def comparison_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run (see the module docstring), best accuracy first within a dataset."""
    rows = []
    for m in runs:
        kind = m["kind"]
        model = str(m.get("model", "?"))
        method = model if kind == "finetune" or model.startswith("head:") else f"head:{model}"
        if kind == "finetune" and (m.get("config") or {}).get("init_head"):
            method += " (LP-FT)"  # the classifier started from a fitted logistic head
        fit = float(m.get("fit_seconds") or 0.0)
        extract = float(m.get("extract_seconds") or 0.0) if kind == "head" else None
        infer = m.get("inference_images_per_second")
        estimated = False
        if not infer and kind == "head":
            infer, estimated = _head_inference_estimate(m), True
        rows.append({
            "method": method, "kind": kind, "backbone": m.get("backbone"), "dataset": m.get("dataset"),
            "split": m.get("split"), "n": m.get("n"), "trainable_params": m.get("trainable_params"),
            "accuracy": float(m["accuracy"]), "macro_f1": float(m.get("macro_f1") or 0.0),
            "train_seconds": fit + (extract or 0.0), "fit_seconds": fit, "extract_seconds": extract,
            "epochs": m.get("epochs") if kind == "finetune" else None,
            "inference_images_per_second": float(infer) if infer else None,
            "inference_estimated": bool(estimated and infer),
            "run_dir": m.get("run_dir"), "created": m.get("created"),
        })
    rows.sort(key=lambda r: (str(r["dataset"]), -r["accuracy"], -r["macro_f1"], r["train_seconds"]))
    return rows


def _fmt_int(v: Any) -> str:
    if v is None:
        return "-"
    v = int(v)
    return f"{v / 1e6:.2f}M" if v >= 1_000_000 else f"{v / 1e3:.1f}k" if v >= 10_000 else str(v)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a text table (one line per run)."""
    several = len({(r["dataset"], r["split"]) for r in rows}) > 1
    head = (f"{'method':<22} {'backbone':<12} {'split':<8} {'params':>8} {'accuracy':>8} "
            f"{'macro-F1':>8} {'train s':>9} {'infer img/s':>11}")
    if several:
        head = f"{'dataset':<14} " + head
    lines = [head, "-" * len(head)]
    for r in rows:
        infer = "-" if r["inference_images_per_second"] is None else \
            f"{r['inference_images_per_second']:.1f}{'~' if r['inference_estimated'] else ''}"
        backbone = Path(str(r["backbone"])).name[:12]
        line = (f"{r['method'][:22]:<22} {backbone:<12} {str(r['split']):<8} "
                f"{_fmt_int(r['trainable_params']):>8} {r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} "
                f"{r['train_seconds']:>9.1f} {infer:>11}")
        lines.append((f"{str(r['dataset'])[:14]:<14} " if several else "") + line)
    lines.append("train s: heads = feature extraction (once) + fit; fine-tunes = all epochs. "
                 "~ = estimated from the extraction speed.")
    return "\n".join(lines)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Bar chart PNG: accuracy and macro-F1, training time, inference speed per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    several = len({r["dataset"] for r in rows}) > 1
    labels = [(f"{r['dataset']}: " if several else "") + r["method"] for r in rows]
    colours = ["tab:orange" if r["kind"] == "finetune" else "tab:blue" for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 1.8 + 0.45 * len(rows)), sharey=True)
    ax = axes[0]
    ax.barh(y - 0.2, [r["accuracy"] for r in rows], height=0.4, color=colours, label="accuracy")
    ax.barh(y + 0.2, [r["macro_f1"] for r in rows], height=0.4, color=colours, alpha=0.45,
            label="macro-F1")
    lo = min([r["accuracy"] for r in rows] + [r["macro_f1"] for r in rows])
    ax.set_xlim(max(0.0, lo - 0.1), 1.0)
    ax.set_xlabel("accuracy (solid) / macro-F1 (light)")
    for i, r in enumerate(rows):
        ax.text(r["accuracy"], i - 0.2, f" {r['accuracy']:.3f}", va="center", fontsize=7)
    ax = axes[1]
    ax.barh(y, [max(r["train_seconds"], 1e-3) for r in rows], color=colours)
    ax.set_xscale("log")
    ax.set_xlabel("training wall-clock, s (log)")
    ax = axes[2]
    speeds = [r["inference_images_per_second"] or 0.0 for r in rows]
    ax.barh(y, speeds, color=colours, hatch=None)
    ax.set_xlabel("inference images/s")
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path, title=title)


@dataclass
class CompareResult:
    """What :func:`compare` found; ``to_dict()`` is the ``fxtl compare --json`` output."""

    rows: list[dict[str, Any]]
    chart: Path | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "chart": str(self.chart) if self.chart else None,
                "notes": self.notes}


def compare(*, cache_dir: str | Path | None = None, runs: Sequence[str | Path] = (),
            dataset: str | None = None, output: str | Path | None = None,
            chart: bool = True) -> CompareResult:
    """Collect heads and fine-tunes, one row each, and draw the comparison chart.

    Parameters
    ----------
    cache_dir : path, optional
        Home of ``runs/`` (default ``./cache`` or ``$FXTL_CACHE``); the chart goes there too.
    runs : sequence of paths
        Explicit run folders instead of every run under ``cache_dir``.
    dataset : str, optional
        Only runs of this dataset (name, or a prefix of its fingerprint).
    output : path, optional
        Chart PNG (default ``<cache-dir>/comparison[-<dataset>].png``).
    chart : bool
        Draw the chart.

    Raises
    ------
    FxtlError
        No run matched.

    Examples
    --------
    >>> res = compare(dataset="hymenoptera")        # doctest: +SKIP
    >>> [(r["method"], round(r["accuracy"], 3)) for r in res.rows]   # doctest: +SKIP
    [('finetune:all', 0.961), ('head:logreg', 0.954)]
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    found = collect_runs(cache_dir=cache_dir, runs=runs, dataset=dataset)
    if not found:
        where = "the given folders" if runs else f"{cache_dir / 'runs'}"
        what = f" of dataset {dataset!r}" if dataset else ""
        raise FxtlError(f"no head or fine-tune runs{what} in {where}; run `fxtl fit-head` or "
                        "`fxtl finetune` first (or pass --cache-dir)")
    rows = comparison_rows(found)
    notes = []
    datasets = sorted({str(r["dataset"]) for r in rows})
    if len(datasets) > 1:
        notes.append(f"runs of {len(datasets)} datasets ({', '.join(datasets[:4])}); pass --dataset "
                     "to compare one")
    for d in datasets:
        splits = sorted({str(r["split"]) for r in rows if str(r["dataset"]) == d})
        if len(splits) > 1:
            notes.append(f"{d}: runs report on different splits ({', '.join(splits)}); their "
                         "scores are not like for like")
    path = None
    if chart:
        name = f"comparison-{datasets[0]}.png" if len(datasets) == 1 else "comparison.png"
        path = plot_comparison(rows, Path(output) if output else cache_dir / name,
                               title=" / ".join(datasets[:3]))
    return CompareResult(rows=rows, chart=path, notes=notes)
