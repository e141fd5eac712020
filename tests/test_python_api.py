"""The notebook API: embed / Embedder, ImageEmbedder in scikit-learn, load_model, results as
tables, on named classes (a space, a non-ASCII letter) in split folders, with the tiny backbone."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fxtl
import fxtl.embedder as embedder_module
from fxtl.errors import DataError, ParameterError, ProvenanceError

NAMES = ("ants", "bees", "grüne Käfer")


def _picture(k: int, seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (size, size + 8, 3), dtype=np.uint8)
    arr[..., k] += 150
    return Image.fromarray(arr, "RGB")


@pytest.fixture(scope="module")
def bugs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api") / "bugs"
    for split, n in (("train", 6), ("val", 3)):
        for k, cls in enumerate(NAMES):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                ext = "jpg" if i % 2 else "png"
                _picture(k, zlib.crc32(f"{split}{cls}{i}".encode())).save(root / split / cls / f"{cls} {i}.{ext}")
    return root


@pytest.fixture(scope="module")
def cache(bugs, tiny, tmp_path_factory):
    res = fxtl.extract(bugs, backbone=tiny, precision="fp32", progress=False,
                       cache_dir=tmp_path_factory.mktemp("cache"))
    return fxtl.load_features(res.cache)


@pytest.fixture(scope="module")
def emb(tiny):
    return fxtl.Embedder(tiny, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def head_run(cache, tmp_path_factory) -> Path:
    res = fxtl.fit_head(cache.path, model="logreg", search=False,
                        runs_dir=tmp_path_factory.mktemp("runs"))
    return res.run_dir


def _abs(cache, bugs):
    return [str(bugs / p) for p in cache.paths]


# ----------------------------------------------------------------------------- embed
def test_embed_on_a_folder_equals_the_cache_rows(bugs, tiny, cache):
    X = fxtl.embed(bugs, tiny, precision="fp32", device="cpu")
    assert X.shape == (27, cache.dim) and X.dtype == np.float32
    order = sorted(range(cache.n), key=lambda i: str(bugs / cache.paths[i]))  # folders: sorted paths
    np.testing.assert_allclose(X, cache.features[order], atol=1e-6, rtol=0)


def test_pil_images_and_arrays_give_the_files_rows(bugs, cache, emb):
    png = [i for i, p in enumerate(cache.paths) if p.endswith(".png")][:3]
    ims = [Image.open(bugs / cache.paths[i]) for i in png]
    np.testing.assert_allclose(emb(ims), cache.features[png], atol=1e-6, rtol=0)
    arrays = np.stack([np.asarray(im.convert("RGB")) for im in ims])  # a 4-d batch
    np.testing.assert_allclose(emb(arrays), cache.features[png], atol=1e-6, rtol=0)
    np.testing.assert_allclose(emb(list(arrays)), cache.features[png], atol=1e-6, rtol=0)


def test_grayscale_and_rgba_arrays_are_converted_like_files(emb):
    gray = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    np.testing.assert_array_equal(emb(gray), emb(np.repeat(gray[..., None], 3, axis=2)))
    rgba = np.zeros((40, 50, 4), dtype=np.uint8)
    rgba[:, :25] = (0, 0, 255, 255)  # opaque blue | transparent (white once composited)
    white = np.full((40, 50, 3), 255, dtype=np.uint8)
    white[:, :25] = (0, 0, 255)
    np.testing.assert_array_equal(emb(rgba), emb(white))


def test_bad_inputs_are_refused_with_a_sentence(emb, tmp_path):
    with pytest.raises(ParameterError, match=r"images\[0\] is a float64 array; pass uint8") as e:
        emb([np.zeros((8, 8, 3))])
    assert e.value.param == "images"
    with pytest.raises(ParameterError, match="nowhere.jpg: no such file or folder"):
        emb(tmp_path / "nowhere.jpg")
    with pytest.raises(ParameterError, match=r"shape \(8, 8, 2\)"):
        emb(np.zeros((8, 8, 2), dtype=np.uint8))
    empty = emb([])
    assert empty.shape == (0, emb.feature_dim) and empty.dtype == np.float32
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = np.full((30, 30, 3), 90, dtype=np.uint8)
    with pytest.raises(DataError, match="broken.jpg: not an image"):
        emb([good, bad])
    rows = emb([good, bad], on_error="nan")
    assert np.isfinite(rows[0]).all() and np.isnan(rows[1]).all()


def test_a_second_call_builds_no_network(tiny, bugs, monkeypatch):
    built = []
    real = embedder_module.load_backbone
    monkeypatch.setattr(embedder_module, "load_backbone",
                        lambda *a, **k: built.append(a) or real(*a, **k))
    emb = fxtl.Embedder(tiny, precision="fp32", device="cpu")
    first = emb(bugs / "val")
    second = emb(bugs / "val")
    third = fxtl.embed(bugs / "val", emb)
    assert len(built) == 1 and emb.images_computed == 27
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)
    with pytest.raises(ParameterError, match="precision cannot be set when backbone is an Embedder"):
        fxtl.embed(bugs / "val", emb, precision="fp32")


# ----------------------------------------------------------------------------- scikit-learn
def test_image_embedder_in_a_pipeline_runs_each_image_once(bugs, tiny, cache):
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline

    paths, labels = _abs(cache, bugs), cache.y
    pipe = make_pipeline(fxtl.ImageEmbedder(tiny, precision="fp32", device="cpu"),
                         LogisticRegression(max_iter=500))
    scores = cross_val_score(pipe, paths, labels, cv=3)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    embedder = pipe.steps[0][1]
    assert embedder.images_computed == 27  # every fold's fit and score read the shared rows
    grid = GridSearchCV(pipe, {"logisticregression__C": [0.1, 1.0, 10.0]}, cv=3).fit(paths, labels)
    assert embedder.images_computed == 27  # the search over the head re-ran no image
    assert set(grid.predict(paths[:4])) <= set(NAMES)
    np.testing.assert_allclose(embedder.transform(paths), cache.features, atol=1e-6, rtol=0)
    copy = clone(embedder)
    assert copy.get_params() == embedder.get_params() and copy is not embedder
    names = copy.get_feature_names_out()
    assert len(names) == cache.dim and names[0] == "imageembedder0"
    other = clone(embedder).set_params(cache=False)
    other.transform(paths[:2])
    assert other.images_computed == 29  # cache=False always computes (and counts)


def _api_checks():
    from sklearn.utils import estimator_checks as ec

    return [ec.check_no_attributes_set_in_init, ec.check_estimator_repr,
            ec.check_parameters_default_constructible, ec.check_get_params_invariance,
            ec.check_set_params, ec.check_do_not_raise_errors_in_init_or_set_params,
            ec.check_estimator_cloneable, ec.check_mixin_order, ec.check_valid_tag_types,
            ec.check_estimator_tags_renamed]


@pytest.mark.parametrize("check", _api_checks(), ids=lambda c: c.__name__)
def test_image_embedder_passes_the_api_checks(check):
    """The checks that need no numeric table (transform takes images, so the data checks of
    ``parametrize_with_checks`` are skipped through the ``two_d_array`` input tag)."""
    check("ImageEmbedder", fxtl.ImageEmbedder())


# ----------------------------------------------------------------------------- load_model
def test_load_model_of_a_head_run_matches_predict(head_run, bugs, cache):
    model = fxtl.load_model(head_run)
    assert list(model.classes_) == list(NAMES) and model.kind == "head"
    res = fxtl.predict(head_run, str(bugs / "val"))  # one string: a folder, not its characters
    paths = [p["path"] for p in res.predictions]
    assert len(paths) == 9
    proba = model.predict_proba(paths)
    got = [float(proba[i, NAMES.index(p["label"])]) for i, p in enumerate(res.predictions)]
    np.testing.assert_allclose(got, [p["probability"] for p in res.predictions], atol=1e-6)
    assert list(model.predict(paths)) == [p["label"] for p in res.predictions]
    unsaved = fxtl.load_model(fxtl.load_head(head_run))  # a Head object, no folder needed
    np.testing.assert_allclose(unsaved.predict_proba(paths), proba, atol=1e-9)


def test_load_model_checks_the_head_hash(head_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(head_run, copy)
    head = copy / "head.skops"
    data = head.read_bytes()
    head.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit: the sha256 must catch it
    with pytest.raises(ProvenanceError, match="head.skops"):
        fxtl.load_model(copy)


def test_load_model_of_an_onnx_export_matches_the_run(head_run, bugs, tmp_path):
    pytest.importorskip("onnxruntime")
    out = fxtl.export_model(head_run, output=tmp_path / "m.onnx")
    onnx = fxtl.load_model(out.output)
    run = fxtl.load_model(head_run, precision="fp32")
    assert onnx.kind == "onnx" and list(onnx.classes_) == list(NAMES)
    folder = bugs / "val"
    np.testing.assert_allclose(onnx.predict_proba(folder), run.predict_proba(folder), atol=1e-4)


def test_load_model_of_a_finetuned_run_matches_predict(bugs, tiny, tmp_path):
    ft = fxtl.finetune(bugs, backbone=tiny, epochs=1, image_size=64, device="cpu",
                       precision="fp32", cache_dir=tmp_path, run_name="ft", progress=False)
    model = fxtl.load_model(ft.run_dir)
    assert model.kind == "finetune" and list(model.classes_) == list(NAMES)
    res = fxtl.predict(ft.run_dir, [bugs / "val"])
    proba = model.predict_proba([p["path"] for p in res.predictions])
    np.testing.assert_allclose(proba.max(axis=1), [p["probability"] for p in res.predictions],
                               atol=1e-6)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)


# ----------------------------------------------------------------------------- tables, fixes
def test_results_as_tables(cache, head_run, bugs):
    pytest.importorskip("pandas")
    assert list(cache.y[:1]) == [NAMES[cache.labels[0]]]
    frame = cache.to_frame()
    assert frame.shape == (27, 3 + cache.dim)
    assert list(frame.columns[:4]) == ["path", "split", "label", "f0"]
    assert set(frame["label"]) == set(NAMES) and frame["f0"].iloc[0] == cache.features[0, 0]
    assert cache.to_frame(features=False).shape == (27, 3)
    pred = fxtl.predict(head_run, bugs / "val").to_frame()
    assert list(pred.columns[:3]) == ["path", "label", "probability"] and len(pred) == 9
    res = fxtl.compare(runs_dir=head_run.parent, output=head_run.parent / "c.png")
    table = res.to_frame()
    assert table["run"].tolist() == [head_run.name] and table["method"].tolist() == ["head:logreg"]
    assert res.figure is not None and res.figure.axes and res.chart.is_file()


def test_compare_after_fit_head_runs_dir_says_what_to_pass(head_run, tmp_path):
    with pytest.raises(fxtl.FxtlError, match="cache_dir=FOLDER .* or runs_dir=FOLDER") as e:
        fxtl.compare(cache_dir=tmp_path / "elsewhere")
    assert e.value.param == "cache_dir" and "--cache-dir" not in str(e.value)
    assert len(fxtl.compare(runs_dir=head_run.parent, chart=False).rows) == 1


def test_plot_embedding_returns_the_figure(cache, tmp_path):
    out = fxtl.plot_embedding(cache, output=tmp_path / "e.png")
    assert out.plot.is_file() and out.figure.axes[0].get_title().endswith("PCA")
    assert "figure" not in out.to_dict()


# ----------------------------------------------------------------------------- terminal
def test_predict_format_csv(head_run, bugs, tmp_path):
    import csv
    import io

    from click.testing import CliRunner

    from fxtl.cli import cli

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"no png")
    r = CliRunner().invoke(cli, ["predict", str(head_run), str(bugs / "val"), str(bad),
                                 "--format", "csv", "--top-k", "2"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 10 and set(rows[0]) == {"path", "label", "probability", "top_k", "error"}
    assert {row["label"] for row in rows[:9]} <= set(NAMES)
    assert rows[0]["top_k"].count("=") == 2 and 0 < float(rows[0]["probability"]) <= 1
    assert rows[9]["path"] == str(bad) and rows[9]["label"] == "" and "not an image" in rows[9]["error"]


def test_quiet_verbose_and_compare_rows_naming_their_run(cache, head_run, tmp_path):
    import shutil

    from click.testing import CliRunner

    from fxtl.cli import cli

    home = tmp_path / "home"
    loud = CliRunner().invoke(cli, ["fit-head", str(cache.path), "--cache-dir", str(home),
                                    "--run-name", "a"])
    assert loud.exit_code == 0 and "fxtl: logreg:" in loud.stderr  # the search's progress line
    quiet = CliRunner().invoke(cli, ["--quiet", "fit-head", str(cache.path), "--cache-dir",
                                     str(home), "--run-name", "b"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and "logreg" in quiet.stdout
    shutil.copytree(head_run, home / "runs" / head_run.name)
    table = CliRunner().invoke(cli, ["compare", "--cache-dir", str(home)]).stdout.splitlines()
    assert table[1].split()[:2] == ["run", "method"]
    assert {line.split()[0] for line in table[3:6]} == {"a", "b", head_run.name[:11] + ".." +
                                                        head_run.name[-11:]}
    both = CliRunner().invoke(cli, ["-q", "-v", "compare", "--cache-dir", str(home)])
    assert both.exit_code == 2 and "cannot be combined" in both.stderr


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io
    import sys
    import threading

    from fxtl._util import progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    before = threading.active_count()
    for enabled in (True, False):  # pytest's stderr is not a terminal
        bar = progress_bar(3, "x", enabled)
        assert bar.disable
        bar.update(2)
        bar.set_postfix(loss="0.1")
        bar.close()
        assert bar.n == 2 and bar.total == 3
    # no bar drawn, no tqdm monitor thread left behind: a live thread would make every later
    # cache probe start a fresh interpreter instead of forking
    assert threading.active_count() == before
    monkeypatch.setattr("sys.stderr", Terminal())
    bar = progress_bar(3, "x", True)
    assert not bar.disable and type(bar).__name__ == "tqdm_asyncio"
    bar.update(3)
    bar.close()
    assert "x: 100%" in sys.stderr.getvalue()
    assert progress_bar(3, "x", False).disable


def test_locks_are_exclusive_and_leave_no_file(tmp_path):
    import threading
    import time

    from fxtl._util import file_lock

    lock, inside, overlaps = tmp_path / "x.h5.lock", [], []

    def work():
        for _ in range(5):
            with file_lock(lock, what="x"):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.005)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and not lock.exists()


def test_extract_leaves_no_lock_file(bugs, tiny, cache):
    assert not list(cache.path.parent.glob("*.lock"))
