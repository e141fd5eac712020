"""Messages that must say what is wrong (issue 14, item 18): the preprocessing-mismatch message
names the fields that differ, once each, instead of printing the same recipe (or the same
placeholder) on both sides."""
from __future__ import annotations

import json

import h5py
import pytest
from click.testing import CliRunner

from fxtl.cli import cli
from fxtl.errors import ProvenanceError
from fxtl.features.store import load_features
from fxtl.heads.fitting import fit_head

from ..test_heads import PRE, write_synthetic_cache
from ._cli import assert_one_line_error


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("messages")
    cache = write_synthetic_cache(home / "blobs.h5")
    return fit_head(cache, model="knn", search=False, cache_dir=home).run_dir


def _with_preprocessing(path, recipe):
    cache = write_synthetic_cache(path)
    with h5py.File(cache, "r+") as f:
        f.attrs["preprocessing"] = json.dumps(recipe)
    return cache


def test_preprocessing_mismatch_names_what_differs_once(tmp_path, head_run):
    """Two recipes that differ slightly (crop, the third mean value, one extra field): the line
    names those three fields with both values, and nothing that is the same."""
    recipe = {**PRE, "crop": 192, "mean": [0.5, 0.5, 0.5000001], "alpha": "white"}
    other = _with_preprocessing(tmp_path / "other.h5", recipe)
    r = CliRunner().invoke(cli, ["predict", str(head_run), str(other)])
    line = assert_one_line_error(r.exit_code, r.stderr, str(other), "preprocessing")
    assert "another recipe" not in line
    assert "(head vs features: " in line, line
    diff = line.split("(head vs features: ", 1)[1].rsplit(");", 1)[0]  # paths left out
    assert diff.split("; ") == ['alpha (absent) vs "white"', "crop 224 vs 192",
                                "mean [0.5, 0.5, 0.5] vs [0.5, 0.5, 0.5000001]"], line
    for same in ("resize", "interpolation", "std", "bicubic", "256"):
        assert same not in diff, line  # fields that agree are not printed at all


def test_preprocessing_stored_as_text_or_object_is_the_same_recipe(tmp_path, head_run):
    """The cache keeps the recipe as JSON text and the head as an object, in another key order:
    not a mismatch."""
    from fxtl.heads import load_head

    head = load_head(head_run)
    same = _with_preprocessing(tmp_path / "same.h5", dict(reversed(list(PRE.items()))))
    fc = load_features(same)
    head.check_features({**fc.attrs, "preprocessing": json.dumps(dict(reversed(list(PRE.items()))))},
                        fc.dim, source="same.h5")  # no error
    with pytest.raises(ProvenanceError, match=r"\(head vs features: crop 224 vs 160\)"):
        head.check_features({**fc.attrs, "preprocessing": json.dumps({**PRE, "crop": 160})},
                            fc.dim, source="x.h5")


def _metrics_run(cache, name: str, **metrics) -> None:
    run = cache / "runs" / name
    run.mkdir(parents=True)
    base = {"kind": "head", "model": "logreg", "split": "val", "dataset": "ds", "backbone": "lite0",
            "n": 10, "dataset_fingerprint": "ab" * 32}
    (run / "metrics.json").write_text(json.dumps({**base, **metrics}))


def test_compare_names_a_damaged_run_and_never_prints_bare_nan(tmp_path):
    """Issue 14 item 14: one bad metrics.json (accuracy null, a string, NaN) is skipped and named;
    the other runs are still compared, and --json stays JSON (no bare NaN)."""
    cache = tmp_path / "cache"
    _metrics_run(cache, "good", accuracy=0.9, macro_f1=0.8)
    _metrics_run(cache, "nanf1", model="knn", accuracy=0.8, macro_f1=float("nan"))
    bad = {"null": None, "text": "0.9", "nan": float("nan")}
    for name, acc in bad.items():
        _metrics_run(cache, name, accuracy=acc)
    r = CliRunner().invoke(cli, ["compare", "--cache-dir", str(cache), "--json"])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output

    def no_bare_constant(c):
        raise AssertionError(f"bare {c} in --json output")

    out = json.loads(r.stdout, parse_constant=no_bare_constant)
    assert sorted(row["run_dir"].rsplit("/", 1)[-1] for row in out["rows"]) == ["good", "nanf1"]
    assert next(row for row in out["rows"] if row["method"] == "head:knn")["macro_f1"] is None
    assert sorted(s["run_dir"].rsplit("/", 1)[-1] for s in out["skipped"]) == sorted(bad)
    for name, acc in bad.items():
        assert f"fxtl: skipped {cache / 'runs' / name}" in r.stderr and f"accuracy is {acc!r}" in r.stderr
