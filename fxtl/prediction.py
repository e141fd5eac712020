"""Predict labels of new images with a saved head or a fine-tuned model (``fxtl predict``).

MODEL is one of

* a head run folder written by ``fxtl fit-head`` (or its ``head.joblib``): the head's backbone
  is rebuilt with the same weights (checked by sha256), preprocessing, layer and precision, the
  images are embedded and the head scores them;
* a fine-tuned run folder holding ``fxtl-model.json``: the network predicts with its own
  classifier (softmax of its logits).

Inputs are image files, folders (searched recursively for images) or feature caches (``.h5``,
scored by a head without running the backbone, after checking that the cache's backbone matches
the head's). Images that cannot be decoded are reported in ``errors`` and skipped; the rest of
the batch goes on.

Examples
--------
>>> res = predict("cache/runs/hymenoptera-lite0-logreg-20250101-120000", ["bee.jpg"])  # doctest: +SKIP
>>> res.predictions[0]["label"], res.predictions[0]["probability"]                       # doctest: +SKIP
('bees', 0.97)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ._util import read_json, say
from .backbones.registry import MODEL_MANIFEST, load_backbone
from .deploy.runtime import predict_onnx
from .errors import FxtlError, ParameterError
from .features.extraction import embed_paths
from .features.store import load_features
from .heads.layers import layer_matrix
from .heads.persistence import load_head
from .inference import (PredictResult, collect_images, finish_result, head_backbone,
                        resolve_model, score_entry)
from .runtime import resolve_device, resolve_precision

# PredictResult, collect_images and resolve_model are fxtl.inference's, named here too so that
# code importing them from fxtl.prediction keeps working.
__all__ = ["predict", "PredictResult", "collect_images", "resolve_model"]
# What a fine-tune leaves in its run folder before it writes its manifest (fxtl.training).
_FINETUNE_CHECKPOINT = "checkpoint-last.pt"


def _recorded(asked: str | None, recorded: str | None) -> str | None:
    """``auto`` (or nothing) means: the precision the model's features were made at."""
    return recorded if asked in (None, "", "auto") else asked


def _resolve_precision(wanted: str | None, device: str, notes: list[str]) -> str:
    if wanted in (None, "", "auto"):
        return resolve_precision("auto", device)
    try:
        return resolve_precision(wanted, device)
    except FxtlError:
        fallback = resolve_precision("auto", device)
        notes.append(f"the model's precision {wanted} is not available on {device}; using "
                     f"{fallback} (scores may differ slightly from the cache's)")
        return fallback


def predict(model: str | Path, inputs: str | Path | Sequence[str | Path], *, top_k: int = 1,
            trust: bool = False, device: str = "auto", precision: str | None = None,
            batch_size: int | None = None, workers: int | None = None,
            cache_dir: str | Path | None = None, progress: bool = False) -> PredictResult:
    """Label images (or cached features) with a saved head or a fine-tuned model.

    Parameters
    ----------
    model : path
        A ``fit-head`` run folder or ``head.joblib``, or a fine-tuned run folder
        (``fxtl-model.json``).
    inputs : path or sequence of paths
        Image files, folders of images, or ``.h5`` feature caches (heads only).
    top_k : int
        How many best classes each prediction lists in ``top_k``.
    trust : bool
        Load a head whose sidecar is missing or does not match (joblib files can run code), or a
        fine-tuned run whose manifest records no ``weights_sha256``.
    device : {"auto", "cpu", "cuda"}
    precision : str, optional
        ``None`` or ``"auto"``: the precision the model's features were made at (so they match
        the cache the head was fitted on), falling back to the hardware's best when this device
        cannot run it.
    batch_size, workers : int, optional
        As for ``fxtl extract``.
    cache_dir : path, optional
        Where a bare run name is looked up (``<cache-dir>/runs/<name>``).

    Returns
    -------
    PredictResult
        ``predictions``: one dict per usable input (``path``, ``label``, ``probability``,
        ``top_k``); ``errors``: ``{"path", "reason"}`` per skipped input.

    Raises
    ------
    ProvenanceError
        A tampered head, or a cache whose backbone does not match the head.
    FxtlError
        No input could be used at all.
    """
    if top_k < 1:
        raise ParameterError("top_k", f"top_k must be at least 1, got {top_k}")
    if Path(model).suffix.lower() == ".onnx":  # an `fxtl export-model` file: onnxruntime runs it
        return predict_onnx(model, inputs, top_k=top_k, batch_size=batch_size, workers=workers)
    t0 = time.perf_counter()
    model = resolve_model(model, cache_dir)
    images, caches, errors = collect_images(inputs)
    if not images and not caches:
        first = errors[0] if errors else {"path": "(none)", "reason": "no input given"}
        raise FxtlError(f"nothing to predict: {first['path']}: {first['reason']}; pass image "
                        "files, folders of images or a feature cache")
    notes: list[str] = []
    if model.is_dir() and (model / MODEL_MANIFEST).is_file():
        if caches:
            raise FxtlError(f"{caches[0]} is a feature cache, but {model} is a fine-tuned network "
                            "that predicts from images; pass image files or folders")
        res = _predict_finetuned(model, images, top_k=top_k, device=resolve_device(device),
                                 precision=precision, batch_size=batch_size, workers=workers,
                                 progress=progress, notes=notes, trust=trust)
    else:
        _refuse_unfinished_finetune(model)
        head = load_head(model, trust=trust)
        res = PredictResult(model=str(head.path), kind="head", class_names=list(head.class_names),
                            notes=notes)
        for cache in caches:
            _predict_cache(head, cache, res, top_k=top_k)
        if images:
            dev = resolve_device(device)
            _predict_images_with_head(head, images, res, top_k=top_k, device=dev,
                                      precision=precision, batch_size=batch_size,
                                      workers=workers, progress=progress, trust=trust)
    return finish_result(res, errors, t0)


def _refuse_unfinished_finetune(model: Path) -> None:
    """A fine-tune stopped before its end has a checkpoint but no model manifest: say so."""
    if model.is_dir() and not (model / MODEL_MANIFEST).exists() and \
            (model / _FINETUNE_CHECKPOINT).is_file():
        raise FxtlError(f"{model} is a fine-tune that did not finish (it holds "
                        f"{_FINETUNE_CHECKPOINT} but no {MODEL_MANIFEST}); finish it with "
                        f"finetune(data, resume=True, run_name={model.name!r}) and the same options, "
                        "or re-run the fine-tune")


def _predict_cache(head, cache_path: Path, res: PredictResult, *, top_k: int) -> None:
    cache = load_features(cache_path)
    names = head.provenance.get("layers")
    X = layer_matrix(cache, names) if names else cache.features
    head.check_features(cache.attrs, int(X.shape[1]), source=str(cache_path))
    scores = head.scores(X)
    names = cache.class_names
    for i, s in enumerate(scores):
        e = score_entry(cache.paths[i], s, head.class_names, top_k)
        e["split"] = str(cache.split[i])
        if cache.labels[i] >= 0 and cache.labels[i] < len(names):
            e["true_label"] = names[int(cache.labels[i])]
        res.predictions.append(e)


def _predict_images_with_head(head, images: list[Path], res: PredictResult, *, top_k: int,
                              device: str, precision: str | None, batch_size: int | None,
                              workers: int | None, progress: bool, trust: bool = False) -> None:
    prov = head.provenance
    bb = head_backbone(head, trust=trust)
    prec = _resolve_precision(_recorded(precision, prov.get("precision")), device, res.notes)
    res.device, res.precision = device, prec
    _embed_and_score(bb, images, res, top_k=top_k, device=device, precision=prec,
                     batch_size=batch_size, workers=workers, progress=progress,
                     score=lambda feats, logits: head.scores(feats), with_logits=False)


def _embed_and_score(bb, images: list[Path], res: PredictResult, *, top_k: int, device: str,
                     precision: str, batch_size: int | None, workers: int | None, progress: bool,
                     score, with_logits: bool) -> None:
    for idx, feats, logits, bad in embed_paths(bb, images, device=device, precision=precision,
                                               batch_size=batch_size, workers=workers,
                                               with_logits=with_logits, progress=progress,
                                               desc="predict"):
        bad_idx = {i for i, _ in bad}
        for i, reason in bad:
            res.errors.append({"path": str(images[i]), "reason": reason})
            say(f"fxtl: skipped {images[i]}: {reason}")
        keep = [k for k, i in enumerate(idx.tolist()) if i not in bad_idx]
        if not keep:
            continue
        scores = score(feats[keep], None if logits is None else logits[keep])
        for k, s in zip(keep, scores):
            res.predictions.append(score_entry(str(images[int(idx[k])]), s, res.class_names, top_k))


def _predict_finetuned(run: Path, images: list[Path], *, top_k: int, device: str,
                       precision: str | None, batch_size: int | None, workers: int | None,
                       progress: bool, notes: list[str], trust: bool = False) -> PredictResult:
    try:
        manifest = read_json(run / MODEL_MANIFEST)
    except (OSError, ValueError) as exc:
        raise FxtlError(f"{run / MODEL_MANIFEST} is unreadable ({exc}); re-run the fine-tune") from None
    bb = load_backbone(str(run), inference=True, trust=trust)
    names = list(bb.categories)
    n_out = int(getattr(bb.model.get_submodule(bb.classifier_name), "out_features", 0))
    if len(names) != n_out:
        raise FxtlError(f"{run / MODEL_MANIFEST} names {len(names)} classes but the network has "
                        f"{n_out} outputs; re-run the fine-tune")
    prec = _resolve_precision(_recorded(precision, manifest.get("precision")), device, notes)
    res = PredictResult(model=str(run), kind="finetune", class_names=names, notes=notes,
                        device=device, precision=prec)

    def softmax(feats, logits):
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    _embed_and_score(bb, images, res, top_k=top_k, device=device, precision=prec,
                     batch_size=batch_size, workers=workers, progress=progress, score=softmax,
                     with_logits=True)
    return res
