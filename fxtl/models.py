"""A saved model that predicts on pictures, from Python: :func:`load_model`.

One object for the three things ``fxtl predict`` runs (a head run, a fine-tuned run, an
exported ``.onnx`` file), loaded and checked by the same loaders (the head's sha256 against its
sidecar, the backbone's weights against the head's provenance, a fine-tune's ``model.pt``
against its manifest, an ONNX file's fxtl metadata) and run with the same precision, so its
probabilities are ``predict``'s. Images are anything :func:`fxtl.embed` takes.

Examples
--------
>>> model = load_model("cache/runs/hymenoptera-lite0-logreg-20260101-120000")  # doctest: +SKIP
>>> model.classes_                                                              # doctest: +SKIP
array(['ants', 'bees'], dtype=object)
>>> model.predict(["bee.jpg"])                                                  # doctest: +SKIP
array(['bees'], dtype=object)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .backbones.registry import MODEL_MANIFEST, load_backbone
from .deploy.runtime import load_onnx
from .embedder import Embedder, image_items, run_batches
from .errors import FxtlError, ParameterError
from .heads.model import Head
from .heads.persistence import load_head
from .inference import head_backbone, resolve_model
from .runtime import resolve_device, resolve_precision

__all__ = ["load_model", "LoadedModel"]


class LoadedModel:
    """A head run, fine-tuned run or ``.onnx`` file, ready to label images.

    Attributes
    ----------
    kind : {"head", "finetune", "onnx"}
    path : Path or None -- what was loaded (None for an in-memory head)
    classes_ : ndarray of str -- class names, the columns of ``predict_proba``
    device, precision : str -- where and at which precision images are run
    provenance : dict -- backbone, weights hash, preprocessing, layer...
    """

    def __init__(self, *, kind: str, path: Path | None, class_names: list[str],
                 proba, provenance: dict[str, Any], device: str, precision: str):
        self.kind, self.path = kind, path
        self.classes_ = np.asarray(class_names, dtype=object)
        self._proba = proba
        self.provenance, self.device, self.precision = provenance, device, precision

    def __repr__(self) -> str:
        return (f"LoadedModel(kind={self.kind!r}, path={str(self.path) if self.path else None!r}, "
                f"classes={list(self.classes_)!r}, device={self.device!r}, "
                f"precision={self.precision!r})")

    def predict_proba(self, images: Any, *, on_error: str = "raise",
                      progress: bool = False) -> np.ndarray:
        """Probabilities ``(n, len(classes_))`` (float64), one row per image in input order.

        A head without ``predict_proba`` gives a softmax of its margins, as ``fxtl predict``
        does. With ``on_error="nan"`` an undecodable image gets a row of NaN instead of a
        :class:`~fxtl.errors.DataError`.
        """
        items, names = image_items(images)
        return self._proba(items, names, on_error=on_error, progress=progress)

    def predict(self, images: Any, *, on_error: str = "raise", progress: bool = False) -> np.ndarray:
        """Class names, the argmax of :meth:`predict_proba` (ties to the first class, as
        ``fxtl predict``); an undecodable image with ``on_error="nan"`` gets ``None``."""
        p = self.predict_proba(images, on_error=on_error, progress=progress)
        out = self.classes_[p.argmax(axis=1)] if len(p) else np.empty(0, dtype=object)
        out[np.isnan(p).any(axis=1)] = None
        return out


def _precision(recorded: str | None, asked: str, device: str) -> str:
    """``auto``: the precision the model's features were made at, when this device runs it
    (so scores match the cache the head was fitted on), else the device's best."""
    if asked != "auto":
        return resolve_precision(asked, device)
    try:
        return resolve_precision(recorded or "auto", device)
    except ParameterError:
        return resolve_precision("auto", device)


def load_model(model: "str | Path | Head", *, device: str = "auto", precision: str = "auto",
               batch_size: int | None = None, trust: bool = False,
               cache_dir: str | Path | None = None) -> LoadedModel:
    """Load a head run, a fine-tuned run or an exported ``.onnx`` file to predict on images.

    Parameters
    ----------
    model : path, run name or Head
        A ``fit_head`` run folder (or its head file), a ``finetune`` run folder, a file written
        by ``export_model`` (``.onnx``), a run name under ``<cache_dir>/runs``, or a fitted
        :class:`~fxtl.heads.model.Head` (``fit_head(...).head``, even unsaved).
    device : {"auto", "cpu", "cuda"}
        Ignored for ``.onnx`` (onnxruntime on the CPU).
    precision : {"auto", "fp32", "bf16", "fp16"}
        ``auto``: the precision the run's features were made at, when this device runs it.
    batch_size : int, optional
        Images per forward pass.
    trust : bool
        Load a head whose sidecar does not match, or a fine-tuned run without a weights hash
        (only for files you made yourself), as ``fxtl predict --trust``.
    cache_dir : path, optional
        Where a bare run name is looked up.

    Returns
    -------
    LoadedModel
        ``predict(images)``, ``predict_proba(images)``, ``classes_``.

    Raises
    ------
    ProvenanceError
        A tampered head, weights that are not the ones the head's features came from, an ONNX
        file fxtl did not write.
    FxtlError
        No such model.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ParameterError("batch_size", f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(model, Head):
        return _from_head(model, None, device=device, precision=precision,
                          batch_size=batch_size, trust=trust)
    if not isinstance(model, (str, Path)):
        raise ParameterError("model", f"model must be a run folder, an .onnx file or a Head, not "
                             f"{type(model).__name__}")
    if Path(model).suffix.lower() == ".onnx":
        return _from_onnx(Path(model), batch_size=batch_size)
    path = resolve_model(model, cache_dir)
    if path.is_dir() and (path / MODEL_MANIFEST).is_file():
        return _from_finetune(path, device=device, precision=precision, batch_size=batch_size,
                              trust=trust)
    return _from_head(load_head(path, trust=trust), path, device=device, precision=precision,
                      batch_size=batch_size, trust=trust)


def _from_head(head: Head, path: Path | None, *, device: str, precision: str,
               batch_size: int | None, trust: bool) -> LoadedModel:
    bb = head_backbone(head, trust=trust)  # weights and recipe checked against the head's
    dev = resolve_device(device)
    emb = Embedder.from_network(bb, device=dev, batch_size=batch_size,
                                precision=_precision(head.provenance.get("precision"), precision, dev))

    def proba(items, names, *, on_error, progress):
        feats = emb.run(items, names, on_error=on_error, progress=progress, desc="predict")
        out = np.full((len(items), len(head.class_names)), np.nan)
        ok = ~np.isnan(feats).any(axis=1)
        if ok.any():
            out[ok] = head.scores(feats[ok])
        return out

    return LoadedModel(kind="head", path=path, class_names=list(head.class_names), proba=proba,
                       provenance={**head.provenance, "head_model": head.model},
                       device=emb.device, precision=emb.precision)


def _from_finetune(run: Path, *, device: str, precision: str, batch_size: int | None,
                   trust: bool) -> LoadedModel:
    try:
        manifest = json.loads((run / MODEL_MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise FxtlError(f"{run / MODEL_MANIFEST} is unreadable ({exc}); re-run the fine-tune") from None
    bb = load_backbone(str(run), inference=True, trust=trust)  # checks model.pt's sha256
    names = list(bb.categories)
    n_out = int(getattr(bb.model.get_submodule(bb.classifier_name), "out_features", 0))
    if len(names) != n_out:
        raise FxtlError(f"{run / MODEL_MANIFEST} names {len(names)} classes but the network has "
                        f"{n_out} outputs; re-run the fine-tune")
    dev = resolve_device(device)
    emb = Embedder.from_network(bb, device=dev, batch_size=batch_size,
                                precision=_precision(manifest.get("precision"), precision, dev))

    def proba(items, names_, *, on_error, progress):
        return emb.run(items, names_, outputs="probabilities", on_error=on_error,
                       progress=progress, desc="predict")

    return LoadedModel(kind="finetune", path=run, class_names=names, proba=proba,
                       provenance=bb.provenance, device=emb.device, precision=emb.precision)


def _from_onnx(path: Path, *, batch_size: int | None) -> LoadedModel:
    net = load_onnx(path)  # refuses a file without fxtl's metadata

    def proba(items, names, *, on_error, progress):
        def fn(x):
            return net.scores(np.ascontiguousarray(x.numpy()))

        return run_batches(items, net.preprocessing, fn, width=len(net.class_names), device="cpu",
                           batch_size=batch_size or 32, workers=0, names=names,
                           on_error=on_error, progress=progress, desc="predict",
                           dtype=np.float64)

    return LoadedModel(kind="onnx", path=path, class_names=net.class_names, proba=proba,
                       provenance=dict(net.meta), device="cpu", precision="fp32")
