"""Run folders read into comparison rows: one per head or fine-tune, grouped by the images it was
scored on, with what each run learned from that another reports on.

Every run folder under ``<cache-dir>/runs/`` holds a ``metrics.json`` in the schema of
:mod:`fxtl.report.metrics` (``kind`` = ``head`` or ``finetune``). :func:`collect_runs` reads them and
:func:`comparison_rows` makes one row per run. The columns:

=======================  ====================================================================
``method``               ``head:<model>`` or ``finetune:<trainable>`` (``(LP-FT)`` when the
                         classifier started from a fitted head, ``--init-head``)
``trainable_params``     numbers the method learned (head coefficients; network weights)
``accuracy``, ``macro_f1``  on the run's reported split (``split``), each with its 95% interval
                         (``accuracy_ci95``: Wilson; ``macro_f1_ci95``: bootstrap over images)
``selection_score``      the score the run was selected on (:func:`selection_score`; ``None``
                         when it selected nothing): what picks the pair :func:`fxtl.report.comparison.compare` tests
``train_seconds``        wall-clock training: for a head, the feature extraction (counted once,
                         the same cache serves every head) plus its own fit; for a fine-tune,
                         its epochs including their validation passes
``inference_images_per_second``  end to end (decode, network, head). For heads that did not
                         measure it, estimated from the cache's extraction speed plus the head's
                         own prediction time (``inference_estimated``)
``group``                which images the row was scored on: dataset fingerprint + evaluated
                         split (+ the evaluated paths when recorded). Rows are ranked only
                         within their group; groups are printed as separate tables
``rows``                 ``recorded`` when the run wrote ``rows.json``, else ``unknown``
``leaked_from``          runs that learned from (trained or selected on) images this row
                         reports on: its score is not held out from them
=======================  ====================================================================
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .._util import default_cache_dir, read_json
from ..backbones.registry import MODEL_MANIFEST
from ..errors import FxtlError
from .metrics import bootstrap_macro_f1, read_predictions, wilson_interval

__all__ = ["collect_runs", "comparison_rows", "selection_score", "finite_float"]

log = logging.getLogger(__name__)

_KINDS = ("head", "finetune")


def finite_float(v: Any) -> float | None:
    """``v`` as a finite float, or ``None`` (null, a string, a bool, NaN, infinity)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _read_metrics(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(metrics, None) for a usable run; (None, reason) for a damaged one; (None, None) for a
    ``metrics.json`` that belongs to no head or fine-tune run."""
    try:
        m = read_json(path)
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({exc})"
    if not isinstance(m, dict) or m.get("kind") not in _KINDS or "accuracy" not in m:
        return None, None
    # A fine-tune writes its manifest last (metrics.json and plots come first): a folder without
    # it stopped part-way (a full disk, a kill) and `predict` refuses it too.
    if m["kind"] == "finetune" and not (path.parent / MODEL_MANIFEST).is_file():
        return None, (f"a fine-tune that did not finish (no {MODEL_MANIFEST}); resume it with "
                      f"`fxtl finetune DATA_DIR --resume --run-name {path.parent.name}`")
    acc = finite_float(m["accuracy"])
    if acc is None or not 0.0 <= acc <= 1.0:
        return None, f"accuracy is {m['accuracy']!r}, not a fraction in [0, 1]"
    m["accuracy"] = acc
    m.setdefault("run_dir", str(path.parent))
    m["_metrics_path"] = str(path)
    return m, None


def collect_runs(*, cache_dir: str | Path | None = None, runs: Sequence[str | Path] = (),
                 dataset: str | None = None,
                 skipped: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """The ``metrics.json`` of the given run folders, or of every run under ``cache_dir/runs``.

    A run whose ``metrics.json`` is damaged (unreadable, accuracy null, a string, NaN) is left
    out with a warning, and named in ``skipped`` when given; it never stops the others.

    Parameters
    ----------
    cache_dir : path, optional
        Home of ``runs/`` (default ``./cache`` or ``$FXTL_CACHE``); ignored when ``runs`` is given.
    runs : sequence of paths
        Explicit run folders (or their ``metrics.json``).
    dataset : str, optional
        Keep runs whose dataset name equals this, or whose dataset fingerprint starts with it.
    skipped : list, optional
        Receives ``{"run_dir", "reason"}`` for every damaged run left out.

    Raises
    ------
    FxtlError
        An explicit run folder without a heads/fine-tune ``metrics.json``.
    """
    found: list[dict[str, Any]] = []

    def skip(path: Path, reason: str) -> None:
        log.warning("fxtl: skipped %s: %s", path, reason)
        if skipped is not None:
            skipped.append({"run_dir": str(path.parent), "reason": reason})

    if runs:
        for r in runs:
            path = Path(r)
            path = path if path.name == "metrics.json" else path / "metrics.json"
            m, why = _read_metrics(path) if path.is_file() else (None, None)
            if why:
                skip(path, why)
                continue
            if m is None:
                raise FxtlError(f"{path.parent} holds no metrics.json of a head or fine-tune run; "
                                "pass run folders written by fit-head or finetune")
            found.append(m)
    else:
        root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "runs"
        for path in sorted(root.glob("*/metrics.json")):
            m, why = _read_metrics(path)
            if why:
                skip(path, why)
            elif m is not None:
                found.append(m)
    if dataset:
        found = [m for m in found if m.get("dataset") == dataset or any(
            str(m.get(k) or "").startswith(dataset) for k in ("dataset_fingerprint", "data_fingerprint"))]
    return found


def _head_inference_estimate(m: dict[str, Any]) -> float | None:
    """Images/s of backbone (the cache's extraction speed) + head (its predict time)."""
    from ..features.store import read_attrs

    cache = m.get("cache")
    n, predict = finite_float(m.get("n")), finite_float(m.get("predict_seconds"))
    if not cache or not Path(cache).is_file() or not n or predict is None:
        return None
    try:
        timings = read_attrs(Path(cache)).get("timings") or {}
    except FxtlError:
        return None
    images, seconds = timings.get("images_computed"), timings.get("compute_seconds")
    if not images or not seconds:
        return None
    per_image = seconds / images + predict / n
    return 1.0 / per_image if per_image > 0 else None


# ----------------------------------------------------------------------------- what each run saw
@dataclass
class _Facts:
    """What a run folder records beside its metrics: rows.json and per-image predictions."""

    rows: Any  # fxtl.data.splits.RunRows or None
    predictions: dict[str, tuple[int, int]] | None
    problem: str | None = None

    @property
    def evaluated(self) -> frozenset[str] | None:
        if self.rows is not None:
            return frozenset(self.rows.report.paths)
        return frozenset(self.predictions) if self.predictions is not None else None


def _facts(m: dict[str, Any]) -> _Facts:
    from ..data.splits import load_rows

    run_dir = Path(str(m.get("run_dir")))
    problem = None
    try:
        rows = load_rows(run_dir)
    except FxtlError as exc:
        rows, problem = None, str(exc)
    return _Facts(rows=rows, predictions=read_predictions(run_dir), problem=problem)


def _fingerprint(m: dict[str, Any], facts: _Facts) -> str:
    """The dataset fingerprint without backbone parts when recorded, else the run's own."""
    if facts.rows is not None:
        return facts.rows.data_fingerprint
    fp = m.get("data_fingerprint") or m.get("dataset_fingerprint")
    return str(fp) if fp else f"name:{m.get('dataset')}"


def _ci(v: Any) -> list[float] | None:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        lo, hi = finite_float(v[0]), finite_float(v[1])
        if lo is not None and hi is not None:
            return [lo, hi]
    return None


def _intervals(m: dict[str, Any], facts: _Facts, acc: float,
               f1: float | None) -> tuple[list[float] | None, list[float] | None]:
    """The run's recorded 95% intervals; for runs made before fxtl recorded them, computed from
    the accuracy and n (Wilson) and from predictions.csv (bootstrap) when those are there."""
    acc_ci, f1_ci = _ci(m.get("accuracy_ci95")), _ci(m.get("macro_f1_ci95"))
    n = finite_float(m.get("n"))
    if acc_ci is None and n and n >= 1:
        acc_ci = list(wilson_interval(int(round(acc * n)), int(n)))
    if f1_ci is None and f1 is not None and facts.predictions:
        pairs = list(facts.predictions.values())
        f1_ci = list(bootstrap_macro_f1([t for t, _ in pairs], [p for _, p in pairs]))
    return acc_ci, f1_ci


def selection_score(m: dict[str, Any]) -> float | None:
    """The score a run was selected on, from its ``metrics.json``: a head's best search score,
    a fine-tune's accuracy on its selection split at the kept epoch; ``None`` when the run
    selected nothing (no search, or no selection split).

    >>> selection_score({"kind": "head", "selection_score": 0.8})
    0.8
    >>> selection_score({"kind": "finetune", "selection_split": "val", "best_epoch": 2,
    ...                  "history": [{"val_accuracy": 0.7}, {"val_accuracy": 0.75}]})
    0.75
    >>> selection_score({"kind": "finetune", "selection_split": None, "best_epoch": 2}) is None
    True
    """
    if m.get("kind") == "finetune":
        best, history = m.get("best_epoch"), m.get("history") or []
        if not m.get("selection_split") or not isinstance(best, int) or not 1 <= best <= len(history):
            return None
        return finite_float((history[best - 1] or {}).get("val_accuracy"))
    return finite_float(m.get("selection_score"))


def _row(m: dict[str, Any], facts: _Facts) -> dict[str, Any]:
    kind = m["kind"]
    model = str(m.get("model", "?"))
    method = model if kind == "finetune" or model.startswith("head:") else f"head:{model}"
    if kind == "finetune" and (m.get("config") or {}).get("init_head"):
        method += " (LP-FT)"  # the classifier started from a fitted logistic head
    fit = finite_float(m.get("fit_seconds")) or 0.0
    extract = (finite_float(m.get("extract_seconds")) or 0.0) if kind == "head" else None
    infer = finite_float(m.get("inference_images_per_second"))
    estimated = False
    if not infer and kind == "head":
        infer, estimated = _head_inference_estimate(m), True
    acc, f1 = float(m["accuracy"]), finite_float(m.get("macro_f1"))
    acc_ci, f1_ci = _intervals(m, facts, acc, f1)
    return {
        "method": method, "kind": kind, "backbone": m.get("backbone"), "dataset": m.get("dataset"),
        "split": m.get("split"), "n": m.get("n"), "trainable_params": m.get("trainable_params"),
        "accuracy": acc, "accuracy_ci95": acc_ci, "macro_f1": f1, "macro_f1_ci95": f1_ci,
        "selection_score": selection_score(m),
        "train_seconds": fit + (extract or 0.0), "fit_seconds": fit, "extract_seconds": extract,
        "epochs": m.get("epochs") if kind == "finetune" else None,
        "inference_images_per_second": float(infer) if infer else None,
        "inference_estimated": bool(estimated and infer),
        "run_dir": m.get("run_dir"), "created": m.get("created"),
        "data_fingerprint": _fingerprint(m, facts),
        "rows": "recorded" if facts.rows is not None else "unknown",
        "predictions": facts.predictions is not None, "leaked_from": [],
    }


def _assign_groups(rows: list[dict[str, Any]], facts: list[_Facts]) -> None:
    """``group`` = fingerprint + split (+ evaluated paths when two recorded sets differ)."""
    by_key: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        by_key.setdefault((r["data_fingerprint"], str(r["split"])), []).append(i)
    for (fp, split), members in by_key.items():
        sets = {facts[i].evaluated for i in members if facts[i].evaluated is not None}
        for i in members:
            r, ev = rows[i], facts[i].evaluated
            short = fp[5:] if fp.startswith("name:") else fp[:8]
            label = f"{r['dataset']} [{short}] {split}"
            if len(sets) > 1:  # same data and split name, different images (e.g. another seed)
                tag = hashlib.sha256("\0".join(sorted(ev)).encode()).hexdigest()[:6] if ev else "?"
                label += f" images {tag}"
            r["group"] = label


def comparison_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run (see the module docstring), grouped by the images they were scored on,
    best accuracy first within a group, with its rank there."""
    facts = [_facts(m) for m in runs]
    rows = [_row(m, f) for m, f in zip(runs, facts)]
    _assign_groups(rows, facts)
    _flag_leaks(rows, facts)
    order = sorted(range(len(rows)), key=lambda i: (
        rows[i]["group"], -rows[i]["accuracy"], -(rows[i]["macro_f1"] or 0.0),
        rows[i]["train_seconds"]))
    out = [rows[i] for i in order]
    rank: dict[str, int] = {}
    for r in out:
        rank[r["group"]] = r["rank"] = rank.get(r["group"], 0) + 1
    return out


def _flag_leaks(rows: list[dict[str, Any]], facts: list[_Facts]) -> None:
    from ..data.splits import leaked_rows

    for i, learner in enumerate(facts):
        for j, reporter in enumerate(facts):
            if i == j or learner.rows is None or reporter.rows is None:
                continue
            leaked = leaked_rows(learner.rows, reporter.rows)
            if leaked:
                rows[j]["leaked_from"].append({"run_dir": rows[i]["run_dir"],
                                               "method": rows[i]["method"], "images": len(leaked)})
