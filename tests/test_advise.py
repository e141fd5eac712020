"""fxtl advise: size and similarity measured, scenario and commands derived."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from scipy.stats import binomtest

from fxtl.advice import SCENARIOS, _commands, advice_verdict, advise, advised_method, certainty
from fxtl.cli import cli
from fxtl.errors import ParameterError


@pytest.fixture(scope="module")
def digits_advice(digits_dir):
    # the cache home the CLI also finds (conftest sets $FXTL_CACHE), so the commands agree
    return advise(digits_dir, sample=60, backbones=["lite0"], cache_dir=os.environ["FXTL_CACHE"])


def test_digits_are_different_from_imagenet(digits_advice):
    """Real handwritten digits: ImageNet features do not beat raw pixels -> 'different'."""
    sim = digits_advice.similarity
    assert sim["category"] == "different", sim
    assert sim["probe_accuracy_pixels"] >= sim["probe_accuracy_features"] - 0.05
    assert digits_advice.size["category"] == "small"
    assert digits_advice.scenario == 3
    assert any("--trainable last:2" in c for c in digits_advice.commands)
    lo, hi = sim["score_ci95"]
    assert lo <= sim["score"] <= hi and hi - lo > 0.01
    assert "How sure:" in digits_advice.explanation
    assert digits_advice.extra["certainty"]["level"] in ("clear", "near the boundary")


def test_certainty_says_when_near_a_boundary():
    small = {"images_per_class_median": 120, "large_per_class": 1000}
    clear = certainty(small, {"score": 0.9, "score_ci95": [0.82, 0.95], "similar_at": 0.5})
    assert clear["level"] == "clear" and "0.82-0.95, clear of 0.5" in clear["text"]
    near = certainty(small, {"score": 0.55, "score_ci95": [0.45, 0.63], "similar_at": 0.5})
    assert near["level"] == "near the boundary" and "straddles the 0.5 boundary" in near["text"]
    sized = certainty({"images_per_class_median": 700, "large_per_class": 1000},
                      {"score": 0.9, "score_ci95": [0.82, 0.95], "similar_at": 0.5})
    assert sized["level"] == "near the boundary" and "within 2x of the 1000" in sized["text"]


def test_advice_verdict_from_the_paired_test():
    pair = {"a_method": "head:logreg", "b_method": "finetune:last:2", "a_accuracy": 0.82,
            "b_accuracy": 0.74, "n": 150, "split": "test", "a_only_correct": 20,
            "b_only_correct": 8, "p_value": 0.036}
    assert advice_verdict(1, pair)["verdict"] == "held"  # head advised, head significantly better
    assert advice_verdict(3, pair)["verdict"] == "held"  # scenario 3 advises the head too
    assert advice_verdict(2, pair)["verdict"] == "failed"  # 2 and 4 advise the fine-tune
    v = advice_verdict(3, {**pair, "p_value": 0.09})
    assert v["verdict"] == "tied" and v["winner"] is None
    assert "0.820 vs 0.740 on 150 test images: not significant, p = 0.09" in v["text"]
    assert advice_verdict(3, None)["verdict"] == "untested"


def test_size_threshold_moves_scenario(digits_dir):
    a = advise(digits_dir, sample=30, large_per_class=5, backbones=["lite0"])
    assert a.size["category"] == "large" and a.scenario == 4
    assert a.size["classes"] == 3 and a.size["images_per_class_median"] == 8


def test_every_scenario_has_commands_and_text():
    for k, (size, sim, text) in SCENARIOS.items():
        cmds = _commands(k, "data", "lite0")
        assert cmds and all(c.startswith("fxtl ") for c in cmds)
        assert text
    assert "fit-head" in " ".join(_commands(1, "data", "lite0"))
    assert "--trainable all" in " ".join(_commands(2, "data", "lite0"))


def test_scenario_3_fine_tunes_from_the_fitted_head():
    """Small + different: heads first, then LP-FT of the last two blocks from the logreg head."""
    cmds = _commands(3, "data", "lite0")
    fit = next(i for i, c in enumerate(cmds) if c.startswith("fxtl fit-head"))
    ft = next(i for i, c in enumerate(cmds) if c.startswith("fxtl finetune"))
    assert fit < ft
    start = next(c for c in cmds if "--run-name data-lite0-start" in c)
    assert "--model logreg --layers penultimate" in start and cmds.index(start) < ft
    assert "--trainable last:2" in cmds[ft]
    assert f"--init-head {Path(os.environ['FXTL_CACHE']) / 'runs' / 'data-lite0-start'}" in cmds[ft]
    assert "--crop-scale 0.8 1.0" in cmds[ft] and "--image-size" not in cmds[ft]
    assert "LP-FT" in SCENARIOS[3][2] and "--init-head" in SCENARIOS[3][2]


def test_scenario_3_recommends_heads_on_several_layers():
    """Small + different: heads that choose among several layers (Head2Toe), beside the fine-tune."""
    cmds = _commands(3, "data", "lite0")
    assert cmds[0] == "fxtl extract data --layers auto"
    assert cmds[1].startswith("fxtl fit-head CACHE --model all --layers auto --run-name data-lite0")
    assert "--layers auto" in SCENARIOS[3][2]
    for k in (1, 2, 4):
        assert "--layers" not in " ".join(_commands(k, "data", "lite0"))


def test_scenario_3_advice_is_the_several_layer_head_and_is_judged_so():
    """Scenario 3 advises the head on the layers it chooses; the LP-FT fine-tune is what it is
    tested against: the advice held when the head wins, failed when the fine-tune does."""
    assert [advised_method(s) for s in (1, 2, 3, 4)] == ["head", "finetune", "head", "finetune"]
    with pytest.raises(ParameterError, match="scenario must be 1, 2, 3 or 4, got 5"):
        advised_method(5)
    # the demo's digits (docs/layers.md): chosen-layers logreg 0.893 vs LP-FT 0.793, 16 / 1
    pair = {"a_method": "head:logreg", "b_method": "finetune:last:2 (LP-FT)", "a_accuracy": 0.893,
            "b_accuracy": 0.793, "n": 150, "split": "test", "a_only_correct": 16,
            "b_only_correct": 1, "p_value": 0.000274658203125}
    held = advice_verdict(3, pair)
    assert (held["advised"], held["verdict"], held["winner"]) == ("head", "held", "head")
    assert held["advised_label"] == "several-layer head"
    assert held["text"].startswith(
        "Advice (scenario 3: several-layer head) held: head:logreg vs finetune:last:2 (LP-FT): "
        "0.893 vs 0.793 on 150 test images: significant, p < 0.001")
    swapped = {**pair, "a_accuracy": 0.793, "b_accuracy": 0.893, "a_only_correct": 1,
               "b_only_correct": 16}
    failed = advice_verdict(3, swapped)
    assert (failed["advised"], failed["verdict"], failed["winner"]) == ("head", "failed", "finetune")
    assert failed["text"].startswith("Advice (scenario 3: several-layer head) failed: ")
    # the fine-tune stays the advice of scenarios 2 and 4
    assert advice_verdict(4, swapped)["verdict"] == "held"
    assert advice_verdict(2, pair)["verdict"] == "failed"
    tied = advice_verdict(3, {**pair, "p_value": 0.77})
    assert (tied["verdict"], tied["winner"]) == ("tied", None)


def test_scenario_3_names_the_several_layer_head_first(digits_advice):
    """The explanation, the commands and --json name the several-layer head as the
    recommendation, before the LP-FT fine-tune that is run beside it as the comparison."""
    text = SCENARIOS[3][2]
    assert text.index("Recommended: heads on the frozen features of several layers") \
        < text.index("As the comparison, fine-tune only the last two blocks") < text.index("LP-FT")
    a = digits_advice
    assert a.scenario == 3 and f"Scenario 3: {text}" in a.explanation
    rec, cmds = a.recommendation, a.commands
    fits = [c for c in cmds if c.startswith("fxtl fit-head")]
    assert rec["method"] == "head" and rec["label"] == "several-layer head"
    assert rec["command"] == fits[0] == cmds[1] and "--model all --layers auto" in rec["command"]
    assert rec["runs"] == a.outputs["head_runs"] and rec["layers"] == "auto"
    ft = next(i for i, c in enumerate(cmds) if c.startswith("fxtl finetune"))
    assert cmds.index(rec["command"]) < ft
    comp = rec["comparison"]
    assert comp["method"] == "finetune" and comp["command"] == cmds[ft]
    assert "--trainable last:2 --init-head" in comp["command"] and "LP-FT" in comp["what"]
    assert comp["runs"] == [a.outputs["finetune_run"]]
    d = a.to_dict()  # --json: the new key beside every key users rely on
    assert d["recommendation"] == rec
    assert {"scenario", "size", "similarity", "explanation", "commands", "outputs",
            "backbones"} <= set(d)


def test_cli_json_is_the_librarys_advice(digits_dir, digits_advice):
    """`advise --json` prints what `advise()` returns for the same data, sample and seed."""
    r = CliRunner().invoke(cli, ["advise", str(digits_dir), "--sample", "60", "--backbone",
                                 "lite0", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    want = json.loads(json.dumps(digits_advice.to_dict()))
    assert d.pop("seconds") > 0
    want.pop("seconds")
    for got in (d, want):  # timings differ from run to run
        assert got["backbones"]["compared"][0].pop("seconds") > 0
    assert d == want
    assert [r["backbone"] for r in d["backbones"]["compared"]] == ["lite0"]  # --backbone alone
    assert d["scenario"] == 3 and d["similarity"]["category"] == "different"


def test_tiny_sample_is_refused_by_name(digits_dir):
    with pytest.raises(ParameterError, match="sample must be at least 10 images, got 9") as exc:
        advise(digits_dir, sample=9)
    assert exc.value.param == "sample"
    r = CliRunner().invoke(cli, ["advise", str(digits_dir), "--sample", "9"])
    assert r.exit_code == 2 and "--sample" in r.output and "Traceback" not in r.output


def test_demo_runs_the_whole_job(tmp_path):
    """`fxtl demo` end to end on a small digits set: advise, extract, heads, fine-tune, compare."""
    r = CliRunner().invoke(cli, ["demo", "--per-class", "8", "--epochs", "1", "--image-size", "64",
                                 "--cache-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    kinds = [run["kind"] for run in d["plan"]["runs"]]
    # Digits are small and unlike ImageNet: scenario 3, every head, then one LP-FT fine-tune.
    assert d["advice"]["scenario"] == 3, d["advice"]["explanation"]
    assert kinds.count("head") >= 2 and kinds[-1] == "finetune" and kinds.count("finetune") == 1
    ft = d["plan"]["runs"][-1]
    cfg = json.loads((Path(ft["run_dir"]) / "metrics.json").read_text())["config"]
    # LP-FT from a logreg head on the penultimate features (the compared heads chose among
    # several layers), at the head's input size, with the milder crop
    start = Path(d["plan"]["start_head"])
    assert cfg["init_head"] and Path(cfg["init_head"]).resolve() == start.resolve()
    assert start not in [Path(run["run_dir"]) for run in d["plan"]["runs"]]
    assert json.loads((start / "metrics.json").read_text())["model"] == "logreg"
    assert json.loads(Path(d["plan"]["runs"][0]["run_dir"], "metrics.json").read_text())["cache"] \
        == d["plan"]["cache"]
    assert d["plan"]["cache"].endswith(".h5") and "--layers auto" in d["advice"]["commands"][0]
    assert cfg["image_size"] == 224 and cfg["crop_scale"] == [0.8, 1.0]
    right = {}  # run folder -> {image: predicted correctly}, read from its predictions.csv
    for run in d["plan"]["runs"]:
        assert (tmp_path / "runs") in Path(run["run_dir"]).parents
        with open(Path(run["run_dir"]) / "predictions.csv", newline="") as f:
            right[run["run_dir"]] = {r["path"]: r["label"] == r["predicted"] for r in csv.DictReader(f)}
        ok = list(right[run["run_dir"]].values())
        assert len(ok) == 20 and run["accuracy"] == pytest.approx(sum(ok) / len(ok))
    assert len(d["plan"]["compare"]["rows"]) == len(d["plan"]["runs"])
    # the paired test of the best head against the fine-tune, on the same test images, redone
    # here from the two predictions.csv files
    pair = d["plan"]["paired"]
    a, b = right[pair["a"]], right[pair["b"]]
    assert sorted(a) == sorted(b) and pair["test"] == "mcnemar-exact" and pair["n"] == len(a) == 20
    a_only = sum(a[p] and not b[p] for p in a)
    b_only = sum(b[p] and not a[p] for p in a)
    assert (pair["a_only_correct"], pair["b_only_correct"]) == (a_only, b_only)
    p_value = binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    assert pair["p_value"] == pytest.approx(p_value)
    # scenario 3 advises the head on the chosen layers (a): it held when a is significantly better
    verdict = "tied" if p_value >= 0.05 else "held" if a_only > b_only else "failed"
    assert d["plan"]["verdict"]["verdict"] == verdict and d["plan"]["verdict"]["advised"] == "head"
    assert d["advice"]["recommendation"]["method"] == "head"
    report = Path(d["report"]).read_text()
    assert "95% interval" in report and pair["text"] in report
    for run in d["plan"]["runs"]:
        lo, hi = run["accuracy_ci95"]
        assert lo <= run["accuracy"] <= hi
    for key in ("report", "embedding_png"):
        assert Path(d[key]).is_file()
