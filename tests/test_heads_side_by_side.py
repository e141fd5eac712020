"""Heads fitted side by side in forked worker processes (fxtl.heads.side_by_side): every head
exactly as when fitted alone, progress and errors reaching the caller, no worker left behind,
and one head at a time wherever side by side does not apply."""
from __future__ import annotations

import multiprocessing
import os
import pickle

import numpy as np
import pytest

import fxtl.heads.fitting as fitting
from fxtl.errors import CacheError, FxtlError, ParameterError
from fxtl.heads import fit_heads, side_by_side
from fxtl.heads.config import HeadConfig

from .test_heads_fast_search import CLASSES, write_named_cache

pytestmark = pytest.mark.skipif(not side_by_side.available(),
                                reason="worker processes are forked on Linux only")

WORKER_NOTE = "fitted in a worker process"


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """Ten named classes (a space, a non-ASCII letter), 52 train rows each (520 fit rows, above
    fitting.SIDE_BY_SIDE_ROWS), train/ and test/."""
    return write_named_cache(tmp_path_factory.mktemp("side") / "alphabets.h5", per_class=52)


def _side(res) -> bool:
    return any(WORKER_NOTE in n for n in res.metrics["notes"])


def test_every_head_is_fitted_side_by_side_exactly_as_alone(named):
    alone = fit_heads(named, models=["all"], jobs=1)
    side = fit_heads(named, models=["all"], jobs=2)
    assert [r.metrics["model"] for r in side] == [r.metrics["model"] for r in alone] \
        == ["logreg", "svm", "linear-svm", "mlp", "knn"]
    assert all(_side(r) for r in side) and not any(_side(r) for r in alone)
    for a, s in zip(alone, side):
        name = a.metrics["model"]
        assert s.metrics["best_params"] == a.metrics["best_params"], name
        assert s.metrics["search"] == a.metrics["search"], name
        assert s.metrics["selection_score"] == a.metrics["selection_score"], name
        assert np.array_equal(s.predictions["y_pred"], a.predictions["y_pred"]), name
        np.testing.assert_allclose(s.predictions["scores"], a.predictions["scores"], rtol=0,
                                   atol=1e-12, err_msg=name)
        assert list(s.head.class_names) == CLASSES
        # the config recorded is the one asked for, not the one-core config of the worker
        assert s.metrics["config"]["jobs"] == 2 and s.config.jobs == 2
    assert multiprocessing.active_children() == []


def test_progress_in_the_workers_reaches_the_caller(named):
    seen: list[tuple[int, int, str]] = []
    logged: list[str] = []
    fit_heads(named, models=["logreg", "knn", "svm"], jobs=2,
              progress=lambda d, t, m: seen.append((d, t, m)), log=logged.append)
    for model in ("logreg", "knn", "svm"):
        mine = [(d, t) for d, t, m in seen if m == model]
        assert mine and mine[-1][0] == mine[-1][1] > 1, model
        assert any(line.startswith(f"fxtl: fitting {model} on ") for line in logged)


def _failing_fit_one(model: str, exc: BaseException | None):
    real = fitting._fit_one

    def fake(source, name, **kw):
        if name == model:
            if exc is None:
                os._exit(3)  # a worker killed, e.g. by the OOM killer
            raise exc
        return real(source, name, **kw)

    return fake


def test_an_error_in_a_worker_is_raised_as_itself_and_no_worker_is_left(named, monkeypatch):
    monkeypatch.setattr(fitting, "_fit_one",
                        _failing_fit_one("mlp", ParameterError("params", "alpha must be > 0")))
    with pytest.raises(ParameterError, match="alpha must be > 0") as info:
        fit_heads(named, models=["all"], jobs=2)
    assert info.value.param == "params"
    assert multiprocessing.active_children() == []


def test_a_worker_that_dies_is_reported_in_one_line(named, monkeypatch):
    monkeypatch.setattr(fitting, "_fit_one", _failing_fit_one("svm", None))
    with pytest.raises(FxtlError, match=r"fitting svm ended without a result \(exit status 3") as info:
        fit_heads(named, models=["logreg", "svm"], jobs=2)
    assert "jobs=1" in str(info.value) and "\n" not in str(info.value)
    assert multiprocessing.active_children() == []


def test_an_interrupt_in_the_caller_stops_every_worker(named):
    def interrupt(done, total, model):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_heads(named, models=["all"], jobs=2, progress=interrupt)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("options", [{"jobs": 1}, {"budget": 60.0}, {"models": ["svm"]},
                                     {"backend": "threading"}])
def test_one_head_at_a_time_where_side_by_side_does_not_apply(named, options):
    options = {"models": ["logreg", "knn"], "jobs": 2, **options}
    assert not any(_side(r) for r in fit_heads(named, **options))


def test_one_head_at_a_time_on_few_rows(named, monkeypatch):
    assert fitting.SIDE_BY_SIDE_ROWS <= 520
    monkeypatch.setattr(fitting, "SIDE_BY_SIDE_ROWS", 521)
    assert not any(_side(r) for r in fit_heads(named, models=["logreg", "knn"], jobs=2))


def test_one_head_at_a_time_where_workers_cannot_be_forked(named, monkeypatch):
    monkeypatch.setattr(side_by_side, "available", lambda: False)
    assert not any(_side(r) for r in fit_heads(named, models=["logreg", "knn"], jobs=2))


def test_run_orders_and_returns_by_name():
    out = side_by_side.run(["b", "a", "c"], lambda name, progress, spare: (name, os.getpid()),
                           workers=2)
    assert sorted(out) == ["a", "b", "c"]
    assert all(out[k][0] == k and out[k][1] != os.getpid() for k in out)


def test_what_travels_back_from_a_worker_pickles_as_itself():
    cfg = HeadConfig(models=("svm",), params={"C": 0.5})
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and dict(back.params) == {"C": 0.5}
    with pytest.raises(TypeError):  # still read-only
        back.params["C"] = 1.0
    for err in (ParameterError("jobs", "jobs must be >= 1"), CacheError("x.h5 is damaged",
                                                                        param="cache")):
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err) and str(again) == str(err) and again.param == err.param


def test_workers_find_scikit_learn_imported_by_the_caller(named):
    """In a fresh interpreter, no worker imports scikit-learn itself (2-3 s of CPU each, and the
    caller would import it once more to read the results)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        import fxtl.heads.fitting as fitting
        real = fitting._fit_one
        def spy(source, name, **kw):
            before = set(sys.modules)
            res = real(source, name, **kw)
            new = sorted(m for m in set(sys.modules) - before if m.startswith(("sklearn", "scipy")))
            print(name, len(new), new[:5], flush=True)
            return res
        fitting._fit_one = spy
        fitting.fit_heads({str(named)!r}, models=["all"], jobs=2)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    counts = {line.split()[0]: int(line.split()[1]) for line in lines if line.strip()}
    assert sorted(counts) == sorted(["logreg", "svm", "linear-svm", "mlp", "knn"]), out.stdout
    assert all(n == 0 for n in counts.values()), out.stdout


def test_search_threads_beyond_the_first_run_only_on_borrowed_cores(monkeypatch):
    import threading
    import time

    from fxtl.heads import grid

    seen: list[str] = []

    def fn(t):
        seen.append(threading.current_thread().name)
        time.sleep(0.02)
        return t

    ctx = multiprocessing.get_context("fork")
    monkeypatch.setattr(grid, "_spare_cores", ctx.Semaphore(0))  # every other worker busy
    assert grid.map_threads(fn, list(range(8)), 2) == list(range(8))
    assert set(seen) == {"fxtl-search-0"}
    seen.clear()
    monkeypatch.setattr(grid, "_spare_cores", ctx.Semaphore(1))  # one worker done
    assert grid.map_threads(fn, list(range(8)), 2) == list(range(8))
    assert set(seen) == {"fxtl-search-0", "fxtl-search-1"}
    assert grid._spare_cores.acquire(timeout=1)  # the borrowed core was given back
