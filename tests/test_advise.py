"""fxtl advise: size and similarity measured, scenario and commands derived."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fxtl.advice import SCENARIOS, _commands, advice_verdict, advise, certainty
from fxtl.cli import cli


@pytest.fixture(scope="module")
def digits_advice(digits_dir):
    return advise(digits_dir, sample=60)


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
    assert advice_verdict(3, pair)["verdict"] == "failed"
    v = advice_verdict(3, {**pair, "p_value": 0.09})
    assert v["verdict"] == "tied" and v["winner"] is None
    assert "0.820 vs 0.740 on 150 test images: not significant, p = 0.09" in v["text"]
    assert advice_verdict(3, None)["verdict"] == "untested"


def test_size_threshold_moves_scenario(digits_dir):
    a = advise(digits_dir, sample=30, large_per_class=5)
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
    assert "--trainable last:2" in cmds[ft] and "--init-head LOGREG_RUN" in cmds[ft]
    assert "--crop-scale 0.8 1.0" in cmds[ft] and "--image-size" not in cmds[ft]
    assert "LP-FT" in SCENARIOS[3][2] and "--init-head" in SCENARIOS[3][2]


def test_cli_json(digits_dir):
    r = CliRunner().invoke(cli, ["advise", str(digits_dir), "--sample", "30", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for key in ("scenario", "size", "similarity", "explanation", "commands"):
        assert key in d
    assert d["scenario"] in (1, 2, 3, 4) and 0 <= d["similarity"]["score"] <= 1


def test_cli_rejects_tiny_sample(digits_dir):
    r = CliRunner().invoke(cli, ["advise", str(digits_dir), "--sample", "3"])
    assert r.exit_code == 2


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
    logreg = next(run for run in d["plan"]["runs"] if run["model"] == "logreg")
    # LP-FT from the logreg head, at the head's input size, with the milder crop
    assert cfg["init_head"] and Path(cfg["init_head"]).resolve() == Path(logreg["run_dir"]).resolve()
    assert cfg["image_size"] == 224 and cfg["crop_scale"] == [0.8, 1.0]
    for run in d["plan"]["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert (tmp_path / "runs") in Path(run["run_dir"]).parents
    assert len(d["plan"]["compare"]["rows"]) == len(d["plan"]["runs"])
    # the paired test of the best head against the fine-tune, on the same test images
    pair = d["plan"]["paired"]
    assert pair["test"] == "mcnemar-exact" and pair["n"] == 20 and 0 <= pair["p_value"] <= 1
    assert d["plan"]["verdict"]["verdict"] in ("held", "tied", "failed")
    report = Path(d["report"]).read_text()
    assert "95% interval" in report and pair["text"] in report
    for run in d["plan"]["runs"]:
        lo, hi = run["accuracy_ci95"]
        assert lo <= run["accuracy"] <= hi
    for key in ("report", "embedding_png"):
        assert Path(d[key]).is_file()
