"""Heads on chosen layers vs the penultimate features vs the fine-tunes  (issue 23, items 2 and 4)

    .venv/bin/python benchmarks/layers_accuracy.py [--epochs 5] [--only NAME ...] [--seed 0]
        [--work DIR] [--heads-only] [--output FILE]

On the calibration's train / val / test rows of each dataset (benchmarks/advise_calibration.py:
hymenoptera's val folder is test and 20 % of its train is val; the class-folder sets and the
demo's digits, 60 per class, are split 60/15/25 per class; the test split selects nothing):

* ``advise`` (its scenario says which fine-tune it recommends);
* one ``extract --layers auto`` (the penultimate features and the pooled later stages, one pass);
* **penultimate**: every head on ``/features`` alone (``fit-head --model all --layers
  penultimate``); the best head is the one with the best selection score on val;
* **chosen layers**: every head on the layers ``fit-head --layers auto`` chooses on val
  (fxtl/heads/layers.py), the best head picked the same way;
* **the advised fine-tune**, as the calibration runs it (scenario 3: LP-FT of the last two
  blocks from the logistic head; scenario 1: the full fine-tune it advises against);
* **the default fine-tune** (``finetune(epochs=5)``, every other option at its default: all
  blocks from the probe); for scenario 1 it is the advised run itself;
* accuracy on test with 95 % Wilson intervals and exact McNemar tests on the same test images:
  chosen layers vs penultimate, chosen layers vs the advised fine-tune, the default fine-tune vs
  the logistic head (penultimate; issue 23 item 4: never more than 1 point below it).

``--work DIR`` keeps the splits, the feature caches and every run (default
``/tmp/fxtl-layers-seed<seed>``), so a second invocation with ``--heads-only`` refits only the
heads (after a change to the layer choice) and pairs them with the fine-tunes already stored in
``--output``. Writes ``benchmarks/results/layers_accuracy.json`` after every dataset and prints
the table of docs/layers.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import advise_calibration as calib  # noqa: E402  (splits, heads, fine-tune plan, McNemar)
from fxtl.training.refit import refit_summary  # noqa: E402

RESULTS = HERE / "results" / "layers_accuracy.json"
DATASETS = calib.DATASETS


def _ft_row(ft, what: str) -> dict:
    m = ft.metrics
    return {"what": what, "run_dir": str(ft.run_dir), "accuracy": ft.accuracy,
            "accuracy_ci95": m.get("accuracy_ci95"), "split": ft.split, "n": m.get("n"),
            "trainable": m["config"]["trainable"], "lr": m["config"]["lr"],
            "epochs": ft.epochs, "best_epoch": ft.best_epoch, "stopped_early": ft.stopped_early,
            "seconds": round(ft.seconds, 1), "initial": m.get("initial"),
            "final_refit": m.get("final_refit"),
            "refit": refit_summary(m),
            "start": m.get("init_probe") or m.get("init_head"),
            "history": [{k: h.get(k) for k in ("epoch", "train_accuracy", "val_accuracy")}
                        for h in m.get("history", [])]}


def _data(name: str, root: Path, seed: int) -> Path:
    """The calibration's split of ``name``; the digits are written once (rewriting them would
    change their files' times, and so the cache's fingerprint)."""
    if name == "digits" and (root / "digits" / "train").is_dir():
        return root / "digits"
    return calib._data(name, root, None, seed)


def heads_stage(name: str, *, work: Path, seed: int, sample: int, row: dict | None,
                advice_from: dict | None, log) -> tuple[dict, dict]:
    """advise (unless ``row`` has it), extract --layers auto, heads on penultimate and on the
    chosen layers; returns ``(row, run folders)``."""
    import numpy as np

    import fxtl
    from fxtl.advice import advise
    from fxtl.features.store import load_features
    from fxtl.heads.fitting import fit_heads
    from fxtl.heads.layers import choose_layers
    from fxtl.heads.planning import plan_head

    cache_dir = work / "cache"
    data = _data(name, work / "data", seed)
    row = dict(row or {"dataset": name})
    row["data"] = str(data)
    if "scenario" not in row and advice_from is not None:
        row.update(advice_from[name], advice_from_file=True)
        log(f"{name}: scenario {row['scenario']} (advise's row in the calibration's results)")
    if "scenario" not in row:
        a = advise(data, seed=seed, sample=sample)
        row.update(scenario=a.scenario, similarity=a.similarity["score"],
                   similarity_ci95=a.similarity.get("score_ci95"),
                   certainty=a.extra["certainty"]["level"], train_images=a.size["train_images"],
                   classes=a.size["classes"], advise_seconds=a.seconds)
        log(f"{name}: scenario {a.scenario}, similarity {a.similarity['score']:.3f}")
    ex = fxtl.extract(data, cache_dir=cache_dir, layers="auto", progress=False)
    row["cache"], row["extract_seconds"] = str(ex.cache), round(ex.seconds, 1)
    t0 = time.perf_counter()
    pen = fit_heads(ex.cache, models=list(calib.HEADS), cache_dir=cache_dir, seed=seed,
                    layers="penultimate")
    row["penultimate_seconds"] = round(time.perf_counter() - t0, 1)
    fc = load_features(ex.cache)
    plan = plan_head(fc.labels, np.asarray(fc.split).astype(str), paths=fc.paths, seed=seed)
    t0 = time.perf_counter()
    choice = choose_layers(fc, plan, layers="auto", seed=seed)
    row["choice_seconds"] = round(time.perf_counter() - t0, 1)
    if choice.layers == pen[0].metrics["layers"]:
        lay = pen  # the choice fell back to the penultimate features: the same heads
    else:
        t0 = time.perf_counter()
        # the layers fit-head --layers auto chooses (the same call on the same plan), passed
        # as given so that the choice is not computed twice
        lay = fit_heads(ex.cache, models=list(calib.HEADS), cache_dir=cache_dir, seed=seed,
                        layers=tuple(choice.layers))
        row["layers_seconds"] = round(time.perf_counter() - t0, 1)
    bp, bl = calib.best_head(pen), calib.best_head(lay)
    logreg = next(h for h in pen if h.metrics["model"] == "logreg")
    row.update(heads_penultimate=calib.head_rows(pen), best_penultimate=bp.metrics["model"],
               heads_layers=calib.head_rows(lay), best_layers=bl.metrics["model"],
               layers=choice.layers, layer_selection=dict(choice),
               layer_dims={n: int(fc.layer(n).shape[1]) for n in fc.layer_names})
    log(f"{name}: penultimate {bp.metrics['model']} {bp.metrics['accuracy']:.3f}; layers "
        f"{'+'.join(choice.layers)}: {bl.metrics['model']} {bl.metrics['accuracy']:.3f}")
    runs = {"penultimate": str(bp.run_dir), "layers": str(bl.run_dir), "logreg": str(logreg.run_dir)}
    row["runs"] = runs
    return row, runs


def finetune_stage(row: dict, runs: dict, *, work: Path, epochs: int, seed: int, log,
                   default: bool = True) -> None:
    """The advised fine-tune and the default one (the same run where they coincide)."""
    from fxtl.plan import write_missing_predictions
    from fxtl.training.loop import finetune

    data, cache_dir = Path(row["data"]), work / "cache"
    trainable, kw, what = calib._finetune_plan(row["scenario"], True)
    kw = dict(kw)
    if kw.get("init_head") == "LOGREG_RUN":
        kw["init_head"] = runs["logreg"]
    # resume=True: a finished run of the same configuration (an earlier invocation's) is reported
    # again instead of trained again
    adv = finetune(data, trainable=trainable, epochs=epochs, seed=seed, cache_dir=cache_dir,
                   progress=False, resume=True, **kw)
    write_missing_predictions(adv.run_dir, like=runs["penultimate"], data=data)
    row["advised_finetune"] = _ft_row(adv, what)
    log(f"{row['dataset']}: advised fine-tune ({what}) {adv.accuracy:.3f} (kept epoch "
        f"{adv.best_epoch}, {adv.seconds:.0f} s)")
    if trainable == "all" and not kw:
        row["default_finetune"] = dict(row["advised_finetune"], what="default (the advised run)")
        return
    if not default:
        row["default_finetune"] = None
        return
    dft = finetune(data, epochs=epochs, seed=seed, cache_dir=cache_dir, progress=False, resume=True)
    write_missing_predictions(dft.run_dir, like=runs["penultimate"], data=data)
    row["default_finetune"] = _ft_row(dft, "default: all blocks from the probe")
    log(f"{row['dataset']}: default fine-tune {dft.accuracy:.3f} (kept epoch {dft.best_epoch}, "
        f"{dft.seconds:.0f} s)")


def pair_stage(row: dict, runs: dict) -> None:
    names = [("layers_vs_penultimate", runs["layers"], runs["penultimate"])]
    if row.get("advised_finetune"):
        names.append(("layers_vs_advised", runs["layers"], row["advised_finetune"]["run_dir"]))
    if row.get("default_finetune"):
        names.append(("default_vs_logreg", row["default_finetune"]["run_dir"], runs["logreg"]))
    pairs, _ = calib.paired_tests([(a, b) for _, a, b in names])
    row["paired"] = {n: calib.pair_row(p) for (n, _, _), p in zip(names, pairs)}
    row["runs"] = runs
    pen = row["heads_penultimate"][row["best_penultimate"]]["accuracy"]
    lay = row["heads_layers"][row["best_layers"]]["accuracy"]
    row["layers_gain_points"] = round(100 * (lay - pen), 1)
    if row.get("default_finetune"):
        row["default_gap_points"] = round(100 * (row["default_finetune"]["accuracy"]
                                                 - row["heads_penultimate"]["logreg"]["accuracy"]), 1)


# ----------------------------------------------------------------------------- the table
def _acc(acc: float, ci) -> str:
    return f"{acc:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{acc:.3f}"


def _p(pair: dict | None) -> str:
    if not pair or pair.get("p_value") is None:
        return "-"
    return f"{pair['a_only_correct']}/{pair['b_only_correct']}, p = {pair['p_value']:.2g}"


def table(rows: list[dict]) -> str:
    lines = ["| data (train imgs, scenario) | penultimate: best head | chosen layers: best head | "
             "gain | layers vs penult. (only a / only b, p) | advised fine-tune (kept epoch) | "
             "layers vs fine-tune (p) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        hp, hl, f = (r["heads_penultimate"][r["best_penultimate"]],
                     r["heads_layers"][r["best_layers"]], r.get("advised_finetune"))
        ft = (f"{f['what'].split(' (')[0]}: {_acc(f['accuracy'], f['accuracy_ci95'])} "
              f"({f['best_epoch']}/{f['epochs']})") if f else "not run"
        lines.append(
            f"| {r['dataset']} ({r['train_images']}, {r['scenario']}) | {r['best_penultimate']} "
            f"{_acc(hp['accuracy'], hp['accuracy_ci95'])} | {'+'.join(r['layers'])}: "
            f"{r['best_layers']} {_acc(hl['accuracy'], hl['accuracy_ci95'])} | "
            f"{r['layers_gain_points']:+.1f} | {_p(r['paired']['layers_vs_penultimate'])} | "
            f"{ft} | {_p(r['paired'].get('layers_vs_advised'))} |")
    lines += ["", "| data | logreg head (penultimate) | default fine-tune (kept epoch; start refitted "
              "on train+val?) | gap (points) | default vs head (only a / only b, p) |",
              "|---|---|---|---|---|"]
    for r in rows:
        lr, d = r["heads_penultimate"]["logreg"], r.get("default_finetune")
        if not d:
            lines.append(f"| {r['dataset']} | {_acc(lr['accuracy'], lr['accuracy_ci95'])} | not run | - | - |")
            continue
        lines.append(
            f"| {r['dataset']} | {_acc(lr['accuracy'], lr['accuracy_ci95'])} | "
            f"{_acc(d['accuracy'], d['accuracy_ci95'])} ({d['best_epoch']}/{d['epochs']}; "
            f"{'yes' if d.get('final_refit') else 'no'}) | {r['default_gap_points']:+.1f} | "
            f"{_p(r['paired'].get('default_vs_logreg'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--only", action="append", choices=DATASETS, metavar="NAME")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=240, help="advise's similarity sample")
    ap.add_argument("--work", type=Path, default=None,
                    help="keeps splits, caches and runs [default: /tmp/fxtl-layers-seed<seed>]")
    ap.add_argument("--heads-only", action="store_true",
                    help="refit the heads only; the fine-tunes are those stored in --output")
    ap.add_argument("--table", action="store_true", help="print the table of --output and stop")
    ap.add_argument("--pairs-only", action="store_true",
                    help="pair the runs already stored in --output (no fitting, no training)")
    ap.add_argument("--merge", type=Path, action="append", default=[],
                    help="with --table: first add these result files' datasets to --output")
    ap.add_argument("--advice-from", type=Path, default=None,
                    help="take advise's scenario from this advise_calibration.py result (same "
                         "seed, splits and sample) instead of running advise again")
    ap.add_argument("--no-default", action="store_true",
                    help="skip the default fine-tune where it is not the advised run (to save time)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the heads of datasets already in --output (their run folders)")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    work = args.work or Path(f"/tmp/fxtl-layers-seed{args.seed}")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    before = json.loads(args.output.read_text()) if args.output.exists() else {"datasets": []}
    if args.pairs_only:
        for r in before["datasets"]:
            if r.get("runs"):
                pair_stage(r, r["runs"])
        args.output.write_text(json.dumps(before, indent=2) + "\n")
    if args.table or args.pairs_only:
        for other in args.merge:  # datasets measured by another invocation (another --output)
            extra = json.loads(other.read_text())
            names = {r["dataset"] for r in extra["datasets"] if "paired" in r}
            before["datasets"] = sorted(
                [r for r in before["datasets"] if r["dataset"] not in names]
                + [r for r in extra["datasets"] if r["dataset"] in names],
                key=lambda r: DATASETS.index(r["dataset"]))
            before.setdefault("merged", []).append({"file": str(other), "datasets": sorted(names),
                                                    "env": extra.get("env")})
        if args.merge:
            args.output.write_text(json.dumps(before, indent=2) + "\n")
        print(table([r for r in before["datasets"] if "paired" in r]))
        return
    stored = {r["dataset"]: r for r in before["datasets"]}
    out = {"settings": {"epochs": args.epochs, "seed": args.seed, "sample": args.sample,
                        "heads": calib.HEADS, "backbone": "lite0", "image_size": 224,
                        "precision": "auto", "work": str(work)},
           "datasets": [r for r in before["datasets"] if r["dataset"] not in (args.only or DATASETS)],
           "failures": []}

    def save() -> None:  # after every step, so a run cut short keeps what it measured
        out["datasets"].sort(key=lambda r: DATASETS.index(r["dataset"]))
        out["env"] = calib._env()
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2) + "\n")

    def failed(name: str, exc: Exception) -> None:  # one dataset's failure must not lose the others
        log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
        out["failures"].append({"dataset": name, "error": f"{type(exc).__name__}: {exc}"})

    # Every dataset's heads first (minutes; the caches they leave are what the layer choice is
    # studied on), then the fine-tunes (the long part).
    advice_from = None
    if args.advice_from:
        keys = ("scenario", "similarity", "similarity_ci95", "certainty", "train_images", "classes",
                "advise_seconds")
        calib_out = json.loads(args.advice_from.read_text())
        assert calib_out["settings"]["seed"] == args.seed and calib_out["settings"]["sample"] == args.sample
        advice_from = {r["dataset"]: {k: r[k] for k in keys} for r in calib_out["datasets"]}
    staged = []
    for name in args.only or DATASETS:
        prev = stored.get(name)
        if args.resume and prev and prev.get("runs") and all(
                Path(v).is_dir() for v in prev["runs"].values()):
            log(f"{name}: heads kept from {args.output}")
            staged.append((prev, prev["runs"]))
            out["datasets"] = [r for r in out["datasets"] if r["dataset"] != name] + [prev]
            continue
        try:
            old = stored.get(name) if args.heads_only else None
            if args.heads_only and (old is None or "advised_finetune" not in old):
                raise RuntimeError(f"--heads-only: {args.output} has no fine-tunes of {name}")
            t0 = time.perf_counter()
            row, runs = heads_stage(name, work=work, seed=args.seed, sample=args.sample, row=old,
                                    advice_from=advice_from, log=log)
            row["heads_seconds"] = round(time.perf_counter() - t0, 1)
            staged.append((row, runs))
            if args.heads_only:
                pair_stage(row, runs)
            out["datasets"] = [r for r in out["datasets"] if r["dataset"] != name] + [row]
        except Exception as exc:
            failed(name, exc)
            if name in stored:  # keep what an earlier run measured
                out["datasets"] = [r for r in out["datasets"] if r["dataset"] != name] + [stored[name]]
        save()
    for row, runs in [] if args.heads_only else staged:
        try:
            t0 = time.perf_counter()
            finetune_stage(row, runs, work=work, epochs=args.epochs, seed=args.seed, log=log,
                           default=not args.no_default)
            pair_stage(row, runs)
            row["finetune_seconds"] = round(time.perf_counter() - t0, 1)
        except Exception as exc:
            failed(row["dataset"], exc)
        save()
    done = [r for r in out["datasets"] if "paired" in r]
    print(table(done))


if __name__ == "__main__":
    main()
