"""Fitted scikit-learn heads -> ONNX graphs ``features [N, D] -> probabilities [N, K]``.

Steps are converted by their class and fitted attributes (``mean_``, ``coef_``, ``coefs_``...),
not by fxtl internals, so any Pipeline of the supported steps converts:

* ``StandardScaler``, ``Normalizer``, ``PCA`` (whitened too);
* ``LogisticRegression`` (binary: sigmoid, multinomial: softmax), ``SGDClassifier`` with
  ``log_loss`` (one-vs-rest sigmoids, normalised), ``MLPClassifier`` (relu/tanh/logistic/identity);
* ``CalibratedClassifierCV(method="sigmoid")`` around a linear estimator (``LinearSVC``,
  ``SGDClassifier``...): Platt's sigmoid per class, normalised as scikit-learn does;
* any other estimator exposing ``coef_``, ``intercept_`` and ``classes_``: softmax
  probabilities (a sigmoid when binary);
* ``KNeighborsClassifier`` (euclidean, uniform or distance weights): the training rows are
  constants of the graph, neighbours found by ``TopK``.

A pipeline without ``predict_proba`` scores with a softmax of its decision margins (binary:
``[-d, d]``), the rule of fxtl's ``Head.scores``. Pipelines with steps outside this list (an RBF
``SVC``) go through ``skl2onnx`` when it is installed
(:func:`convert_with_skl2onnx`); :func:`convert_head` raises :class:`UnsupportedHead` otherwise.
All arithmetic is float32, the precision of the features.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import FxtlError

__all__ = ["convert_head", "convert_with_skl2onnx", "register_torch_heads", "UnsupportedHead",
           "HEAD_INPUT", "HEAD_OUTPUT"]

HEAD_INPUT = "features"
HEAD_OUTPUT = "probabilities"


class UnsupportedHead(FxtlError):
    """A fitted step has no exact tensor form here (the caller may try skl2onnx)."""


class _Builder:
    """Collects ONNX nodes and float32 constants under unique names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"head/{stem}_{self._n}"

    def const(self, value, stem: str = "c") -> str:
        from onnx import numpy_helper

        arr = np.asarray(value)
        arr = arr.astype(np.int64 if arr.dtype.kind in "iu" else np.float32)
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node_outputs(self, op_type: str, *inputs: str, n: int, stem: str | None = None,
                     **attrs) -> list[str]:
        """A node with ``n`` outputs (TopK: values, indices)."""
        from onnx import helper

        outs = [self.name(stem or op_type.lower()) for _ in range(n)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs

    def op(self, op_type: str, *inputs: str, stem: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


# ----------------------------------------------------------------------------- transformers
def _standard_scaler(b: _Builder, x: str, step) -> str:
    if getattr(step, "mean_", None) is not None and step.with_mean:
        x = b.op("Sub", x, b.const(step.mean_[None, :], "mean"))
    if getattr(step, "scale_", None) is not None and step.with_std:
        x = b.op("Div", x, b.const(step.scale_[None, :], "scale"))
    return x


def _normalizer(b: _Builder, x: str, step) -> str:
    axis = b.const(np.array([1], dtype=np.int64), "axis")
    if step.norm == "l2":  # as row_norms: sqrt of the sum of squares
        norm = b.op("Sqrt", b.op("ReduceSum", b.op("Mul", x, x), axis, keepdims=1))
    elif step.norm == "l1":
        norm = b.op("ReduceSum", b.op("Abs", x), axis, keepdims=1)
    elif step.norm == "max":  # scikit-learn's "max" is the largest absolute value
        norm = b.op("ReduceMax", b.op("Abs", x), axis, keepdims=1) if b.opset >= 18 else \
            b.op("ReduceMax", b.op("Abs", x), axes=[1], keepdims=1)  # axes became an input in 18
    else:
        raise UnsupportedHead(f"Normalizer(norm={step.norm!r})")
    # scikit-learn divides a zero row by 1 (it stays zero)
    zero = b.op("Equal", norm, b.const(np.zeros((1, 1)), "zero"))
    safe = b.op("Where", zero, b.const(np.ones((1, 1)), "one"), norm)
    return b.op("Div", x, safe)


def _pca(b: _Builder, x: str, step) -> str:
    if getattr(step, "mean_", None) is not None:
        x = b.op("Sub", x, b.const(step.mean_[None, :], "mean"))
    x = b.op("MatMul", x, b.const(step.components_.T, "components"))
    if step.whiten:
        scale = np.sqrt(step.explained_variance_)
        x = b.op("Div", x, b.const(scale[None, :], "whiten"))
    return x


# ----------------------------------------------------------------------------- estimators
def _linear(b: _Builder, x: str, est) -> str:
    """Decision margins ``x @ coef_.T + intercept_``: [N, 1] when binary."""
    coef = np.atleast_2d(np.asarray(est.coef_, dtype=np.float64))
    intercept = np.broadcast_to(np.asarray(est.intercept_, dtype=np.float64), (coef.shape[0],))
    return b.op("Add", b.op("MatMul", x, b.const(coef.T, "coef")),
                b.const(intercept[None, :], "intercept"), stem="decision")


def _two_columns(b: _Builder, p: str) -> str:
    """``p`` of the positive class [N, 1] -> ``[1 - p, p]``."""
    return b.op("Concat", b.op("Sub", b.const(np.ones((1, 1)), "one"), p), p, axis=1)


def _normalise_rows(b: _Builder, p: str, k: int) -> str:
    """``p / p.sum(1)``; a row summing to zero becomes uniform (as scikit-learn does)."""
    total = b.op("ReduceSum", p, b.const(np.array([1], dtype=np.int64), "axis"), keepdims=1)
    zero = b.op("Equal", total, b.const(np.zeros((1, 1)), "zero"))
    ratio = b.op("Div", p, b.op("Where", zero, b.const(np.ones((1, 1)), "one"), total))
    return b.op("Where", zero, b.const(np.full((1, k), 1.0 / k), "uniform"), ratio)


def _is_linear(est) -> bool:
    return hasattr(est, "coef_") and hasattr(est, "intercept_") and hasattr(est, "classes_")


def _linear_proba(b: _Builder, x: str, est) -> str:
    """``predict_proba`` of a linear estimator (LogisticRegression, SGD log_loss, look-alikes)."""
    k = len(est.classes_)
    d = _linear(b, x, est)
    if k == 2 and np.atleast_2d(est.coef_).shape[0] == 1:
        return _two_columns(b, b.op("Sigmoid", d))
    if type(est).__name__ == "SGDClassifier":
        if est.loss != "log_loss":
            raise UnsupportedHead(f"SGDClassifier(loss={est.loss!r}) probabilities")
        return _normalise_rows(b, b.op("Sigmoid", d), k)  # one-vs-rest, as _predict_proba_lr
    return b.op("Softmax", d, axis=1)


_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid", "identity": "Identity"}


def _mlp_proba(b: _Builder, x: str, est) -> str:
    if est.activation not in _ACTIVATIONS or est.out_activation_ not in ("softmax", "logistic"):
        raise UnsupportedHead(f"MLPClassifier(activation={est.activation!r}, "
                              f"out_activation_={est.out_activation_!r})")
    last = len(est.coefs_) - 1
    for i, (w, c) in enumerate(zip(est.coefs_, est.intercepts_)):
        x = b.op("Add", b.op("MatMul", x, b.const(w, "weight")), b.const(c[None, :], "bias"))
        if i != last:
            x = b.op(_ACTIVATIONS[est.activation], x)
    if est.out_activation_ == "softmax":
        return b.op("Softmax", x, axis=1)
    p = b.op("Sigmoid", x)
    return _two_columns(b, p) if len(est.classes_) == 2 else p


def _calibrated_proba(b: _Builder, x: str, est) -> str:
    if est.method != "sigmoid":
        raise UnsupportedHead(f"CalibratedClassifierCV(method={est.method!r})")
    k = len(est.classes_)
    parts = []
    for cc in est.calibrated_classifiers_:
        base = cc.estimator
        if not _is_linear(base) or hasattr(base, "support_vectors_"):
            raise UnsupportedHead(f"calibrated {type(base).__name__}")
        d = _linear(b, x, base)
        a = np.array([c.a_ for c in cc.calibrators], dtype=np.float64)
        bias = np.array([c.b_ for c in cc.calibrators], dtype=np.float64)
        # expit(-(a * d + b)) per column, one Platt sigmoid per class
        p = b.op("Sigmoid", b.op("Neg", b.op("Add", b.op("Mul", d, b.const(a[None, :], "a")),
                                               b.const(bias[None, :], "b"))))
        if k == 2:
            parts.append(_two_columns(b, p))
            continue
        pos = np.searchsorted(np.asarray(cc.classes), np.asarray(base.classes_))
        if not np.array_equal(pos, np.arange(k)):
            p = _scatter(b, p, pos, k)
        parts.append(_normalise_rows(b, p, k))
    out = parts[0] if len(parts) == 1 else b.op("Sum", *parts)
    if len(parts) > 1:
        out = b.op("Div", out, b.const(np.full((1, 1), float(len(parts))), "n"))
    return out


def _scatter(b: _Builder, p: str, columns: Sequence[int], k: int) -> str:
    """Columns of ``p`` placed at ``columns`` of a [N, k] matrix (zeros elsewhere), exactly."""
    m = np.zeros((len(columns), k))
    m[np.arange(len(columns)), np.asarray(columns, dtype=np.int64)] = 1.0
    return b.op("MatMul", p, b.const(m, "place"))


def _knn_proba(b: _Builder, x: str, est) -> str:
    """``KNeighborsClassifier.predict_proba`` (euclidean, uniform or distance weights), exactly.

    skl2onnx's converter weighs every neighbour alike whatever ``weights`` says, so kNN is built
    here: squared distances by one MatMul, the ``k`` nearest by TopK, one-hot labels gathered.
    """
    metric = est.effective_metric_
    if metric not in ("euclidean", "minkowski") or est.effective_metric_params_.get("p", 2) != 2 \
            or est.weights not in ("uniform", "distance") or est.outputs_2d_:
        raise UnsupportedHead(f"KNeighborsClassifier(metric={metric!r}, weights={est.weights!r})")
    train = np.asarray(est._fit_X, dtype=np.float64)
    k = int(min(est.n_neighbors, len(train)))
    onehot = np.zeros((len(train), len(est.classes_)))
    onehot[np.arange(len(train)), np.asarray(est._y, dtype=np.int64)] = 1.0
    axis1 = b.const(np.array([1], dtype=np.int64), "axis")
    # |x|^2 - 2 x.t + |t|^2, clipped at 0 as scikit-learn's euclidean_distances does
    sq = b.op("ReduceSum", b.op("Mul", x, x), axis1, keepdims=1)
    cross = b.op("MatMul", x, b.const(-2.0 * train.T, "train_t"))
    d2 = b.op("Add", b.op("Add", sq, cross), b.const((train ** 2).sum(1)[None, :], "train_sq"))
    d2 = b.op("Max", d2, b.const(np.zeros((1, 1)), "zero"))
    neg_top = b.node_outputs("TopK", b.op("Neg", d2), b.const(np.array([k], dtype=np.int64), "k"),
                             n=2, stem="nearest", axis=1, largest=1, sorted=1)
    votes = b.op("Gather", b.const(onehot, "onehot"), neg_top[1], axis=0)  # [N, k, K]
    if est.weights == "uniform":
        summed = b.op("ReduceSum", votes, axis1, keepdims=0)
    else:  # 1 / distance; a neighbour at distance 0 outweighs every other one
        dist = b.op("Sqrt", b.op("Neg", neg_top[0]))
        w = b.op("Reciprocal", b.op("Max", dist, b.const(np.full((1, 1), 1e-12), "eps")))
        w = b.op("Unsqueeze", w, b.const(np.array([2], dtype=np.int64), "axis2"))
        summed = b.op("ReduceSum", b.op("Mul", votes, w), axis1, keepdims=0)
    return _normalise_rows(b, summed, len(est.classes_))


def _estimator_scores(b: _Builder, x: str, est, *, probabilities: bool) -> str:
    name = type(est).__name__
    if not probabilities:  # fxtl's rule: softmax of the decision margins
        if not _is_linear(est):
            raise UnsupportedHead(f"{name} decision function")
        d = _linear(b, x, est)
        if len(est.classes_) == 2 and np.atleast_2d(est.coef_).shape[0] == 1:
            d = b.op("Concat", b.op("Neg", d), d, axis=1)
        return b.op("Softmax", d, axis=1)
    if name == "CalibratedClassifierCV":
        return _calibrated_proba(b, x, est)
    if "MLPClassifier" in {c.__name__ for c in type(est).__mro__}:  # subclasses: same attributes
        return _mlp_proba(b, x, est)
    if _is_linear(est) and not hasattr(est, "support_vectors_"):
        return _linear_proba(b, x, est)
    if "KNeighborsClassifier" in {c.__name__ for c in type(est).__mro__}:
        return _knn_proba(b, x, est)
    raise UnsupportedHead(name)


_TRANSFORMS = {"StandardScaler": _standard_scaler, "Normalizer": _normalizer, "PCA": _pca}


def _steps(pipeline) -> list[Any]:
    steps = [s for _, s in getattr(pipeline, "steps", [("est", pipeline)])]
    return [s for s in steps if s is not None and s != "passthrough"]


def convert_head(pipeline, *, class_positions: Sequence[int], n_classes: int, feature_dim: int,
                 opset: int):
    """The fitted ``pipeline`` as an ONNX model ``features [N, D] -> probabilities [N, K]``.

    Parameters
    ----------
    pipeline : sklearn estimator or Pipeline
        Fitted; its last step is the classifier.
    class_positions : sequence of int
        Column of the output that each entry of ``pipeline.classes_`` goes to.
    n_classes : int
        Output width ``K`` (classes the head never saw get probability 0).
    feature_dim : int
        ``D``.
    opset : int
        ONNX opset of the default domain.

    Raises
    ------
    UnsupportedHead
        A step without an exact tensor form here (its class name is the message).
    """
    from onnx import TensorProto, helper

    b = _Builder(opset)
    x = HEAD_INPUT
    *transforms, est = _steps(pipeline)
    for step in transforms:
        fn = _TRANSFORMS.get(type(step).__name__)
        if fn is None:
            raise UnsupportedHead(type(step).__name__)
        x = fn(b, x, step)
    s = _estimator_scores(b, x, est, probabilities=hasattr(pipeline, "predict_proba"))
    if list(class_positions) != list(range(n_classes)):
        s = _scatter(b, s, class_positions, n_classes)
    b.nodes.append(helper.make_node("Identity", [s], [HEAD_OUTPUT]))
    graph = helper.make_graph(
        b.nodes, "fxtl-head",
        [helper.make_tensor_value_info(HEAD_INPUT, TensorProto.FLOAT, ["batch", feature_dim])],
        [helper.make_tensor_value_info(HEAD_OUTPUT, TensorProto.FLOAT, ["batch", n_classes])],
        initializer=b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def register_torch_heads() -> None:
    """Tell skl2onnx to convert fxtl's estimators (:mod:`fxtl.heads.torch_heads`,
    :class:`~fxtl.heads.kernel_svm.RBFSVC`, :class:`~fxtl.heads.linear_svm.LinearSVC` and
    :class:`~fxtl.heads.mlp.MLPClassifier`) with the
    converters of their scikit-learn parents
    (they hold the parents' fitted attributes). Idempotent."""
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import calculate_linear_classifier_output_shapes
    from skl2onnx.operator_converters.linear_classifier import convert_sklearn_linear_classifier
    from skl2onnx.operator_converters.multilayer_perceptron import convert_sklearn_mlp_classifier
    from skl2onnx.operator_converters.support_vector_machines import convert_sklearn_svm_classifier
    from skl2onnx.shape_calculators.support_vector_machines import calculate_sklearn_svm_output_shapes

    from ..heads.kernel_svm import RBFSVC
    from ..heads.linear_svm import LinearSVC
    from ..heads.mlp import MLPClassifier
    from ..heads.torch_heads import TorchLinearSVC, TorchLogisticRegression, TorchMLPClassifier

    update_registered_converter(RBFSVC, "SklearnSVC", calculate_sklearn_svm_output_shapes,
                                convert_sklearn_svm_classifier,
                                options={"zipmap": [True, False, "columns"], "nocl": [True, False],
                                         "output_class_labels": [False, True],
                                         "raw_scores": [True, False]})

    # the options skl2onnx registers for each parent
    labels = {"zipmap": [True, False, "columns"], "nocl": [True, False],
              "output_class_labels": [False, True]}
    for cls, alias, convert, options in (
            (TorchLogisticRegression, "SklearnLinearClassifier", convert_sklearn_linear_classifier,
             {**labels, "raw_scores": [True, False]}),
            (TorchLinearSVC, "SklearnLinearSVC", convert_sklearn_linear_classifier,
             {"nocl": [True, False], "output_class_labels": [False, True],
              "raw_scores": [True, False]}),
            (LinearSVC, "SklearnLinearSVC", convert_sklearn_linear_classifier,
             {"nocl": [True, False], "output_class_labels": [False, True],
              "raw_scores": [True, False]}),
            (TorchMLPClassifier, "SklearnMLPClassifier", convert_sklearn_mlp_classifier, labels),
            (MLPClassifier, "SklearnMLPClassifier", convert_sklearn_mlp_classifier, labels)):
        update_registered_converter(cls, alias, calculate_linear_classifier_output_shapes,
                                    convert, options=options)


def convert_with_skl2onnx(pipeline, *, class_positions: Sequence[int], n_classes: int,
                          feature_dim: int, opset: int):
    """``pipeline`` through skl2onnx (RBF SVC, kNN...), renamed to the head's input and output.

    Raises :class:`UnsupportedHead` when skl2onnx is missing or cannot convert a step.
    """
    try:
        from skl2onnx import to_onnx
    except ImportError:
        raise UnsupportedHead("skl2onnx is not installed") from None
    from onnx import compose, helper

    register_torch_heads()

    est = _steps(pipeline)[-1]
    try:
        model = to_onnx(pipeline, np.zeros((1, feature_dim), dtype=np.float32),
                        options={id(est): {"zipmap": False}},
                        target_opset={"": opset, "ai.onnx.ml": 3})
    except Exception as exc:  # skl2onnx raises many kinds for unknown estimators
        raise UnsupportedHead(f"skl2onnx: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}") from None
    outputs = [o.name for o in model.graph.output]
    prob = next((o for o in outputs if "prob" in o), None)
    if prob is None:
        raise UnsupportedHead(f"skl2onnx gave no probabilities (outputs {outputs})")
    model = compose.add_prefix(model, "skl/")
    g = model.graph
    prob = "skl/" + prob
    # one input named like ours; only the probabilities as output
    g.node.insert(0, helper.make_node("Identity", [HEAD_INPUT], [g.input[0].name]))
    new_in = helper.make_tensor_value_info(HEAD_INPUT, 1, ["batch", feature_dim])
    del g.input[:]
    g.input.append(new_in)
    tail = prob
    if list(class_positions) != list(range(n_classes)):
        m = np.zeros((len(class_positions), n_classes), dtype=np.float32)
        m[np.arange(len(class_positions)), np.asarray(class_positions)] = 1.0
        from onnx import numpy_helper

        g.initializer.append(numpy_helper.from_array(m, "skl/place"))
        g.node.append(helper.make_node("MatMul", [tail, "skl/place"], ["skl/placed"]))
        tail = "skl/placed"
    g.node.append(helper.make_node("Identity", [tail], [HEAD_OUTPUT]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(HEAD_OUTPUT, 1, ["batch", n_classes]))
    return model
