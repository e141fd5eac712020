"""Write the README's measured numbers from benchmarks/results/*.json (never by hand).

    .venv/bin/python benchmarks/readme_numbers.py           # rewrite README.md's marked sections
    .venv/bin/python benchmarks/readme_numbers.py --check   # exit 1 if any differs (tests run this)

Every number the README reports from a measurement sits in a marked section
(``<!-- fxtl:NAME -->`` ... ``<!-- /fxtl:NAME -->``, see ``benchmarks/_readme.py``) whose text a
renderer below makes from the results a benchmark script saved. To change a number, rerun the
benchmark (it writes its json), then this script; a number typed into a section fails
``tests/test_readme_numbers.py``. To add a section: a function ``(Results) -> str`` registered
with ``@section("NAME")`` here, and the markers in README.md.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any, Callable

from _readme import get_section, replace_section, section_names
from fxtl.advice import advice_verdict
from fxtl.demo import summary_text

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
README = REPO / "README.md"

__all__ = ["RENDERERS", "Results", "render", "check", "update", "main"]


class Results:
    """The json files of a results folder, read once each: ``results["scale"]``."""

    def __init__(self, folder: Path = RESULTS) -> None:
        self.folder = Path(folder)
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            path = self.folder / f"{name}.json"
            if not path.is_file():
                raise SystemExit(f"readme_numbers: {path} is missing; run the benchmark that "
                                 "writes it")
            self._loaded[name] = json.loads(path.read_text())
        return self._loaded[name]

    def all(self, pattern: str) -> list[Any]:
        """Every json whose name (without ``.json``) matches ``pattern``, in name order."""
        return [self[p.stem] for p in sorted(self.folder.glob(f"{pattern}.json"))]


Renderer = Callable[[Results], str]
RENDERERS: dict[str, Renderer] = {}


def section(name: str) -> Callable[[Renderer], Renderer]:
    """Register the renderer of README section ``name`` (one per name)."""
    def register(fn: Renderer) -> Renderer:
        if name in RENDERERS:
            raise ValueError(f"README section {name!r} has two renderers")
        RENDERERS[name] = fn
        return fn
    return register


def _f(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------- the demo
@section("demo")
def demo_block(r: Results) -> str:
    """The introduction line and what ``fxtl demo`` printed (benchmarks/demo_table.py)."""
    d = r["demo"]
    images = d["images"]
    lines = summary_text(d["report"]).strip("\n").splitlines()
    runs_at = next(i for i, line in enumerate(lines) if line.startswith("Run folders"))
    folders = lines[runs_at + 1:]
    if len(folders) > 2:  # the first and the last say what the names look like
        lines = lines[:runs_at + 1] + [folders[0], "  ...", folders[-1]]
    m = d["machine"]
    cpu = f"{m['cpus']}-core CPU" + (", no GPU" if not m.get("gpu") else f", {m['gpu']}")
    if "cpu_bf16" in m and not m.get("gpu"):  # precision auto: what the features were computed in
        cpu += (", bf16 on the CPU (avx512_bf16; an fp32 CPU gives other numbers)"
                if m["cpu_bf16"] else ", fp32 (no bf16 on this CPU)")
    load = (m.get("load_average_at_end") or [0])[0]
    if load > m["cpus"]:  # the time says more about the other jobs than about fxtl
        cpu += f", shared with other jobs: load average {load:.0f}"
    head = (f"`fxtl demo` output ({cpu}, {d['measured'][:10]}, `benchmarks/demo_table.py`: "
            f"{d['wall_seconds']:.0f} s for the whole command; "
            f"{sum(images.values())} digits, {images.get('train', 0)} train / "
            f"{images.get('val', 0)} val / {images.get('test', 0)} test):")
    return "\n".join([head, "", "```", *lines, "```"])


@section("demo-verdict")
def demo_verdict(r: Results) -> str:
    plan = r["demo"]["report"]["plan"]
    pair, verdict = plan.get("paired") or {}, plan.get("verdict") or {}
    if verdict.get("verdict") in (None, "untested"):
        return "No paired test ran: " + verdict.get("text", "no fine-tune beside the heads.")
    a, b = _f(pair["a_accuracy"]), _f(pair["b_accuracy"])
    where = f"on {pair['n']} {pair['split']} images"
    if verdict["verdict"] == "tied":
        return (f"Here the best head and the fine-tune tie: {a} vs {b} {where} is not a "
                f"significant difference (p = {pair['p_value']:.2f})")
    winner = pair["a_method"] if pair["a_accuracy"] > pair["b_accuracy"] else pair["b_method"]
    return (f"Here {winner} is significantly better: {a} vs {b} {where} "
            f"(p = {pair['p_value']:.2g}; the advice {verdict['verdict']})")


@section("advise-example")
def advise_example(r: Results) -> str:
    """What ``fxtl advise`` printed on hymenoptera (benchmarks/advise_example.py)."""
    d = r["advise_example"]
    head = (f"Example (hymenoptera, photos of ants and bees; {d['machine']['cpus']}-core CPU, "
            f"{d['measured'][:10]}, `benchmarks/advise_example.py`):")
    return "\n".join([head, "", "```", f"$ {d['command']}", *d["output"].rstrip().splitlines(),
                      "```"])


@section("backbones-table")
def backbones_table(r: Results) -> str:
    """Heads on five datasets with lite0/lite1/lite2 (benchmarks/backbones_table.py)."""
    return r["backbones_table"]["readme_block"]


# ----------------------------------------------------------------------------- summary table
def _before_after_what(d: dict[str, Any]) -> str:
    text = f"vs {d['revisions']['before']}, {d['rounds']} alternating rounds"
    load = d.get("loadavg_at_end")
    return text + (f", load average {load[0]:.1f} at the end" if load else "")


def _before_after(d: dict[str, Any], json_name: str) -> str:
    """``benchmarks/before_after.py``'s summary: medians after vs before, each stage it timed."""
    s, rates = d["summary"], d.get("rates", {})
    parts = [f"extract {s['extract']['after_median']:.1f} vs {s['extract']['before_median']:.1f} "
             f"img/s (**{s['extract']['after_over_before']:.2f}x**)"]
    if "cache_hit_seconds" in rates.get("after", {}):  # medians hide the spread: the ranges
        a, b = rates["after"]["cache_hit_seconds"], rates["before"]["cache_hit_seconds"]
        parts.append(f"cache hit {min(a):.2f}-{max(a):.2f} vs {min(b):.2f}-{max(b):.2f} s")
    if "fit_head_all_seconds" in s:
        f = s["fit_head_all_seconds"]
        parts.append(f"`fit-head --model all` {f['after_median']:.1f} vs {f['before_median']:.1f} s")
    f = s["finetune"]
    parts.append(f"fine-tune {f['after_median']:.1f} vs {f['before_median']:.1f} train img/s "
                 f"(**{f['after_over_before']:.2f}x**)")
    return "; ".join(parts) + f" (`benchmarks/results/{json_name}.json`)"


@section("before-after-what")
def before_after_what(r: Results) -> str:
    return _before_after_what(r["before_after"])


@section("before-after")
def before_after(r: Results) -> str:
    return _before_after(r["before_after"], "before_after")


@section("before-after-ea90e28-what")
def before_after_ea90e28_what(r: Results) -> str:
    return _before_after_what(r["before_after_ea90e28"])


@section("before-after-ea90e28")
def before_after_ea90e28(r: Results) -> str:
    return _before_after(r["before_after_ea90e28"], "before_after_ea90e28")


@section("lpft-gap")
def lpft_gap(r: Results) -> str:
    leak, gap = r["finetune_leak_demo"], r["demo_selection_gap"]["summary"]["epochs_2"]
    b, a = leak["before"], leak["after"]
    heads = leak["heads_val_vs_test"]
    widest = max(heads, key=lambda h: abs(heads[h][0] - heads[h][1]))
    seeds = [p["seed"] for p in gap["per_seed"]]
    lp = ", ".join(f"{p['lpft_gap']:+.3f}" for p in gap["per_seed"])
    hd = ", ".join(f"{p['heads_max_abs_gap']:.3f}" for p in gap["per_seed"])
    every = ("every time" if gap["lpft_within_heads"] == len(seeds)
             else f"{gap['lpft_within_heads']} of {len(seeds)} times")
    return (f"before: {_f(b['lpft_val_accuracy'])} vs {_f(b['lpft_test_accuracy'])} (its start "
            f"head had learned val); after (head refitted on train only): "
            f"{_f(a['lpft_val_accuracy'])} vs {_f(a['lpft_test_accuracy'])}, a gap of "
            f"{abs(a['lpft_val_accuracy'] - a['lpft_test_accuracy']):.3f}; the heads' widest in "
            f"that run: {widest} {_f(heads[widest][0])} vs {_f(heads[widest][1])}. Over data seeds "
            f"{_join_and([str(s) for s in seeds])} the LP-FT gap ({lp}) is within the heads' "
            f"largest ({hd}) {every}; mean signed gap {gap['lpft_mean_gap']:+.3f} (heads "
            f"{gap['heads_mean_gap']:+.3f})")


@section("advise-calibration")
def advise_calibration(r: Results) -> str:
    """benchmarks/advise_calibration.py, every seed's json (advise_calibration*.json), and
    scenario 3's head on the layers it chooses vs LP-FT (benchmarks/layers_accuracy.py)."""
    runs = r.all("advise_calibration*")
    rows = [row for run in runs for row in run["datasets"]]
    count = {v: sum(1 for row in rows if row["verdict"] == v) for v in ("held", "tied", "failed")}
    untested = len(rows) - sum(count.values())

    def advised_ahead(row: dict[str, Any]) -> bool:
        p = row["paired"]
        head_ahead = p["a_accuracy"] > p["b_accuracy"]
        return head_ahead if row["advised"] == "head" else p["b_accuracy"] > p["a_accuracy"]

    tested = [row for row in rows if row.get("paired") and row["paired"].get("p_value") is not None]
    ahead = sum(1 for row in tested if advised_ahead(row))
    closest = min(tested, key=lambda row: row["paired"]["p_value"])
    settings = runs[0]["settings"]
    th = runs[0]["threshold"]
    names = {row["dataset"] for row in rows}
    agree = ("all" if th["current_agreement"] == 1 else f"{th['current_agreement']:.0%} of the")
    seeds = len(runs)
    images = ("every image" if settings.get("per_class") is None
              else f"{settings['per_class']} per class")
    judged = ""
    if all(run.get("rejudged") for run in runs):
        judged = (", judged again with scenario 3 advising the head (`--rejudge`, on the stored "
                  "pairs: best penultimate head vs fine-tune)")
    return (f"{images}, {settings['epochs']} epochs, {seeds} split seed{'s' if seeds > 1 else ''}"
            f"{judged}: "
            f"{count['held']} held, **{count['tied']} tied** (not significant), {count['failed']} failed"
            + (f", {untested} untested" if untested else "")
            + f"; the advised method was ahead in {ahead} of {len(tested)} (closest to significant: "
            f"{closest['dataset']}, head:{closest['best_head']} {_f(closest['paired']['a_accuracy'])} "
            f"vs fine-tune {_f(closest['paired']['b_accuracy'])}, p = "
            f"{closest['paired']['p_value']:.2g}); the "
            f"threshold {th['current']} agrees with {agree} {len(names)} datasets"
            + (", leave-one-dataset-out too" if th.get("leave_one_out_agreement") == 1 else "")
            + f". {_layers_verdicts(r['layers_accuracy'])}")


def _layers_verdicts(d: dict[str, Any]) -> str:
    """Scenario 3's advice as advise gives it now, judged on benchmarks/layers_accuracy.py's
    pairs of the chosen-layers head against the LP-FT fine-tune."""
    by: dict[str, list[str]] = {}
    for row in d["datasets"]:
        p = (row.get("paired") or {}).get("layers_vs_advised")
        if row.get("scenario") != 3 or not p:
            continue
        v = advice_verdict(3, {**p, "a_method": "head", "b_method": "finetune"})["verdict"]
        by.setdefault(v, []).append(f"{row['dataset']} ({_f(p['a_accuracy'])} vs "
                                    f"{_f(p['b_accuracy'])}, p = {p['p_value']:.2g})")
    parts = [f"{v} on {_join_and(by[v])}" for v in ("held", "tied", "failed", "untested") if v in by]
    return (f"Scenario 3's head on the layers it chooses vs its LP-FT fine-tune (split seed "
            f"{d['settings']['seed']}, `benchmarks/layers_accuracy.py`): " + "; ".join(parts))


@section("onnx-export")
def onnx_export(r: Results) -> str:
    d = r["onnx_export"]
    rows = d["rows"]
    heads = [x["model"] for x in rows if not x["model"].startswith("finetune")]
    tuned = [x["model"] for x in rows if x["model"].startswith("finetune")]
    same = min(x["same_top1"] for x in rows)
    n = rows[0]["n"]
    what = f"every head kind ({', '.join(heads)})"
    if tuned:
        epochs = tuned[0].removeprefix("finetune-").removesuffix("ep")
        what += f" and a {epochs}-epoch fine-tune" if epochs.isdigit() else " and a fine-tune"
    diff = max(x["max_abs_prob_diff"] for x in rows)
    return (f"{what}: **{same}/{n}** same top-1 {'each' if same == n else 'at least'}, max prob. "
            f"difference {diff:.0e} (`benchmarks/results/onnx_export.json`)").replace("e-0", "e-")


# ----------------------------------------------------------------------------- extraction
@section("extract-speed")
def extract_speed(r: Results) -> str:
    d = r["extract_speed"]
    mo, mt, fx = d["model_only"], d["model_only_as_trained"], d["fxtl"]
    auto = d.get("auto_precision", "bf16")
    return "\n".join([
        "| | images/s |",
        "|---|---|",
        f"| model only, random tensors, bf16 batch {d['batch_size']} / fp32 batch 4 (BatchNorm "
        f"folded, as fxtl runs it) | {mo['bf16']:.0f} / {mo['fp32']:.0f} |",
        f"| model only, the network as trained (BatchNorm separate) | {mt['bf16']:.0f} / "
        f"{mt['fp32']:.0f} |",
        f"| `fxtl extract`, bf16{' (default here)' if auto == 'bf16' else ''}, end to end | "
        f"**{fx['bf16']['end_to_end_images_per_second']:.0f}** |",
        f"| `fxtl extract`, fp32, end to end | {fx['fp32']['end_to_end_images_per_second']:.0f} |",
        f"| PyTorch-tutorial loop (PIL transforms, fp32, batch 4, no workers), end to end | "
        f"{d['tutorial']['end_to_end_images_per_second']:.0f} |",
    ])


@section("extract-speedup")
def extract_speedup(r: Results) -> str:
    d = r["extract_speed"]
    speedup, frac = d["speedup_vs_tutorial_end_to_end"], d["fraction_of_model_only"]
    return (f"Speed-up over the tutorial loop: **{speedup:.2f}x** (target 3x: "
            f"**{'met' if speedup >= 3 else 'not met'}**); fxtl's loop at **{frac * 100:.0f} %** of the "
            f"folded model-only rate (target 85 %: **{'met' if frac >= 0.85 else 'not met'}**).")


def _val_n(r: Results) -> int:
    """Images in hymenoptera's val split (the rows every hymenoptera accuracy is over)."""
    return next(row["n"] for row in r["finetune_accuracy"]["compare_rows"]
                if row["method"] == "head:logreg")


@section("extract-bf16-accuracy")
def extract_bf16_accuracy(r: Results) -> str:
    acc = r["extract_speed"]["logreg_val_accuracy"]
    n = _val_n(r)
    same = "=" if acc["bf16"] == acc["fp32"] else "vs"
    return (f"**{acc['bf16']:.4f} (bf16) {same} {acc['fp32']:.4f} (fp32)** on val, "
            f"{round(acc['bf16'] * n)} of {n} images")


def _heads(r: Results, size: str) -> dict[str, dict[str, Any]]:
    s = next(x for x in r["heads_scale"]["sizes"] if x["name"] == size)
    return {h["model"]: h for h in s["heads"]}


@section("logreg-small")
def logreg_small(r: Results) -> str:
    acc, n = _heads(r, "small")["logreg"]["accuracy"], _val_n(r)
    return f"{acc:.3f} ({round(acc * n)} of {n}, below)"


@section("scale-memory")
def scale_memory(r: Results) -> str:
    rows = r["scale"]["memory"]["results"]
    small, big = min(rows, key=lambda x: x["images"]), max(rows, key=lambda x: x["images"])
    return (f"peak RSS {small['peak_rss_mb_main']:.0f} MB for {small['images']:,} images vs "
            f"{big['peak_rss_mb_main']:.0f} MB for {big['images']:,}")


# ----------------------------------------------------------------------------- heads
_HEAD_ORDER = ("logreg", "svm", "linear-svm", "mlp", "knn")


def _range(values: list[float], unit: str, digits: int = 1) -> str:
    lo, hi = (f"{v:.{digits}f}" for v in (min(values), max(values)))
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


@section("heads-scale")
def heads_scale(r: Results) -> str:
    labels = {"small": "hymenoptera"}
    lines = ["| rows (fitted) | `fit-head --model all` wall | peak RSS | "
             + " | ".join(_HEAD_ORDER)
             + " | exhaustive search, same space and splits | plain StandardScaler + "
               "LogisticRegressionCV |",
             "|---" * (5 + len(_HEAD_ORDER)) + "|"]
    for s in r["heads_scale"]["sizes"]:
        heads = {h["model"]: h for h in s["heads"]}
        fit = s["fit_head_all"]
        runs = [x["wall_seconds"] for x in fit.get("runs", [fit])]
        wall = f"**{_range(runs, ' s')}** over {len(runs)} run{'s' if len(runs) > 1 else ''}"
        other = fit.get("other_runs_same_commit")
        if other:
            wall += (f"; {_range(other['wall_seconds'], ' s')} in {len(other['wall_seconds'])} "
                     "more runs just after another job")
        wall += f" (target {s['target_seconds']:.0f} s)"
        rss = max(x["peak_rss_mb"] for x in fit.get("runs", [fit]))
        best = max(h["accuracy"] for h in heads.values())
        accs = [f"**{_f(heads[m]['accuracy'])}**" if round(heads[m]["accuracy"], 3) == round(best, 3)
                else _f(heads[m]["accuracy"]) for m in _HEAD_ORDER if m in heads]
        ex = {m: h["exhaustive"]["accuracy"] for m, h in heads.items() if h.get("exhaustive")}
        if ex and all(abs(ex[m] - heads[m]["accuracy"]) < 5e-4 for m in ex):
            exhaustive = "equal for all five heads" if len(ex) == 5 else "equal for every head"
        else:
            exhaustive = ", ".join(f"{m} {_f(ex[m])}" for m in _HEAD_ORDER if m in ex)
        plain = s.get("plain_logreg_cv5")
        ref = _f(plain["accuracy"]) if plain else "-"
        shuffled = s.get("plain_logreg_cv5_shuffled")
        if shuffled:
            accs_sh = [x["accuracy"] for x in shuffled]
            ref += (f" with its default folds; {_f(min(accs_sh))}-{_f(max(accs_sh))} (mean "
                    f"{_f(sum(accs_sh) / len(accs_sh))}) with shuffled folds, seeds "
                    f"{shuffled[0]['fold_seed']}-{shuffled[-1]['fold_seed']}")
        n_fit = heads["logreg"]["n_fit"]
        rows = f"{s['rows']:,} ({labels[s['name']] + ', ' if s['name'] in labels else ''}{n_fit:,})"
        lines.append(f"| {rows} | {wall} | {rss:,.0f} MB | " + " | ".join(accs)
                     + f" | {exhaustive} | {ref} |")
    return "\n".join(lines)


@section("heads-vs-exhaustive")
def heads_vs_exhaustive(r: Results) -> str:
    gaps = [(h["accuracy_gap_points"], h["model"], s["rows"]) for s in r["heads_scale"]["sizes"]
            for h in s["heads"] if h.get("accuracy_gap_points") is not None]
    worst = min(gaps)
    ahead = sum(1 for g, _, _ in gaps if g > 0)
    if worst[0] >= 0:
        return f"Every head is at or above the exhaustive search at every size, ahead of it in {ahead} cases"
    return (f"Every head is within {-worst[0]:.2f} point of the exhaustive search at every size "
            f"(the largest shortfall: {worst[1]} at {worst[2]:,} rows) and ahead of it in "
            f"{ahead} cases")


def _size(r: Results, name: str) -> dict[str, Any]:
    return next(x for x in r["heads_scale"]["sizes"] if x["name"] == name)


@section("logreg-cv-medium")
def logreg_cv_medium(r: Results) -> str:
    s = _size(r, "medium")
    ours, ref = _heads(r, "medium")["logreg"]["accuracy"], s["plain_logreg_cv5"]["accuracy"]
    n_test = s["rows"] - _heads(r, "medium")["logreg"]["n_fit"]
    return (f"{_f(ours)} against {_f(ref)}, {round(abs(ref - ours) * n_test)} of {n_test:,} "
            "test images")


@section("logreg-cv-folds")
def logreg_cv_folds(r: Results) -> str:
    s = _size(r, "medium")
    ours = _heads(r, "medium")["logreg"]["accuracy"]
    plain, shuffled = s["plain_logreg_cv5"], s["plain_logreg_cv5_shuffled"]
    accs = [x["accuracy"] for x in shuffled]
    cs = [x["C"] for x in shuffled]
    inside = "inside" if min(accs) <= ours <= max(accs) else "outside"
    mean = sum(accs) / len(accs)
    return (f"it picks C = {plain['C']:.2g} and scores {_f(plain['accuracy'])}; with the same "
            f"folds shuffled (seeds {shuffled[0]['fold_seed']}-{shuffled[-1]['fold_seed']}) it "
            f"picks C from {min(cs):.2g} to {max(cs):.2g} and scores "
            f"{', '.join(_f(a) for a in accs)}, so fxtl's {_f(ours)} is {inside} the reference's "
            f"own spread and {'above' if ours > mean else 'below'} its mean")


@section("logreg-cv-others")
def logreg_cv_others(r: Results) -> str:
    words = []
    for name in ("small", "large"):
        s = _size(r, name)
        ours, ref = _heads(r, name)["logreg"]["accuracy"], s["plain_logreg_cv5"]["accuracy"]
        how = ("equals it" if round(ours, 3) == round(ref, 3) else
               f"is {'ahead' if ours > ref else 'behind'} ({_f(ours)} vs {_f(ref)})")
        words.append(f"{s['rows']:,} rows logreg {how}" if not words else f"{s['rows']:,} rows it {how}")
    return f"At {words[0]}, at {words[1]}"


@section("heads-large-references")
def heads_large_references(r: Results) -> str:
    heads, s = _heads(r, "large"), _size(r, "large")
    return (f"the exhaustive mlp and knn in {heads['mlp']['exhaustive']['seconds']:.0f} s and "
            f"{heads['knn']['exhaustive']['seconds']:.0f} s (with the MLP's many-row setting "
            f"applied to its candidates too, as to any fit on over 8,000 rows), "
            f"LogisticRegressionCV in {s['plain_logreg_cv5']['seconds']:.0f} s")


# ----------------------------------------------------------------------------- fine-tuning
def _ft_rows(r: Results) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    rows = r["finetune_accuracy"]["compare_rows"]
    full = next(x for x in rows if x["method"] == "finetune:all")
    lpft = next((x for x in rows if x["method"].startswith("finetune:all (LP-FT")), None)
    best_head = max((x for x in rows if x["kind"] == "head"), key=lambda x: x["accuracy"])
    return full, lpft, best_head


@section("finetune-accuracy")
def finetune_accuracy(r: Results) -> str:
    full, lpft, _ = _ft_rows(r)
    res = r["finetune_accuracy"]
    v = res["verdict"]
    d, pair = v["default_finetune"], v["paired"]
    trained = ", ".join(_f(a) for a in d["val_accuracy_per_epoch"])
    ran = f"{v['epochs']} epoch(s)" + (" (stopped early)" if d["stopped_early"] else "")
    if v["best_epoch"] == 0:
        kept = (f"kept epoch 0, the probe, refitted on every train image: no trained epoch beat its "
                f"{_f(d['initial_val_accuracy'])} on a hold-out of {d['n_selection']} train images "
                f"({trained} after {ran})")
    else:
        kept = (f"kept epoch {v['best_epoch']} of {ran}, chosen on a hold-out of "
                f"{d['n_selection']} train images (the probe {_f(d['initial_val_accuracy'])}, "
                f"then {trained})")
        if d.get("refit"):  # the reported model: that epoch trained again on every train image
            rf = d["refit"]
            kept += (f", then trained again from the same start on all {rf['refit_rows']} train "
                     f"images for {rf['epochs']} epoch(s) ({rf['seconds']:.0f} s): the refit")
    m = res["machine"]
    load = (f", load average {m['loadavg_before'][0]:.1f} at the start and "
            f"{m['loadavg_at_end'][0]:.1f} at the end") if "loadavg_before" in m else ""
    return (f"**{_f(full['accuracy'])}** ({v['precision']}; {kept}; {full['train_seconds']:.0f} s "
            f"of training{load}"
            + f"); the logreg head {_f(v['logreg_head_accuracy'])} on the same {pair['n']} val "
            f"images ({v['gap_points']:+.1f} points; {pair['a_only_correct']} / "
            f"{pair['b_only_correct']} images right only for the head / the fine-tune, "
            f"p = {pair['p_value']:.2g})"
            + (f"; LP-FT from the logreg head {_f(lpft['accuracy'])}" if lpft else "")
            + f" (target: {v['target']}, {'met' if v['passed'] else 'not met'})")


@section("finetune-speed")
def finetune_speed(r: Results) -> str:
    sp = r["finetune_speed"]
    load = sp["machine"].get("loadavg_at_end")
    return (f"{sp['fxtl']['images_per_second']:.1f} vs {sp['tutorial']['images_per_second']:.1f} "
            f"img/s, **{sp['speedup_median_epoch']:.2f}x** median epoch, {sp['speedup']:.2f}x "
            f"overall" + (f", load average {load[0]:.1f} at the end" if load else "")
            + f" (target {sp['target'].removeprefix('>= ')}")


@section("finetune-speed-bf16")
def finetune_speed_bf16(r: Results) -> str:
    """benchmarks/finetune_speed.py's json at ea90e28, a run on a CPU where fxtl trained in
    bf16 (kept as benchmarks/results/finetune_speed_ea90e28.json)."""
    sp = r["finetune_speed_ea90e28"]
    return (f"{sp['fxtl']['images_per_second']:.1f} vs {sp['tutorial']['images_per_second']:.1f} "
            f"img/s, **{sp['speedup_median_epoch']:.2f}x** median epoch")


@section("finetune-speedup-bf16")
def finetune_speedup_bf16(r: Results) -> str:
    return f"{r['finetune_speed_ea90e28']['speedup_median_epoch']:.2f}x"


@section("cache-hit")
def cache_hit(r: Results) -> str:
    """benchmarks/cache_hit.py: `fxtl extract DATA` run again on an unchanged folder."""
    d = r["cache_hit"]
    hit, targets, imports, m = d["variants"]["hit"], d["targets"], d["imports"], d["machine"]
    wall_target, rss_target = targets["wall_seconds_median"], targets["peak_rss_mb"]
    wall_met = "met" if hit["wall_seconds_median"] <= wall_target else "not met"
    rss_met = "met" if hit["peak_rss_mb"] <= rss_target else "not met"
    names = {"torch": "torch", "sklearn": "scikit-learn"}
    if not imports["cache_hit"]:
        imported = "the import check's run was not a cache hit (see the json)"
    elif imports["imported"]:
        imported = f"{_join_and([names.get(x, x) for x in imports['imported']])} imported"
    else:
        imported = ("neither torch nor scikit-learn is imported"
                    + (" (nor in the child it forks)" if imports["probe_ran_in_child"] else ""))
    loads = [m["load_average_at_start"][0], *m["load_average_1min_per_round"]]
    runs = f"{d['runs']} runs" if d["runs"] != 1 else "1 run"
    return (f"**{_range(hit['wall_seconds'], ' s', 2)}** wall, median "
            f"{hit['wall_seconds_median']:.2f} s over {runs} (target {wall_target:g} s: "
            f"**{wall_met}**), **{hit['peak_rss_mb']:.0f} MB** peak RSS of its largest process "
            f"(target {rss_target:g} MB: **{rss_met}**); no network is built, {imported}; the "
            f"forked child that checks the cache adds {d['probe_seconds_median'] * 1000:.0f} ms "
            f"(median, against `--no-cache-probe`); without a bytecode cache "
            f"(`PYTHONDONTWRITEBYTECODE=1`, as in this sandbox) the median is "
            f"{d['variants']['no_bytecode_write']['wall_seconds_median']:.2f} s. {m['cpus']}-core "
            f"CPU, 1-minute load average {_range(loads, '', 1)} over the runs, "
            f"{d['measured'][:16].replace('T', ' ')} UTC (`benchmarks/results/cache_hit.json`)")


@section("finetune-ddp")
def finetune_ddp(r: Results) -> str:
    ddp = r["scale"]["finetune"]["results"]["summary"]
    return (f"{ddp['1']['train_images_per_second_median']:.1f} vs "
            f"{ddp['2']['train_images_per_second_median']:.1f} train img/s")


# The latest round of benchmarks/heads_classes.py: (before, after) labels, and their repeat.
HEADS_CLASSES_ROUND = ("s12-filed", "s12-now")
HEADS_CLASSES_REPEAT = ("s12-filed-again", "s12-now-again")


@section("heads-classes")
def heads_classes(r: Results) -> str:
    """The latest round measured alone on the CPU: main before it (a git archive of its fxtl)
    against the code after it, same caches, same host (:data:`HEADS_CLASSES_ROUND`)."""
    data = r["heads_classes"]
    labels = data["labels"]
    before, after = (labels[k] for k in HEADS_CLASSES_ROUND)
    b, a = before["caches"], after["caches"]
    digits = [n for n in ("digits300", "digits600", "digits1000") if n in a]
    target = data["target_seconds"]

    def med(runs, names, key):
        return " / ".join(f"{runs[n][key + '_median']:.1f}" for n in names)

    loads = [rep["load_before"][0] for lab in (b, a) for c in lab.values() for rep in c["repeats"]]
    reps = min(len(c["repeats"]) for lab in (b, a) for c in lab.values())
    rows = " / ".join(f"{a[n]['repeats'][0]['heads']['logreg']['n_fit']:,}" for n in digits)
    omni = a["omniglot"]["repeats"][0]["heads"]["logreg"]["n_fit"]
    ten = digits + ["omniglot"]
    met = [n for n in ten if a[n]["wall_seconds_median"] <= target]
    missed = [n for n in ten if n not in met]
    changed, resplit = [], []
    for n in a:
        heads = a[n]["repeats"][0]["heads"]
        fit_rows = (b[n]["repeats"][0]["heads"]["logreg"]["n_fit"], heads["logreg"]["n_fit"])
        if fit_rows[0] != fit_rows[1]:  # another hold-out: accuracies on other test rows
            resplit.append(f"{n} ({fit_rows[0]:,} fit rows then, {fit_rows[1]:,} now)")
            continue
        for m, h in heads.items():
            old = b[n]["repeats"][0]["heads"][m]
            if old["best_params"] != h["best_params"] or old["accuracy"] != h["accuracy"]:
                changed.append(f"{m} on {n} {_f(old['accuracy'])} to {_f(h['accuracy'])}")
    big = digits[-1]
    per_head = ", ".join(f"{m} {h['fit_seconds']:.1f} s" for m, h in sorted(
        a[big]["repeats"][0]["heads"].items(), key=lambda kv: -kv[1]["fit_seconds"]))
    hym = a["hymenoptera"]["wall_seconds_median"]
    ratio = a[big]["wall_seconds_median"] / hym
    return (f"{after['date'][:10]}, each command alone on the CPU (load average "
            f"{min(loads):.1f}-{max(loads):.1f} before each run), "
            + ("one run each" if reps == 1 else "the slower of 2 runs" if reps == 2
               else f"median of {reps} runs")
            + ", wall "
            f"(CPU): on 10-class lite0 digits with {rows} fit rows {med(a, digits, 'wall_seconds')} s "
            f"({med(a, digits, 'cpu_seconds')} s), {before.get('baseline', 'before this round')} "
            f"(main at {before.get('tree_commit', '?')[:7]}) {med(b, digits, 'wall_seconds')} s "
            f"({med(b, digits, 'cpu_seconds')} s); omniglot ({omni:,} rows, "
            f"{a['omniglot']['classes']} classes) {a['omniglot']['wall_seconds_median']:.1f} s "
            f"(before {b['omniglot']['wall_seconds_median']:.1f} s); hymenoptera "
            f"{hym:.1f} s (before {b['hymenoptera']['wall_seconds_median']:.1f} s). The "
            f"{target:.0f} s target "
            + (f"is met on {_join_and(met)}" + (f", not on {_join_and(missed)}" if missed else "")
               if met else f"is met on none of {_join_and(missed)}")
            + f" on this host{_host_words(after)}, where {big} takes {ratio:.1f} times as long as hymenoptera. At "
            f"{a[big]['repeats'][0]['heads']['logreg']['n_fit']:,} rows the heads take "
            f"{per_head} (each one's own wall time, two at a time in worker processes). "
            + ("Heads that chose or scored differently from before: " + "; ".join(changed)
               + "; every other head chose the same parameters with the same reported accuracy"
               if changed else
               "Every head chose the same parameters with the same reported accuracy as before")
            + (f". The hold-out of {_join_and(resplit)} was drawn differently in between, so "
               "its accuracies are on other test rows and are not compared" if resplit else "")
            + _heads_classes_repeat(labels, digits))


def _host_words(entry: dict) -> str:
    """" (CPU, cores)" where the results say which host ran them."""
    h = entry.get("host")
    if not h:
        return ""
    return (f" ({h['cpus']}-core {h['cpu']}" + (" with avx512_bf16" if h.get("avx512_bf16") else "")
            + ")")


def _heads_classes_repeat(labels: dict, digits: list[str]) -> str:
    """One sentence on the repeat of the same commands, where one was run."""
    if HEADS_CLASSES_REPEAT[1] not in labels:
        return ""
    b, a = (labels[k]["caches"] for k in HEADS_CLASSES_REPEAT)
    runs = min(len(c["repeats"]) for lab in (b, a) for c in lab.values())
    walls = " / ".join(f"{a[n]['wall_seconds_median']:.1f}" for n in digits)
    old = " / ".join(f"{b[n]['wall_seconds_median']:.1f}" for n in digits)
    ratio = [a[n]["wall_seconds_median"] / b[n]["wall_seconds_median"] for n in digits]
    return (f". A repeat of both right after, {'one run' if runs == 1 else f'{runs} runs'} each, measured "
            f"{walls} s on digits against {old} s before: {min(ratio):.2f}-{max(ratio):.2f} of "
            f"before's time")


@section("head-vs-finetune")
def head_vs_finetune(r: Results) -> str:
    full, _, head = _ft_rows(r)
    verb = "beats" if head["accuracy"] > full["accuracy"] else "does not beat"
    return (f"the best head ({_f(head['accuracy'])} in {head['train_seconds']:.0f} s, extraction "
            f"included) {verb} the full fine-tune ({_f(full['accuracy'])} in "
            f"{full['train_seconds']:.0f} s)")


# ----------------------------------------------------------------------------- the script
def render(text: str, results: Results) -> str:
    """``text`` with every marked section rewritten by its renderer."""
    names = section_names(text)
    unknown = [n for n in names if n not in RENDERERS]
    if unknown:
        raise SystemExit(f"readme_numbers: README section(s) {', '.join(unknown)} have no "
                         "renderer; register one with @section(NAME) in benchmarks/readme_numbers.py")
    for name in names:
        text = replace_section(text, name, RENDERERS[name](results))
    return text


def check(readme: Path = README, results: Path = RESULTS) -> list[str]:
    """The sections of ``readme`` whose text differs from what the results give (with a diff)."""
    text = Path(readme).read_text()
    new = render(text, Results(results))
    problems = []
    for name in section_names(text):
        old_body, new_body = get_section(text, name), get_section(new, name)
        if old_body != new_body:
            diff = "\n".join(difflib.unified_diff(old_body.splitlines(), new_body.splitlines(),
                                                  "README.md", "from results", lineterm=""))
            problems.append(f"section {name!r} differs from benchmarks/results:\n{diff}")
    missing = sorted(set(RENDERERS) - set(section_names(text)))
    problems += [f"section {n!r} has a renderer but no markers in README.md" for n in missing]
    return problems


def update(readme: Path = README, results: Path = RESULTS) -> list[str]:
    """Rewrite ``readme``'s marked sections; returns the names that changed."""
    text = Path(readme).read_text()
    new = render(text, Results(results))
    changed = [n for n in section_names(text) if get_section(text, n) != get_section(new, n)]
    if new != text:
        Path(readme).write_text(new)
    return changed


def update_and_say(who: str) -> None:
    """:func:`update`, then one line naming the sections that changed (for the scripts whose
    results feed the README)."""
    changed = update()
    print(f"{who}: README sections rewritten: {', '.join(changed) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="Change nothing; exit 1 when a section differs from the results.")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.check:
        problems = check(args.readme, args.results)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    changed = update(args.readme, args.results)
    print(f"readme_numbers: {len(changed)} section(s) rewritten"
          + (f": {', '.join(changed)}" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
