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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._util import say
from .backbones.registry import MODEL_MANIFEST
from .data.discovery import walk_images
from .errors import FxtlError, ParameterError, ProvenanceError
from .tables import records_frame

__all__ = ["predict", "PredictResult", "collect_images", "resolve_model"]

_CACHE_SUFFIXES = (".h5", ".hdf5")
# What a fine-tune leaves in its run folder before it writes its manifest (fxtl.training).
_FINETUNE_CHECKPOINT = "checkpoint-last.pt"


@dataclass
class PredictResult:
    """What :func:`predict` did; ``to_dict()`` is the ``--json`` output."""

    model: str
    kind: str  # "head" or "finetune"
    class_names: list[str]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = ""
    precision: str = ""
    notes: list[str] = field(default_factory=list)

    def to_frame(self):
        """A pandas DataFrame, one row per prediction (``path``, ``label``, ``probability``,
        ``index``, ``top_k``...). Needs pandas."""
        frame = records_frame(self.predictions, first=("path", "label", "probability"))
        return frame.reindex(columns=["path", "label", "probability"]) if frame.empty else frame

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "kind": self.kind, "class_names": self.class_names,
                "predictions": self.predictions, "errors": self.errors,
                "n": len(self.predictions), "seconds": round(self.seconds, 4),
                "images_per_second": round(self.images_per_second, 2), "device": self.device,
                "precision": self.precision, "notes": self.notes}


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Path], list[dict[str, str]]]:
    """Split ``inputs`` into image files and caches; folders are walked for image files.

    Returns ``(images, caches, errors)``; a missing path or an empty folder is an error entry,
    not an exception, so one bad argument does not stop the others.
    """
    if isinstance(inputs, (str, Path)):  # one path, not a sequence of its characters
        inputs = [inputs]
    images: list[Path] = []
    caches: list[Path] = []
    errors: list[dict[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            # The dataset walker: symlink loops are not followed twice (they would hang a plain
            # os.walk), unreadable folders are reported instead of silently skipped.
            unreadable: list[tuple[str, str]] = []
            found = walk_images(p, unreadable=unreadable)
            errors.extend({"path": where, "reason": why} for where, why in unreadable)
            if not found and not unreadable:
                errors.append({"path": str(p), "reason": "folder holds no image files"})
            images.extend(found)
        elif p.is_file():
            (caches if p.suffix.lower() in _CACHE_SUFFIXES else images).append(p)
        else:
            errors.append({"path": str(p), "reason": "no such file or folder"})
    return images, caches, errors


def _top_k(scores: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"label": class_names[j], "probability": round(float(scores[j]), 6)} for j in order]


def _entry(path: str, scores: np.ndarray, class_names: Sequence[str], k: int) -> dict[str, Any]:
    j = int(np.argmax(scores))  # the same rule as fit-head's evaluation (Head.predict)
    return {"path": path, "label": class_names[j], "index": j,
            "probability": round(float(scores[j]), 6), "top_k": _top_k(scores, class_names, k)}


def _recorded(asked: str | None, recorded: str | None) -> str | None:
    """``auto`` (or nothing) means: the precision the model's features were made at."""
    return recorded if asked in (None, "", "auto") else asked


def resolve_model(model: str | Path, cache_dir: str | Path | None = None) -> Path:
    """``model`` as given, else the run of that name under ``<cache-dir>/runs/``."""
    from ._util import default_cache_dir

    p = Path(model)
    if p.exists():
        return p
    run = (Path(cache_dir) if cache_dir else default_cache_dir()) / "runs" / str(model)
    if run.exists():
        return run
    raise FxtlError(f"{model}: no such head or run folder (nor {run}); pass a folder written by "
                    "`fxtl fit-head` or `fxtl finetune`")


def _resolve_precision(wanted: str | None, device: str, notes: list[str]) -> str:
    from .runtime import resolve_precision

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
    from .runtime import resolve_device

    if top_k < 1:
        raise ParameterError("top_k", f"top_k must be at least 1, got {top_k}")
    if Path(model).suffix.lower() == ".onnx":  # an `fxtl export-model` file: onnxruntime runs it
        from .deploy.runtime import predict_onnx

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
        from .heads.fitting import load_head

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


def finish_result(res: PredictResult, errors: list[dict[str, str]], t0: float) -> PredictResult:
    """Put the inputs' ``errors`` first, refuse a call where no input could be used (one line
    naming the first failure), and time it from ``t0``; every predictor ends here."""
    res.errors = errors + res.errors
    if not res.predictions:
        first = res.errors[0] if res.errors else {"path": "(none)", "reason": "no input given"}
        raise FxtlError(f"none of the {len(res.errors)} input(s) could be used (first: "
                        f"{first['path']}: {first['reason']})")
    res.seconds = time.perf_counter() - t0
    res.images_per_second = len(res.predictions) / res.seconds if res.seconds > 0 else 0.0
    return res


def _refuse_unfinished_finetune(model: Path) -> None:
    """A fine-tune stopped before its end has a checkpoint but no model manifest: say so."""
    if model.is_dir() and not (model / MODEL_MANIFEST).exists() and \
            (model / _FINETUNE_CHECKPOINT).is_file():
        raise FxtlError(f"{model} is a fine-tune that did not finish (it holds "
                        f"{_FINETUNE_CHECKPOINT} but no {MODEL_MANIFEST}); finish it with `fxtl "
                        f"finetune DATA_DIR --resume --run-name {model.name}` (same options), or "
                        "re-run the fine-tune")


def _predict_cache(head, cache_path: Path, res: PredictResult, *, top_k: int) -> None:
    from .features.store import load_features

    cache = load_features(cache_path)
    head.check_features(cache.attrs, cache.dim, source=str(cache_path))
    scores = head.scores(cache.features)
    names = cache.class_names
    for i, s in enumerate(scores):
        e = _entry(cache.paths[i], s, head.class_names, top_k)
        e["split"] = str(cache.split[i])
        if cache.labels[i] >= 0 and cache.labels[i] < len(names):
            e["true_label"] = names[int(cache.labels[i])]
        res.predictions.append(e)


def head_backbone(head, *, trust: bool = False):
    """The backbone ``head``'s features came from, built for inference and checked against the
    head's provenance (same weights, layer, preprocessing and width), else ProvenanceError.
    ``trust`` lets that backbone be a fine-tuned run that records no ``weights_sha256``."""
    from .backbones.registry import load_backbone

    prov = head.provenance
    if not prov.get("backbone"):
        raise ProvenanceError(f"{head.path} has no backbone in its sidecar, so its features cannot "
                              "be recomputed; refit the head with `fxtl fit-head`")
    layer = prov.get("layer")
    bb = load_backbone(prov["backbone"], layer=None if layer in (None, "pooled") else layer,
                       inference=True, trust=trust)
    head.check_features(bb.provenance, bb.feature_dim, source=f"backbone {prov['backbone']} here")
    return bb


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
    from .features.extraction import embed_paths

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
            res.predictions.append(_entry(str(images[int(idx[k])]), s, res.class_names, top_k))


def _predict_finetuned(run: Path, images: list[Path], *, top_k: int, device: str,
                       precision: str | None, batch_size: int | None, workers: int | None,
                       progress: bool, notes: list[str], trust: bool = False) -> PredictResult:
    from .backbones.registry import load_backbone

    try:
        manifest = json.loads((run / MODEL_MANIFEST).read_text())
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
