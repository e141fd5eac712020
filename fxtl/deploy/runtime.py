"""Run an exported ``.onnx`` file with onnxruntime (``fxtl predict model.onnx IMAGES...``).

The file says everything it needs in its own metadata (preprocessing, class names, input type),
so prediction needs no run folder, torch model or scikit-learn head: images are decoded and
resized by fxtl's eval transform (the one ``fxtl predict`` uses), batched as uint8 NCHW and
scored by the graph. The JSON is ``fxtl predict``'s, so an export is checked with the same
command as the run it came from.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._util import loads_json, read_json, say, sha256_file
from ..data.images import EvalTransform, ImageDecodeError, Preprocessing
from ..errors import FxtlError, ProvenanceError, ParameterError
from ..inference import PredictResult, collect_images, finish_result, score_entry
from .onnx_graph import ONNX_FORMAT, ONNX_FORMAT_VERSION, require_onnx

__all__ = ["predict_onnx", "OnnxModel", "load_onnx"]


class OnnxModel:
    """An exported file opened in onnxruntime, with its metadata parsed.

    Attributes
    ----------
    path : Path
    session : onnxruntime.InferenceSession
    meta : dict -- the file's metadata (JSON values decoded)
    class_names : list of str
    preprocessing : fxtl.data.images.Preprocessing
    """

    def __init__(self, path: Path, session, meta: dict[str, Any]):
        self.path, self.session, self.meta = path, session, meta
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        self.input_name = _graph_name(path, meta, "input_name", inputs, session.get_inputs()[0].name)
        self.output_name = _graph_name(path, meta, "output_name", outputs, session.get_outputs()[0].name)
        width = outputs[self.output_name].shape[-1] if outputs[self.output_name].shape else None
        self.class_names = _class_names(path, meta.get("class_names"),
                                        width if isinstance(width, int) else None)
        try:
            self.preprocessing = Preprocessing.from_dict(meta.get("preprocessing"))
        except ValueError as exc:
            raise ProvenanceError(f"{path}: its metadata's {exc}; export it again with "
                                  "`fxtl export-model`") from None
        self.float_input = "float" in inputs[self.input_name].type

    def scores(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, 3, H, W]`` -> probabilities ``[N, K]`` (float64)."""
        x = images.astype(np.float32) if self.float_input else images
        return self.session.run([self.output_name], {self.input_name: x})[0].astype(np.float64)


def _graph_name(path: Path, meta: dict[str, Any], key: str, names: dict[str, Any], default: str) -> str:
    """The graph input/output the metadata names (it must be one of the graph's own)."""
    name = meta.get(key, default)
    if not isinstance(name, str) or name not in names:
        raise ProvenanceError(f"{path}: its metadata's {key} {name!r:.40} is not one of the graph's "
                              f"({', '.join(names)}); export it again with `fxtl export-model`")
    return name


def _class_names(path: Path, names: Any, width: int | None) -> list[str]:
    """The metadata's class names: a JSON list of distinct strings, one per output column."""
    fix = "export it again with `fxtl export-model`"
    if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
        raise ProvenanceError(f"{path}: its metadata's class_names must be a JSON list of class "
                              f"names, got {json.dumps(names)[:60]}; {fix}")
    if len(set(names)) != len(names):
        dup = next(c for c in names if names.count(c) > 1)
        raise ProvenanceError(f"{path}: its metadata's class_names list {dup!r} twice; {fix}")
    if width is not None and width != len(names):
        raise ProvenanceError(f"{path}: its metadata names {len(names)} classes but the graph "
                              f"outputs {width} scores per image; {fix}")
    return list(names)


def _check_sidecar(path: Path) -> None:
    """When ``<file>.json`` (written beside every export) is there, the file must be the one it
    hashed: flipped weight bytes would otherwise run without a word."""
    sidecar = path.with_name(path.name + ".json")
    if not sidecar.is_file():
        return
    try:
        recorded = read_json(sidecar)
    except (OSError, ValueError) as exc:
        raise ProvenanceError(f"{sidecar} is unreadable ({exc}); export the model again, or "
                              "delete the sidecar to run the .onnx file on its own") from None
    recorded = recorded.get("onnx_sha256") if isinstance(recorded, dict) else None
    if recorded is None:
        return  # a JSON file of the user's own by that name: nothing recorded to check
    if recorded != sha256_file(path):
        raise ProvenanceError(f"{path} does not match the onnx_sha256 in {sidecar.name} (modified "
                              "or replaced); export it again with `fxtl export-model`")


def load_onnx(path: str | Path, *, threads: int | None = None) -> OnnxModel:
    """Open an ``fxtl export-model`` file; refuses an ONNX file fxtl did not write."""
    require_onnx()
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FxtlError(f"{path}: no such ONNX file; write one with `fxtl export-model RUN -o {path.name}`")
    _check_sidecar(path)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ProvenanceError(f"{path} is not a readable ONNX model ({str(exc).splitlines()[0][:120]}); "
                              "export it again with `fxtl export-model`") from None
    raw = sess.get_modelmeta().custom_metadata_map
    if raw.get("format") != ONNX_FORMAT:
        raise ProvenanceError(f"{path} was not written by `fxtl export-model` (no {ONNX_FORMAT} "
                              "metadata); run it with onnxruntime directly")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = loads_json(value)
        except ValueError:
            meta[key] = value
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > ONNX_FORMAT_VERSION:
        raise ProvenanceError(f"{path} has {ONNX_FORMAT} format_version {meta.get('format_version')}, "
                              f"this fxtl reads up to {ONNX_FORMAT_VERSION}; upgrade fxtl")
    return OnnxModel(path, sess, meta)


def predict_onnx(model: str | Path, inputs: Sequence[str | Path], *, top_k: int = 1,
                 batch_size: int | None = None, workers: int | None = None,
                 threads: int | None = None):
    """Label images with an exported ``.onnx`` file; the result is ``fxtl predict``'s.

    Parameters
    ----------
    model : path
        A file written by :func:`fxtl.deploy.export_model`.
    inputs : sequence of paths
        Image files or folders of images (feature caches need the head run instead).
    top_k : int
        How many best classes each prediction lists.
    batch_size : int, optional
        Images per onnxruntime call (default 32).
    workers : int, optional
        Decoding threads (default: up to 4).
    threads : int, optional
        onnxruntime's intra-op threads (default: its own choice, all cores).

    Returns
    -------
    fxtl.prediction.PredictResult
        ``kind`` is ``"onnx"``, ``device`` ``"cpu"``, ``precision`` ``"fp32"``.
    """
    if top_k < 1:
        raise ParameterError("top_k", f"top_k must be at least 1, got {top_k}")
    if batch_size is not None and batch_size < 1:
        raise ParameterError("batch_size", f"batch_size must be at least 1, got {batch_size}")
    t0 = time.perf_counter()
    net = load_onnx(model, threads=threads)
    images, caches, errors = collect_images(inputs)
    if caches:
        raise FxtlError(f"{caches[0]} is a feature cache, but {net.path} predicts from images; pass "
                        "image files or folders (or the head run, which scores caches)")
    res = PredictResult(model=str(net.path), kind="onnx", class_names=net.class_names,
                        device="cpu", precision="fp32")
    transform = EvalTransform(net.preprocessing)

    def decode(i: int):
        try:
            return i, transform.load(images[i]).numpy(), None
        except ImageDecodeError as exc:
            return i, None, str(exc)

    batch_size = batch_size or 32
    n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, n_workers)) as pool:
        for start in range(0, len(images), batch_size):
            done = list(pool.map(decode, range(start, min(start + batch_size, len(images)))))
            for i, _, reason in done:
                if reason is not None:
                    res.errors.append({"path": str(images[i]), "reason": reason})
                    say(f"fxtl: skipped {images[i]}: {reason}")
            good = [(i, x) for i, x, reason in done if reason is None]
            if not good:
                continue
            scores = net.scores(np.stack([x for _, x in good]))
            res.predictions.extend(score_entry(str(images[i]), s, net.class_names, top_k)
                                   for (i, _), s in zip(good, scores))
    return finish_result(res, errors, t0)
