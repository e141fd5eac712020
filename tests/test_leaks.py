"""No split is both learned from and used for selection or report (issue 13, item 1).

The planted leak: with train/val/test, ``fit-head`` refits its head on train+val; passed as
``init_head`` to a fine-tune that early-stops on val, that head has already learned the selection
split. ``finetune`` must refit it on the fine-tune's training rows only, and ``rows.json`` must say
which rows trained, selected and reported.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fxtl.data.discovery import discover, fingerprint
from fxtl.data.splits import RowSet, RunRows, hash_holdout, leaked_rows, load_rows
from fxtl.training.loop import finetune, linear_head_weights

TINY = dict(image_size=32, batch_size=4, workers=0, progress=False, precision="fp32")


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory):
    from fxtl.data.samples import write_shapes

    return write_shapes(tmp_path_factory.mktemp("leak"), per_class=5, splits=("train", "val", "test"))


@pytest.fixture(scope="module")
def leaky_head(three_splits, tiny, tmp_path_factory):
    """A logreg head fitted (by fit-head) on train+val, and its cache."""
    import fxtl
    from fxtl.heads.fitting import fit_head

    out = tmp_path_factory.mktemp("leak-cache")
    cache = fxtl.extract(three_splits, backbone=tiny, cache_dir=out, progress=False,
                         precision="fp32", workers=0).cache
    fitted = fit_head(cache, model="logreg", cache_dir=out, search=False)
    return fitted, cache


def _classifier(run_dir):
    state = torch.load(run_dir / "model.pt", weights_only=True)
    return state["classifier.weight"].numpy(), state["classifier.bias"].numpy()


def test_init_head_is_refitted_on_the_finetune_training_rows(three_splits, tiny, leaky_head, tmp_path):
    from sklearn.base import clone

    from fxtl.features.store import load_features

    fitted, cache_path = leaky_head
    cache = load_features(cache_path)
    # The planted leak: the head as saved learned from val, the fine-tune's selection split.
    assert fitted.metrics["n_fit"] == int(np.isin(cache.split, ["train", "val"]).sum())

    res = finetune(three_splits, backbone=tiny, init_head=fitted.run_dir, epochs=0,
                   cache_dir=tmp_path, **TINY)
    images = discover(three_splits)
    rows = load_rows(res.run_dir)
    assert rows is not None and rows.data_fingerprint == fingerprint(images)
    assert rows.train.split == "train" and rows.selection.split == "val" and rows.report.split == "test"
    split_of = {s.path: s.split for s in images.samples}
    assert {split_of[p] for p in rows.train.paths} == {"train"}
    assert {split_of[p] for p in rows.selection.paths} == {"val"}
    assert {split_of[p] for p in rows.report.paths} == {"test"}

    # The head as fit-head saved it learned val: as a learner it leaks into the fine-tune's
    # selection, which is what rows.json lets anyone detect.
    head_rows = RunRows(rows.data_fingerprint,
                        RowSet("train+val", rows.train.paths + rows.selection.paths), None,
                        RowSet("test", rows.report.paths))
    assert leaked_rows(head_rows, RunRows(rows.data_fingerprint, rows.train, None, rows.selection))
    # The start head actually used learned from the fine-tune's train rows only.
    info = res.metrics["init_head"]
    assert info["refit_rows"] == len(rows.train.paths) and info["refit_split"] == "train"
    assert info["cache"] == str(cache_path)
    refit_rows = RunRows(rows.data_fingerprint, RowSet("train", rows.train.paths), None, rows.report)
    assert not leaked_rows(refit_rows, rows)
    assert not leaked_rows(refit_rows, RunRows(rows.data_fingerprint, rows.train, None, rows.selection))

    # No trained epoch (epochs=0): val kept the start, which learned train only, so it is
    # refitted on train + val before the report, as fit-head refits the head val chose. The
    # classifier reported is then the train+val head, never one that saw a test image.
    refit_info = res.metrics["final_refit"]
    assert refit_info["refit_split"] == "train+val"
    assert refit_info["refit_rows"] == len(rows.train.paths) + len(rows.selection.paths)
    train = np.isin(np.asarray(cache.paths), rows.train.paths)
    train_only = clone(fitted.pipeline).fit(cache.features[train], cache.labels[train])
    W, b = _classifier(res.run_dir)
    W_ok, b_ok = linear_head_weights(fitted.pipeline, cache.class_names, images.class_names,
                                     feature_dim=W.shape[1])
    np.testing.assert_allclose(W, W_ok, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, b_ok, rtol=1e-5, atol=1e-6)
    W_train, _ = linear_head_weights(train_only, cache.class_names, images.class_names,
                                     feature_dim=W.shape[1])
    assert np.abs(W - W_train).max() > 1e-4  # the refit changed the start
    assert any("refitted" in n for n in res.metrics["notes"])


def test_init_head_whose_cache_is_gone_is_refused(three_splits, tiny, leaky_head, tmp_path):
    import shutil

    import fxtl

    fitted, cache_path = leaky_head
    moved = tmp_path / "elsewhere.h5"
    shutil.copy(cache_path, moved)
    cache_path.unlink()
    try:
        with pytest.raises(fxtl.ProvenanceError, match="gone") as err:
            finetune(three_splits, backbone=tiny, init_head=fitted.run_dir, epochs=0,
                     cache_dir=tmp_path, **TINY)
        assert str(cache_path) in str(err.value) and "\n" not in str(err.value)
    finally:
        shutil.copy(moved, cache_path)


def test_train_only_reports_the_heads_holdout_and_selects_on_another(tmp_path, tiny):
    from fxtl.data.samples import write_shapes

    data = write_shapes(tmp_path / "d", per_class=10, splits=("train",)) / "train"
    res = finetune(data, backbone=tiny, epochs=1, cache_dir=tmp_path / "c", seed=5, **TINY)
    images = discover(data)
    labels = np.array([s.label for s in images.samples])
    rest, held = hash_holdout(np.arange(len(labels)), labels, [s.path for s in images.samples],
                              test_size=0.2, seed=5, source="t")
    rows = load_rows(res.run_dir)
    assert rows.report.paths == tuple(images.samples[i].path for i in held)
    assert rows.report.split == res.split == "holdout"
    assert not set(rows.selection.paths) & set(rows.report.paths)
    assert not set(rows.train.paths) & (set(rows.report.paths) | set(rows.selection.paths))
    assert len(rows.train.paths) + len(rows.selection.paths) == len(rest)
    assert not leaked_rows(rows, rows)
    assert any("second 20% hold-out" in n for n in res.metrics["notes"])
    assert json.loads((res.run_dir / "metrics.json").read_text())["selection_split"] == "holdout-selection"
