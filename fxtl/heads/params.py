"""Values of ``--param KEY=VALUE`` that scikit-learn's own validation lets through.

:func:`fxtl.heads.registry.check_params` asks each estimator to judge its parameters on a toy
fit; some refusals only come later, on the real data, as a traceback (a logistic regression's
``penalty='l1'`` with the default solver, an SVM's ``kernel='precomputed'``), and some values are
never refused although they make no sense (``gamma=-1``, ``C=1e400``, which Python reads as
infinity). :func:`check_values` refuses them first, in one line naming the parameter.

Examples
--------
>>> check_values({"C": 0.5}, estimator="sklearn.linear_model:LogisticRegression", model="logreg")
>>> check_values({"penalty": "l1"}, estimator="sklearn.linear_model:LogisticRegression",
...              model="logreg")
Traceback (most recent call last):
...
fxtl.errors.ParameterError: penalty='l1' is not valid for logreg: solver 'lbfgs' takes penalty 'l2' or None; add solver=saga
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import ParameterError

__all__ = ["check_values", "check_seed", "MAX_SEED"]

# Seeds go to numpy and scikit-learn, which take 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
# Which penalties each LogisticRegression solver takes (scikit-learn's documented table).
_LOGREG_PENALTIES = {
    "lbfgs": ("l2", None), "newton-cg": ("l2", None), "newton-cholesky": ("l2", None),
    "sag": ("l2", None), "liblinear": ("l1", "l2"), "saga": ("l1", "l2", "elasticnet", None),
}
_LOGREG_DEFAULT_SOLVER = "lbfgs"


def check_values(params: Mapping[str, Any], *, estimator: str, model: str) -> None:
    """Raise :class:`ParameterError` (``params``) for a value ``model``'s estimator (dotted
    ``module:Class``) would take only to fail on the data, or that makes no sense."""
    for key, value in params.items():
        if not _finite(value):
            raise ParameterError("params", f"{key}={value!r} is not valid for {model}: it must be "
                                           "a finite number (1e400 reads as infinity)")
    kernel = params.get("kernel")
    if kernel == "precomputed":
        raise ParameterError("params", f"kernel='precomputed' is not valid for {model}: a head is "
                                       "fitted on feature rows, not on a kernel matrix; use rbf, "
                                       "linear, poly or sigmoid")
    gamma = params.get("gamma")
    if _number(gamma) and gamma <= 0:
        raise ParameterError("params", f"gamma={gamma!r} is not valid for {model}: it must be "
                                       "above 0 (or 'scale' or 'auto')")
    if estimator.endswith(":LogisticRegression") and ("penalty" in params or "solver" in params):
        _check_logreg(params, model)


def check_seed(seed: Any, *, param: str = "seed") -> int:
    """``seed`` if it is a whole number in ``0 .. 2**32 - 1`` (what numpy and scikit-learn take),
    else :class:`ParameterError`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ParameterError(param, f"{param} must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return seed


def _check_logreg(params: Mapping[str, Any], model: str) -> None:
    solver = params.get("solver", _LOGREG_DEFAULT_SOLVER)
    penalty = params.get("penalty", "l2")
    allowed = _LOGREG_PENALTIES.get(solver)
    if allowed is None:
        return  # an unknown solver: scikit-learn's own check names the valid ones
    if penalty not in allowed and penalty in ("l1", "l2", "elasticnet", None):
        # liblinear is left out of the advice: it fits two classes only
        takers = [s for s, ps in _LOGREG_PENALTIES.items() if penalty in ps and s != "liblinear"]
        shown = " or ".join(repr(p) if p is not None else "None" for p in allowed)
        raise ParameterError("params", f"penalty={penalty!r} is not valid for {model}: solver "
                                       f"{solver!r} takes penalty {shown}; add "
                                       f"{' or '.join('solver=' + s for s in takers)}")
    if penalty == "elasticnet" and params.get("l1_ratio") is None:
        raise ParameterError("params", f"penalty='elasticnet' is not valid for {model} without "
                                       "l1_ratio; add l1_ratio=0.5 (0 is l2, 1 is l1)")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """No NaN or infinity, also inside a tuple or list (``hidden_layer_sizes=(inf,)``)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    return True
