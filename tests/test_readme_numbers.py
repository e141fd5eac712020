"""The README's measured numbers are what benchmarks/readme_numbers.py writes from the committed
benchmarks/results/*.json: a number typed into a marked section, or a json changed without
regenerating the README, fails here."""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def tools():
    """benchmarks/_readme.py and benchmarks/readme_numbers.py, imported as the scripts do."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        yield importlib.import_module("_readme"), importlib.import_module("readme_numbers")


def test_readme_sections_are_what_the_results_give(tools):
    _, numbers = tools
    problems = numbers.check(ROOT / "README.md", BENCH / "results")
    assert problems == [], "\n\n".join(problems) + (
        "\n\nrun: .venv/bin/python benchmarks/readme_numbers.py")


def test_every_measured_table_is_marked(tools):
    """The demo block, the speed, heads and fine-tune tables are generated sections."""
    readme_mod, numbers = tools
    text = (ROOT / "README.md").read_text()
    names = readme_mod.section_names(text)
    for name in ("demo", "demo-verdict", "advise-example", "extract-speed", "heads-scale",
                 "finetune-speed", "before-after", "onnx-export", "scale-memory"):
        assert name in names, name
    demo = readme_mod.get_section(text, "demo")
    assert "fxtl demo: scenario" in demo and "head logreg" in demo and demo.count("```") == 2
    assert text.count("<!-- fxtl:scale-memory -->") == 2  # quoted twice, written by one renderer


def test_a_typed_number_is_caught(tools, tmp_path):
    readme_mod, numbers = tools
    text = (ROOT / "README.md").read_text()
    body = readme_mod.get_section(text, "heads-scale")
    typed = body.replace("| 0.9", "| 0.8", 1)  # one accuracy, typed over
    assert typed != body
    copy = tmp_path / "README.md"
    copy.write_text(readme_mod.replace_section(text, "heads-scale", typed))
    problems = numbers.check(copy, BENCH / "results")
    assert len(problems) == 1 and "'heads-scale' differs" in problems[0]
    # ...and a changed result without a regenerated README too; update() fixes both.
    results = tmp_path / "results"
    shutil.copytree(BENCH / "results", results)
    speed = (results / "extract_speed.json").read_text()
    (results / "extract_speed.json").write_text(speed.replace('"fraction_of_model_only": 0.',
                                                              '"fraction_of_model_only": 0.9', 1))
    problems = numbers.check(copy, results)
    assert {p.split("'")[1] for p in problems} == {"heads-scale", "extract-speedup"}
    assert sorted(numbers.update(copy, results)) == ["extract-speedup", "heads-scale"]
    assert numbers.check(copy, results) == []
    assert "target 85 %: **met**" in copy.read_text()


def test_unknown_or_missing_sections_are_refused(tools, tmp_path):
    readme_mod, numbers = tools
    text = (ROOT / "README.md").read_text()
    copy = tmp_path / "README.md"
    copy.write_text(text + "\nnew <!-- fxtl:not-registered -->1<!-- /fxtl:not-registered -->\n")
    with pytest.raises(SystemExit, match="not-registered have no renderer"):
        numbers.check(copy, BENCH / "results")
    copy.write_text(text.replace("<!-- fxtl:onnx-export -->", "").replace("<!-- /fxtl:onnx-export -->", ""))
    assert numbers.check(copy, BENCH / "results") == [
        "section 'onnx-export' has a renderer but no markers in README.md"]


def test_replace_section_blocks_inline_and_bad_markers(tools):
    readme_mod, _ = tools
    rs, MarkerError = readme_mod.replace_section, readme_mod.MarkerError
    text = "a <!-- fxtl:x -->1<!-- /fxtl:x --> b\n<!-- fxtl:t -->\nold\n<!-- /fxtl:t -->\nc <!-- fxtl:x -->1<!-- /fxtl:x -->\n"
    out = rs(rs(text, "x", "2.5"), "t", "| a |\n| b |\n")
    assert out == ("a <!-- fxtl:x -->2.5<!-- /fxtl:x --> b\n<!-- fxtl:t -->\n| a |\n| b |\n"
                   "<!-- /fxtl:t -->\nc <!-- fxtl:x -->2.5<!-- /fxtl:x -->\n")
    assert readme_mod.section_names(out) == ["x", "t"]
    assert readme_mod.get_section(out, "t") == "| a |\n| b |"
    assert rs(out, "t", readme_mod.get_section(out, "t")) == out  # a round trip changes nothing
    with pytest.raises(MarkerError, match="inline"):
        rs(text, "x", "two\nlines")
    with pytest.raises(MarkerError, match="no section 'y'"):
        rs(text, "y", "1")
    with pytest.raises(MarkerError, match="without"):
        rs("<!-- fxtl:x -->1", "x", "2")
    with pytest.raises(MarkerError, match="another section"):
        rs("<!-- fxtl:x --><!-- fxtl:y -->1<!-- /fxtl:y --><!-- /fxtl:x -->", "x", "2")
    with pytest.raises(MarkerError, match="without its opening"):
        rs("<!-- fxtl:x -->1<!-- /fxtl:x --><!-- /fxtl:x -->", "x", "2")
