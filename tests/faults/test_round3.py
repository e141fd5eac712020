"""Issue 21, the third fault round: an artifact's meaning is covered by its hash (5, 6), exports
never destroy another artifact or write a file that is not what its name says (7, 8), CSV cells
cannot be formulas (9), no NaN in JSON (11), merge checks its shards (12), a run is finished only
when its last file is in place (13), one-line errors for bad parameters and hostile JSON (14-16),
and the CLI speaks flags, not Python parameters (22)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fxtl.cli import cli

from ..test_heads import write_synthetic_cache
from ._cli import assert_one_line_error, lines


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- 5: head.json
@pytest.mark.parametrize("names", [
    ["class0", "renamed", "class2"],             # a rename
    ["class2", "class1", "class0"],              # a swap: the same names, other columns
    ["only"],                                    # one name
    ["class0", "class1", "class2", "class3"],    # one name too many
])
def test_edited_head_class_names_are_refused(tmp_path, genuine, names):
    run, cache = genuine
    copy = _copy_run(run, tmp_path)
    _edit_json(copy / "head.json", class_names=names)
    r = _invoke("predict", copy, cache)
    assert_one_line_error(r.exit_code, r.stderr, "head.json", "edited", "refit the head")


@pytest.mark.parametrize("field,value", [
    ("preprocessing", {"resize": 300, "crop": 224, "mean": [0.5] * 3, "std": [0.5] * 3}),
    ("backbone", "resnet50"),
    ("weights_sha256", "1" * 64),
])
def test_edited_head_provenance_is_refused(tmp_path, genuine, field, value):
    run, cache = genuine
    copy = _copy_run(run, tmp_path)
    _edit_json(copy / "head.json", **{field: value})
    r = _invoke("predict", copy, cache)
    assert_one_line_error(r.exit_code, r.stderr, "head.json", "edited")


@pytest.mark.parametrize("names,fragment", [
    (["class0", "renamed", "class2"], "fitted on"),
    (["class0", "class0", "class2"], "twice"),
])
def test_old_head_without_meaning_hash_still_cross_checks_its_classes(tmp_path, genuine, names,
                                                                      fragment):
    """A sidecar written before meaning_sha256 existed: the names must still be the estimator's."""
    run, cache = genuine
    copy = _copy_run(run, tmp_path)
    side = json.loads((copy / "head.json").read_text())
    del side["meaning_sha256"]
    side["class_names"] = names
    (copy / "head.json").write_text(json.dumps(side))
    r = _invoke("predict", copy, cache)
    assert_one_line_error(r.exit_code, r.stderr, "head.json", fragment)


def test_untouched_head_still_predicts(genuine):
    run, cache = genuine
    r = _invoke("predict", run, cache, "--json")
    assert r.exit_code == 0, r.stderr
    labels = {p["label"] for p in json.loads(r.stdout)["predictions"]}
    assert labels == {"class0", "class1", "class2"}


# ----------------------------------------------------------------------------- 16: deep JSON
@pytest.mark.parametrize("name", ["head.json", "metrics.json"])
def test_deeply_nested_json_is_unreadable_not_a_recursion_error(tmp_path, genuine, name):
    run, cache = genuine
    copy = _copy_run(run, tmp_path)
    (copy / name).write_text("[" * 100000)
    if name == "head.json":
        r = _invoke("predict", copy, cache)
        assert_one_line_error(r.exit_code, r.stderr, "head.json", "unreadable")
    else:
        r = _invoke("compare", copy)  # the run is skipped as damaged, with a warning
        assert_one_line_error(r.exit_code, r.stderr, "1 skipped as damaged")
