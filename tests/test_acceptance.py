"""Every command, end to end, on data shaped like a user's (not classes named 0, 1, 2).

Two datasets a user could have: split folders of named classes (``ants``, ``bees`` and
``grüne Käfer``: a space and a non-ASCII letter), and a CSV manifest whose labels are numbers
that are not their own positions (``7``, ``12``, ``5``). Each command runs through the CLI
with ``--json`` on the tiny seeded backbone; answers are checked against each other: the
exported ONNX model gives ``predict``'s labels, the class names survive every artifact.
"""
from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fxtl.cli import cli

NAMED = ("ants", "bees", "grüne Käfer")
NUMBERED = ("7", "12", "5")
HEADS = ("logreg", "linear-svm", "mlp", "svm", "knn")


def _picture(cls_index: int, seed: int, size: int = 40) -> Image.Image:
    """A noisy picture whose colour and stripe direction say its class."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    arr[..., cls_index % 3] += 150
    stripes = (np.arange(size) // 5) % 2 == 0
    if cls_index % 2:
        arr[:, stripes] = 255
    else:
        arr[stripes, :] = 255
    return Image.fromarray(arr, "RGB")


def _write_named(root: Path) -> Path:
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for k, cls in enumerate(NAMED):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                suffix = "jpg" if i % 2 else "png"
                _picture(k, seed=zlib.crc32(f'{split}/{cls}/{i}'.encode())).save(folder / f"{cls} {i}.{suffix}")
    return root


def _write_manifest(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for k, label in enumerate(NUMBERED):
        for i in range(10):
            name = f"images/{label}_{i}.png"
            _picture(k, seed=1000 + 17 * k + i).save(root / name)
            rows.append((name, label, "train" if i < 6 else "val" if i < 8 else "test"))
    manifest = root / "labels.csv"
    with manifest.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return manifest


def _run(*args: str) -> dict:
    res = CliRunner().invoke(cli, [*map(str, args), "--json"])
    assert res.exit_code == 0, f"fxtl {' '.join(map(str, args))}: {res.output[-2000:]}"
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def named(tmp_path_factory) -> Path:
    return _write_named(tmp_path_factory.mktemp("named") / "bugs")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def named_cache(named, tiny, home) -> Path:
    out = _run("extract", named, "-b", tiny, "--precision", "fp32", "--cache-dir", home)
    assert out["n"] == 36 and out["splits"] == {"train": 18, "val": 9, "test": 9}
    return Path(out["cache"])


@pytest.fixture(scope="module")
def head_runs(named_cache, home) -> dict[str, Path]:
    out = _run("fit-head", named_cache, "--model", "all", "--cache-dir", home)
    runs = {r["model"]: Path(r["run_dir"]) for r in out["runs"]}
    assert set(HEADS) <= set(runs)
    return runs


@pytest.fixture(scope="module")
def finetune_run(named, tiny, home) -> Path:
    out = _run("finetune", named, "-b", tiny, "--epochs", "1", "--image-size", "64",
               "--device", "cpu", "--precision", "fp32", "--cache-dir", home, "--run-name", "ft")
    assert out["split"] == "test" and out["epochs"] >= 1
    return Path(out["run_dir"])


def test_info_and_every_export_format_keep_the_names(named_cache, tmp_path):
    info = _run("info", named_cache)
    assert info["class_names"] == list(NAMED)
    assert info["class_counts"] == {c: 12 for c in NAMED}
    npz = _run("export", named_cache, "--format", "npz", "-o", tmp_path / "f.npz")
    with np.load(npz["output"], allow_pickle=False) as z:
        assert z["features"].shape[0] == 36
        assert sorted(set(z["class_names"].tolist())) == sorted(NAMED)
    out = _run("export", named_cache, "--format", "csv", "-o", tmp_path / "f.csv")
    text = Path(out["output"]).read_text(encoding="utf-8")
    assert "grüne Käfer" in text and "bees" in text
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    out = _run("export", named_cache, "--format", "parquet", "-o", tmp_path / "f.parquet")
    df = pd.read_parquet(out["output"])
    assert len(df) == 36 and set(df["label_name"]) == set(NAMED)


@pytest.mark.parametrize("model", HEADS)
def test_every_head_predicts_named_classes(model, head_runs, named):
    pred = _run("predict", head_runs[model], named / "test")
    labels = [p["label"] for p in pred["predictions"]]
    assert len(labels) == 9 and set(labels) <= set(NAMED)
    metrics = json.loads((head_runs[model] / "metrics.json").read_text())
    assert metrics["split"] == "test"


@pytest.mark.parametrize("model", HEADS)
def test_export_model_of_every_head_gives_predicts_labels(model, head_runs, named, tmp_path):
    pytest.importorskip("onnxruntime")
    out = _run("export-model", head_runs[model], "-o", tmp_path / "m.onnx")
    assert out["class_names"] == list(NAMED) and out["max_abs_diff"] < 1e-4
    want = _run("predict", head_runs[model], named / "test", "--precision", "fp32")
    got = _run("predict", out["output"], named / "test")
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
    np.testing.assert_allclose([p["probability"] for p in got["predictions"]],
                               [p["probability"] for p in want["predictions"]], atol=1e-3)


def test_finetune_exports_and_predicts_named_classes(finetune_run, named, tmp_path):
    pytest.importorskip("onnxruntime")
    want = _run("predict", finetune_run, named / "test", "--device", "cpu", "--precision", "fp32")
    assert {p["label"] for p in want["predictions"]} <= set(NAMED)
    out = _run("export-model", finetune_run, "-o", tmp_path / "ft.onnx")
    assert out["class_names"] == list(NAMED)
    got = _run("predict", out["output"], named / "test")
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]


def test_compare_sees_heads_and_the_finetune(head_runs, finetune_run, home):
    out = _run("compare", "--cache-dir", home)
    methods = {r["method"] for r in out["rows"]}
    assert {f"head:{m}" for m in HEADS} | {"finetune:all"} <= methods
    assert all(0 <= r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] <= 1
               for r in out["rows"])
    assert out["paired"], "a head and the fine-tune on the same test rows are tested in pairs"


def test_advise_on_named_classes(named, tiny):
    out = _run("advise", named, "-b", tiny, "--sample", "36", "--precision", "fp32")
    assert out["scenario"] in (1, 2, 3, 4)
    assert out["size"]["classes"] == 3 and out["size"]["train_images"] == 18
    assert out["commands"] and all("fxtl " in c for c in out["commands"])


def test_shards_merge_into_the_single_process_cache(named, tiny, named_cache, tmp_path):
    target = tmp_path / "sharded.h5"
    for i in range(2):
        _run("extract", named, "-b", tiny, "--precision", "fp32", "--shard", f"{i}/2", "-o", target)
    out = _run("merge", f"{target}.shards", "-o", target)
    assert out["n"] == 36 and not out["cache_hit"]
    import h5py

    with h5py.File(target, "r") as a, h5py.File(named_cache, "r") as b:
        np.testing.assert_array_equal(a["features"][:], b["features"][:])
        assert list(a.attrs["class_names"]) == list(b.attrs["class_names"]) == list(NAMED)


def test_a_manifest_with_numbered_labels_exports_and_predicts(tmp_path, tiny):
    """Labels ``7, 12, 5`` are names, not positions: once an IndexError at export-model."""
    pytest.importorskip("onnxruntime")
    manifest = _write_manifest(tmp_path / "numbers")
    home = tmp_path / "home"
    cache = _run("extract", manifest, "-b", tiny, "--precision", "fp32", "--cache-dir", home)["cache"]
    assert _run("info", cache)["class_names"] == sorted(NUMBERED)
    for model in ("logreg", "knn"):
        run = _run("fit-head", cache, "--model", model, "--cache-dir", home)["runs"][0]["run_dir"]
        onnx_file = _run("export-model", run, "-o", tmp_path / f"{model}.onnx")["output"]
        images = sorted((manifest.parent / "images").glob("*.png"))[:6]
        want = _run("predict", run, *images, "--precision", "fp32")
        got = _run("predict", onnx_file, *images)
        assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
        assert {p["label"] for p in got["predictions"]} <= set(NUMBERED)
