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


# ----------------------------------------------------------------------------- 5, 13, 16: fine-tunes
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A finished fine-tune (one epoch, timm's tiny test network) and the images it learned."""
    import timm
    import torch

    from fxtl.data.samples import write_shapes

    base = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    weights = base / "test_efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), weights)
    data = write_shapes(base / "data", per_class=4)
    r = _invoke("finetune", data, "--backbone", f"timm:test_efficientnet={weights}", "--cache-dir",
                base / "home", "--epochs", "1", "--image-size", "32", "--batch-size", "4",
                "--workers", "0", "--precision", "fp32", "--trainable", "head", "--json")
    assert r.exit_code == 0, r.stderr[-2000:]
    return Path(json.loads(r.stdout)["run_dir"]), data


def _predict_args(run: Path, data: Path) -> list:
    return ["predict", run, data / "val", "--device", "cpu", "--workers", "0"]


@pytest.mark.parametrize("edit", ["swap", "one", "preprocessing"])
def test_edited_finetune_manifest_is_refused(tmp_path, finetuned, edit):
    """Swapped class names would invert every prediction: refused, not silently used."""
    run, data = finetuned
    copy = _copy_run(run, tmp_path)
    manifest = json.loads((copy / "fxtl-model.json").read_text())
    if edit == "swap":
        manifest["class_names"] = manifest["class_names"][::-1]
    elif edit == "one":
        manifest["class_names"], manifest["num_classes"] = manifest["class_names"][:1], 1
    else:
        manifest["preprocessing"]["crop"] = 64
    (copy / "fxtl-model.json").write_text(json.dumps(manifest))
    r = _invoke(*_predict_args(copy, data))
    assert_one_line_error(r.exit_code, r.stderr, "fxtl-model.json", "edited")


def test_untouched_finetune_predicts_its_own_class_names(finetuned):
    run, data = finetuned
    r = _invoke(*_predict_args(run, data), "--json")
    assert r.exit_code == 0, r.stderr[-2000:]
    assert {p["label"] for p in json.loads(r.stdout)["predictions"]} <= {"circle", "square"}
    assert len(json.loads(r.stdout)["predictions"]) == 8


def test_deeply_nested_finetune_manifest_is_unreadable(tmp_path, finetuned):
    run, data = finetuned
    copy = _copy_run(run, tmp_path)
    (copy / "fxtl-model.json").write_text("[" * 100000)
    r = _invoke(*_predict_args(copy, data))
    assert_one_line_error(r.exit_code, r.stderr, "fxtl-model.json", "unreadable")


def test_finetune_without_its_last_file_is_unfinished_for_compare_and_predict(tmp_path, finetuned):
    """A disk that filled before fxtl-model.json (written last) leaves metrics.json, model.pt and
    the checkpoint: compare must not list it as finished while predict calls it unfinished."""
    run, data = finetuned
    home = tmp_path / "home"
    copy = _copy_run(run, home / "runs")
    (copy / "fxtl-model.json").unlink()
    # The checkpoint is removed only once the manifest is in place: a run stopped before that
    # still has it (the finished fixture's is gone).
    (copy / "checkpoint-last.pt").write_bytes(b"the training state")
    assert (copy / "metrics.json").is_file()
    r = _invoke(*_predict_args(copy, data))
    assert_one_line_error(r.exit_code, r.stderr, "did not finish", "--resume")
    r = _invoke("compare", "--cache-dir", home, "--json")
    assert r.exit_code == 1, r.stdout
    assert "no usable head or fine-tune runs" in json.loads(r.stdout)["error"]
    r = _invoke("compare", copy, "--json")
    assert r.exit_code == 1 and "1 skipped" in json.loads(r.stdout)["error"], r.stdout


# ----------------------------------------------------------------------------- 6: .onnx metadata
@pytest.fixture(scope="module")
def exported(finetuned, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    run, data = finetuned
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    r = _invoke("export-model", run, "-o", out)
    assert r.exit_code == 0, r.stderr[-2000:]
    return out, data


def _with_metadata(src: Path, dst: Path, **changes: str) -> Path:
    """A copy of ``src`` whose metadata entries ``changes`` are replaced (no sidecar beside it)."""
    import onnx

    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key in changes:
            prop.value = changes[prop.key]
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("key,value,fragment", [
    ("class_names", '["only"]', "names 1 classes but the graph outputs 2"),
    ("class_names", '{"a": 1}', "class_names must be a JSON list"),
    ("class_names", "not json", "class_names must be a JSON list"),
    ("class_names", '["a", "a"]', "twice"),
    ("class_names", "[" * 100000, "class_names must be a JSON list"),
    ("preprocessing", '{"resize": -5, "crop": 32, "interpolation": "bicubic", "mean": [0, 0, 0], '
                      '"std": [1, 1, 1]}', "resize must be a whole number"),
    ("preprocessing", "garbage", "preprocessing must be a JSON object"),
    ("preprocessing", '{"resize": 36}', "preprocessing has no 'crop'"),
    ("output_name", '"elsewhere"', "output_name"),
])
def test_onnx_metadata_is_validated(tmp_path, exported, key, value, fragment):
    out, data = exported
    bad = _with_metadata(out, tmp_path / "bad.onnx", **{key: value})
    r = _invoke("predict", bad, data / "val")
    assert_one_line_error(r.exit_code, r.stderr, "bad.onnx", fragment)


def test_onnx_bytes_changed_after_export_are_refused_by_the_sidecar(tmp_path, exported):
    out, data = exported
    copy = tmp_path / "m.onnx"
    blob = bytearray(out.read_bytes())
    blob[-40] ^= 0x01  # a weight bit near the end of the file
    copy.write_bytes(bytes(blob))
    shutil.copy(out.with_name("m.onnx.json"), tmp_path / "m.onnx.json")
    r = _invoke("predict", copy, data / "val")
    assert_one_line_error(r.exit_code, r.stderr, "onnx_sha256", "m.onnx.json")
    (tmp_path / "m.onnx.json").unlink()  # without its sidecar the file runs on its own metadata
    assert _invoke("predict", copy, data / "val").exit_code == 0


def test_exported_onnx_predicts_as_before(exported):
    out, data = exported
    r = _invoke("predict", out, data / "val", "--json")
    assert r.exit_code == 0, r.stderr[-2000:]
    assert {p["label"] for p in json.loads(r.stdout)["predictions"]} <= {"circle", "square"}


# ----------------------------------------------------------------------------- 7, 8, 9: export
HOSTILE = ["=1+2", "@SUM(A1)", "-2+3"]


@pytest.fixture(scope="module")
def hostile_cache(tmp_path_factory) -> Path:
    """A cache whose class names and paths a spreadsheet would run as formulas."""
    from fxtl.features.store import write_cache

    from ..test_heads import PRE

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    X = (rng.normal(size=(3, 4))[y] * 4 + rng.normal(size=(30, 4))).astype(np.float32)
    split = ["train"] * 6 + ["test"] * 4
    path = tmp_path_factory.mktemp("hostile") / "hostile.h5"
    attrs = {"backbone": "synthetic", "weights_sha256": "0" * 64, "preprocessing": PRE,
             "precision": "fp32", "layer": "pooled", "fingerprint": "fp-hostile",
             "created": "2025-01-01T00:00:00", "fxtl_version": "test", "dataset_name": "hostile"}
    return write_cache(path, chunks=[X], n=30, dim=4, labels=y.tolist(),
                       paths=[f"{HOSTILE[c]}/+{i}.png" for i, c in enumerate(y)],
                       split=split * 3, class_names=HOSTILE, errors=[], attrs=attrs)


def test_export_csv_escapes_formula_cells(tmp_path, hostile_cache):
    out = tmp_path / "x.csv"
    r = _invoke("export", hostile_cache, "--format", "csv", "-o", out)
    assert r.exit_code == 0, r.stderr
    rows = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
    assert [row["label_name"] for row in rows[::10]] == ["'=1+2", "'@SUM(A1)", "'-2+3"]
    assert rows[0]["path"] == "'=1+2/+0.png" and rows[0]["label"] == "0"
    assert rows[0]["f0"].lstrip("-")[0].isdigit()  # numbers stay numbers


def test_predictions_csv_escapes_formula_cells_and_reads_back(tmp_path, hostile_cache):
    from fxtl.report.metrics import read_predictions

    r = _invoke("fit-head", hostile_cache, "--no-search", "--cache-dir", tmp_path, "--json")
    assert r.exit_code == 0, r.stderr[-2000:]
    run = Path(json.loads(r.stdout)["runs"][0]["run_dir"])
    rows = list(csv.DictReader((run / "predictions.csv").open(newline="")))
    assert rows and all(row["label"] in ("'" + n for n in HOSTILE) for row in rows)
    assert all(row["path"].startswith("'") for row in rows)
    back = read_predictions(run)
    assert set(back) == {f"{HOSTILE[c]}/+{i}.png" for i, c in enumerate(np.repeat(np.arange(3), 10))
                         if i % 10 >= 6}
    assert sorted({t for t, _ in back.values()}) == [0, 1, 2]


def test_export_format_follows_the_output_suffix(tmp_path, genuine):
    _, cache = genuine
    r = _invoke("export", cache, "-o", tmp_path / "x.csv", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["format"] == "csv"
    assert (tmp_path / "x.csv").read_text().startswith("path,split,label,label_name,f0")
    r = _invoke("export", cache, "--format", "npz", "-o", tmp_path / "y.csv")
    assert r.exit_code == 2 and "Invalid value for '--format'" in r.stderr, r.stderr
    assert "names the csv format" in r.stderr and not (tmp_path / "y.csv").exists()


@pytest.mark.parametrize("target", ["other_cache", "head_file", "run_metrics", "new_in_run"])
def test_export_never_overwrites_an_fxtl_artifact(tmp_path, genuine, target):
    run, cache = genuine
    copy = _copy_run(run, tmp_path)
    other = write_synthetic_cache(tmp_path / "other.h5", seed=3)
    out = {"other_cache": other, "head_file": copy / "head.skops",
           "run_metrics": copy / "metrics.json", "new_in_run": copy / "features.npz"}[target]
    before = out.read_bytes() if out.exists() else None
    r = _invoke("export", cache, "--format", "npz", "-o", out)
    assert r.exit_code == 2 and "Invalid value for '--output' / '-o'" in r.stderr, r.stderr
    assert "never" in r.stderr
    assert (out.read_bytes() if out.exists() else None) == before


def test_export_may_replace_its_own_earlier_export(tmp_path, genuine):
    _, cache = genuine
    out = tmp_path / "x.npz"
    assert _invoke("export", cache, "-o", out).exit_code == 0
    assert _invoke("export", cache, "-o", out).exit_code == 0
    assert np.load(out)["features"].shape[0] == 120


# ----------------------------------------------------------------------------- 14, 15: --param, --seed
@pytest.mark.parametrize("model,param,fragment", [
    ("logreg", "penalty=l1", "solver 'lbfgs' takes penalty 'l2' or None; add solver=saga"),
    ("logreg", "penalty=elasticnet", "add solver=saga"),
    ("svm", "kernel=precomputed", "not on a kernel matrix"),
    ("svm", "gamma=-1", "gamma=-1 is not valid for svm: it must be above 0"),
    ("logreg", "C=1e400", "C=inf is not valid for logreg: it must be a finite number"),
    ("mlp", "alpha=-1e400", "alpha=-inf is not valid for mlp: it must be a finite number"),
])
def test_param_values_scikit_learn_would_fail_on_are_usage_errors(genuine, model, param, fragment):
    _, cache = genuine
    r = _invoke("fit-head", cache, "-m", model, "--param", param, "--no-search")
    assert r.exit_code == 2 and "Traceback" not in r.stderr, (r.exit_code, r.stderr[-2000:])
    assert "Invalid value for '--param'" in r.stderr and fragment in r.stderr, r.stderr


def test_valid_penalty_with_its_solver_fits(tmp_path, genuine):
    _, cache = genuine
    r = _invoke("fit-head", cache, "-m", "logreg", "--param", "penalty=l1", "--param",
                "solver=saga", "--no-search", "--cache-dir", tmp_path, "--json")
    assert r.exit_code == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["runs"][0]["accuracy"] == 1.0


@pytest.mark.parametrize("command", ["fit-head", "advise", "finetune", "plot-embedding"])
def test_negative_seed_is_refused_the_same_way_by_every_command(tmp_path, genuine, command):
    _, cache = genuine
    target = cache if command in ("fit-head", "plot-embedding") else tmp_path
    r = _invoke(command, target, "--seed", "-1")
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295" in r.stderr


def test_library_advise_refuses_a_negative_seed(tmp_path):
    from fxtl.advice import advise
    from fxtl.errors import ParameterError

    with pytest.raises(ParameterError, match="seed must be a whole number") as info:
        advise(tmp_path, seed=-1)
    assert info.value.param == "seed"


# ----------------------------------------------------------------------------- 11: no NaN
def test_advise_on_one_image_per_class_says_too_few(tmp_path):
    from fxtl.data.samples import write_shapes

    data = write_shapes(tmp_path / "one", per_class=1, splits=("train",))
    r = _invoke("advise", data, "--json")
    assert r.exit_code == 1, r.stdout
    out = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))
    assert "too few images to measure similarity" in out["error"]
    assert "have 1 training image" in out["error"]


def test_json_output_never_holds_nan():
    from fxtl._util import dumps_json

    assert dumps_json({"a": [1.0, 0.5]}) == '{"a": [1.0, 0.5]}'
    with pytest.raises(ValueError, match=r"similarity\.score"):
        dumps_json({"similarity": {"score": float("nan")}})


# ----------------------------------------------------------------------------- 22: flags, not parameters
_PYTHON_SPELLINGS = ("force=True", "trust=True", "nonfinite=", "device='cpu'", "run_name", "cache_dir")


def _speaks_flags(text: str) -> None:
    import re

    for spelling in _PYTHON_SPELLINGS:  # as a word, not inside a path
        assert not re.search(rf"(?<![\w/.-]){re.escape(spelling)}", text), f"{spelling!r} in {text!r}"


def test_extract_over_a_foreign_file_says_force_flag(tmp_path):
    from fxtl.data.samples import write_shapes

    data = write_shapes(tmp_path / "data", per_class=2)
    other = tmp_path / "other.h5"
    other.write_bytes(b"not a cache")
    r = _invoke("extract", data, "-o", other, "--backbone", "lite0")
    assert r.exit_code == 2, r.stderr
    assert "pass --force to replace it or choose another --output" in r.stderr, r.stderr
    _speaks_flags(r.stderr)


def test_nonfinite_cache_gives_no_python_only_fix(tmp_path):
    import h5py

    cache = write_synthetic_cache(tmp_path / "c.h5")
    with h5py.File(cache, "r+") as f:
        f["features"][3, 0] = np.nan
    r = _invoke("info", cache)
    line = assert_one_line_error(r.exit_code, r.stderr, "NaN or infinity", "re-create it with `fxtl extract`")
    _speaks_flags(line)


def test_pickle_head_names_the_trust_flag(tmp_path, genuine):
    _, cache = genuine
    run = tmp_path / "old"
    run.mkdir()
    (run / "head.joblib").write_bytes(b"not even a pickle")
    r = _invoke("predict", run, cache)
    assert r.exit_code == 2 and "read only with --trust" in r.stderr, r.stderr
    _speaks_flags(r.stderr)


def test_edited_head_names_the_trust_flag_in_predict_only(tmp_path, genuine):
    run, cache = genuine
    copy = _copy_run(run, tmp_path)
    with open(copy / "head.skops", "ab") as fh:
        fh.write(b"\0")
    r = _invoke("predict", copy, cache)
    line = assert_one_line_error(r.exit_code, r.stderr, "sha256", "load it with --trust")
    _speaks_flags(line)
    r = _invoke("export-model", copy, "-o", tmp_path / "m.onnx")
    line = assert_one_line_error(r.exit_code, r.stderr, "sha256", "refit the head")
    assert "trust" not in line  # export-model has no --trust: the fix is not offered
    _speaks_flags(line)


def test_taken_run_name_names_the_run_name_flag(tmp_path, genuine):
    _, cache = genuine
    (tmp_path / "runs" / "mine").mkdir(parents=True)  # holding another run's file: an empty
    (tmp_path / "runs" / "mine" / "metrics.json").write_text("{}")  # folder is reused (item 18)
    r = _invoke("fit-head", cache, "--run-name", "mine", "--no-search", "--cache-dir", tmp_path)
    line = assert_one_line_error(r.exit_code, r.stderr, "--run-name")
    _speaks_flags(line)


def test_cuda_on_a_machine_without_it_says_device_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from fxtl.data.samples import write_shapes

    data = write_shapes(tmp_path / "data", per_class=2)
    r = _invoke("advise", data, "--device", "cuda")
    assert r.exit_code == 2 and "use --device cpu" in r.stderr, r.stderr
    _speaks_flags(r.stderr)


# ----------------------------------------------------------------------------- 12: merge
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards 0/2 and 1/2 of a tiny dataset (timm's test network), written once by the CLI."""
    import timm
    import torch

    from fxtl.data.samples import write_shapes

    base = tmp_path_factory.mktemp("shards")
    torch.manual_seed(0)
    weights = base / "w.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), weights)
    data = write_shapes(base / "d", per_class=3)
    files = []
    for i in (0, 1):
        r = _invoke("extract", data, "--cache-dir", base / "c", "--shard", f"{i}/2", "--json",
                    "-b", f"timm:test_efficientnet={weights}", "--precision", "fp32",
                    "--batch-size", "4", "--workers", "0")
        assert r.exit_code == 0, r.stderr[-2000:]
        files.append(Path(json.loads(r.stdout)["shard_file"]))
    return files


def _copy_shards(files: list[Path], dest: Path) -> Path:
    folder = dest / files[0].parent.name
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, folder / f.name)
    return folder


def test_merge_refuses_a_shard_holding_nan(tmp_path, shards):
    import h5py

    folder = _copy_shards(shards, tmp_path)
    with h5py.File(folder / shards[1].name, "r+") as f:
        f["features"][2, 5] = np.nan
    r = _invoke("merge", folder)
    assert_one_line_error(r.exit_code, r.stderr, shards[1].name, "row 2", "NaN or infinity")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in shards)  # kept
    assert not folder.with_name(folder.name.removesuffix(".shards")).exists()


def test_merge_refuses_a_shard_whose_features_are_an_external_link(tmp_path, shards):
    import h5py

    folder = _copy_shards(shards, tmp_path)
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as f:
        f["x"] = np.ones((8, 32), np.float32)
    with h5py.File(folder / shards[0].name, "r+") as f:
        del f["features"]
        f["features"] = h5py.ExternalLink(str(outside), "x")
    r = _invoke("merge", folder)
    assert_one_line_error(r.exit_code, r.stderr, shards[0].name, "/features is not a dataset stored in the file")


def test_merging_the_shards_folder_twice_is_a_no_op(tmp_path, shards):
    folder = _copy_shards(shards, tmp_path)
    first = _invoke("merge", folder, "--json")
    assert first.exit_code == 0, first.stderr[-2000:]
    assert not folder.exists() and json.loads(first.stdout)["cache_hit"] is False
    again = _invoke("merge", folder, "--json")
    assert again.exit_code == 0, again.stderr[-2000:]
    d = json.loads(again.stdout)
    assert d["cache_hit"] is True and d["cache"] == json.loads(first.stdout)["cache"] and d["n"] == 12


# ----------------------------------------------------------------------------- 19, 20: data


def _extract(data: Path, backbone: str, *extra):
    return _invoke("extract", data, "-b", backbone, "--precision", "fp32", "--batch-size", "4",
                   "--workers", "0", *extra)


def test_cache_dir_inside_a_class_folder_is_named_when_the_class_goes_missing(tmp_path, tiny):
    from fxtl.data.samples import write_shapes

    data = write_shapes(tmp_path / "d", per_class=3)
    inside = data / "train" / "circle"
    first = _extract(data, tiny, "--cache-dir", inside)
    assert first.exit_code == 0, first.stderr[-2000:]
    again = _extract(data, tiny, "--cache-dir", inside)
    assert_one_line_error(again.exit_code, again.stderr, "class 'circle'", str(inside),
                          "holds images and fxtl output", "--cache-dir outside the data")


def test_float_tiff_of_nan_is_one_warning_saying_what_was_kept(tmp_path, tiny):
    from PIL import Image

    from fxtl.data.samples import write_shapes

    data = write_shapes(tmp_path / "d", per_class=3, splits=("train",))
    Image.fromarray(np.full((40, 40), np.nan, np.float32), "F").save(data / "train" / "circle" / "nan.tif")
    r = _extract(data, tiny, "--cache-dir", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.stderr[-2000:]
    assert "RuntimeWarning" not in r.stderr and "invalid value" not in r.stderr, r.stderr
    warned = [line for line in lines(r.stderr) if line.startswith("fxtl: warning:")]
    assert len(warned) == 1, r.stderr
    assert "nan.tif: 1600 of 1600 pixels are NaN or infinite; kept as black" in warned[0]
    assert json.loads(r.stdout)["n"] == 7
