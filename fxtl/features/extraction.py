"""Run a frozen backbone once over a dataset and cache the embeddings (``fxtl extract``).

The entry point: it resolves the options into an :class:`~fxtl.features.job.ExtractJob`, answers
from a finished cache when one matches (without building the network: the fingerprint comes from
the registry's weights hash and preprocessing), and otherwise computes the rows in one process
(:mod:`.chunks`), as one shard of several (:mod:`.shards`) or across torchrun ranks
(:mod:`.torchrun`). A lock file makes a second process on the same cache wait, then reuse it.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from ..backbones.folding import INFERENCE_GRAPH
from ..backbones.registry import (DEFAULT_BACKBONE, WeightsIdentity, load_backbone,
                                  parse_backbone_name, weights_identity)
from ..backbones.spec import AUTO_LAYERS
from .._util import default_cache_dir, slug
from ..data.discovery import ImageSet, discover, fingerprint
from ..distributed import place_rank, torchrun_env
from ..errors import CacheError, DataError, ParameterError, ProvenanceError
from ..runtime import resolve_device, resolve_precision
from .chunks import chunk_errors, compute_rows, write_rows
from .embedding import default_batch_size, default_workers, embed_paths
from .job import ExtractJob, ExtractResult, cache_hit, make_result, reuse_or_compute
from .shards import SHARD_FORMAT, extract_shard, job_attrs, merge_shards
from .store import FORMAT_VERSION, read_attrs
from .torchrun import extract_torchrun

__all__ = ["extract", "merge_shards", "ExtractResult", "embed_paths", "cache_path_for",
           "planned_cache_path", "cache_fingerprint", "parse_layers", "default_batch_size",
           "default_workers", "SHARD_FORMAT"]


def cache_path_for(images: ImageSet, backbone: str, fp: str, cache_dir: Path) -> Path:
    """``<cache-dir>/<dataset>-<backbone>-<fingerprint[:16]>.h5``."""
    return Path(cache_dir) / f"{slug(images.name)}-{slug(Path(backbone).name)}-{fp[:16]}.h5"


def cache_fingerprint(images: ImageSet, *, backbone: str, identity: WeightsIdentity, layer: str,
                      precision: str, layers: Sequence[str] = ()) -> str:
    """What a cache's features depend on: the files, the weights, the preprocessing, the layer,
    the precision, the inference-graph recipe, the format version and the further layers asked
    for (``auto`` as the recipe that picks them); none needs a network."""
    parts: dict[str, Any] = {}
    if layers:  # absent when none, so a cache of the features alone keeps its key
        parts["layers"] = [AUTO_LAYERS if name == "auto" else name for name in layers]
    return fingerprint(images, backbone=backbone, weights_sha256=identity.weights_sha256,
                       preprocessing=identity.preprocessing.to_dict(), layer=layer,
                       precision=precision, graph=INFERENCE_GRAPH, format_version=FORMAT_VERSION,
                       **parts)


def planned_cache_path(data: str | Path | ImageSet, *, backbone: str = DEFAULT_BACKBONE,
                       layer: str | None = None, layers: str | Sequence[str] | None = None,
                       precision: str = "auto", device: str = "auto",
                       cache_dir: str | Path | None = None,
                       identity: WeightsIdentity | None = None) -> Path | None:
    """The cache file :func:`extract` with these options writes (or reuses), without extracting.

    The same rule as :func:`extract` (:func:`cache_fingerprint` into :func:`cache_path_for`), so
    a command printed for later (``fxtl advise``'s "Next:") can name the file it will produce.

    Parameters
    ----------
    data : str, Path or ImageSet
        DATA_DIR, a CSV manifest, or the images already discovered from it.
    backbone, layer, layers, precision, device, cache_dir
        As for :func:`extract`.
    identity : WeightsIdentity, optional
        The weights hash and preprocessing of a network already built (``Backbone.weights_sha256``,
        ``.preprocessing``), for backbones whose weights only a built network knows.

    Returns
    -------
    Path or None
        ``None`` when the weights' hash cannot be known without building the network (hub
        weights) and no ``identity`` was given.
    """
    images = data if isinstance(data, ImageSet) else discover(data)
    spec = parse_backbone_name(backbone)
    identity = weights_identity(spec) or identity
    if identity is None:
        return None
    precision = resolve_precision(precision, resolve_device(device))
    return _cache_target(images, spec.name, identity=identity, layer=layer or "pooled",
                         precision=precision, layers=parse_layers(layers), cache_dir=cache_dir)[1]


def _cache_target(images: ImageSet, backbone: str, *, identity: WeightsIdentity, layer: str,
                  precision: str, layers: tuple[str, ...], cache_dir: str | Path | None
                  ) -> tuple[str, Path]:
    """The fingerprint and default file of a cache (``extract`` and ``planned_cache_path``)."""
    fp = cache_fingerprint(images, backbone=backbone, identity=identity, layer=layer,
                           precision=precision, layers=layers)
    return fp, cache_path_for(images, backbone, fp, Path(cache_dir) if cache_dir else default_cache_dir())


def parse_layers(layers: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"auto"``, ``"blocks.4,blocks.5"`` or a sequence of module names -> a tuple without
    duplicates; the penultimate features (``pooled``, ``penultimate``) are always stored, so
    they are dropped here.

    Examples
    --------
    >>> parse_layers("blocks.4, blocks.5,blocks.4,pooled")
    ('blocks.4', 'blocks.5')
    >>> parse_layers("auto"), parse_layers(None)
    (('auto',), ())
    """
    if layers is None:
        return ()
    names = layers.split(",") if isinstance(layers, str) else list(layers)
    if not all(isinstance(v, str) for v in names):
        raise ParameterError("layers", f"layers must be 'auto' or module names, got {layers!r}")
    out: list[str] = []
    for name in (v.strip() for v in names):
        if name and name not in out and name not in ("pooled", "penultimate"):
            out.append(name)
    if "auto" in out and len(out) > 1:
        raise ParameterError("layers", "layers='auto' picks the layers itself; pass 'auto' alone "
                             "or a list of module names")
    return tuple(out)


def extract(data: str | Path, *, backbone: str = DEFAULT_BACKBONE, layer: str | None = None,
            layers: str | Sequence[str] | None = None, precision: str = "auto",
            device: str = "auto", batch_size: int | None = None, workers: int | None = None,
            cache_dir: str | Path | None = None, output: str | Path | None = None,
            chunk_batches: int = 8, progress: bool = True,
            force: bool = False, shard: tuple[int, int] | None = None,
            distributed: bool | None = None) -> ExtractResult:
    """Extract features of every image under ``data`` into an HDF5 cache (or reuse one).

    ----------
    data : str or Path
        DATA_DIR (class folders or split folders) or a CSV manifest.
    backbone : str
        Backbone name (see ``fxtl backbones``); default ``lite0`` (offline).
    layer : str, optional
        Intermediate layer to pool instead of the penultimate features.
    layers : "auto", str or sequence of str, optional
        Further layers whose average-pooled outputs are stored beside the features, from the same
        forward pass, each as ``/layers/<name>`` (``FeatureCache.layer(name)``): ``"auto"`` picks
        the backbone's later stages (``blocks.2`` ... ``blocks.6`` for lite0), or module names
        (a list, or one comma-separated string; ``fxtl backbones --layers NAME`` lists them).
    precision : {"auto", "fp32", "bf16", "fp16"}
    device : {"auto", "cpu", "cuda"}
    batch_size : int, optional
        Images per forward pass [default: 128 on CUDA; on CPU 16 at bf16, 4 at fp32].
    workers : int, optional
        Decoding processes [default: up to 8 on CUDA; none on CPU, where a thread pool decodes
        each batch on all cores].
    cache_dir : path, optional
        Where the cache goes (default ``./cache`` or ``$FXTL_CACHE``).
    output : path, optional
        Explicit cache file path instead of the fingerprint-derived name. An existing file there
        is replaced only if it is a cache of the same dataset (or with ``force``).
    chunk_batches : int
        Batches per saved chunk: the most work a kill can lose.
    force : bool
        Re-extract even when a matching cache (or shard file) exists.
    shard : (int, int), optional
        ``(I, N)``: extract only shard I of N (I counts from 0) into
        ``<cache>.shards/shard-IIIII-of-NNNNN.h5``, for array jobs; ``merge_shards`` (``fxtl
        merge``) assembles the cache once all N exist. The result then describes that shard.
    distributed : bool, optional
        ``None`` (default): when launched by torchrun (``WORLD_SIZE`` > 1), every rank extracts
        its own shard and rank 0 merges them; every rank returns the merged cache's result.
        ``False`` ignores torchrun's variables; ``True`` insists on them.

    Returns
    -------
    ExtractResult

    Raises
    ------
    ParameterError
        A bad ``batch_size``, ``chunk_batches``, ``shard``, ``distributed``, ``device`` or
        ``precision``, or an ``output`` that holds something else than a cache of this dataset.
    DataError, BackboneError, CacheError
        The dataset, the backbone or the disk cannot be used; one line naming the file.

    Examples
    --------
    >>> res = extract("data/hymenoptera")   # doctest: +SKIP
    >>> res.n, res.dim, res.cache_hit       # doctest: +SKIP
    (398, 1280, False)
    >>> extract("data/hymenoptera", shard=(1, 4)).shard_file   # doctest: +SKIP
    PosixPath('cache/hymenoptera-lite0-1e2b80d0e2303460.h5.shards/shard-00001-of-00004.h5')
    """
    t0 = time.perf_counter()
    _check_options(batch_size=batch_size, workers=workers, chunk_batches=chunk_batches)
    env = None if distributed is False else torchrun_env()
    if distributed and env is None:
        raise ParameterError("distributed", "distributed=True, but this process was not launched "
                             "by torchrun (WORLD_SIZE unset or 1); launch with `torchrun -m fxtl extract`")
    if shard is not None:
        shard = _check_shard(shard, torchrun=env is not None)
    layers = parse_layers(layers)
    if layers and (shard is not None or env is not None):
        raise ParameterError("layers", "layers cannot be combined with shard or torchrun yet "
                             "(merging keeps only the features); extract in one process")
    images = discover(data)
    device = resolve_device(device)
    rank_workers = None
    if env is not None:
        device, rank_workers = place_rank(env, device)
    precision = resolve_precision(precision, device)
    spec = parse_backbone_name(backbone)
    identity = weights_identity(spec)
    built = None
    if identity is None:  # only a built network knows its weights (hub weights...)
        built = load_backbone(backbone, layer=layer, layers=layers, inference=True)
        identity = WeightsIdentity(built.weights_sha256, built.preprocessing)
    layer_name = layer or "pooled"
    fp, path = _cache_target(images, spec.name, identity=identity, layer=layer_name,
                             precision=precision, layers=layers, cache_dir=cache_dir)
    path = Path(output) if output else path

    def build():
        bb = built or load_backbone(backbone, layer=layer, layers=layers, inference=True)
        if bb.weights_sha256 != identity.weights_sha256:
            raise ProvenanceError(f"the weights of {spec.name} changed while extracting "
                                  f"(sha256 {bb.weights_sha256[:12]}, expected "
                                  f"{identity.weights_sha256[:12]}); run again")
        return bb

    if workers is None:
        workers = default_workers(device) if rank_workers is None else rank_workers
    job = ExtractJob(images=images, backbone=spec.name, layer=layer_name, fp=fp, path=path,
                     device=device, precision=precision,
                     batch_size=batch_size or default_batch_size(device, precision),
                     workers=workers, chunk_batches=chunk_batches, progress=progress, t0=t0,
                     build=build, bb=built, layers=layers)

    def hit() -> ExtractResult | None:
        return cache_hit(path, fp, t0)

    if env is not None:
        return extract_torchrun(job, env, force=force, find_hit=hit)
    if shard is not None:
        res = None if force else hit()  # the merged cache exists: nothing to do
        return res if res is not None else extract_shard(job, *shard, force=force)

    def compute() -> ExtractResult:
        if output is not None and not force:
            _refuse_foreign_output(path, images)
        return _extract_locked(job)

    return reuse_or_compute(path, hit=hit, compute=compute, force=force,
                            what=f"the cache {path.name}")


def _check_options(**values: int | None) -> None:
    for name, value in values.items():
        least = 0 if name == "workers" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ParameterError(name, f"{name} must be an integer >= {least}, got {value!r}")


def _check_shard(shard: Any, *, torchrun: bool) -> tuple[int, int]:
    if torchrun:
        raise ParameterError("shard", "shard cannot be combined with torchrun, which gives each "
                             "rank its own shard; drop shard (or launch without torchrun)")
    try:
        index, count = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ParameterError("shard", f"shard must be a pair (I, N), got {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ParameterError("shard", f"shard ({index}, {count}): need 0 <= I < N (I counts from 0)")
    return index, count


def _refuse_foreign_output(path: Path, images: ImageSet) -> None:
    """An explicit output may replace a cache of the same dataset, never another file."""
    if not path.exists():
        return
    try:
        attrs = read_attrs(path)
    except CacheError:
        raise ParameterError("output", f"{path} exists and is not an fxtl cache this version can "
                             "read; pass force=True to replace it or choose another output") from None
    root = attrs.get("dataset_root")
    if root is not None and str(root) != str(images.root):
        raise ParameterError("output", f"{path} holds the features of another dataset ({root}); "
                             "pass force=True to replace it or choose another output")


def _extract_locked(job: ExtractJob) -> ExtractResult:
    """One process, all rows: chunks in ``<cache>.parts/``, then the cache (the lock is held)."""
    images, path = job.images, job.path
    for tmp in path.parent.glob(path.name + ".*.partial"):  # of a killed run: none is live
        tmp.unlink(missing_ok=True)
    n = len(images)
    comp = compute_rows(job, path.with_name(path.name + ".parts"), 0, n, label=path.name)
    errors = chunk_errors(comp)
    if len(errors) == n:
        raise DataError(f"none of the {n} images under {images.root} could be decoded "
                        f"(first: {images.samples[0].path}: {errors.get(0)})")
    samples = write_rows(job, path, comp, errors)
    shutil.rmtree(comp.parts, ignore_errors=True)
    return make_result(cache=path, attrs=job_attrs(job), n=len(samples),
                       dim=job.backbone_model().feature_dim, split=[s.split for s in samples],
                       errors=[{"path": images.samples[i].path, "reason": r}
                               for i, r in sorted(errors.items())],
                       t0=job.t0, cache_hit=False, class_names=images.class_names,
                       computed=comp.computed, compute_seconds=comp.compute_seconds,
                       resumed_rows=comp.resumed_rows,
                       layers={n: job.backbone_model().layer_dims[n]
                               for n in (job.backbone_model().extra_layers if job.layers else ())})
