"""Ship a run as one portable file: ONNX export (``fxtl export-model``) and its runner.

``export_model(run, output=...)`` writes a head run (backbone + head in one graph) or a
fine-tuned run as ONNX; ``predict_onnx(file, images)`` runs it with onnxruntime. Needs the
``fxtl[onnx]`` extra (onnx, onnxruntime, skl2onnx); see ``docs/onnx.md``.
"""
from __future__ import annotations

from .onnx_graph import ExportResult, export_model, require_onnx
from .runtime import OnnxModel, load_onnx, predict_onnx

__all__ = ["export_model", "ExportResult", "predict_onnx", "load_onnx", "OnnxModel", "require_onnx"]
