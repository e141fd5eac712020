"""The README's measured numbers are what benchmarks/readme_numbers.py writes from the committed
benchmarks/results/*.json: a number typed into a marked section, or a json changed without
regenerating the README, fails here; so does a number that reads as a measurement typed outside the
sections (one-off measurements go to docs/history.md, dated)."""
from __future__ import annotations

import importlib
import re
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
                 "finetune-speed", "before-after", "onnx-export", "scale-memory", "cache-hit",
                 "finetune-speed-bf16"):
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


# Numbers outside the marked sections that are not measurements, each with why. Keep it short:
# a measured number belongs in a section rendered from benchmarks/results, or, if no script
# reproduces it, in docs/history.md with its date.
NOT_MEASURED = (
    "20 % of each class",            # the default hold-out share
    "a seeded 20 % hold-out",        # the same default
    "`--budget 60s`",                # an option's example value
    "95 % intervals",                # the confidence level
    "(~3x the model)",               # weights + AdamW's two moments: what a checkpoint holds
    "treat speeds as ±30 %",         # the caveat on a shared machine
    "Why not 3x / 85 %",             # the extraction targets
    "checks 1e-5",                   # the DDP test's tolerance
)


def test_no_measured_number_is_typed_outside_the_sections(tools):
    readme_mod, _ = tools
    text = (ROOT / "README.md").read_text()
    unmarked = re.sub(r"<!-- fxtl:([a-z0-9-]+) -->.*?<!-- /fxtl:\1 -->", "", text, flags=re.S)
    stale = [phrase for phrase in NOT_MEASURED if phrase not in unmarked]
    assert stale == [], f"allowlisted phrases no longer in the README (remove them): {stale}"
    typed = readme_mod.typed_numbers(text, NOT_MEASURED)
    assert typed == [], "numbers typed outside the fxtl: sections:\n" + "\n".join(
        f"README.md:{line}: {number!r} in: {context.strip()[:160]}" for line, number, context in typed)


def test_typed_numbers_finds_measurements_and_only_them(tools):
    readme_mod, _ = tools
    found = readme_mod.typed_numbers(
        "| cache hit | **0.33-0.55 s** wall, median 0.41 s over 9 runs, **54 MB** peak RSS |\n"
        "BatchNorm folded: 184 vs 112 img/s, 0-10 % once tuned; resize (3.1 -> 1.4 ms/image);\n"
        "a 2-process run ends within 3e-7; logreg 0.954; 10x fewer page faults; ~11-13 ms\n"
        "kept: <!-- fxtl:x -->**0.41 s**, 0.954, 3e-7<!-- /fxtl:x -->, `torch==2.14.1`,\n"
        "`--epochs 5`, 245 train / 153 val, lite2 (260 px), p < 0.05, 2-core CPU, the 10 s target\n"
        "[history](docs/history.md#heads-before-issue-12s-work-2026-11-30)\n",
        ("the 10 s target",))
    assert [(line, number) for line, number, _ in found] == [
        (1, "0.33-0.55 s"), (1, "0.41 s"), (1, "54 MB"),
        (2, "112 img/s"), (2, "0-10 %"), (2, "3.1 -> 1.4 ms"),
        (3, "3e-7"), (3, "0.954"), (3, "10x"), (3, "~11-13 ms")]
