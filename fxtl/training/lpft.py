"""LP-FT (Kumar et al. 2022): start the new classifier from a fitted logistic-regression head.

Two starts, both fitted on the fine-tune's training rows only, so the head has never seen the
images the fine-tune selects or reports on; its scaler and coefficients then fold into one linear
layer:

* the probe (the default, :func:`probe_classifier`): the network's own features of the
  training images (evaluation preprocessing at the run's input size, no augmentation), a
  standardised logistic regression with C chosen by stratified k-fold cross-validation on those
  rows;
* ``init_head``: a ``fit-head`` run refitted (a ``sklearn.base.clone``, same hyper-parameters)
  on the training rows of its own feature cache.

When the selection split keeps that start (no trained epoch beat it there), the start is refitted
on the training *and* selection rows before the report (:func:`refit_kept_start`): what
``fit-head`` does with the hyper-parameters its selection chose, so the run reports the head it
kept fitted on the same rows as ``fit-head``'s, and the reported split still takes no part.
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..backbones.building import replace_linear
from ..data.discovery import ImageSet
from .._util import read_json
from ..errors import FxtlError, ProvenanceError
from ..heads.persistence import load_head
from ..runtime import autocast
from .trainer import note_errors

if TYPE_CHECKING:
    from ..backbones.registry import Backbone
    from .trainer import Trainer

__all__ = ["linear_head_weights", "load_linear_head", "head_cache", "refit_on_train_rows",
           "new_classifier", "fit_probe", "probe_classifier", "pooled_features",
           "refit_kept_start", "PROBE_CS", "PROBE_FOLDS"]

# The probe's C grid (fit-head's logreg grid) and its cross-validation folds (fewer when the
# smallest class has fewer training rows).
PROBE_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
PROBE_FOLDS = 5


def linear_head_weights(pipeline, head_classes: Sequence[str], class_names: Sequence[str],
                        *, feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold a fitted ``[StandardScaler ->] LogisticRegression`` pipeline into ``(W, b)``.

    ``W @ x + b`` are logits over ``class_names`` whose softmax equals the pipeline's
    ``predict_proba`` on raw features ``x`` (the scaler is folded in: ``W = coef / scale``,
    ``b = intercept - W @ mean``). A binary model's single margin ``d`` becomes ``(-d/2, d/2)``.
    ``head_classes`` names the head's class indices (``pipeline.classes_`` index into it).

    Raises
    ------
    FxtlError
        The pipeline holds a step that is not linear-foldable (PCA, L2 normalisation, an SVM...).
    """
    steps = list(pipeline.steps) if hasattr(pipeline, "steps") else [("est", pipeline)]
    est = steps[-1][1]
    if not (hasattr(est, "coef_") and hasattr(est, "intercept_") and hasattr(est, "predict_proba")):
        raise FxtlError(f"init_head needs a logistic-regression head, not {type(est).__name__}; "
                        "fit one with model='logreg' (fit-head)")
    mean = np.zeros(feature_dim)
    scale = np.ones(feature_dim)
    for name, step in steps[:-1]:
        if step is None or step == "passthrough":
            continue
        if type(step).__name__ != "StandardScaler":
            raise FxtlError(f"init_head: the head's step {name!r} ({type(step).__name__}) cannot "
                            "be folded into a linear layer; fit the head without PCA or L2 normalisation")
        m = step.mean_ if getattr(step, "mean_", None) is not None else np.zeros(feature_dim)
        s = step.scale_ if getattr(step, "scale_", None) is not None else np.ones(feature_dim)
        # x -> (x - m) / s applied after the previous affine map (x - mean) / scale.
        mean, scale = mean + m * scale, scale * s
    coef = np.asarray(est.coef_, dtype=np.float64)
    intercept = np.asarray(est.intercept_, dtype=np.float64)
    if coef.shape[1] != feature_dim:
        raise ProvenanceError(f"init_head: the head expects {coef.shape[1]}-d features, the "
                              f"backbone gives {feature_dim}-d; fit the head on this backbone")
    if coef.shape[0] == 1:  # binary: one margin for classes_[1]
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    w = coef / scale
    b = intercept - w @ mean
    index = {c: i for i, c in enumerate(class_names)}
    W = np.zeros((len(class_names), feature_dim))
    B = np.full(len(class_names), float(b.min()) - 10.0)  # classes the head never saw: unlikely
    for row, cls in enumerate(np.asarray(est.classes_).tolist()):
        name = head_classes[int(cls)] if isinstance(cls, (int, np.integer)) else str(cls)
        if name not in index:
            raise ProvenanceError(f"init_head: the head knows class {name!r}, the dataset does "
                                  "not; fit the head on this dataset's features")
        W[index[name]], B[index[name]] = w[row], b[row]
    return W.astype(np.float32), B.astype(np.float32)


def load_linear_head(run: str | Path, bb: Backbone) -> Any:
    """The ``Head`` of a ``fit-head`` run, checked against the backbone."""
    head = load_head(run)
    prov = head.provenance
    for key, mine in (("backbone", bb.spec.name), ("weights_sha256", bb.weights_sha256),
                      ("layer", bb.layer)):
        if prov.get(key) is not None and prov.get(key) != mine:
            raise ProvenanceError(f"init_head {run}: the head was fitted on features with {key} "
                                  f"{prov.get(key)!r}, this fine-tune uses {mine!r}; fit the head "
                                  "on a cache of the same backbone")
    head_pre = prov.get("preprocessing")
    if isinstance(head_pre, str):
        head_pre = json.loads(head_pre)
    crop = (head_pre or {}).get("crop")
    if crop and int(crop) != bb.preprocessing.crop:
        warnings.warn(f"init_head {run} was fitted on {crop}-px features but this fine-tune runs "
                      f"at {bb.preprocessing.crop} px, where it starts far below its own accuracy "
                      f"(docs/advise.md); use image_size={crop}", stacklevel=2)
    return head


def head_cache(run: str | Path, head: Any) -> Path:
    """The feature cache a head was fitted on (its sidecar, else its run's metrics.json)."""
    cache = head.provenance.get("cache")
    if not cache and head.path is not None:
        metrics = Path(head.path).parent / "metrics.json"
        with contextlib.suppress(OSError, ValueError):
            cache = read_json(metrics).get("cache")
    if not cache:
        raise ProvenanceError(f"init_head {run} does not say which feature cache it was fitted on, "
                              "so it cannot be refitted on this fine-tune's training rows; refit "
                              "it with `fxtl fit-head`")
    cache = Path(cache)
    if not cache.is_file():
        raise ProvenanceError(f"init_head {run} was fitted on the feature cache {cache}, which is "
                              "gone; re-extract it (fxtl extract) so the head can be refitted on "
                              "this fine-tune's training rows only")
    return cache


def refit_on_train_rows(run: str | Path, bb: Backbone, images: ImageSet,
                        train_rows: np.ndarray, *, split: str = "train"
                        ) -> tuple[Any, list[str], dict[str, Any]]:
    """A clone of ``run``'s head (same hyper-parameters) fitted on the fine-tune's training rows.

    ``fit-head`` may have fitted the head on train+val (or its hold-out differs); a start head that
    has seen the fine-tune's selection or report images would make those numbers optimistic. The
    head's own cache supplies the features of exactly the training images (matched by path).
    ``split`` names the rows in ``info`` (``train+<selection split>`` for
    :func:`refit_kept_start`).

    Returns ``(pipeline, class_names, info)``; ``info`` says which cache and how many rows.
    """
    from sklearn.base import clone

    from ..features.store import load_features

    head = load_linear_head(run, bb)
    cache_path = head_cache(run, head)
    cache = load_features(cache_path)
    train_paths = {images.samples[i].path for i in train_rows}
    rows = np.array([i for i, p in enumerate(cache.paths)
                     if p in train_paths and cache.labels[i] >= 0], dtype=np.int64)
    if not len(rows):
        raise ProvenanceError(f"init_head {run}: its cache {cache_path} holds none of this "
                              f"fine-tune's training images under {images.root}; fit the head on "
                              "a cache of this dataset")
    pipeline = clone(head.pipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes: the head's own run reported them
        pipeline.fit(cache.features[rows], cache.labels[rows])
    info = {"head": str(head.path or run), "cache": str(cache_path), "refit_rows": int(len(rows)),
            "refit_split": split}
    return pipeline, list(cache.class_names), info


def new_classifier(bb: Backbone, class_names: Sequence[str], init_head: str | Path | None, *,
                    images: ImageSet, train_rows: np.ndarray) -> dict[str, Any] | None:
    """Replace the ImageNet classifier by a zero one, or one folded from a logistic head
    refitted on ``train_rows`` (:func:`refit_on_train_rows`); returns the refit's info.

    A zero classifier (as in BiT, Kolesnikov et al. 2020) sends no gradient into the pretrained
    features until it has learned something, so the first steps do not scramble them with a
    random head's errors (and a run does not depend on a random init).
    """
    import torch

    feature_dim = bb.feature_dim
    replace_linear(bb.model, bb.classifier_name, len(class_names))
    W = np.zeros((len(class_names), feature_dim), dtype=np.float32)
    b = np.zeros(len(class_names), dtype=np.float32)
    info = None
    if init_head:
        pipeline, head_classes, info = refit_on_train_rows(init_head, bb, images, train_rows)
        W, b = linear_head_weights(pipeline, head_classes, class_names, feature_dim=feature_dim)
    classifier = bb.model.get_submodule(bb.classifier_name)
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(W))
        classifier.bias.copy_(torch.from_numpy(b))
    return info




def fit_probe(features: np.ndarray, labels: np.ndarray, *, seed: int,
              split: str = "train") -> tuple[Any, dict[str, Any]]:
    """A ``StandardScaler -> LogisticRegression`` fitted on these rows; C by stratified k-fold CV.

    Only the rows given take part (the fine-tune's training rows; ``split`` names them in
    ``info``): the folds choose C, then the model is refitted on all of them. With fewer than two
    rows in some class C stays at 1.

    Returns ``(pipeline, info)``; ``info`` holds ``C``, ``folds``, ``rows`` and the CV accuracy.
    """
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels)
    folds = int(min(PROBE_FOLDS, counts[counts > 0].min()))
    if folds >= 2:
        est = LogisticRegressionCV(Cs=list(PROBE_CS), max_iter=2000,
                                   cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    else:
        est = LogisticRegression(C=1.0, max_iter=2000)
    pipeline = make_pipeline(StandardScaler(), est)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and deprecation notes of a throwaway fit
        pipeline.fit(features, labels)
    info: dict[str, Any] = {"head": "probe", "refit_rows": int(len(labels)), "refit_split": split,
                            "C": 1.0, "folds": folds if folds >= 2 else 0}
    if folds >= 2:
        info["C"] = float(np.ravel(est.C_)[0])
        info["cv_accuracy"] = float(np.max(np.mean(next(iter(est.scores_.values())), axis=0)))
    return pipeline, info


def pooled_features(trainer: Trainer, loader, n: int, *, errors: dict[str, str],
                    paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's inputs (the pooled features) of the ``n`` images ``loader`` yields
    (``ImageDataset`` items, in order), in eval mode at the run's precision: ``(features, seen)``,
    ``seen`` False where an image could not be decoded."""
    import torch

    classifier = trainer.net.get_submodule(trainer.bb.classifier_name)
    captured: list = []
    hook = classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    feats = np.zeros((n, classifier.in_features), dtype=np.float32)
    seen = np.zeros(n, dtype=bool)
    trainer.net.eval()
    try:
        with torch.inference_mode(), autocast(trainer.device, trainer.precision):
            for x, idx, errs in loader:
                keep = note_errors(idx, errs, errors, paths)
                if not keep.any():
                    continue
                x = x[torch.from_numpy(keep)].to(trainer.device, non_blocking=True)
                captured.clear()
                trainer.logits(x.contiguous(memory_format=torch.channels_last))
                rows = idx.numpy()[keep]
                feats[rows] = captured[0].float().cpu().numpy()
                seen[rows] = True
    finally:
        hook.remove()
    return feats, seen


def _fold_into_classifier(trainer: Trainer, W: np.ndarray, b: np.ndarray) -> None:
    import torch

    classifier = trainer.net.get_submodule(trainer.bb.classifier_name)
    with torch.no_grad():
        classifier.weight.copy_(torch.from_numpy(W))
        classifier.bias.copy_(torch.from_numpy(b))


def probe_classifier(trainer: Trainer, loader, labels: np.ndarray, class_names: Sequence[str], *,
                     errors: dict[str, str], paths: Sequence[str], seed: int,
                     keep: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Fit the probe on the training images of ``loader`` and fold it into the classifier.

    ``loader`` yields ``ImageDataset`` items of the training rows in order (evaluation
    preprocessing); ``labels`` are theirs. Every process computes the same features and the same
    fit, so under torchrun the ranks stay identical. Returns the probe's info, or None when fewer
    than two classes have a readable training image (the classifier then stays at zero).
    ``keep``, when given, receives the features (``keep["train"] = (features, seen)``) so that
    :func:`refit_kept_start` need not compute them again.
    """
    t0 = time.perf_counter()
    feats, seen = pooled_features(trainer, loader, len(labels), errors=errors, paths=paths)
    if keep is not None:
        keep["train"] = (feats, seen)
    y = labels[seen]
    if len(np.unique(y)) < 2:
        return None
    pipeline, info = fit_probe(feats[seen], y, seed=seed)
    W, b = linear_head_weights(pipeline, list(class_names), class_names,
                               feature_dim=feats.shape[1])
    _fold_into_classifier(trainer, W, b)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info


def refit_kept_start(trainer: Trainer, *, init_head: str | Path | None, images: ImageSet,
                     labels: np.ndarray, rows: dict[str, np.ndarray], loader_for, errors: dict[str, str],
                     paths: Sequence[str], seed: int, kept: dict[str, Any] | None = None,
                     split: str = "train+val") -> dict[str, Any] | None:
    """Refit the fitted start the selection split kept (epoch 0) on the training and selection
    rows, and fold it into ``trainer``'s classifier (which must hold the kept weights).

    This is ``fit-head``'s rule: the selection rows choose (here: the start over every trained
    epoch), then the chosen model is refitted on every row that is not reported on. The probe's C
    is chosen again by k-fold CV on those rows; an ``init_head`` keeps its hyper-parameters and is
    refitted on the same rows of its own cache. The reported rows take no part.

    Parameters
    ----------
    rows : {"train": ndarray, "val": ndarray}
        Row indices into ``images.samples`` / ``labels``.
    loader_for : callable
        ``loader_for(rows)``: the rows' images in order, evaluation preprocessing.
    kept : dict, optional
        :func:`probe_classifier`'s ``keep``: the training rows' features already computed.
    split : str
        Names the rows in the returned info (``train+holdout-selection`` when the selection
        rows are a hold-out of train).

    Returns
    -------
    dict or None
        What was refitted (``refit_rows``, ``refit_split``, ``C``...); None when fewer than two
        classes have a readable image.
    """
    t0 = time.perf_counter()
    both = np.concatenate([rows["train"], rows["val"]])
    if init_head is not None:
        pipeline, head_classes, info = refit_on_train_rows(init_head, trainer.bb, images, both,
                                                           split=split)
        classifier = trainer.net.get_submodule(trainer.bb.classifier_name)
        W, b = linear_head_weights(pipeline, head_classes, images.class_names,
                                   feature_dim=classifier.in_features)
    else:
        parts = []
        for name in ("train", "val"):
            if name == "train" and kept and "train" in kept:
                parts.append(kept["train"])
                continue
            r = rows[name]
            parts.append(pooled_features(trainer, loader_for(r), len(r), errors=errors,
                                         paths=[paths[i] for i in r]))
        feats = np.concatenate([p[0] for p in parts])
        seen = np.concatenate([p[1] for p in parts])
        y = labels[both][seen]
        if len(np.unique(y)) < 2:
            return None
        pipeline, info = fit_probe(feats[seen], y, seed=seed, split=split)
        W, b = linear_head_weights(pipeline, list(images.class_names), images.class_names,
                                   feature_dim=feats.shape[1])
    _fold_into_classifier(trainer, W, b)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info
