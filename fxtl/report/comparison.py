"""Heads and fine-tunes of one dataset side by side (``fxtl compare``), with the uncertainty
that a finite test set leaves, and only between runs scored on the same images.

:mod:`fxtl.report.runs` reads the run folders into rows (its docstring lists the columns);
:func:`compare` tests pairs of them, formats the table and draws a bar chart.

``paired`` holds the exact McNemar tests: per group the best head against the best fine-tune,
plus any pair asked for, on the images both runs scored (``predictions.csv``). "Best" is by
each run's *selection* score (a head's search score, a fine-tune's accuracy on the split it
early-stopped on), never by the reported score the test is then run on: picking the larger of
several test scores and testing it on the same images would favour it (``picked_by`` says
which; only runs without a selection score fall back to the reported accuracy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .._util import default_cache_dir
from ..errors import FxtlError, ParameterError
from ..tables import records_frame
from .metrics import mcnemar_exact, read_predictions
from .runs import collect_runs, comparison_rows, finite_float, selection_score

__all__ = ["collect_runs", "comparison_rows", "selection_score", "pick_by_selection",
           "format_table", "plot_comparison", "comparison_figure", "compare",
           "paired_test", "describe_pair", "CompareResult", "SIGNIFICANCE"]

SIGNIFICANCE = 0.05  # two-sided level at which a paired difference is called significant


def pick_by_selection(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, str]:
    """The row to stand for a kind of method: the best ``selection_score`` (ties: the one that
    took less time to train); without any selection score, the best reported accuracy.
    Returns ``(row, picked_by)``."""
    scored = [r for r in rows if r.get("selection_score") is not None]
    if scored:
        return max(scored, key=lambda r: (r["selection_score"], -(r.get("train_seconds") or 0.0))), \
            "selection score"
    if rows:
        return max(rows, key=lambda r: r["accuracy"]), "reported accuracy (no selection score)"
    return None, ""


# ----------------------------------------------------------------------------- paired tests
def _fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def describe_pair(pair: dict[str, Any]) -> str:
    """A paired test in words: ``"0.820 vs 0.740 on 150 test images: not significant, p = 0.09"``."""
    if pair.get("p_value") is None:
        return f"{pair['a_method']} vs {pair['b_method']}: {pair.get('note', 'no paired test')}"
    verdict = "significant" if pair["p_value"] < SIGNIFICANCE else "not significant"
    split = f" {pair['split']}" if pair.get("split") else ""
    return (f"{pair['a_method']} vs {pair['b_method']}: {pair['a_accuracy']:.3f} vs "
            f"{pair['b_accuracy']:.3f} on {pair['n']}{split} images: {verdict}, "
            f"{_fmt_p(pair['p_value'])} (exact McNemar; {pair['a_only_correct']} "
            f"image{'' if pair['a_only_correct'] == 1 else 's'} right only for the first, "
            f"{pair['b_only_correct']} only for the second)")


def paired_test(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Exact McNemar test of two comparison rows on the images both scored.

    Reads each run's ``predictions.csv``; accuracies in the result are on the common images.
    ``p_value`` is ``None`` (with a ``note``) when a run has no per-image predictions or the
    two share no evaluated image.
    """
    out: dict[str, Any] = {"a": a["run_dir"], "b": b["run_dir"], "a_method": a["method"],
                           "b_method": b["method"], "split": a["split"], "n": 0,
                           "a_only_correct": None, "b_only_correct": None, "p_value": None,
                           "test": "mcnemar-exact"}
    pa, pb = read_predictions(a["run_dir"]), read_predictions(b["run_dir"])
    missing = [r["method"] for r, p in ((a, pa), (b, pb)) if p is None]
    if missing:
        out["note"] = (f"no per-image predictions for {' and '.join(missing)} (predictions.csv); "
                       "re-run with this fxtl to test the pair")
        return out
    common = sorted(set(pa) & set(pb))
    if not common:
        out["note"] = "the two runs scored no image in common: no paired test"
        return out
    if any(pa[p][0] != pb[p][0] for p in common):
        out["note"] = "the two runs disagree on the true labels of the same images: no paired test"
        return out
    a_ok = [pa[p][0] == pa[p][1] for p in common]
    b_ok = [pb[p][0] == pb[p][1] for p in common]
    out.update(mcnemar_exact(a_ok, b_ok))
    out["a_accuracy"] = sum(a_ok) / len(common)
    out["b_accuracy"] = sum(b_ok) / len(common)
    if a["split"] != b["split"]:
        out["split"] = None
    out["text"] = describe_pair(out)
    return out


def _find(rows: Sequence[dict[str, Any]], key: str | Path) -> dict[str, Any]:
    """The row named by a run folder (path or folder name) or a unique method."""
    key_s = str(key)
    for r in rows:
        rd = Path(str(r["run_dir"]))
        if key_s in (str(rd), rd.name) or (Path(key_s).exists() and Path(key_s).resolve() == rd.resolve()):
            return r
    by_method = [r for r in rows if r["method"] == key_s]
    if len(by_method) == 1:
        return by_method[0]
    raise ParameterError("pairs", f"pairs names {key_s!r}, which is no compared run folder"
                         + (" (that method has several runs: name the folder)" if by_method else ""))


def _auto_pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[dict, dict, str]]:
    """Per group: the best head against the best fine-tune, each picked on its selection score
    (:func:`pick_by_selection`); the third item says how they were picked."""
    pairs = []
    for g in dict.fromkeys(r["group"] for r in rows):
        head, how_h = pick_by_selection([r for r in rows if r["group"] == g and r["kind"] == "head"])
        ft, how_f = pick_by_selection([r for r in rows if r["group"] == g and r["kind"] == "finetune"])
        if head and ft:
            pairs.append((head, ft, how_h if how_h == how_f else f"head: {how_h}; fine-tune: {how_f}"))
    return pairs


# ----------------------------------------------------------------------------- table and chart
def _fmt_int(v: Any) -> str:
    if finite_float(v) is None:
        return "-"
    v = int(v)
    return f"{v / 1e6:.2f}M" if v >= 1_000_000 else f"{v / 1e3:.1f}k" if v >= 10_000 else str(v)


def _fmt_score(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return f"{'-':>22}"
    inner = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[  -  ]"
    return f"{v:>7.4f} {inner:>14}"


def format_table(rows: Sequence[dict[str, Any]], *, paired: Sequence[dict[str, Any]] = ()) -> str:
    """The comparison as text: one table per group of rows scored on the same images (each
    ranked on its own), accuracy and macro-F1 with their 95% intervals, then the paired tests."""
    head = (f"{'run':<24} {'method':<22} {'backbone':<12} {'params':>8} {'accuracy [95% CI]':>22} "
            f"{'macro-F1 [95% CI]':>22} {'train s':>9} {'infer img/s':>11}")
    groups = list(dict.fromkeys(r.get("group", f"{r['dataset']} {r['split']}") for r in rows))
    lines: list[str] = []
    for g in groups:
        members = [r for r in rows if r.get("group", f"{r['dataset']} {r['split']}") == g]
        n = {r.get("n") for r in members}
        lines += [f"== {g}" + (f" ({n.pop()} images)" if len(n) == 1 else "") + " ==", head,
                  "-" * len(head)]
        for r in members:
            infer = "-" if r["inference_images_per_second"] is None else \
                f"{r['inference_images_per_second']:.1f}{'~' if r['inference_estimated'] else ''}"
            backbone = Path(str(r["backbone"])).name[:12]
            flags = "" if r.get("rows", "recorded") == "recorded" else "  (rows unknown)"
            if r.get("leaked_from"):
                flags += "  LEAK: learned-on by " + ", ".join(
                    Path(str(x["run_dir"])).name for x in r["leaked_from"])
            run = Path(str(r.get("run_dir", ""))).name
            run = run if len(run) <= 24 else run[:11] + ".." + run[-11:]  # the name's two ends
            lines.append(f"{run:<24} {r['method'][:22]:<22} {backbone:<12} {_fmt_int(r['trainable_params']):>8} "
                         f"{_fmt_score(r['accuracy'], r.get('accuracy_ci95'))} "
                         f"{_fmt_score(r['macro_f1'], r.get('macro_f1_ci95'))} "
                         f"{r['train_seconds']:>9.1f} {infer:>11}{flags}")
        for p in paired:
            if any(str(p["a"]) == str(r["run_dir"]) for r in members):
                how = p.get("picked_by")
                lines.append("paired: " + describe_pair(p)
                             + (f" [picked by {how}]" if how and how != "asked for" else ""))
        lines.append("")
    if len(groups) > 1:
        lines.append(f"{len(groups)} tables: rows scored on different images are never ranked together.")
    lines.append("train s: heads = feature extraction (once) + fit; fine-tunes = all epochs. "
                 "~ = estimated from the extraction speed. Intervals: 95% (accuracy Wilson, "
                 "macro-F1 bootstrap over images).")
    return "\n".join(lines)


def plot_comparison(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Bar chart PNG: accuracy and macro-F1 with 95% error bars, training time, inference speed."""
    from .figures import save_png

    return save_png(comparison_figure(rows), path, title=title)


def comparison_figure(rows: Sequence[dict[str, Any]]):
    """The chart :func:`plot_comparison` writes, as a matplotlib Figure (shows inline)."""
    import numpy as np

    from .figures import new_figure

    groups = list(dict.fromkeys(r.get("group", "") for r in rows))
    labels = [(f"{r.get('group')}: " if len(groups) > 1 else "") + r["method"] for r in rows]
    colours = ["tab:orange" if r["kind"] == "finetune" else "tab:blue" for r in rows]
    y = np.arange(len(rows))
    fig = new_figure(figsize=(14, 1.8 + 0.45 * len(rows)))
    axes = fig.subplots(1, 3, sharey=True)

    def err(key: str, ci_key: str) -> np.ndarray:
        e = np.zeros((2, len(rows)))
        for i, r in enumerate(rows):
            ci, v = r.get(ci_key), r[key]
            if ci and v is not None:
                e[:, i] = [max(0.0, v - ci[0]), max(0.0, ci[1] - v)]
        return e

    ax = axes[0]
    acc = [r["accuracy"] for r in rows]
    f1 = [r["macro_f1"] or 0.0 for r in rows]
    ax.barh(y - 0.2, acc, height=0.4, color=colours, label="accuracy",
            xerr=err("accuracy", "accuracy_ci95"), error_kw={"elinewidth": 1, "capsize": 2})
    ax.barh(y + 0.2, f1, height=0.4, color=colours, alpha=0.45, label="macro-F1",
            xerr=err("macro_f1", "macro_f1_ci95"), error_kw={"elinewidth": 1, "capsize": 2,
                                                             "alpha": 0.6})
    lows = [r["accuracy_ci95"][0] for r in rows if r.get("accuracy_ci95")] + acc + f1
    ax.set_xlim(max(0.0, min(lows) - 0.05), 1.0)
    ax.set_xlabel("accuracy (solid) / macro-F1 (light), 95% intervals")
    for i, r in enumerate(rows):  # the value sits right of its error bar, not on it
        right = r["accuracy_ci95"][1] if r.get("accuracy_ci95") else r["accuracy"]
        ax.text(right, i - 0.2, f" {r['accuracy']:.3f}", va="center", fontsize=7)
    ax = axes[1]
    ax.barh(y, [max(r["train_seconds"], 1e-3) for r in rows], color=colours)
    ax.set_xscale("log")
    ax.set_xlabel("training wall-clock, s (log)")
    ax = axes[2]
    ax.barh(y, [r["inference_images_per_second"] or 0.0 for r in rows], color=colours)
    ax.set_xlabel("inference images/s")
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------- the command
def _finite(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by ``None``, so its JSON is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


@dataclass
class CompareResult:
    """What :func:`compare` found; ``to_dict()`` is the ``fxtl compare --json`` output."""

    rows: list[dict[str, Any]]
    chart: Path | None
    notes: list[str] = field(default_factory=list)
    paired: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    figure: Any = field(default=None, repr=False)  # the chart as a matplotlib Figure

    @property
    def groups(self) -> list[str]:
        return list(dict.fromkeys(r["group"] for r in self.rows))

    def to_frame(self):
        """A pandas DataFrame, one row per run (``run``, ``method``, ``accuracy``...;
        intervals stay ``[lo, hi]`` cells). Needs pandas."""
        return records_frame([{"run": Path(str(r.get("run_dir", ""))).name, **r} for r in self.rows],
                             first=("run", "method", "accuracy", "macro_f1"))

    def to_dict(self) -> dict[str, Any]:
        return _finite({"rows": self.rows, "chart": str(self.chart) if self.chart else None,
                        "notes": self.notes, "paired": self.paired, "skipped": self.skipped,
                        "groups": self.groups})


def _row_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What a reader of the table must know: separate groups, unknown rows, leaks."""
    notes = []
    groups = list(dict.fromkeys(r["group"] for r in rows))
    if len(groups) > 1:
        notes.append(f"{len(groups)} groups of runs scored on different images "
                     f"({'; '.join(groups[:4])}): ranked separately, never against each other")
    unknown = [Path(str(r["run_dir"])).name for r in rows if r["rows"] == "unknown"]
    if unknown:
        notes.append(f"rows unknown (no rows.json, made before fxtl recorded them): "
                     f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}")
    for r in rows:
        for leak in r["leaked_from"]:
            notes.append(f"{Path(str(r['run_dir'])).name} reports on {leak['images']} images that "
                         f"{Path(str(leak['run_dir'])).name} learned from: not held out between them")
    return notes


def compare(*, cache_dir: str | Path | None = None, runs: Sequence[str | Path] = (),
            runs_dir: str | Path | None = None, dataset: str | None = None,
            output: str | Path | None = None, chart: bool = True,
            pairs: Sequence[tuple[str | Path, str | Path]] = ()) -> CompareResult:
    """Collect heads and fine-tunes, one row each, test the best head against the best
    fine-tune on the same images, and draw the comparison chart.

    Parameters
    ----------
    cache_dir : path, optional
        Home of ``runs/`` (default ``./cache`` or ``$FXTL_CACHE``); the chart goes there too.
    runs : sequence of paths
        Explicit run folders instead of every run under ``cache_dir``.
    runs_dir : path, optional
        Compare every run in this folder (what ``fit_head(runs_dir=...)`` and
        ``finetune(runs_dir=...)`` wrote into) instead of ``cache_dir/runs``.
    dataset : str, optional
        Only runs of this dataset (name, or a prefix of its fingerprint).
    output : path, optional
        Chart PNG (default ``<cache-dir>/comparison[-<dataset>].png``).
    chart : bool
        Draw the chart.
    pairs : sequence of (run, run)
        More pairs to test (run folder path or name, or a method that only one run has).

    Raises
    ------
    FxtlError
        No run matched.
    ParameterError
        A pair names no compared run.

    Examples
    --------
    >>> res = compare(dataset="hymenoptera")        # doctest: +SKIP
    >>> [(r["method"], round(r["accuracy"], 3)) for r in res.rows]   # doctest: +SKIP
    [('finetune:all', 0.961), ('head:logreg', 0.954)]
    >>> res.paired[0]["text"]                        # doctest: +SKIP
    'head:logreg vs finetune:all: 0.954 vs 0.961 on 153 val images: not significant, p = 1 ...'
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if runs_dir is not None and not runs:
        runs_dir = Path(runs_dir)
        if not runs_dir.is_dir():
            raise ParameterError("runs_dir", f"runs_dir {runs_dir} is not a folder; pass the folder "
                                 "fit_head or finetune wrote its runs into")
        runs = sorted(p.parent for p in runs_dir.glob("*/metrics.json"))
        if not runs:
            raise FxtlError(f"no head or fine-tune runs in {runs_dir}; pass the folder fit_head "
                            "or finetune wrote into as runs_dir", param="runs_dir")
    skipped: list[dict[str, str]] = []
    found = collect_runs(cache_dir=cache_dir, runs=runs, dataset=dataset, skipped=skipped)
    notes = [f"skipped {s['run_dir']}: {s['reason']}" for s in skipped]
    if not found:
        where = "the given folders" if runs else f"{cache_dir / 'runs'}"
        what = f" of dataset {dataset!r}" if dataset else ""
        raise FxtlError(f"no usable head or fine-tune runs{what} in {where}"
                        + (f" ({len(skipped)} skipped as damaged)" if skipped else "")
                        + "; fit a head or a fine-tune first, or pass cache_dir=FOLDER whose runs/ "
                          "holds them, or runs_dir=FOLDER that fit_head or finetune wrote into",
                        param="cache_dir")
    rows = comparison_rows(found)
    notes += _row_notes(rows)
    todo = _auto_pairs(rows) + [(_find(rows, a), _find(rows, b), "asked for") for a, b in pairs]
    paired, seen = [], set()
    for a, b, how in todo:
        if (a["run_dir"], b["run_dir"]) not in seen and a is not b:
            seen.add((a["run_dir"], b["run_dir"]))
            paired.append({**paired_test(a, b), "picked_by": how})
    path = fig = None
    if chart:
        from .figures import save_png

        datasets = sorted({str(r["dataset"]) for r in rows})
        name = f"comparison-{datasets[0]}.png" if len(datasets) == 1 else "comparison.png"
        fig = comparison_figure(rows)
        path = save_png(fig, Path(output) if output else cache_dir / name,
                        title=" / ".join(datasets[:3]))
    return CompareResult(rows=rows, chart=path, notes=notes, paired=paired, skipped=skipped,
                         figure=fig)
