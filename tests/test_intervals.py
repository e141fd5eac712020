"""95% intervals and the exact McNemar test, against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fxtl.report.metrics import (bootstrap_macro_f1, classification_metrics, mcnemar_exact,
                                 read_predictions, wilson_interval, write_predictions)


def test_wilson_known_values():
    # 8/10: p = 0.8, z = 1.96 -> centre 0.7167, half-width 0.2265 (textbook value 0.490-0.943)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    # 0/10: lower bound exactly 0, upper z^2 / (n + z^2)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1.96 ** 2 / (10 + 1.96 ** 2), abs=1e-3)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2775, abs=1e-4)
    # 123/150 (the demo's head): about +-6 points
    lo, hi = wilson_interval(123, 150)
    assert lo == pytest.approx(0.7508, abs=1e-4) and hi == pytest.approx(0.8732, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_bootstrap_macro_f1_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.7, y, (y + 1) % 3)
    m = classification_metrics(y, p, ["a", "b", "c"])
    lo, hi = m["macro_f1_ci95"]
    assert lo < m["macro_f1"] < hi and 0.05 < hi - lo < 0.3
    assert bootstrap_macro_f1(y, p, n_classes=3, seed=0) == (lo, hi)
    assert bootstrap_macro_f1(y, p, n_classes=3, seed=1) != (lo, hi)
    assert bootstrap_macro_f1([0, 1, 1, 0], [0, 1, 1, 0]) == (1.0, 1.0)  # perfect stays perfect
    state = np.random.get_state()[1].copy()
    bootstrap_macro_f1(y, p, seed=3)
    assert (np.random.get_state()[1] == state).all()  # no global RNG touched


def test_classification_metrics_intervals():
    m = classification_metrics([0] * 5 + [1] * 5, [0] * 5 + [1] * 3 + [0, 0], ["a", "b"])
    assert m["accuracy"] == 0.8 and m["n"] == 10
    assert m["accuracy_ci95"] == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert m["macro_f1_ci95"][0] <= m["macro_f1"] <= m["macro_f1_ci95"][1]
    assert m["ci"]["accuracy"] == "wilson" and "bootstrap" in m["ci"]["macro_f1"]


def test_mcnemar_hand_computed():
    # A right only on 1 image, B right only on 6, 3 both right: n_discordant = 7,
    # P(X <= 1 | 7, 1/2) = (1 + 7) / 128, two-sided p = 16/128 = 0.125
    a = [1] * 3 + [1] + [0] * 6
    b = [1] * 3 + [0] + [1] * 6
    r = mcnemar_exact(a, b)
    assert (r["n"], r["a_only_correct"], r["b_only_correct"]) == (10, 1, 6)
    assert r["p_value"] == pytest.approx(0.125) and r["test"] == "mcnemar-exact"
    assert mcnemar_exact(b, a)["p_value"] == pytest.approx(0.125)
    # 0 vs 5 discordant: 2 / 32
    assert mcnemar_exact([0] * 5, [1] * 5)["p_value"] == pytest.approx(0.0625)
    # no discordant pair: nothing to tell them apart
    assert mcnemar_exact([1, 0, 1], [1, 0, 1])["p_value"] == 1.0
    # 3 vs 3: p capped at 1
    assert mcnemar_exact([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])["p_value"] == 1.0
    # a large sample stays finite (no 2**n overflow): 40 vs 10 of 1000
    big = mcnemar_exact([1] * 40 + [0] * 10 + [1] * 950, [0] * 40 + [1] * 10 + [1] * 950)
    assert 0 < big["p_value"] < 1e-4 and math.isfinite(big["p_value"])
    with pytest.raises(ValueError):
        mcnemar_exact([1, 0], [1])


def test_predictions_round_trip(tmp_path):
    write_predictions(tmp_path, paths=["x/a.png", "y/b.png", "y/c.png"], y_true=[0, 1, 1],
                      y_pred=[0, 0, 1], class_names=["x", "y"], split="test")
    assert read_predictions(tmp_path) == {"x/a.png": (0, 0), "y/b.png": (1, 0), "y/c.png": (1, 1)}
    assert read_predictions(tmp_path / "nothing") is None
