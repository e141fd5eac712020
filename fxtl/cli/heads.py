"""The head commands: fit-head, predict, plot-embedding."""
from __future__ import annotations

import contextlib
import csv
import io
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import click

from ..heads.config import HeadConfig
from ..heads.dask_backend import BACKENDS
from ..heads.fitting import fit_heads, stop_workers
from ..heads.registry import head_names, parse_params  # --model's choices
from ..heads.runs import check_destination, destination, save_runs
from ..heads.source import LARGE_ROWS
from ..report.plots import METHODS as EMBEDDING_METHODS
from .common import (SEED, Failure, cache_dir_option, device_options, emit, handle_errors,
                     json_option, log, prepare_compute_process, resolve_cache_dir, show_progress)


def _pca_value(ctx, param, value):
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter("give a number of components (e.g. 64) or a variance fraction "
                                 "(e.g. 0.95)") from None
    if v >= 1 and v.is_integer():
        return int(v)
    if 0 < v < 1:
        return v
    raise click.BadParameter("give a whole number of components >= 1 or a fraction in (0, 1)")


def _layers_value(ctx, param, value):
    """``auto``, ``penultimate`` or a comma list of layer names (HeadConfig's ``layers``)."""
    if value in ("auto", "penultimate"):
        return value
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise click.BadParameter("give auto, penultimate or layer names separated by commas")
    return names


def _jobs_value(ctx, param, value):
    if value == 0:  # joblib: -1 is every core, -2 all but one; 0 means nothing
        raise click.BadParameter("0 jobs cannot run anything; give a count >= 1, or -1 for every core")
    return value


@contextlib.contextmanager
def _workers_stopped_on_exit(stop: Callable[[], None]):
    """SIGTERM ends the command like Ctrl-C; every exit path stops the search's worker processes
    (loky's reusable pool would otherwise outlive us, re-parented to init)."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        yield
    finally:
        stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class _ProgressBar:
    """``fxtl: svm: 12/16 candidates, ETA 3 s`` on stderr, redrawn in place on a terminal."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, model: str) -> None:
        now = time.perf_counter()
        t0 = self.started.setdefault(model, now)
        eta = (now - t0) / max(done, 1) * (total - done)
        line = f"fxtl: {model}: {done}/{total} candidates, ETA {eta:.0f} s"
        if self.tty:
            click.echo("\r" + line + ("\n" if done >= total else ""), err=True, nl=False)
        elif done >= total:
            click.echo(line.replace(", ETA 0 s", f" in {now - t0:.1f} s"), err=True)


def _fmt_params(p: dict) -> str:
    def short(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k}={short(v)}" for k, v in (p or {}).items()) or "defaults"


@click.command("fit-head")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", "models", multiple=True, default=("logreg",), show_default=True,
              type=click.Choice([*head_names(), "all"]), help="Head to fit; repeat for several, or all.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Estimator parameter, fixed (not searched), e.g. --param C=0.1; repeatable.")
@click.option("--no-search", is_flag=True, help="Fit the default parameters, no hyper-parameter search.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seeds folds, hold-out and estimators.")
@click.option("--jobs", "-j", type=int, default=-1, show_default=True, callback=_jobs_value,
              help="Cores to use: a head's candidates, and several heads on a few thousand rows, run "
                   "side by side; -1 uses every core, 1 fits one thing at a time.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Hold-out fraction (per class) when the cache has only train.")
@click.option("--cv-folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="k of the stratified k-fold CV used when there is no val split to select on.")
@click.option("--l2-normalize", is_flag=True, help="L2-normalise feature rows before scaling.")
@click.option("--pca", default=None, callback=_pca_value, metavar="N|FRACTION",
              help="PCA after scaling: components, or explained-variance fraction.")
@click.option("--large-threshold", type=click.IntRange(min=1), default=LARGE_ROWS, show_default=True,
              help="Above this many rows, fit scalable streaming estimators (SGD, partial_fit).")
@click.option("--run-name", default=None, help="Run folder name [default: <dataset>-<backbone>-<model>-<time>].")
@click.option("--backend", type=click.Choice(BACKENDS), default="loky", show_default=True,
              help="Where the search's fits run: this process (loky, threading: threads) "
                   "or a Dask cluster (pip install \"fxtl[dask]\"; docs/scaling.md).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Dask scheduler for --backend dask, e.g. tcp://host:8786 [default: "
                   "$DASK_SCHEDULER_ADDRESS, else a local cluster].")
@click.option("--budget", default=None, metavar="DURATION",
              help="Time the searches may take in all, e.g. 60s or 2m (shared by the heads; "
                   "each search stops between candidates and says so).")
@click.option("--solver", type=click.Choice(["auto", "sklearn", "torch"]), default="auto",
              show_default=True,
              help="logreg, linear-svm and mlp in scikit-learn or in torch (L-BFGS/Adam, every "
                   "core, CUDA when present); auto takes torch on large data.")
@click.option("--layers", "layers", default="auto", show_default=True, callback=_layers_value,
              metavar="auto|penultimate|NAME[,NAME...]",
              help="Features the heads are fitted on, for a cache made with `extract --layers`: "
                   "auto chooses the layers on the selection split (never the reported one); "
                   "penultimate uses /features only; or name the layers.")
@cache_dir_option
@json_option
@handle_errors
def fit_head(cache, models, params, no_search, seed, jobs, test_size, cv_folds, l2_normalize, pca,
             large_threshold, run_name, backend, scheduler, budget, solver, layers, cache_dir,
             as_json):
    """Fit scikit-learn heads on a feature CACHE and report honest scores.

    Hyper-parameters are selected on val when a test split exists, else by stratified k-fold
    CV on train; scores are reported on test, else val, else a seeded hold-out of train. Each head
    is saved in <cache-dir>/runs/<run>/ with metrics.json, rows.json, confusion.png and
    head.skops. Large data is searched on a subsample with one held-out split, then refitted on
    every row; metrics.json's "strategy" says what was done.
    """
    if scheduler and backend != "dask":
        raise click.BadParameter("needs --backend dask", param_hint="--scheduler")
    config = HeadConfig(models=models, params=parse_params(params), search=not no_search,
                        seed=seed, jobs=jobs, test_size=test_size, cv_folds=cv_folds,
                        l2_normalize=l2_normalize, pca=pca, large_threshold=large_threshold,
                        backend=backend, scheduler=scheduler, budget=budget, solver=solver,
                        layers=layers)
    where = destination(cache_dir=resolve_cache_dir(cache_dir), run_name=run_name)
    check_destination(where, config.models)  # before the fit: a taken name costs no fitting
    results = []
    try:
        with _workers_stopped_on_exit(stop_workers):
            results = fit_heads(cache, config=config, log=log,
                                progress=_ProgressBar() if show_progress() else None)
            save_runs(results, where)
    except KeyboardInterrupt:
        saved = [r.run_dir.name for r in results if r.run_dir is not None]
        kept = f"kept {', '.join(saved)}; the others were not written" if saved else \
            "no run folder was written (a head's folder appears only whole, after the fit)"
        raise Failure(f"interrupted; {kept}: running the command again fits the heads from "
                      "the start", exit_code=130, prefix="fxtl: ") from None
    runs = [r.to_dict() for r in results]
    for r in runs:
        for note in r["notes"] or []:
            log(f"fxtl: {r['model']}: {note}")
    best = max(runs, key=lambda r: (r["accuracy"], r["macro_f1"]))
    d = {"cache": str(cache), "runs": runs, "best": best["model"]}

    def human(d):
        head = (f"{'model':<11} {'split':<8} {'accuracy':>8} {'bal.acc':>8} {'macro-F1':>8} "
                f"{'fit s':>7} {'pred s':>7}  {'selection':<10} best params")
        lines = [head, "-" * len(head)]
        for r in d["runs"]:
            lines.append(f"{r['model']:<11} {r['split']:<8} {r['accuracy']:>8.4f} "
                         f"{r['balanced_accuracy']:>8.4f} {r['macro_f1']:>8.4f} {r['fit_seconds']:>7.2f} "
                         f"{r['predict_seconds']:>7.3f}  {r['selection']:<10} {_fmt_params(r['best_params'])}")
        if len(results) == 1:
            from ..report.metrics import format_metrics

            lines += ["", format_metrics(results[0].metrics)]
        b = next(r for r in d["runs"] if r["model"] == d["best"])
        lines += ["", f"best: {b['model']} ({b['accuracy']:.4f} on {b['split']}); head: {b['head']}"]
        if len(d["runs"]) > 1:
            lines.append(f"runs: {Path(b['run_dir']).parent}")
        return "\n".join(lines)

    emit(d, as_json, human)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="List the k most likely classes per image.")
@click.option("--trust", is_flag=True,
              help="Load a head whose JSON sidecar is missing or does not match, or a fine-tuned "
                   "run whose fxtl-model.json records no weights_sha256. A joblib file is a "
                   "pickle: loading one can run arbitrary code, so only for files you made yourself.")
@device_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: 128 on CUDA; on CPU 16 at bf16, 4 at fp32].")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding processes.")
@click.option("--format", "fmt", type=click.Choice(["text", "csv"]), default="text",
              show_default=True,
              help="csv: one row per input on stdout (path,label,probability,top_k,error); "
                   "--json overrides it.")
@cache_dir_option
@json_option
@handle_errors
def predict(model, inputs, top_k, trust, device, precision, batch_size, workers, fmt, cache_dir,
            as_json):
    """Label images with a saved head (MODEL: a fit-head run folder or its head.skops), a
    fine-tuned run folder (fxtl-model.json) or an exported model.onnx (`fxtl export-model`).

    INPUTS are image files, folders (searched recursively) or feature caches (.h5, heads only).
    The head's backbone runs with the same weights, preprocessing, layer and precision (auto =
    the precision of the head's cache). Unreadable images are reported and skipped.
    """
    from ..prediction import predict as run_predict

    prepare_compute_process()
    res = run_predict(model, inputs, top_k=top_k, trust=trust, device=device, precision=precision,
                      batch_size=batch_size, workers=workers, cache_dir=resolve_cache_dir(cache_dir),
                      progress=show_progress(as_json))
    for note in res.notes:
        log(f"fxtl: {note}")

    def human(d):
        width = min(60, max([len(p["path"]) for p in d["predictions"]] + [4]))
        lines = []
        for p in d["predictions"]:
            line = f"{p['path']:<{width}}  {p['label']:<16} {p['probability']:.4f}"
            if len(p["top_k"]) > 1:
                line += "   " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in p["top_k"])
            lines.append(line)
        lines += [f"skipped {e['path']}: {e['reason']}" for e in d["errors"]]
        return "\n".join(lines)

    emit(res.to_dict(), as_json, _predictions_csv if fmt == "csv" else human)


def _predictions_csv(d: dict[str, Any]) -> str:
    """``fxtl predict --format csv``: a header, one row per prediction, then one per skipped
    input (empty label, the reason in ``error``); ``top_k`` holds ``label=p;label=p``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "probability", "top_k", "error"])
    for p in d["predictions"]:
        w.writerow([p["path"], p["label"], f"{p['probability']:.6f}",
                    ";".join(f"{t['label']}={t['probability']:.6f}" for t in p["top_k"]), ""])
    for e in d["errors"]:
        w.writerow([e["path"], "", "", "", e["reason"]])
    return buf.getvalue().rstrip("\n")


@click.command("plot-embedding")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(EMBEDDING_METHODS), default="pca", show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
              help="Only this split [default: all, told apart by marker].")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG path [default: <cache-dir>/plots/<cache>-<method>.png].")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--max-points", type=click.IntRange(min=3), default=5000, show_default=True,
              help="Subsample larger caches (stratified by class).")
@click.option("--perplexity", type=click.FloatRange(min=1.0), default=30.0, show_default=True,
              help="t-SNE perplexity.")
@cache_dir_option
@json_option
@handle_errors
def plot_embedding(cache, method, split, output, seed, max_points, perplexity, cache_dir, as_json):
    """Draw a 2-D map (PCA or t-SNE) of a CACHE's features, coloured by class, as a PNG."""
    from ..report.plots import plot_embedding as run_plot

    res = run_plot(cache, method=method, split=split, output=output, seed=seed,
                   max_points=max_points, perplexity=perplexity, cache_dir=resolve_cache_dir(cache_dir))
    for note in res.notes:
        log(f"fxtl: {note}")
    emit(res.to_dict(), as_json, lambda d: d["plot"])
