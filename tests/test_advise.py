"""fxtl advise: size and similarity measured, scenario and commands derived."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fxtl.advice import SCENARIOS, _commands, advise
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
    for key in ("report", "embedding_png"):
        assert Path(d[key]).is_file()
