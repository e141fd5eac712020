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

The public names are imported on first use, so ``import fxtl`` (and every CLI start) does not
pay for torch and scikit-learn until a stage needs them.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

from .errors import BackboneError, CacheError, DataError, FxtlError, ProvenanceError

# public name -> module that defines it (imported lazily by __getattr__)
_API = {
    "FeatureCache": "store", "load_features": "store",
    "get_backbone": "backbones", "list_backbones": "backbones", "load_backbone": "backbones",
    "discover": "data",
    "extract": "extract",
    "fit_head": "heads", "fit_heads": "heads", "load_head": "heads",
    "predict": "predict",
    "plot_embedding": "plots",
    "finetune": "finetune",
    "compare": "compare",
    "advise": "advise",
    "export_cache": "export",
    "datasets": None,
}

__all__ = ["__version__", "FxtlError", "DataError", "CacheError", "BackboneError",
           "ProvenanceError", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'fxtl' has no attribute {name!r}")
    module = importlib.import_module(f".{_API[name] or name}", __name__)
    value = module if _API[name] is None else getattr(module, name)
    # Several stages share their module's name (fxtl.extract, fxtl.finetune...): bind the
    # function over the submodule attribute that the import just set.
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))


# Stage modules that share their function's name.
_SAME_NAME = frozenset({"extract", "finetune", "compare", "advise", "predict"})


class _Package(types.ModuleType):
    """``fxtl.extract`` is the function even after ``fxtl.extract`` the module was imported.

    Importing a submodule binds it as an attribute of the package; this keeps the public
    function in front (the modules stay reachable through ``sys.modules``).
    """

    def __getattribute__(self, name: str):
        value = super().__getattribute__(name)
        if name in _SAME_NAME and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        return value


sys.modules[__name__].__class__ = _Package
