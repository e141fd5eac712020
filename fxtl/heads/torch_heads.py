"""Torch solvers for the linear and MLP heads, for feature sets too large for scikit-learn's.

Each estimator subclasses the scikit-learn estimator it stands in for and solves the same
problem with full-batch matrix work in torch (all cores, or a GPU when present). The fitted
attributes are the parent's (``coef_``, ``intercept_``, ``coefs_``...), stored as numpy
arrays, so ``predict``, ``predict_proba`` and ``decision_function`` are the parent's own
methods: predicting, saving (skops) and exporting (ONNX) a fitted head never import torch.
Only ``fit`` does.

* :class:`TorchLogisticRegression`: ``LogisticRegression(solver="lbfgs")``'s L2 problem
  (``0.5 ||W||^2 + C * sum(log-loss)``, intercept unpenalised), by L-BFGS.
* :class:`TorchLinearSVC`: ``LinearSVC()``'s default problem (one-vs-rest squared hinge, L2,
  the intercept penalised as a constant feature), every class in one L-BFGS run.
* :class:`TorchMLPClassifier`: ``MLPClassifier(activation="relu", solver="adam")`` with
  sklearn's ``alpha`` and early stopping.

Examples
--------
>>> from sklearn.datasets import load_iris
>>> X, y = load_iris(return_X_y=True)
>>> clf = TorchLogisticRegression(C=1.0, device="cpu").fit(X, y)
>>> clf.predict_proba(X[:2]).shape
(2, 3)
"""
from __future__ import annotations

import contextlib
import math
import warnings
from types import MappingProxyType

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import LabelBinarizer
from sklearn.svm import LinearSVC
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data

from ..errors import ParameterError

__all__ = ["TorchLogisticRegression", "TorchLinearSVC", "TorchMLPClassifier", "TORCH_HEADS"]

_DEVICES = StrOptions({"auto", "cpu", "cuda"})


def _constraints(parent, names, **extra) -> dict:
    """The parent's validation rules for the parameters we keep, plus ours."""
    return {**{k: parent._parameter_constraints[k] for k in names}, "device": [_DEVICES], **extra}


def _torch_device(device: str):
    """``(torch, torch.device)``: CUDA when asked for or (``"auto"``) when present, else CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", "device='cuda' but torch sees no CUDA device; "
                             "use device='auto' or 'cpu'")
    return torch, torch.device(device)


def _classes(est, X, y):
    """Validated ``X`` (float, C order), the classes and ``y`` as indices into them."""
    X, y = validate_data(est, X, y, dtype=[np.float64, np.float32], order="C")
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{type(est).__name__} needs samples of at least 2 classes in the data, "
                         f"but the data contains only one class: {classes[0]!r}")
    return X, classes, y_idx


def _lbfgs(torch, params, objective, *, tol: float, max_iter: int, dtype) -> int:
    """Minimise ``objective()`` over ``params`` with full-batch L-BFGS; the iterations used.

    Stops when the largest gradient entry is <= ``tol`` (scipy's ``gtol``, as scikit-learn's
    lbfgs solver), or the objective stops changing at the dtype's precision.
    """
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, max_eval=2 * max_iter + 20,
                            tolerance_grad=tol, tolerance_change=64 * torch.finfo(dtype).eps,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    return int(opt.state[params[0]].get("n_iter", 0))


def _sample_weight(sample_weight, n: int) -> np.ndarray:
    """Row weights as float64 (n,), ones by default; refuses negative or all-zero weights."""
    if sample_weight is None:
        return np.ones(n)
    sw = np.asarray(sample_weight, dtype=np.float64)
    if sw.ndim == 0:
        sw = np.full(n, float(sw))
    if sw.shape != (n,):
        raise ValueError(f"sample_weight.shape == {sw.shape}, expected {(n,)}")
    if not np.all(np.isfinite(sw)) or (sw < 0).any() or sw.sum() <= 0:
        raise ValueError("sample_weight must be finite and non-negative, and the weights cannot "
                         "all be zero")
    return sw


def _warm(est, attr: str, shape: tuple) -> np.ndarray | None:
    """The previous fit's ``attr`` when warm-starting and its shape still fits."""
    prev = getattr(est, attr, None) if est.warm_start else None
    return np.asarray(prev) if prev is not None and np.shape(prev) == shape else None


# Full-batch L-BFGS stages: float32 gets close at half the cost per iteration, float64 then
# converges to ``tol`` (float32 cannot resolve the objective's last changes near the optimum).
_LBFGS_STAGES = ("float32", "float64")
# Above this many feature values the float64 stage is skipped: on real 1280-d features its last
# digits change no prediction (same validation accuracy at 22k rows) but it doubles the time
# and holds a float64 copy of the data.
FLOAT64_MAX_VALUES = 8_000_000


def _linear_objective(torch, X, y_idx, k: int, sw, *, loss: str, reg: float,
                      penalise_intercept: bool):
    """``f(w, b)``: the ``sw``-weighted mean loss plus ``reg * ||w||^2`` (and ``||b||^2``
    when penalised)."""
    F = torch.nn.functional
    n = len(y_idx)
    sw = (sw / sw.sum()).to(X.dtype)
    if loss == "log" and k > 1:
        target = y_idx
    elif k == 1:  # one margin, positive class = classes_[1]
        target = (2.0 * y_idx - 1.0).to(X.dtype)[:, None]
    else:  # one-vs-rest signs
        target = torch.full((n, k), -1.0, dtype=X.dtype, device=X.device)
        target[torch.arange(n, device=X.device), y_idx] = 1.0

    def objective(w, b):
        z = torch.addmm(b, X, w.T)
        if loss != "log":
            per_row = torch.relu(1.0 - target * z).square().sum(1)
        else:
            per_row = F.cross_entropy(z, target, reduction="none") if k > 1 else \
                F.softplus(-target * z)[:, 0]
        data = per_row @ sw
        penalty = w.square().sum() + (b.square().sum() if penalise_intercept else 0.0)
        return data + reg * penalty

    return objective


def _fit_linear(est, X, y, sample_weight, *, loss: str, penalise_intercept: bool) -> int:
    """Shared body of the linear fits: sets ``coef_``, ``intercept_``, ``classes_``; returns
    the L-BFGS iterations used."""
    X, classes, y_idx = _classes(est, X, y)
    torch, dev = _torch_device(est.device)
    n, d = X.shape
    k = 1 if len(classes) == 2 else len(classes)
    w, b = np.zeros((k, d)), np.zeros(k)
    prev_w, prev_b = _warm(est, "coef_", (k, d)), _warm(est, "intercept_", (k,))
    if prev_w is not None and prev_b is not None:
        w, b = prev_w, prev_b
    yt = torch.as_tensor(y_idx, device=dev)
    sw = _sample_weight(sample_weight, n)
    X32 = torch.as_tensor(X, device=dev).float()
    # Divided by C * sum(sample_weight) (as scikit-learn's lbfgs): mean loss + ||W||^2 / (2 C n).
    reg = 0.5 / (est.C * float(sw.sum()))
    sw = torch.as_tensor(sw, device=dev)
    n_iter = 0
    stages = _LBFGS_STAGES if est.polish and n * d <= FLOAT64_MAX_VALUES else _LBFGS_STAGES[:1]
    for name in stages:
        if n_iter >= est.max_iter:
            break
        dtype = getattr(torch, name)
        objective = _linear_objective(torch, X32.to(dtype), yt, k, sw, loss=loss, reg=reg,
                                      penalise_intercept=penalise_intercept)
        wt = torch.tensor(w, dtype=dtype, device=dev, requires_grad=True)
        bt = torch.tensor(b, dtype=dtype, device=dev, requires_grad=True)
        n_iter += _lbfgs(torch, [wt, bt], lambda: objective(wt, bt), tol=est.tol,
                         max_iter=est.max_iter - n_iter, dtype=dtype)
        w, b = wt.detach().cpu().double().numpy(), bt.detach().cpu().double().numpy()
    if n_iter >= est.max_iter:
        warnings.warn(f"{type(est).__name__} did not converge in max_iter={est.max_iter} "
                      "iterations; raise max_iter or lower C", ConvergenceWarning, stacklevel=3)
    est.classes_, est.coef_, est.intercept_ = classes, w, b
    return n_iter


class _TorchLinear:
    """Parameters, ``fit`` and tags shared by the two linear estimators (listed first in their
    bases, so scikit-learn reads this ``__init__``'s signature as their parameters)."""

    _loss: str
    _penalise_intercept: bool

    def __init__(self, C=1.0, *, tol=1e-4, max_iter=1000, warm_start=False, device="auto",
                 random_state=None, polish=True):
        self.C = C
        self.polish = polish
        self.tol = tol
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.device = device
        self.random_state = random_state

    def fit(self, X, y, sample_weight=None):
        """Fit on ``X`` (n, d) and labels ``y``, rows weighted by ``sample_weight``."""
        self._validate_params()
        n_iter = _fit_linear(self, X, y, sample_weight, loss=self._loss,
                             penalise_intercept=self._penalise_intercept)
        # as the parent reports it: LogisticRegression an array of one, LinearSVC an int
        self.n_iter_ = np.array([n_iter], dtype=np.int32) if self._loss == "log" else n_iter
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.array_api_support = False
        return tags


class TorchLogisticRegression(_TorchLinear, LogisticRegression):
    """``LogisticRegression(solver="lbfgs")`` with an L2 penalty, solved in torch.

    Binary problems learn one logit vector (``coef_`` of shape ``(1, d)``), multiclass ones a
    softmax (``(K, d)``), exactly the problem scikit-learn's lbfgs solver minimises; ``tol`` is
    its ``gtol`` on the objective divided by ``C * n``. ``warm_start=True`` starts from the
    previous ``coef_``/``intercept_`` (a C path walked upwards converges in fewer iterations).

    Parameters
    ----------
    C : float
        Inverse regularisation strength.
    tol : float
        Stop when the largest gradient entry of the scaled objective is below it.
    max_iter : int
        L-BFGS iterations at most.
    warm_start : bool
        Start from the previous solution when the shapes match.
    device : {"auto", "cpu", "cuda"}
        Where to fit; ``"auto"`` takes CUDA when torch sees it.
    random_state : None
        Unused (the problem is convex and the start is zero); kept for fxtl's seeding.
    polish : bool
        Finish with a float64 L-BFGS stage (on up to :data:`FLOAT64_MAX_VALUES` values), so the
        solution matches scikit-learn's to ``tol``. fxtl's search turns it off: comparing
        candidates needs their predictions, not the last digits of their probabilities.
    """

    _loss, _penalise_intercept = "log", False
    _parameter_constraints = _constraints(LogisticRegression, ("C", "tol", "max_iter", "warm_start",
                                                               "random_state"),
                                          polish=["boolean"])
    # The parent's parameters that its inherited methods read, fixed to what is solved here.
    penalty, l1_ratio, dual, fit_intercept, intercept_scaling = "l2", 0.0, False, True, 1
    class_weight, solver, verbose, n_jobs = None, "lbfgs", 0, None


class TorchLinearSVC(_TorchLinear, LinearSVC):
    """``LinearSVC()``'s default problem solved in torch: one-vs-rest squared hinge, L2.

    The intercept is penalised like liblinear's (a constant feature of value 1,
    ``intercept_scaling=1``). All classes are solved together by L-BFGS (the squared hinge is
    continuously differentiable); ``tol`` bounds the largest gradient entry of the objective
    divided by ``C * n``. Binary problems learn one vector, positive class ``classes_[1]``.

    Parameters
    ----------
    C, tol, max_iter, warm_start, device, random_state, polish
        As :class:`TorchLogisticRegression`.
    """

    _loss, _penalise_intercept = "squared_hinge", True
    _parameter_constraints = _constraints(LinearSVC, ("C", "tol", "max_iter", "random_state"),
                                          warm_start=["boolean"], polish=["boolean"])
    penalty, loss, dual, multi_class, fit_intercept = "l2", "squared_hinge", False, "ovr", True
    intercept_scaling, class_weight, verbose = 1, None, 0


def _mlp_init(torch, sizes, gen, dev):
    """Glorot-uniform weights and biases, as scikit-learn initialises relu layers."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        for shape in ((fan_in, fan_out), (fan_out,)):
            t = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
            params.append(t.to(dev).requires_grad_())
    return params


def _forward(torch, params, x):
    """Logits of the relu network ``params`` = [W0, b0, W1, b1, ...]."""
    for i in range(0, len(params), 2):
        x = torch.addmm(params[i + 1], x, params[i])
        if i + 2 < len(params):
            x = torch.relu(x)
    return x


class TorchMLPClassifier(MLPClassifier):
    """``MLPClassifier(activation="relu", solver="adam")`` trained in torch.

    ``alpha`` means what it means to scikit-learn (each mini-batch adds
    ``0.5 * alpha * ||weights||^2 / batch_len`` to its mean log-loss; biases are not
    penalised). Early stopping holds out a stratified ``validation_fraction``, stops after
    ``n_iter_no_change`` epochs without a validation-accuracy gain above ``tol`` and keeps the
    best weights, as scikit-learn does. Data too small for such a hold-out (a class with one
    row, or fewer hold-out or training rows than classes) is trained on whole, stopping on the
    training loss as with ``early_stopping=False`` (with a warning, ``validation_scores_`` is
    None). Binary problems have one logistic output. Seeded by ``random_state`` through a
    private generator (the global torch seed is left alone). There is no ``partial_fit``:
    scikit-learn's would go on training with its own solver.

    Parameters
    ----------
    hidden_layer_sizes, alpha, batch_size, learning_rate_init, max_iter, early_stopping,
    validation_fraction, n_iter_no_change, tol, random_state
        As :class:`~sklearn.neural_network.MLPClassifier`.
    device : {"auto", "cpu", "cuda"}
        Where to train; ``"auto"`` takes CUDA when torch sees it.
    """

    _parameter_constraints = _constraints(
        MLPClassifier, ("hidden_layer_sizes", "alpha", "batch_size", "learning_rate_init",
                        "max_iter", "early_stopping", "validation_fraction", "n_iter_no_change",
                        "tol", "random_state"))
    activation, solver, learning_rate, shuffle, warm_start, verbose = \
        "relu", "adam", "constant", True, False, False
    beta_1, beta_2, epsilon, power_t, momentum, nesterovs_momentum, max_fun = \
        0.9, 0.999, 1e-8, 0.5, 0.9, True, 15000

    def __init__(self, hidden_layer_sizes=(256,), *, alpha=1e-4, batch_size=64,
                 learning_rate_init=3e-3, max_iter=300, early_stopping=True,
                 validation_fraction=0.1, n_iter_no_change=10, tol=1e-4, random_state=None,
                 device="auto"):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.random_state = random_state
        self.device = device

    def fit(self, X, y, sample_weight=None):
        """Train on ``X`` (n, d) and labels ``y``, rows weighted by ``sample_weight``."""
        self._validate_params()
        hidden = list(np.atleast_1d(self.hidden_layer_sizes))
        if any(h <= 0 for h in hidden):
            raise ValueError(f"hidden_layer_sizes must be > 0, got {self.hidden_layer_sizes}")
        X, classes, y_idx = _classes(self, X, y)
        self._label_binarizer = LabelBinarizer().fit(classes)
        self.classes_ = classes
        rng = check_random_state(self.random_state)
        train, val = np.arange(len(y_idx)), None
        if self.early_stopping and self._can_hold_out(y_idx, len(classes)):
            train, val = train_test_split(train, test_size=self.validation_fraction,
                                          stratify=y_idx, random_state=rng)
        torch, dev = _torch_device(self.device)
        gen = torch.Generator().manual_seed(int(rng.randint(np.iinfo(np.int32).max)))
        Y = self._label_binarizer.transform(classes[y_idx])
        self.n_outputs_ = Y.shape[1]
        self.n_layers_ = len(hidden) + 2
        self.out_activation_ = "logistic" if self.n_outputs_ == 1 else "softmax"
        params = _mlp_init(torch, [X.shape[1], *hidden, self.n_outputs_], gen, dev)
        sw = None if sample_weight is None else _sample_weight(sample_weight, len(y_idx))
        best = self._train(torch, dev, gen, params, X, Y, sw, train, val)
        self.coefs_ = [p.detach().cpu().double().numpy() for p in best[0::2]]
        self.intercepts_ = [p.detach().cpu().double().numpy() for p in best[1::2]]
        return self

    def _can_hold_out(self, y_idx: np.ndarray, n_classes: int) -> bool:
        """Whether a stratified ``validation_fraction`` hold-out exists; warns when not."""
        n = len(y_idx)
        n_val = math.ceil(self.validation_fraction * n)
        if np.bincount(y_idx).min() >= 2 and n_classes <= n_val <= n - n_classes:
            return True
        warnings.warn(f"TorchMLPClassifier: {n} rows in {n_classes} classes are too few to hold "
                      f"out a stratified {self.validation_fraction:g} for early stopping; "
                      "training on all rows and stopping on the training loss", UserWarning,
                      stacklevel=3)
        return False

    @available_if(lambda est: False)
    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Not offered (the inherited one would train on with scikit-learn's solver)."""
        raise AttributeError("TorchMLPClassifier has no partial_fit")

    def _train(self, torch, dev, gen, params, X, Y, sw, train, val):
        """Adam epochs over shuffled mini-batches; sets sklearn's bookkeeping attributes and
        returns the weights to keep (the best on validation with early stopping)."""
        F = torch.nn.functional
        Xt = torch.as_tensor(X, device=dev).float()
        binary = self.n_outputs_ == 1
        Yt = torch.as_tensor(Y, device=dev).float() if binary else \
            torch.as_tensor(Y.argmax(1), device=dev)
        train_t = torch.as_tensor(train, device=dev)  # rows are gathered per batch: no copy
        W = None if sw is None else torch.as_tensor(sw, device=dev).float()
        Wtr = None if W is None else W[train_t]
        n = len(train)
        bs = n if self.batch_size == "auto" and n < 200 else \
            200 if self.batch_size == "auto" else min(self.batch_size, n)
        weights = params[0::2]
        # sklearn's penalty 0.5 * alpha * ||W||^2 / batch_len is Adam's coupled weight decay
        # alpha / batch_len on the weights; the fused step is one pass over all parameters.
        groups = [{"params": weights, "weight_decay": self.alpha / bs},
                  {"params": params[1::2], "weight_decay": 0.0}]
        opt = torch.optim.Adam(groups, lr=self.learning_rate_init, betas=(0.9, 0.999), eps=1e-8,
                               fused=True)
        self.loss_curve_, self.t_, self.n_iter_, self._no_improvement_count = [], 0, 0, 0
        if val is not None:
            self.validation_scores_, self.best_validation_score_ = [], -np.inf
            self.best_loss_ = None
            Xv, Yv = Xt[torch.as_tensor(val, device=dev)], Yt[torch.as_tensor(val, device=dev)]
            Wv = None if W is None else W[torch.as_tensor(val, device=dev)]
        else:
            self.validation_scores_ = self.best_validation_score_ = None
            self.best_loss_ = np.inf
        best = [p.detach().clone() for p in params]
        for epoch in range(self.max_iter):
            perm = torch.randperm(n, generator=gen).to(dev)
            total = torch.zeros((), device=dev)
            for start in range(0, n, bs):
                idx = perm[start:start + bs]  # gathered per batch: no shuffled copy of the data
                rows = train_t[idx]
                xb, yb = Xt[rows], Yt[rows]
                with _autocast(torch, dev):  # per step: autocast caches its weight casts
                    z = _forward(torch, params, xb).float()
                loss, size = _batch_loss(F, z, yb, None if Wtr is None else Wtr[idx])
                opt.param_groups[0]["weight_decay"] = self.alpha / size
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * size
            self.n_iter_, self.t_ = epoch + 1, self.t_ + n
            with torch.no_grad():  # the penalty each batch added, at the epoch's final weights
                penalty = 0.5 * self.alpha * sum(float(w.square().sum()) for w in weights)
            weight = n if Wtr is None else float(Wtr.sum())
            self.loss_ = float(total) / weight + penalty * math.ceil(n / bs) / weight
            self.loss_curve_.append(self.loss_)
            if val is not None:
                with torch.no_grad():
                    with _autocast(torch, dev):
                        zv = _forward(torch, params, Xv).float()
                    hit = ((zv[:, 0] > 0).float() == Yv[:, 0]) if binary else zv.argmax(1) == Yv
                    hit = hit.float()
                    score = hit.mean() if Wv is None else (hit @ Wv) / Wv.sum()
                if self._improved(float(score)):
                    best = [p.detach().clone() for p in params]
            else:
                self._improved(None)  # without a hold-out the last weights are kept
            if self._no_improvement_count > self.n_iter_no_change:
                break
        else:
            warnings.warn(f"TorchMLPClassifier: max_iter={self.max_iter} epochs reached "
                          "before the optimisation converged", ConvergenceWarning, stacklevel=3)
        return best if val is not None else params

    def _improved(self, score: float | None) -> bool:
        """scikit-learn's patience rule; True when the weights are the best so far."""
        if score is not None:
            self.validation_scores_.append(score)
            stalled = score < self.best_validation_score_ + self.tol
            better = score > self.best_validation_score_
            if better:
                self.best_validation_score_ = score
        else:
            last = self.loss_curve_[-1]
            stalled = last > self.best_loss_ - self.tol
            better = last < self.best_loss_
            if better:
                self.best_loss_ = last
        self._no_improvement_count = self._no_improvement_count + 1 if stalled else 0
        if score is not None and self.best_validation_score_ >= 1.0:
            # a perfect validation score cannot be beaten: the kept weights are final
            # (as fxtl.heads.mlp.MLPClassifier)
            self._no_improvement_count = self.n_iter_no_change + 1
        return better

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False
        tags.classifier_tags.multi_label = False
        return tags


def _batch_loss(F, z, yb, wb):
    """A mini-batch's (weighted) mean log-loss and its size (the weights' sum when weighted)."""
    binary = yb.ndim == 2  # one logistic output, float targets of shape (n, 1)
    if wb is None:
        loss = F.binary_cross_entropy_with_logits(z, yb) if binary else F.cross_entropy(z, yb)
        return loss, len(yb)
    per_row = F.binary_cross_entropy_with_logits(z, yb, reduction="none")[:, 0] if binary else \
        F.cross_entropy(z, yb, reduction="none")
    size = float(wb.sum())
    return (per_row @ wb) / max(size, 1e-12), max(size, 1e-12)


def _autocast(torch, dev):
    """bfloat16 matmuls where the hardware has them (accumulation stays float32)."""
    if _MLP_BF16 and dev.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Whether the MLP's CPU matmuls run in bfloat16 (decided by measurement, see the benchmark).
_MLP_BF16 = False

# fxtl head name -> the torch stand-in for its scikit-learn estimator.
TORCH_HEADS = MappingProxyType({"logreg": TorchLogisticRegression, "linear-svm": TorchLinearSVC,
                                "mlp": TorchMLPClassifier})
