"""Does `fxtl advise` recommend what wins, on five real datasets?  (issue 13, items 3 and 4)

    .venv/bin/python benchmarks/advise_calibration.py [--epochs 3] [--only NAME ...]
        [--no-lpft] [--image-size PX] [--output FILE]
    .venv/bin/python benchmarks/advise_calibration.py --rejudge [--output FILE]

For hymenoptera, trashnet, chest_xray and omniglot (``../shared/datasets``) and scikit-learn's
handwritten digits (the demo's 600: 60 per class) this runs ``advise``, then on the same
train / val / test rows:

* heads on the frozen features (all five; hyper-parameters searched on ``val``, refit
  on train+val); the *best head* is the one with the best selection score (``val``), never
  chosen on test;
* the fine-tune of the advice's plan (scenario 1 runs none, so its counterpart is the full
  fine-tune the advice says would not pay; 2 and 4: the full network; 3: its comparison, the
  last two blocks from the logistic head, LP-FT, or from a zero classifier with
  ``--no-lpft``), early-stopped on ``val``;
* both scored on ``test`` with 95% intervals, and paired on the same test images with the exact
  McNemar test: the advice *held* (the advised method significantly better), *tied* (not
  significant, p >= 0.05) or *failed* (the other significantly better). The advised method is
  ``fxtl.advice.advised_method``'s: a head for scenarios 1 and 3, the fine-tune for 2 and 4.
  This script's head is the best one on the penultimate features; for scenario 3 advise now
  recommends heads on the layers they choose, measured by benchmarks/layers_accuracy.py.

``--rejudge`` judges the rows stored in ``--output`` again with today's advice (after the advice
of a scenario changed), from their stored paired tests, without running anything again.

Every dataset gets a test split no run selects on: hymenoptera's ``val`` folder becomes the test
split and 20% of its ``train`` the val split; the class-folder sets are split 60/15/25 per class
(``--seed``, default 0), through a CSV manifest beside symlinks to the files.

Then the similarity threshold (``fxtl.advice.SIMILAR_AT``): with every dataset small, the
threshold alone moves a dataset between scenario 1 (head) and 3 (fine-tune). A threshold
"agrees" with a dataset when the advice it gives did not fail there. Leave-one-dataset-out: for
each dataset, the threshold that agrees best with the other four (ties: the one nearest the
current) is checked on the one left out. The threshold is refitted on all five only if that
leave-one-out agreement beats the current threshold's agreement.

Results: ``benchmarks/results/advise_calibration.json`` (``datasets``: one row each, with every
run's settings and seconds; ``threshold``: the leave-one-out check). Prints the table of
docs/advise.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("FXTL_DATASETS", ROOT.parent / "shared" / "datasets"))
if not SHARED.is_dir():  # a throwaway worktree elsewhere than beside shared/
    SHARED = Path("/work/shared/datasets")
RESULTS = HERE / "results" / "advise_calibration.json"
# Cheapest first, so that a run cut short by the clock has measured the most datasets.
DATASETS = ("chest_xray", "trashnet", "digits", "hymenoptera", "omniglot")
HEADS = ("logreg", "svm", "linear-svm", "mlp", "knn")  # every head, as advise --run fits


# ----------------------------------------------------------------------------- data
def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if not target.exists():
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())


def split_manifest(name: str, out: Path, *, seed: int = 0, per_class: int | None = None) -> Path:
    """A ``path,label,split`` manifest with train / val / test for dataset ``name`` (class-folder
    sets: ``per_class`` images per class drawn at random first, when given)."""
    import numpy as np

    from fxtl.data.discovery import discover

    src = SHARED / name
    images = discover(src)
    rng = np.random.default_rng(seed)
    lines = ["path,label,split"]
    for label, cls in enumerate(images.class_names):
        members = [s for s in images.samples if s.label == label]
        if images.layout == "splits":  # hymenoptera: val -> test, 20% of train -> val
            train = [s for s in members if s.split == "train"]
            order = rng.permutation(len(train))
            n_val = int(round(0.2 * len(train)))
            assign = {train[i].path: ("val" if k < n_val else "train") for k, i in enumerate(order)}
            assign.update({s.path: "test" for s in members if s.split != "train"})
        else:
            if per_class:
                members = [members[i] for i in sorted(rng.permutation(len(members))[:per_class])]
            order = rng.permutation(len(members))
            n_test, n_val = int(round(0.25 * len(members))), int(round(0.15 * len(members)))
            assign = {members[i].path: ("test" if k < n_test else "val" if k < n_test + n_val
                                        else "train") for k, i in enumerate(order)}
        lines += [f"{p},{cls},{sp}" for p, sp in sorted(assign.items())]
    root = out / name
    _link_tree(src, root)
    manifest = root / f"{name}.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def _data(name: str, tmp: Path, per_class: int | None, seed: int = 0) -> Path:
    """The dataset with its train / val / test split (drawn with ``seed``)."""
    if name == "digits":
        from fxtl.data.samples import write_digits

        return write_digits(tmp / "digits", classes=10, per_class=per_class or 60,
                            val_fraction=0.25, test_fraction=0.25, seed=seed)
    return split_manifest(name, tmp, per_class=per_class, seed=seed)


# ----------------------------------------------------------------------------- shared pieces
def head_rows(heads) -> dict:
    """``{model: its test accuracy, interval, selection score...}`` of fit_heads' results."""
    return {h.metrics["model"]: {k: h.metrics.get(k) for k in (
        "accuracy", "accuracy_ci95", "macro_f1", "macro_f1_ci95", "split", "n",
        "selection", "selection_score", "fit_seconds")} for h in heads}


def best_head(heads):
    """The head with the best selection score (val), never picked on test (ties: logreg)."""
    return max(heads, key=lambda h: (h.metrics.get("selection_score") or 0.0,
                                     h.metrics["model"] == "logreg"))


def paired_tests(pairs: list[tuple]) -> tuple[list, object]:
    """The exact McNemar test of each ``(a, b)`` run pair on their common test images
    (``compare``); returns ``([pair or None per input], compare's result)``."""
    from fxtl.report.comparison import compare

    runs = list(dict.fromkeys(str(Path(r)) for ab in pairs for r in ab))
    res = compare(runs=runs, chart=False, pairs=pairs)
    same = lambda x, y: Path(str(x)).resolve() == Path(str(y)).resolve()  # noqa: E731
    return [next((p for p in res.paired if same(p["a"], a) and same(p["b"], b)), None)
            for a, b in pairs], res


def pair_row(pair: dict | None) -> dict | None:
    return {k: pair.get(k) for k in ("n", "a_only_correct", "b_only_correct", "p_value", "test",
                                     "a_accuracy", "b_accuracy", "text", "note")} if pair else None


# ----------------------------------------------------------------------------- one dataset
def _finetune_plan(scenario: int, lpft: bool) -> tuple[str, dict, str]:
    """(trainable, finetune() keyword arguments, description) of the recommended fine-tune."""
    from fxtl.advice_commands import LP_FT_CROP_SCALE

    if scenario == 3 and lpft:
        return "last:2", {"init_head": "LOGREG_RUN", "crop_scale": LP_FT_CROP_SCALE}, \
            "LP-FT last:2 from the logreg head"
    if scenario == 3:
        return "last:2", {}, "last:2 from a zero classifier"
    return "all", {}, "full fine-tune" + (" (the path scenario 1 advises against)" if scenario == 1 else "")


def run_dataset(name: str, *, tmp: Path, cache: Path, epochs: int, image_size: int | None,
                lpft: bool, seed: int, per_class: int | None, sample: int, log) -> dict:
    import fxtl
    from fxtl.advice import advice_verdict, advise
    from fxtl.heads.fitting import fit_heads
    from fxtl.plan import write_missing_predictions
    from fxtl.training.loop import finetune

    t0 = time.perf_counter()
    data = _data(name, tmp, per_class, seed)
    a = advise(data, seed=seed, sample=sample)
    log(f"{name}: scenario {a.scenario}, similarity {a.similarity['score']:.3f} "
        f"{a.similarity.get('score_ci95')} ({a.seconds:.0f} s)")
    row = {"dataset": name, "scenario": a.scenario, "similarity": a.similarity["score"],
           "similarity_ci95": a.similarity.get("score_ci95"), "certainty": a.extra["certainty"]["level"],
           "size": a.size["category"], "train_images": a.size["train_images"],
           "classes": a.size["classes"], "images_per_class_median": a.size["images_per_class_median"],
           "probe_features": a.similarity["probe_accuracy_features"],
           "probe_pixels": a.similarity["probe_accuracy_pixels"],
           "familiarity": a.similarity.get("imagenet_familiarity"), "advise_seconds": a.seconds}
    ex = fxtl.extract(data, cache_dir=cache, progress=False)
    row["extract_seconds"] = round(ex.seconds, 1)
    heads = fit_heads(ex.cache, models=list(HEADS), cache_dir=cache, seed=seed)
    row["heads"] = head_rows(heads)
    best = best_head(heads)
    logreg = next(h for h in heads if h.metrics["model"] == "logreg")
    row["best_head"] = best.metrics["model"]
    log(f"{name}: heads " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in row["heads"].items())
        + f"; best on val: {row['best_head']}")
    trainable, kw, what = _finetune_plan(a.scenario, lpft)
    kw = dict(kw)
    if kw.get("init_head") == "LOGREG_RUN":
        kw["init_head"] = logreg.run_dir
    elif image_size:
        kw["image_size"] = image_size
    ft = finetune(data, trainable=trainable, epochs=epochs, seed=seed, cache_dir=cache,
                  progress=False, **kw)
    wrote = write_missing_predictions(ft.run_dir, like=best.run_dir, data=data)
    m = ft.metrics
    row["finetune"] = {"what": what, "trainable": trainable, "accuracy": ft.accuracy,
                       "accuracy_ci95": m.get("accuracy_ci95"), "macro_f1": ft.macro_f1,
                       "macro_f1_ci95": m.get("macro_f1_ci95"), "split": ft.split,
                       "selection_split": m.get("selection_split"), "epochs": ft.epochs,
                       "best_epoch": ft.best_epoch, "seconds": round(ft.seconds, 1),
                       "image_size": (m.get("config") or {}).get("image_size"),
                       "predictions": "predict() on the head's test images" if wrote else "finetune",
                       "settings": {k: (v if k != "init_head" else "the logreg head of this row")
                                    for k, v in {"epochs": epochs, **kw}.items()}}
    pairs, res = paired_tests([(best.run_dir, ft.run_dir)])
    pair = pairs[0]
    row["paired"] = pair_row(pair)
    row["groups"] = res.groups
    verdict = advice_verdict(a.scenario, pair)
    row["advised"], row["verdict"], row["winner"] = verdict["advised"], verdict["verdict"], verdict["winner"]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"{name}: {verdict['text']} ({row['seconds']:.0f} s)")
    return row


# ----------------------------------------------------------------------------- the threshold
def _agrees(row: dict, threshold: float) -> bool:
    """Would the advice at ``threshold`` not have failed on ``row``? Every dataset here is small,
    so the threshold puts it in scenario 1 (similar) or 3 (different), and each advises what
    ``fxtl.advice.advised_method`` says. Since scenario 3 advises the several-layer head, both
    sides advise a head: a threshold can then disagree only where a fine-tune won significantly."""
    from fxtl.advice import advised_method

    if row["verdict"] in ("tied", "untested"):
        return True
    advised = advised_method(1 if row["similarity"] >= threshold else 3)
    return advised == row["winner"]


def threshold_check(rows: list[dict], current: float) -> dict:
    """Leave-one-dataset-out agreement of a refitted threshold against the current one."""
    scores = sorted({r["similarity"] for r in rows})
    candidates = sorted({current, 0.0, 1.01, *[(a + b) / 2 for a, b in zip(scores, scores[1:])]})

    def fit(train: list[dict]) -> float:
        return max(candidates, key=lambda t: (sum(_agrees(r, t) for r in train), -abs(t - current)))

    loo = []
    for i, held in enumerate(rows):
        t = fit(rows[:i] + rows[i + 1:])
        loo.append({"left_out": held["dataset"], "threshold": round(t, 4), "agrees": _agrees(held, t)})
    current_agreement = sum(_agrees(r, current) for r in rows) / len(rows)
    loo_agreement = sum(x["agrees"] for x in loo) / len(rows)
    refit = fit(rows) if loo_agreement > current_agreement else None
    return {"current": current, "current_agreement": current_agreement,
            "leave_one_out_agreement": loo_agreement, "leave_one_out": loo,
            "refitted": round(refit, 4) if refit is not None else None,
            "rule": "refit only if leave-one-dataset-out agreement beats the current threshold's"}


# ----------------------------------------------------------------------------- judging again
def rejudge(path: Path, log) -> dict:
    """Judge the rows stored in ``path`` again with today's ``advice_verdict`` (scenario 3 now
    advises the several-layer head), on the paired tests stored there: nothing is advised,
    fitted or trained again. Each row's first judgement stays in ``judged_as_measured``; the
    threshold check and the summary are recomputed; ``rejudged`` says when and with what."""
    from fxtl.advice import SIMILAR_AT, advice_verdict

    out = json.loads(path.read_text())
    for row in out["datasets"]:
        row.setdefault("judged_as_measured",
                       {k: row.get(k) for k in ("advised", "verdict", "winner")})
        pair = row.get("paired")
        if pair:  # the stored pair lacks the names describe_pair writes: the row has them
            pair = {**pair, "a_method": f"head:{row['best_head']}",
                    "b_method": f"finetune:{row['finetune']['trainable']}",
                    "split": row["finetune"].get("split")}
        v = advice_verdict(row["scenario"], pair)
        row["advised"], row["verdict"], row["winner"] = v["advised"], v["verdict"], v["winner"]
        before = row["judged_as_measured"]
        log(f"{row['dataset']}: scenario {row['scenario']}: {before['advised']} {before['verdict']}"
            f" -> {row['advised']} {row['verdict']}")
    rows = out["datasets"]
    out["threshold"] = threshold_check(rows, SIMILAR_AT) if len(rows) > 1 else None
    out["summary"] = {v: sum(r["verdict"] == v for r in rows)
                      for v in ("held", "tied", "failed", "untested")}
    out["rejudged"] = {**_env(), "what": (
        "advised / verdict / winner recomputed by fxtl.advice.advice_verdict from the stored "
        "paired test of each row (its best head on the penultimate features vs its fine-tune); "
        "no run repeated. judged_as_measured: the judgement when the row was measured")}
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- main
def _env() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:  # pragma: no cover
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "argv": " ".join(sys.argv[1:]), "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "load": "seconds depend on what else ran on the machine (load_average: at the end)"}


def _table(rows: list[dict]) -> str:
    def ci(v):
        return f"[{v[0]:.2f}, {v[1]:.2f}]" if v else ""

    lines = ["| data | train imgs | similarity [95%] | scenario (how sure) | best head, test acc | "
             "fine-tune, test acc | paired test (n, p) | advice |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        h = r["heads"][r["best_head"]]
        f = r["finetune"]
        p = r["paired"] or {}
        pv = "-" if p.get("p_value") is None else f"{p['p_value']:.2g}"
        lines.append(
            f"| {r['dataset']} | {r['train_images']} | {r['similarity']:.2f} {ci(r['similarity_ci95'])} | "
            f"{r['scenario']} ({r['certainty']}) | {r['best_head']} {h['accuracy']:.3f} {ci(h['accuracy_ci95'])} | "
            f"{f['what']}: {f['accuracy']:.3f} {ci(f['accuracy_ci95'])} | {p.get('n', '-')}, p = {pv} | "
            f"{r['advised']}: **{r['verdict']}** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=None,
                    help="input side of the fine-tunes from a zero classifier (LP-FT always runs at "
                         "the head's size) [default: the backbone's]")
    ap.add_argument("--no-lpft", action="store_true",
                    help="scenario 3 fine-tunes the last blocks from a zero classifier instead of "
                         "from the logreg head")
    ap.add_argument("--only", action="append", choices=DATASETS, metavar="NAME",
                    help=f"only these datasets (repeatable; of {', '.join(DATASETS)})")
    ap.add_argument("--per-class", type=int, default=None,
                    help="images per class drawn from each class-folder set (and digits per "
                         "class; default: all, and the demo's 60 digits) to fit a CPU budget")
    ap.add_argument("--sample", type=int, default=240, help="advise's similarity sample")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other datasets' rows already in --output (replace these)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds the splits (and digits drawn), advise's sample, the heads and the "
                         "fine-tune; another seed is another draw of every test set")
    ap.add_argument("--rejudge", action="store_true",
                    help="judge the rows stored in --output again with today's advice (no run "
                         "repeated), recompute the threshold check, and print the table")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args()
    from fxtl.advice import SIMILAR_AT

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.rejudge:
        judged = rejudge(args.output, log)
        print("\n" + _table(judged["datasets"]))
        print(f"\nverdicts: {judged['summary']}")
        return

    tmp = Path(tempfile.mkdtemp(prefix="fxtl-calib-"))
    cache = tmp / "cache"
    rows, failures = [], []
    out: dict = {}

    kept = []
    if args.merge and args.output.exists():
        kept = [r for r in json.loads(args.output.read_text()).get("datasets", [])
                if r["dataset"] not in (args.only or DATASETS)]

    def save() -> None:  # after every dataset, so a run cut short keeps what it measured
        every = sorted(kept + rows, key=lambda r: DATASETS.index(r["dataset"]))
        out.update({"env": _env(), "settings": {
            "epochs": args.epochs, "image_size": args.image_size, "lpft": not args.no_lpft,
            "seed": args.seed, "heads": HEADS, "significance": 0.05, "per_class": args.per_class,
            "sample": args.sample}, "datasets": every,
            "failures": failures,
            "threshold": threshold_check(every, SIMILAR_AT) if len(every) > 1 else None,
            "summary": {v: sum(r["verdict"] == v for r in every)
                        for v in ("held", "tied", "failed", "untested")}})
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(out, indent=2) + "\n")

    try:
        for name in args.only or DATASETS:
            try:
                rows.append(run_dataset(name, tmp=tmp, cache=cache, epochs=args.epochs,
                                        image_size=args.image_size, lpft=not args.no_lpft,
                                        seed=args.seed, per_class=args.per_class,
                                        sample=args.sample, log=log))
            except Exception as exc:  # one dataset's failure must not lose the others
                log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                failures.append({"dataset": name, "error": f"{type(exc).__name__}: {exc}"})
            save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = out["summary"]
    print("\n" + _table(out["datasets"]))
    print(f"\nverdicts: {counts}")
    if out["threshold"]:
        t = out["threshold"]
        print(f"threshold {t['current']}: agreement {t['current_agreement']:.2f}; leave-one-out "
              f"refit: {t['leave_one_out_agreement']:.2f}; refitted: {t['refitted']}")


if __name__ == "__main__":
    main()
