"""Heads fast on many classes (issue 23 item 5): what each shortcut of the search changes, and
what it must not change.

* the linear SVM's candidates are fitted at its ``search_params`` tolerance, never its final fit;
* the MLP selects on one held-out split from 50 fit rows per class (its ``plenty_per_class``),
  the other heads by k-fold CV up to the default;
* calibration's fold fits and the folds' preparation run in threads without changing a number;
* a round of candidates fills every worker.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import fxtl.heads.search as search
from fxtl.features.store import write_cache
from fxtl.heads import fit_head
from fxtl.heads.grid import candidates_per_round, prepare_folds, score_grid
from fxtl.heads.registry import build_pipeline, get_head

from .test_heads import PRE

# Ten named classes, as users name them: a space, a non-ASCII letter.
CLASSES = ["Early Aramaic", "Ñandú", "Greek", "Japanese (katakana)", "Korean", "Latin",
           "Sanskrit", "Tagalog", "Balinese", "Ge'ez"]


def write_named_cache(path: Path, *, per_class: int, test_per_class: int = 8, dim: int = 24,
                      seed: int = 0, sep: float = 1.6) -> Path:
    """A cache of overlapping Gaussian blobs in train/ and test/ folders of named classes."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(CLASSES), dim)) * sep
    feats, labels, paths, split = [], [], [], []
    for name, n in (("train", per_class), ("test", test_per_class)):
        y = np.repeat(np.arange(len(CLASSES)), n)
        feats.append((centers[y] + rng.normal(size=(len(y), dim))).astype(np.float32))
        labels += y.tolist()
        paths += [f"{name}/{CLASSES[c]}/{i:04d}.png" for i, c in enumerate(y)]
        split += [name] * len(y)
    X = np.concatenate(feats)
    attrs = {"backbone": "synthetic", "weights_sha256": "0" * 64, "preprocessing": PRE,
             "precision": "fp32", "layer": "pooled", "fingerprint": f"named-{seed}-{per_class}",
             "created": "2026-12-02T00:00:00", "fxtl_version": "test", "dataset_name": "alphabets",
             "timings": {"compute_seconds": 1.0}}
    return write_cache(path, chunks=[X], n=len(X), dim=dim, labels=labels, paths=paths,
                       split=split, class_names=CLASSES, errors=[], attrs=attrs)


@pytest.fixture(scope="module")
def plenty(tmp_path_factory) -> Path:
    """60 train rows per class: above the MLP's 50, below the default's 300."""
    return write_named_cache(tmp_path_factory.mktemp("plenty") / "alphabets.h5", per_class=60)


# ----------------------------------------------------------------------------- search_params
def _spy_fixed(monkeypatch) -> list[dict]:
    seen: list[dict] = []
    real = search.run_search

    def spy(*args, **kwargs):
        seen.append(dict(kwargs["fixed"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(search, "run_search", spy)
    return seen


def test_linear_svm_candidates_use_the_search_tolerance_and_the_final_fit_its_own(plenty, monkeypatch):
    seen = _spy_fixed(monkeypatch)
    res = fit_head(plenty, model="linear-svm", jobs=1)
    assert seen[0]["tol"] == get_head("linear-svm").search_params["tol"] == 1e-2
    calibrated = res.estimator.named_steps["est"]
    final = calibrated.calibrated_classifiers_[0].estimator
    assert final.tol == get_head("linear-svm").defaults["tol"] == 1e-4
    assert res.metrics["strategy"]["search_params"] == {"tol": 1e-2}
    assert "tol" not in res.metrics["best_params"]


def test_a_tolerance_the_caller_fixes_holds_for_the_search_too(plenty, monkeypatch):
    seen = _spy_fixed(monkeypatch)
    res = fit_head(plenty, model="linear-svm", jobs=1, params={"tol": 1e-3})
    assert seen[0]["tol"] == 1e-3
    assert res.estimator.named_steps["est"].calibrated_classifiers_[0].estimator.tol == 1e-3
    assert res.metrics["strategy"]["search_params"] == {}


def test_other_heads_search_with_their_own_parameters(plenty, monkeypatch):
    seen = _spy_fixed(monkeypatch)
    res = fit_head(plenty, model="logreg", jobs=1)
    assert seen[0]["max_iter"] == get_head("logreg").defaults["max_iter"] and "tol" not in seen[0]
    assert res.metrics["strategy"]["search_params"] == {}


# ----------------------------------------------------------------------------- plenty_per_class
def test_mlp_selects_on_one_held_out_split_from_50_rows_per_class(plenty):
    mlp = fit_head(plenty, model="mlp", jobs=1)
    logreg = fit_head(plenty, model="logreg", jobs=1)
    assert mlp.metrics["selection"] == "holdout20"
    assert mlp.metrics["strategy"]["kind"] == "holdout"
    # 20% of 600 rows, stratified: 12 per class held out; the final fit sees all 600
    assert mlp.metrics["strategy"]["rows_searched"] == 600
    assert mlp.metrics["strategy"]["final_fit_rows"] == 600
    assert logreg.metrics["selection"] == "cv5"
    # the reported split is the test folder either way
    assert mlp.metrics["split"] == logreg.metrics["split"] == "test"
    assert mlp.metrics["n_fit"] == logreg.metrics["n_fit"] == 600


def test_mlp_keeps_k_fold_cv_below_50_rows_per_class(tmp_path):
    few = write_named_cache(tmp_path / "few.h5", per_class=40)
    assert fit_head(few, model="mlp", jobs=1).metrics["selection"] == "cv5"


@pytest.mark.parametrize("min_class, plenty_per_class, kind", [
    (49, 50, "cv"), (50, 50, "holdout"), (299, None, "cv"), (300, None, "holdout")])
def test_plenty_per_class_is_the_threshold(min_class, plenty_per_class, kind):
    extra = {} if plenty_per_class is None else {"plenty_per_class": plenty_per_class}
    s = search.choose_strategy(n_fit=2 * min_class, min_class=min_class, selection="cv5",
                               search_rows=4_000, **extra)
    assert s.kind == kind


# ----------------------------------------------------------------------------- threads
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="threads need two cores")
@pytest.mark.parametrize("model", ["linear-svm", "svm"])
def test_calibration_in_threads_gives_the_same_head(plenty, model, monkeypatch):
    from sklearn.calibration import CalibratedClassifierCV

    jobs_seen = []
    real_fit = CalibratedClassifierCV.fit

    def fit(self, *args, **kwargs):
        jobs_seen.append(self.n_jobs)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(CalibratedClassifierCV, "fit", fit)
    one = fit_head(plenty, model=model, jobs=1)
    two = fit_head(plenty, model=model, jobs=2)
    assert jobs_seen == [None, 2]  # the second calibration's fold fits ran two at a time
    X = np.random.default_rng(1).normal(size=(40, 24)).astype(np.float32) * 2
    np.testing.assert_allclose(one.estimator.predict_proba(X), two.estimator.predict_proba(X),
                               rtol=0, atol=1e-12)
    assert one.metrics["best_params"] == two.metrics["best_params"]
    # the saved estimator does not carry the thread count it was calibrated with
    assert two.estimator.named_steps["est"].n_jobs is None


@pytest.mark.parametrize("model, kernel", [("linear-svm", False), ("svm", True), ("logreg", False)])
def test_folds_prepared_in_threads_are_the_same(model, kernel):
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(0)
    y = np.repeat(np.array(CLASSES, dtype=object), 12)
    X = (rng.normal(size=(len(y), 200)) + (np.arange(len(y)) % 10)[:, None]).astype(np.float32)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X, y))

    def factory():
        return build_pipeline(model, calibrate=False)

    one = prepare_folds(factory, X=X, y=y, folds=folds, kernel=kernel, workers=1)
    two = prepare_folds(factory, X=X, y=y, folds=folds, kernel=kernel, workers=2)
    for a, b in zip(one, two):
        for field in ("X_train", "X_test", "d_train", "d_test"):
            if getattr(a, field) is None:
                assert getattr(b, field) is None
            else:
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert list(a.y_train) == list(b.y_train)
    if model == "linear-svm":  # 96 rows < 200 features: each fold was taken to its rows' span
        assert one[0].X_train.shape == (96, 96)


def test_rounds_fill_the_workers():
    assert candidates_per_round(2, 5) == 2  # 10 fits on 2 workers: no idle slot
    assert candidates_per_round(1, 5) == 1
    assert candidates_per_round(2, 1) == 2  # one held-out split: two candidates side by side
    for workers in range(1, 17):
        for folds in (1, 3, 5, 10):
            r = candidates_per_round(workers, folds)
            assert r * folds >= workers or r == 1 and folds >= workers


def test_scores_do_not_depend_on_the_round_size():
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(10), 15)
    X = (rng.normal(size=(len(y), 30)) + y[:, None] * 0.3).astype(np.float32)
    folds = list(StratifiedKFold(5, shuffle=True, random_state=0).split(X, y))
    prepared = prepare_folds(lambda: build_pipeline("linear-svm", calibrate=False), X=X, y=y,
                             folds=folds)
    cands = [{"C": c} for c in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)]
    serial = score_grid("linear-svm", prepared, cands, workers=1)
    rounds = score_grid("linear-svm", prepared, cands, workers=2)
    assert serial.scores == rounds.scores and serial.best == rounds.best
