"""fxtl: transfer learning on images.

Cached frozen-CNN features with interchangeable scikit-learn heads, fine-tuning of the same
backbone on the same splits for comparison, and advice on which to use.

>>> import fxtl
>>> result = fxtl.extract("data/hymenoptera")            # doctest: +SKIP
>>> cache = fxtl.load_features(result.cache)             # doctest: +SKIP
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import FxtlError, DataError, CacheError, BackboneError, ProvenanceError
from .store import FeatureCache, load_features
from .backbones import get_backbone, list_backbones, load_backbone
from .data import discover
from .extract import extract

__all__ = ["__version__", "FxtlError", "DataError", "CacheError", "BackboneError",
           "ProvenanceError", "FeatureCache", "load_features", "get_backbone", "list_backbones",
           "load_backbone", "extract", "discover"]


def __getattr__(name):
    # Stage entry points are imported on first use so `import fxtl` stays light.
    if name == "fit_head":
        from .heads import fit_head
        return fit_head
    if name == "finetune":
        from .finetune import finetune
        return finetune
    if name == "advise":
        from .advise import advise
        return advise
    raise AttributeError(f"module 'fxtl' has no attribute {name!r}")
