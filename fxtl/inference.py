"""What every predictor shares: inputs, the result, the model's place and the head's backbone.

:mod:`fxtl.prediction` (heads and fine-tunes) and :mod:`fxtl.deploy` (``.onnx`` files, export)
both predict; the pieces they share live here, below both, so that neither imports the other's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._util import default_cache_dir
from .backbones.registry import load_backbone
from .data.discovery import walk_images
from .errors import FxtlError, ProvenanceError
from .tables import records_frame

__all__ = ["PredictResult", "collect_images", "resolve_model", "finish_result", "head_backbone",
           "score_entry"]

_CACHE_SUFFIXES = (".h5", ".hdf5")


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


def collect_images(inputs: str | Path | Sequence[str | Path]) -> tuple[list[Path], list[Path], list[dict[str, str]]]:
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
        elif p.exists():
            # A pipe (`<(cat a.jpg)`), device or socket: decoders seek, and a pipe of unknown
            # length is never read into memory on a caller's say.
            errors.append({"path": str(p), "reason": "is a pipe, device or socket, not a regular "
                                                      "file; save the image to a file and pass that"})
        else:
            errors.append({"path": str(p), "reason": "no such file or folder"})
    return images, caches, errors


def _top_k(scores: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"label": class_names[j], "probability": round(float(scores[j]), 6)} for j in order]


def score_entry(path: str, scores: np.ndarray, class_names: Sequence[str], k: int) -> dict[str, Any]:
    """One prediction: the best class, its probability and the ``k`` best."""
    j = int(np.argmax(scores))  # the same rule as fit-head's evaluation (Head.predict)
    return {"path": path, "label": class_names[j], "index": j,
            "probability": round(float(scores[j]), 6), "top_k": _top_k(scores, class_names, k)}


def resolve_model(model: str | Path, cache_dir: str | Path | None = None) -> Path:
    """``model`` as given, else the run of that name under ``<cache-dir>/runs/``."""
    p = Path(model)
    if p.exists():
        return p
    run = (Path(cache_dir) if cache_dir else default_cache_dir()) / "runs" / str(model)
    if run.exists():
        return run
    raise FxtlError(f"{model}: no such head or run folder (nor {run}); pass a folder written by "
                    "`fxtl fit-head` or `fxtl finetune`")


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


def head_backbone(head, *, trust: bool = False):
    """The backbone ``head``'s features came from, built for inference and checked against the
    head's provenance (same weights, layer, preprocessing and width), else ProvenanceError.
    ``trust`` lets that backbone be a fine-tuned run that records no ``weights_sha256``."""
    prov = head.provenance
    if not prov.get("backbone"):
        raise ProvenanceError(f"{head.path} has no backbone in its sidecar, so its features cannot "
                              "be recomputed; refit the head with `fxtl fit-head`")
    layer = prov.get("layer")
    # A head on several layers: the backbone pools them in the pass that makes the features and
    # hands the head their concatenation, in the head's order.
    own = layer or "pooled"
    layers = [n for n in prov.get("layers") or [] if n != own]
    bb = load_backbone(prov["backbone"], layer=None if layer in (None, "pooled") else layer,
                       layers=layers, inference=True, trust=trust)
    if prov.get("layers"):
        bb.concatenate(prov["layers"])
    head.check_features(bb.provenance, bb.feature_dim, source=f"backbone {prov['backbone']} here")
    return bb
