"""``fxtl advise --run``: run what the advice recommends (extract, heads, a fine-tune), then test
the best head against the fine-tune on the same images and say whether the advice held.

:mod:`fxtl.advice` measures and decides; this module runs the whole pipeline, as
:mod:`fxtl.demo` does on its own small dataset (through :func:`run_plan`).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ._util import csv_text, read_json
from .advice import Advice, advice_verdict
from .advice_commands import LP_FT_CROP_SCALE
from .data.discovery import discover
from .features.extraction import extract
from .heads.fitting import fit_heads
from .prediction import predict
from .report.comparison import compare, pick_by_selection
from .report.metrics import PREDICTIONS_FILE, write_predictions
from .training.loop import finetune

__all__ = ["run_plan", "write_missing_predictions"]


def write_missing_predictions(run_dir: str | Path, *, like: str | Path, data: str | Path,
                              device: str = "auto", precision: str = "auto") -> bool:
    """Give a fine-tune run without ``predictions.csv`` one, on the images run ``like`` scored.

    Labels the images listed in ``like``'s ``predictions.csv`` (paths relative to the root of
    ``data``) with ``run_dir``'s model, so the two can be paired. Returns ``False`` (and writes
    nothing) when ``run_dir`` already has predictions or ``like`` has none.
    """
    run_dir, like = Path(run_dir), Path(like)
    if (run_dir / PREDICTIONS_FILE).exists() or not (like / PREDICTIONS_FILE).exists():
        return False
    with open(like / PREDICTIONS_FILE, newline="") as fh:
        rows = [(csv_text(r["path"]), csv_text(r["label"])) for r in csv.DictReader(fh)]
    root = discover(data).root
    res = predict(run_dir, [root / p for p, _ in rows], device=device, precision=precision)
    by_path = {str(Path(e["path"]).resolve()): e["label"] for e in res.predictions}
    names = list(dict.fromkeys([t for _, t in rows] + [e["label"] for e in res.predictions]))
    kept = [(p, t, by_path[str((root / p).resolve())]) for p, t in rows
            if str((root / p).resolve()) in by_path]
    index = {n: i for i, n in enumerate(names)}
    write_predictions(run_dir, paths=[p for p, _, _ in kept], y_true=[index[t] for _, t, _ in kept],
                      y_pred=[index[q] for _, _, q in kept], class_names=names,
                      split=str(read_json(run_dir / "metrics.json").get("split")))
    return True


def run_plan(advice: Advice, *, cache_dir: str | Path | None = None, device: str = "auto",
             precision: str = "auto", seed: int = 0, epochs: int | None = None,
             image_size: int | None = None, log=None) -> dict[str, Any]:
    """Execute what ``advice`` recommends (``fxtl advise --run``), then compare the runs.

    Runs with the backbone the advice's commands use (``advice.recommended_backbone``).
    Scenario 1: extract + every head. 2 and 4: a full fine-tune (4 trains longer) beside a
    logistic-regression head. 3: several layers extracted (``layers="auto"``) and every head
    choosing among them (the recommendation), then, as the comparison, the last two blocks
    fine-tuned from a logistic-regression head on the penultimate features (LP-FT, crop scale
    :data:`LP_FT_CROP_SCALE`, at the input size the head was fitted at, so ``image_size`` does
    not apply to it; that start head is in ``start_head``, not among the compared runs). The
    same splits are used throughout, so ``compare`` lines the results up. Ends with the paired
    test of the best head (best on its search score, not on test: ``best_head``) against the
    fine-tune on the same images (``paired``: exact McNemar) and whether the advice held, tied
    or failed (``verdict``, :func:`advice_verdict`: scenario 3 advises the head).
    """
    log = log or (lambda msg: None)
    data = advice.data
    backbone = advice.recommended_backbone
    heads = ["all"] if advice.scenario in (1, 3) else ["logreg"]
    layers = "auto" if advice.scenario == 3 else None
    out: dict[str, Any] = {"scenario": advice.scenario, "backbone": backbone, "runs": [],
                           "summary": []}
    log(f"fxtl: scenario {advice.scenario}: extracting features of {data} ({backbone}"
        + (", several layers" if layers else "") + ")")
    ex = extract(data, backbone=backbone, layers=layers, device=device, precision=precision,
                 cache_dir=cache_dir, progress=log is not None)
    out["cache"] = str(ex.cache)
    out["summary"].append(f"extract: {ex.n} images -> {ex.cache} ({ex.seconds:.1f} s)")
    for res in fit_heads(ex.cache, models=heads, seed=seed, cache_dir=cache_dir, log=log):
        m = res.metrics
        out["runs"].append({"kind": "head", "model": m["model"], "accuracy": m["accuracy"],
                            "accuracy_ci95": m.get("accuracy_ci95"), "macro_f1": m["macro_f1"],
                            "macro_f1_ci95": m.get("macro_f1_ci95"), "split": m["split"],
                            "selection_score": m.get("selection_score"),
                            "train_seconds": m.get("fit_seconds"), "run_dir": str(res.run_dir)})
        out["summary"].append(f"head {m['model']}: {m['split']} accuracy {m['accuracy']:.3f} ({res.run_dir})")
    if advice.scenario != 1:
        trainable = "last:2" if advice.scenario == 3 else "all"
        n_epochs = epochs or (15 if advice.scenario == 4 else 5)
        kw: dict[str, Any] = {"image_size": image_size}
        how = ""
        if advice.scenario == 3:
            # The fine-tune folds its start head into the classifier, which sees the penultimate
            # features only; the heads above may have chosen other layers.
            start = fit_heads(ex.cache, models=["logreg"], layers="penultimate", seed=seed,
                              cache_dir=cache_dir, log=log)[0]
            out["start_head"] = str(start.run_dir)
            kw = {"init_head": str(start.run_dir), "crop_scale": LP_FT_CROP_SCALE}
            how = ", from the logreg head (LP-FT)"
            if image_size:
                log(f"fxtl: the LP-FT fine-tune runs at the input size the head was fitted at; "
                    f"image size {image_size} applies to fine-tunes from a zero classifier")
        log(f"fxtl: fine-tuning ({trainable}, {n_epochs} epochs{how})")
        ft = finetune(data, backbone=backbone, trainable=trainable, epochs=n_epochs,
                      seed=seed, device=device, precision=precision, cache_dir=cache_dir,
                      progress=log is not None, **kw)
        out["runs"].append({"kind": "finetune", "model": ft.model + (" (LP-FT)" if how else ""),
                            "accuracy": ft.accuracy, "accuracy_ci95": ft.metrics.get("accuracy_ci95"),
                            "macro_f1": ft.macro_f1, "macro_f1_ci95": ft.metrics.get("macro_f1_ci95"),
                            "split": ft.split, "run_dir": str(ft.run_dir)})
        out["summary"].append(f"finetune {trainable}{how}: {ft.split} accuracy {ft.accuracy:.3f} ({ft.run_dir})")
    # The head that stands against the fine-tune is picked on its search score, never on the
    # test score the paired test is then run on (that would favour the head).
    best_head, picked_by = pick_by_selection([r for r in out["runs"] if r["kind"] == "head"])
    out["best_head"] = {"run_dir": best_head["run_dir"], "picked_by": picked_by}
    tuned = next((r for r in out["runs"] if r["kind"] == "finetune"), None)
    if tuned is not None:  # the paired test needs its per-image predictions
        write_missing_predictions(tuned["run_dir"], like=best_head["run_dir"], data=data,
                                  device=device, precision=precision)
    pairs = [(best_head["run_dir"], tuned["run_dir"])] if tuned is not None else []
    comp = compare(cache_dir=cache_dir, runs=[r["run_dir"] for r in out["runs"]], pairs=pairs)
    out["compare"] = comp.to_dict()
    same = lambda x, y: Path(str(x)).resolve() == Path(str(y)).resolve()  # noqa: E731
    pair = next((p for p in comp.paired if tuned is not None and same(p["a"], best_head["run_dir"])
                 and same(p["b"], tuned["run_dir"])), None)
    out["paired"] = pair
    out["verdict"] = advice_verdict(advice.scenario, pair)
    out["summary"].append(out["verdict"]["text"])
    return out
