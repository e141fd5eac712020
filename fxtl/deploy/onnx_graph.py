"""A run -> one ONNX file: images in, probabilities per class out (``fxtl export-model``).

The graph takes images already resized and centre-cropped to the model's input size, as
``uint8`` (or ``float32`` holding 0..255) ``[N, 3, H, W]`` RGB, with a dynamic batch size. The
mean/std normalisation is inside the graph (exact). Resizing stays outside: ONNX's ``Resize``
has no antialiased bicubic like PIL's, so the recipe (shorter side, crop, interpolation) is
written in the model's metadata and in a sidecar JSON for the caller to apply.

A head run becomes the backbone (same weights, layer and BatchNorm folding as ``fxtl predict``)
followed by the head as exact tensor ops (:mod:`fxtl.deploy.heads_onnx`), or skl2onnx's graph
for an RBF SVM. A fine-tuned run becomes its network with a softmax. Every export is run
once under onnxruntime on random images and compared with fxtl's own scores before it is kept.
"""
from __future__ import annotations

import io
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._util import atomic_write_bytes, atomic_write_json, now_iso, sha256_file
from ..backbones.registry import MODEL_MANIFEST
from ..errors import FxtlError, ParameterError
from ..heads.model import class_positions
from ..inference import resolve_model
from .heads_onnx import HEAD_INPUT, HEAD_OUTPUT, UnsupportedHead, convert_head, convert_with_skl2onnx
from .sources import load_run

__all__ = ["export_model", "ExportResult", "require_onnx", "ONNX_FORMAT", "ONNX_FORMAT_VERSION",
           "INPUT_NAME", "OUTPUT_NAME", "INPUT_DTYPES", "EXACT_HEADS", "SKL2ONNX_HEADS"]

ONNX_FORMAT = "fxtl-onnx"
ONNX_FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = HEAD_OUTPUT
INPUT_DTYPES = ("uint8", "float32")
# head kinds fxtl's registry makes, by how they export (the converter itself goes by class)
EXACT_HEADS = ("logreg", "linear-svm", "mlp", "knn")
SKL2ONNX_HEADS = ("svm",)
# an export whose probabilities differ more than this from fxtl's on the check batch is refused
CHECK_TOLERANCE = 1e-4
_EXTRA = "pip install 'fxtl[onnx]' (onnx, onnxruntime, skl2onnx)"


def require_onnx() -> None:
    """Raise a one-line :class:`FxtlError` naming the extra when onnx/onnxruntime are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise FxtlError(f"ONNX export needs the onnx extra ({exc.name} is missing): {_EXTRA}") from None


@dataclass
class ExportResult:
    """What :func:`export_model` wrote; ``to_dict()`` is ``fxtl export-model --json``."""

    output: Path
    sidecar: Path
    kind: str
    model: str
    class_names: list[str]
    input_shape: list[Any]
    input_dtype: str
    opset: int
    max_abs_diff: float
    converter: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "sidecar": str(self.sidecar), "kind": self.kind,
                "model": self.model, "class_names": self.class_names,
                "input": {"name": INPUT_NAME, "shape": self.input_shape, "dtype": self.input_dtype},
                "output_name": OUTPUT_NAME, "opset": self.opset, "converter": self.converter,
                "max_abs_diff": self.max_abs_diff, "bytes": self.output.stat().st_size,
                "seconds": round(self.seconds, 3), "notes": self.notes}


def export_model(run: str | Path, *, output: str | Path | None = None, input_dtype: str = "uint8",
                 opset: int = 17, cache_dir: str | Path | None = None) -> ExportResult:
    """Write a head run or a fine-tuned run as one ONNX file (and ``<output>.json``).

    Parameters
    ----------
    run : path
        A ``fit-head`` run folder (or its head file) or a ``finetune`` run folder; a bare run
        name is looked up under ``<cache_dir>/runs``.
    output : path, optional
        The ``.onnx`` file; default ``<run>/model.onnx``.
    input_dtype : {"uint8", "float32"}
        Type of the ``image`` input (float32 holds 0..255 pixel values, not 0..1).
    opset : int
        ONNX opset of the default domain (13 or later).
    cache_dir : path, optional
        Where a bare run name is looked up.

    Returns
    -------
    ExportResult

    Raises
    ------
    ProvenanceError
        The run does not check (tampered head or weights, other backbone weights).
    FxtlError
        A head kind that cannot be exported, or the onnx extra is missing.

    Examples
    --------
    >>> res = export_model("cache/runs/hymenoptera-lite0-logreg-20250101-120000",
    ...                    output="bees.onnx")                               # doctest: +SKIP
    >>> res.class_names                                                      # doctest: +SKIP
    ['ants', 'bees']
    """
    if input_dtype not in INPUT_DTYPES:
        raise ParameterError("input_dtype", f"input_dtype must be one of {', '.join(INPUT_DTYPES)}, "
                                            f"got {input_dtype!r}")
    require_onnx()
    import onnx

    if not 13 <= opset <= onnx.defs.onnx_opset_version():
        raise ParameterError("opset", f"opset must be in 13..{onnx.defs.onnx_opset_version()}, got {opset}")
    t0 = time.perf_counter()
    src = load_run(resolve_model(run, cache_dir), manifest_name=MODEL_MANIFEST)
    out = Path(output) if output else (src.run if src.run.is_dir() else src.run.parent) / "model.onnx"
    if out.suffix.lower() != ".onnx":
        raise ParameterError("output", f"output must end in .onnx, got {out.name}")
    size = int(src.backbone.preprocessing.crop)
    net = _backbone_graph(src, size=size, input_dtype=input_dtype, opset=opset)
    converter = "torch"
    if src.kind == "head":
        head, converter = _head_graph(src, opset=opset)
        net = _join(net, head)
    onnx.checker.check_model(net)
    diff = _check_against_fxtl(net, src, size=size, input_dtype=input_dtype)
    meta = _metadata(src, size=size, input_dtype=input_dtype, opset=opset, converter=converter)
    for key, value in meta.items():
        net.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    net.producer_name, net.producer_version = "fxtl", meta["fxtl_version"]
    net.doc_string = (f"fxtl {src.kind} export of {src.run.name}: {INPUT_NAME} {input_dtype} "
                      f"[N, 3, {size}, {size}] RGB 0..255 -> {OUTPUT_NAME} [N, {len(src.class_names)}]")
    atomic_write_bytes(out, net.SerializeToString())
    sidecar = out.with_name(out.name + ".json")
    atomic_write_json(sidecar, {**meta, "onnx_file": out.name, "onnx_sha256": sha256_file(out)})
    return ExportResult(output=out, sidecar=sidecar, kind=src.kind, model=src.head_model,
                        class_names=list(src.class_names), input_shape=["batch", 3, size, size],
                        input_dtype=input_dtype, opset=opset, max_abs_diff=diff, converter=converter,
                        seconds=time.perf_counter() - t0)


def _backbone_graph(src, *, size: int, input_dtype: str, opset: int):
    """The backbone (with its softmax for a fine-tune) traced by torch's ONNX exporter."""
    import onnx
    import torch

    class Network(torch.nn.Module):
        def __init__(self, bb, finetuned: bool):
            super().__init__()
            self.bb, self.finetuned = bb, finetuned

        def forward(self, x):
            if self.finetuned:
                _, logits = self.bb.forward_with_logits(x)
                return torch.softmax(logits, dim=1)
            return self.bb(x)

    finetuned = src.kind == "finetune"
    dtype = torch.uint8 if input_dtype == "uint8" else torch.float32
    example = torch.zeros(2, 3, size, size, dtype=dtype)
    out_name = OUTPUT_NAME if finetuned else HEAD_INPUT
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        torch.onnx.export(Network(src.backbone, finetuned).eval(), (example,), buf, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[out_name], opset_version=opset,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, out_name: {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def _head_graph(src, *, opset: int):
    """The head as exact tensor ops, else through skl2onnx, else a one-line refusal."""
    pipeline = src.head
    classes = getattr(pipeline, "classes_", np.arange(len(src.class_names)))
    kw = dict(class_positions=class_positions(classes, list(src.class_names)),
              n_classes=len(src.class_names),
              feature_dim=int(src.backbone.feature_dim), opset=opset)
    try:
        return convert_head(pipeline, **kw), "exact"
    except UnsupportedHead as exact_reason:
        try:
            return convert_with_skl2onnx(pipeline, **kw), "skl2onnx"
        except UnsupportedHead as reason:
            raise FxtlError(
                f"{src.run}: the {src.head_model} head cannot be exported ({exact_reason} has no exact "
                f"tensor form; {reason}); exportable heads: {', '.join(EXACT_HEADS)} (exact), "
                f"{', '.join(SKL2ONNX_HEADS)} (with skl2onnx), and fine-tuned runs") from None


def _join(backbone, head):
    """``backbone``'s ``features`` output fed to ``head``: one graph, ``image`` -> probabilities."""
    from onnx import compose, helper

    head.ir_version = backbone.ir_version
    have = {o.domain: o.version for o in backbone.opset_import}
    for o in head.opset_import:
        if o.domain not in have:
            backbone.opset_import.append(helper.make_opsetid(o.domain, o.version))
    del head.opset_import[:]
    head.opset_import.extend(backbone.opset_import)
    return compose.merge_models(backbone, head, io_map=[(HEAD_INPUT, HEAD_INPUT)],
                                outputs=[HEAD_OUTPUT])


def _check_against_fxtl(model, src, *, size: int, input_dtype: str) -> float:
    """Max |onnxruntime - fxtl| probability on a seeded random batch; refuses a mismatch."""
    import onnxruntime as ort

    x = np.random.default_rng(0).integers(0, 256, (3, 3, size, size), dtype=np.uint8)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x if input_dtype == "uint8" else x.astype(np.float32)})[0]
    want = src.scores(x)
    diff = float(np.abs(got.astype(np.float64) - want).max()) if got.shape == want.shape else float("inf")
    if not diff <= CHECK_TOLERANCE:
        raise FxtlError(f"{src.run}: the ONNX graph does not reproduce fxtl's probabilities (max "
                        f"difference {diff:.2g} > {CHECK_TOLERANCE:g}); exportable heads: "
                        f"{', '.join(EXACT_HEADS)} (exact), {', '.join(SKL2ONNX_HEADS)} (with skl2onnx)")
    return diff


def _metadata(src, *, size: int, input_dtype: str, opset: int, converter: str) -> dict[str, Any]:
    """What the file says about itself (model metadata and sidecar carry the same)."""
    prov = src.provenance
    pre = dict(prov.get("preprocessing") or src.backbone.preprocessing.to_dict())
    return {"format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "kind": src.kind,
            "model": src.head_model, "class_names": list(src.class_names),
            "input_name": INPUT_NAME, "input_dtype": input_dtype,
            "input_shape": ["batch", 3, size, size], "input_layout": "NCHW RGB, 0..255",
            "output_name": OUTPUT_NAME, "output": "probabilities per class, in class_names order",
            "preprocessing": pre,
            "preprocessing_in_graph": "mean/std normalisation (x / 255 - mean) / std",
            "preprocessing_outside": (f"decode to RGB, resize the shorter side to {pre.get('resize')} "
                                      f"({pre.get('interpolation')}, PIL), centre crop {pre.get('crop')}"),
            "opset": opset, "converter": converter,
            "provenance": {k: v for k, v in prov.items() if k != "preprocessing" and v is not None},
            "source_run": str(src.run), "fxtl_version": __version__, "created": now_iso()}
