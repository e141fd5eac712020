"""One extraction, resolved once: the job (inputs and options), its result, and the one rule for
reusing finished work (check, lock, check again, else compute).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .._util import ensure_dir, file_lock
from ..data.discovery import ImageSet
from ..errors import CacheError
from .store import read_attrs, summarize

if TYPE_CHECKING:
    from ..backbones.network import Backbone

__all__ = ["ExtractResult", "ExtractJob", "make_result", "cache_hit", "reuse_or_compute",
           "count_splits", "rate"]


@dataclass
class ExtractResult:
    """What ``extract`` did; ``to_dict()`` is the ``--json`` output."""

    cache: Path
    n: int
    dim: int
    splits: dict[str, int]
    errors: list[dict[str, str]]
    seconds: float
    images_per_second: float
    cache_hit: bool
    resumed_rows: int = 0
    backbone: str = ""
    layer: str = ""
    precision: str = ""
    device: str = ""
    fingerprint: str = ""
    class_names: list[str] = field(default_factory=list)
    # further layers stored beside the features: name -> width (``extract(layers=)``)
    layers: dict[str, int] = field(default_factory=dict)
    # Scale-out: how many shards the cache is (or will be) assembled from; for a ``--shard I/N``
    # call, which shard and its file (n, splits and errors then describe that shard only); per
    # shard: index, rows, images_computed, compute_seconds (and reused, under torchrun).
    shards: int = 1
    shard_index: int | None = None
    shard_file: Path | None = None
    shard_runs: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cache"] = str(self.cache)
        d["shard_file"] = str(self.shard_file) if self.shard_file else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractResult":
        d = dict(d)
        d["cache"] = Path(d["cache"])
        d["shard_file"] = Path(d["shard_file"]) if d.get("shard_file") else None
        return cls(**d)


@dataclass
class ExtractJob:
    """Everything one extraction needs, resolved once (device, precision, batch size...).

    ``bb`` is built only when rows must be computed; a cache hit never needs it.
    """

    images: ImageSet
    backbone: str  # the spec's name, as recorded in the cache
    layer: str
    fp: str
    path: Path  # the final cache
    device: str
    precision: str
    batch_size: int
    workers: int
    chunk_batches: int
    progress: bool
    t0: float
    build: Callable[[], "Backbone"] | None = None
    bb: Any = None
    # further layers to store, as asked (module names, or ("auto",)); () for the features only
    layers: tuple[str, ...] = ()

    @property
    def device_kind(self) -> str:
        return "cuda" if self.device.startswith("cuda") else self.device

    def backbone_model(self) -> "Backbone":
        """The network, built on first use."""
        if self.bb is None:
            self.bb = self.build()
        return self.bb


def count_splits(split: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in split:
        out[s] = out.get(s, 0) + 1
    return out


def rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


def make_result(*, cache: Path, attrs: dict[str, Any], n: int, dim: int, split: Sequence[str] | None = None,
                splits: dict[str, int] | None = None, errors: Sequence[dict[str, str]] = (),
                t0: float, cache_hit: bool, class_names: Sequence[str], computed: int = 0,
                compute_seconds: float = 0.0, layers: dict[str, int] | None = None,
                **extra: Any) -> ExtractResult:
    """The one place an :class:`ExtractResult` is made: from a cache's (or shard's) attributes
    plus what this call did; ``extra`` sets the scale-out fields."""
    return ExtractResult(
        cache=Path(cache), n=int(n), dim=int(dim),
        splits=dict(splits) if splits is not None else count_splits(split or []),
        errors=[dict(e) for e in errors], seconds=time.perf_counter() - t0,
        images_per_second=rate(computed, compute_seconds), cache_hit=cache_hit,
        backbone=str(attrs.get("backbone", "")), layer=str(attrs.get("layer", "")),
        precision=str(attrs.get("precision", "")), device=str(attrs.get("device", "")),
        fingerprint=str(attrs.get("fingerprint", "")), class_names=[str(c) for c in class_names],
        layers=dict(layers or {}), **extra)


def cache_hit(path: Path, fp: str, t0: float, **overrides: Any) -> ExtractResult | None:
    """The result for a complete cache at ``path`` made from the inputs of fingerprint ``fp``,
    else None (no file, another dataset or options, or a file this version cannot read)."""
    if not path.exists():
        return None
    try:
        if read_attrs(path).get("fingerprint") != fp:
            return None
        s = summarize(path)
    except CacheError:
        return None
    attrs = {**s["attrs"], **overrides}
    return make_result(cache=path, attrs=attrs, n=s["n"], dim=s["dim"], splits=s["splits"],
                       errors=s["errors"], t0=t0, cache_hit=True, class_names=s["class_names"],
                       shards=int(s["attrs"].get("shards", 1) or 1), layers=s.get("layers"))


def reuse_or_compute(target: Path, *, hit: Callable[[], ExtractResult | None],
                     compute: Callable[[], ExtractResult], what: str,
                     force: bool = False) -> ExtractResult:
    """Return ``hit()`` when the work is done, else compute it under ``target``'s lock.

    The hit is checked before the lock (a finished cache needs no write access, so caches can be
    shared read-only) and again once the lock is held (another process may have finished it
    while this one waited).
    """
    if not force:
        res = hit()
        if res is not None:
            return res
    ensure_dir(target.parent)
    with file_lock(target.with_name(target.name + ".lock"), what=what):
        res = None if force else hit()
        return res if res is not None else compute()
