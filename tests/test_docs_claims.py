"""What the README says about the command line is what the command line does (issue 21's "Docs"
paragraph): which commands take --cache-dir, what `predict --help` accepts, and a reading
snippet a user can run as printed."""
from __future__ import annotations

import re
from pathlib import Path

import click
from click.testing import CliRunner

from fxtl.cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _options(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in getattr(p, "opts", [])}


def test_the_commands_without_cache_dir_are_the_ones_the_readme_names():
    without = sorted(name for name, command in cli.commands.items()
                     if "--cache-dir" not in _options(command))
    # `backbones` lists the registry and touches no file at all.
    assert without == ["backbones", "export", "info", "merge"]
    said = " ".join(README.split())
    assert ("Commands that find or write caches, heads and runs by themselves take `--cache-dir`"
            in said)
    assert "`info`, `export` and `merge` work on the files you name" in said


def test_predict_help_names_every_kind_of_model_it_takes():
    r = CliRunner().invoke(cli, ["predict", "--help"], terminal_width=100)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "head.skops" in text and "fxtl-model.json" in text and "model.onnx" in text


def test_the_h5py_snippet_needs_no_fingerprinted_file_name():
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", README, re.S)
                   if "h5py.File" in block)
    assert not re.search(r"-[0-9a-f]{16}\.h5", snippet)  # a user's fingerprint differs
    assert 'glob.glob("cache/hymenoptera-lite0-*.h5")' in snippet
