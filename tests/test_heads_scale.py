"""Heads that scale with rows (issue 12): the strategy chosen at each size, the time budget,
rows.json, scikit-learn conformance of the fitted head, and no file written unless asked."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fxtl.data.splits import load_rows
from fxtl.errors import ParameterError
from fxtl.heads import choose_strategy, fit_head, parse_budget
from fxtl.heads.search import search_folds

from .test_heads import write_synthetic_cache


# ----------------------------------------------------------------------------- strategy per size
@pytest.mark.parametrize("n_fit, min_class, selection, n_train, kind, subsample", [
    (245, 100, "cv5", None, "cv", None),           # ~400 images, no test split: 5-fold CV
    (1_800, 150, "cv5", None, "cv", None),         # still small: every row helps choose
    (1_800, 600, "cv5", None, "holdout", None),    # every class has plenty: one split suffices
    (2_800, 150, "cv5", None, "holdout", None),    # ~3,500 rows
    (2_800, 150, "val", 2_450, "val", None),       # a val split is used as it is
    (21_600, 1_200, "cv5", None, "holdout", 4_000),  # ~27,000 rows: subsample, refit on all
    (21_600, 1_200, "val", 19_000, "val", 4_000),
    (21_600, 1_200, "none", None, "none", None),
])
def test_strategy_chosen_at_each_size(n_fit, min_class, selection, n_train, kind, subsample):
    s = choose_strategy(n_fit=n_fit, min_class=min_class, selection=selection, search_rows=4_000,
                        n_train=n_train)
    assert (s.kind, s.subsample) == (kind, subsample)


def test_search_folds_subsample_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 2_500)
    rows = np.arange(len(labels))
    s = choose_strategy(n_fit=len(rows), min_class=2_500, selection="cv5", search_rows=1_000)
    (tr, te), = search_folds(s, fit_rows=rows, labels=labels, seed=0)
    assert len(tr) == 1_000 and len(te) == 250 and not set(tr) & set(te)
    assert np.bincount(labels[tr]).tolist() == [250] * 4


def test_large_fit_searches_a_subsample_and_refits_on_all_rows(tmp_path, monkeypatch):
    from dataclasses import replace

    from fxtl.heads import fitting

    spec = replace(fitting.get_head("logreg"), search_rows=4_000)  # logreg's own cap is 8,000
    monkeypatch.setattr(fitting, "get_head", lambda name: spec)
    cache = write_synthetic_cache(tmp_path / "big.h5", splits=(("train", 6_000), ("test", 300)),
                                  dim=16, classes=4, sep=1.0)
    res = fit_head(cache, model="logreg", seed=0)
    st = res.metrics["strategy"]
    assert st["kind"] == "holdout" and st["path"] and st["rows_searched"] == 4_000 + 1_000
    assert st["final_fit_rows"] == res.metrics["n_fit"] == 6_000
    assert st["candidates_tried"] == st["candidates"] == 13
    assert res.metrics["selection"] == "holdout20" and res.metrics["accuracy"] > 0.8


def test_many_row_settings_reach_search_candidates_fitted_on_many_rows(tmp_path, monkeypatch):
    """scale_up (the MLP's batch 256 beyond 8,000 rows) is a rule of the rows a fit sees: with
    the subsample cap raised (as an exhaustive reference does) candidates get it too."""
    from dataclasses import replace

    from fxtl.heads import fitting

    seen = []

    def scale_up(params, n_rows):
        seen.append(n_rows)
        if n_rows > 150 and params.get("batch_size") == 64:
            params.update(batch_size=32)
            return [f"batch_size 32 for fits on {n_rows} rows"]
        return []

    spec = replace(fitting.get_head("mlp"), scale_up=scale_up, search_rows=10 ** 6)
    monkeypatch.setattr(fitting, "get_head", lambda name: spec)
    cache = write_synthetic_cache(tmp_path / "m.h5", splits=(("train", 240), ("val", 60), ("test", 30)),
                                  dim=8, classes=3, sep=3.0)
    res = fit_head(cache, model="mlp", seed=0, solver="sklearn")
    assert seen[0] == 240  # the candidates' training rows (val selects)
    assert res.estimator.steps[-1][1].batch_size == 32
    assert any("batch_size 32 for fits on 240 rows" in n for n in res.metrics["notes"])


def test_svm_final_fit_is_capped_and_calibrated_once(tmp_path, monkeypatch):
    from fxtl.heads import search

    monkeypatch.setattr(search, "CALIBRATION_SPLIT_ROWS", 200)
    cache = write_synthetic_cache(tmp_path / "s.h5", splits=(("train", 900), ("test", 60)),
                                  dim=8, classes=3, sep=2.0)
    res = fit_head(cache, model="svm", seed=0)
    est = res.estimator.steps[-1][1]
    assert type(est).__name__ == "CalibratedClassifierCV" and len(est.calibrated_classifiers_) == 1
    assert any("Platt-calibrated on" in n for n in res.metrics["notes"])
    np.testing.assert_allclose(res.estimator.predict_proba(np.zeros((2, 8), np.float32)).sum(1), 1)


# ----------------------------------------------------------------------------- budget
def test_budget_is_respected_and_reported(tmp_path):
    cache = write_synthetic_cache(tmp_path / "b.h5", splits=(("train", 600), ("test", 60)), dim=8)
    t0 = time.perf_counter()
    # 1 ms: spent before the first candidate ends, however fast the machine (the MLP selects on
    # one held-out split here, 200 rows per class, and a candidate can take under 20 ms)
    res = fit_head(cache, model="mlp", budget=0.001, seed=0)
    st = res.metrics["strategy"]
    assert st["stopped_by_budget"] and st["candidates_tried"] < st["candidates"]
    assert res.metrics["budget_seconds"] == pytest.approx(0.001)
    assert any("time budget reached" in n for n in res.metrics["notes"])
    assert time.perf_counter() - t0 < 120  # generous: the test machine may be shared
    full = fit_head(cache, model="knn", seed=0)
    assert not full.metrics["strategy"]["stopped_by_budget"]


@pytest.mark.parametrize("text, seconds", [("60s", 60.0), ("2m", 120.0), ("1.5h", 5400.0), (7, 7.0)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["soon", "-3s", "0"])
def test_parse_budget_refuses_nonsense_naming_the_parameter(text):
    with pytest.raises(ParameterError) as err:
        parse_budget(text)
    assert err.value.param == "budget"


# ----------------------------------------------------------------------------- sklearn-native
def test_fitted_head_is_a_plain_sklearn_estimator(tmp_path):
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    cache = write_synthetic_cache(tmp_path / "c.h5")
    res = fit_head(cache, model="logreg", seed=0)
    est = res.estimator
    assert type(est).__name__ == "Pipeline"
    assert list(est.classes_) == ["class0", "class1", "class2"]
    from fxtl.features.store import load_features

    c = load_features(cache)
    names = np.asarray(c.class_names)[c.labels]
    assert (est.predict(c.features[:5]) == names[:5]).all()
    np.testing.assert_allclose(est.predict_proba(c.features).sum(axis=1), 1.0, rtol=1e-6)
    scores = cross_val_score(clone(est), c.features, names,
                             cv=StratifiedKFold(3, shuffle=True, random_state=0))
    assert scores.mean() > 0.9


def test_fit_head_from_python_writes_nothing_unless_told_where(tmp_path, monkeypatch):
    cache = write_synthetic_cache(tmp_path / "c.h5")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("FXTL_CACHE", raising=False)
    res = fit_head(cache, model="knn", search=False)
    assert res.run_dir is None and list(work.iterdir()) == []
    res = fit_head(cache, model="knn", search=False, run_dir=tmp_path / "here")
    assert res.run_dir == tmp_path / "here" and (tmp_path / "here" / "head.skops").is_file()
    with pytest.raises(ParameterError, match="already exists"):
        fit_head(cache, model="knn", search=False, run_dir=tmp_path / "here")


def test_rows_json_says_what_the_head_learned_from(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c.h5")
    res = fit_head(cache, model="logreg", seed=0, runs_dir=tmp_path / "runs")
    rows = load_rows(res.run_dir)
    assert rows.data_fingerprint == "cache:fp-0-8"
    assert rows.train.split == "train+val" and len(rows.train.paths) == 90
    assert rows.selection.split == "val" and len(rows.selection.paths) == 30
    assert rows.report.split == "test" and len(rows.report.paths) == 30
    assert not set(rows.report.paths) & rows.learned_from()
    assert json.loads((res.run_dir / "metrics.json").read_text())["rows_json"].endswith("rows.json")


def test_knn_votes_score_every_candidate_like_grid_search():
    """The one-query-per-fold kNN search gives GridSearchCV's scores exactly."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from fxtl.heads.registry import build_pipeline, get_head
    from fxtl.heads.config import HeadConfig
    from fxtl.heads.search import KNN_VOTES, run_search

    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["a", "b", "c"]), 40)
    X = (rng.normal(size=(3, 5))[np.unique(y, return_inverse=True)[1]] + rng.normal(size=(120, 5))).astype(np.float32)
    X[1] = X[0]  # an exact duplicate: distance weights with a zero distance
    folds = list(StratifiedKFold(4, shuffle=True, random_state=0).split(X, y))
    cands = [{"n_neighbors": k, "weights": w} for k in (15, 7, 3, 1) for w in ("uniform", "distance")]
    out = run_search(get_head("knn"), X=X, y=y, folds=folds, candidates=cands, fixed={},
                     config=HeadConfig(models=("knn",), seed=0, jobs=1), path_param=KNN_VOTES)
    gs = GridSearchCV(build_pipeline("knn"), [{f"est__{k}": [v] for k, v in c.items()} for c in cands],
                      cv=folds).fit(X, y)
    np.testing.assert_allclose(out.scores, gs.cv_results_["mean_test_score"], atol=1e-12)


# ------------------------------------------------------------------------- solver per size
@pytest.mark.parametrize("model, requested, n_values, params, solver", [
    ("logreg", "auto", 398 * 1280, {}, "sklearn"),        # hymenoptera: importing torch costs more
    ("logreg", "auto", 3_500 * 1280, {}, "torch"),        # ~3,500 rows
    ("mlp", "auto", 22_000 * 1280, {}, "torch"),
    ("linear-svm", "auto", 22_000 * 1280, {}, "torch"),
    ("svm", "auto", 22_000 * 1280, {}, "sklearn"),        # no torch form (BLAS kernel instead)
    ("knn", "torch", 22_000 * 1280, {}, "sklearn"),
    ("logreg", "auto", 22_000 * 1280, {"solver": "saga"}, "sklearn"),  # a scikit-learn-only param
    ("logreg", "sklearn", 22_000 * 1280, {}, "sklearn"),
    ("logreg", "torch", 100, {}, "torch"),
    ("logreg", "auto", 100, {"device": "cpu"}, "torch"),  # only the torch solver has it
])
def test_solver_chosen_at_each_size(model, requested, n_values, params, solver):
    from fxtl.heads.registry import get_head, resolve_solver

    got, notes = resolve_solver(get_head(model), requested=requested, n_values=n_values, params=params)
    assert got == solver
    assert bool(notes) == (requested == "torch" and solver == "sklearn")


def test_bad_solver_requests_name_the_parameter():
    from fxtl.heads.registry import get_head, resolve_solver

    with pytest.raises(ParameterError) as e:
        resolve_solver(get_head("logreg"), requested="jax", n_values=1, params={})
    assert e.value.param == "solver"
    with pytest.raises(ParameterError) as e:
        resolve_solver(get_head("logreg"), requested="torch", n_values=1, params={"solver": "saga"})
    assert e.value.param == "params" and "solver" in str(e.value)


def test_torch_and_sklearn_solvers_pick_and_score_alike(tmp_path):
    """The same head, search and splits through both solvers: same choice, same accuracy, and
    metrics.json says which solver ran."""
    cache = write_synthetic_cache(tmp_path / "t.h5", splits=(("train", 400), ("test", 200)),
                                  dim=24, classes=3, sep=0.6)
    for model in ("logreg", "linear-svm"):
        sk = fit_head(cache, model=model, seed=0, solver="sklearn")
        th = fit_head(cache, model=model, seed=0, solver="torch")
        assert sk.metrics["solver"] == "sklearn" and th.metrics["solver"] == "torch"
        assert th.metrics["estimator"].startswith("Torch")
        assert th.metrics["best_params"] == sk.metrics["best_params"]
        assert abs(th.metrics["accuracy"] - sk.metrics["accuracy"]) <= 1 / 200
