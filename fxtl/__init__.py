"""fxtl: transfer learning on images.

Cached frozen-CNN features with interchangeable scikit-learn heads, fine-tuning of the same
backbone on the same splits for comparison, and advice on which to use.

>>> import fxtl
>>> res = fxtl.extract("data/hymenoptera")                 # doctest: +SKIP
>>> cache = fxtl.load_features(res.cache)                  # doctest: +SKIP
>>> head = fxtl.fit_head(res.cache, model="svm")           # doctest: +SKIP
>>> ft = fxtl.finetune("data/hymenoptera", epochs=5)       # doctest: +SKIP
>>> fxtl.advise("data/hymenoptera").scenario               # doctest: +SKIP
1
>>> fxtl.export_model(head.run_dir, output="model.onnx")  # doctest: +SKIP

The public names are imported on first use, so ``import fxtl`` (and every CLI start) does not
pay for torch and scikit-learn until a stage needs them.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import (BackboneError, CacheError, DataError, FxtlError, ParameterError,
                     ProvenanceError)

# public name -> module that defines it (imported lazily by __getattr__). No module is named
# like a function it exports, so ``fxtl.extract`` is always the function.
_API = {
    "FeatureCache": "features.store", "load_features": "features.store",
    "get_backbone": "backbones.registry", "list_backbones": "backbones.registry",
    "load_backbone": "backbones.registry",
    "discover": "data.discovery",
    "extract": "features.extraction",
    "fit_head": "heads.fitting", "fit_heads": "heads.fitting", "load_head": "heads.persistence",
    "HeadConfig": "heads.config",
    "predict": "prediction",
    "plot_embedding": "report.plots",
    "finetune": "training.loop", "FinetuneConfig": "training.config",
    "compare": "report.comparison",
    "advise": "advice",
    "export_cache": "features.export",
    "export_model": "deploy.onnx_graph",
    "embed": "embedder", "Embedder": "embedder", "ImageEmbedder": "embedder",
    "load_model": "models",
}
# public module -> where it lives
_MODULES = {"datasets": "data.samples"}

__all__ = ["__version__", "FxtlError", "DataError", "CacheError", "BackboneError",
           "ProvenanceError", "ParameterError", *_API, *_MODULES]


def __getattr__(name: str):
    if name in _MODULES:
        value = importlib.import_module(f".{_MODULES[name]}", __name__)
    elif name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'fxtl' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API) | set(_MODULES))
