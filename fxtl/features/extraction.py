"""Run a frozen backbone once over a dataset and cache the embeddings (``fxtl extract``).

Speed comes from what the field knows: DataLoader workers decode (with JPEG draft mode) while
the main process computes; uint8 tensors cross process boundaries; ``inference_mode``,
``channels_last`` and bf16 autocast where the hardware runs it natively; pinned memory and
non-blocking copies on CUDA.

Robustness: rows are computed in chunks, each saved atomically to ``<cache>.parts/``; a run
killed at any point (SIGKILL included) resumes at the first missing chunk with the same batch
boundaries, so features are identical to an uninterrupted run. The cache appears at its final
path in one rename. A lock file makes a second process on the same cache wait, then reuse it.

Scale: the same rows can be computed as shards (``fxtl/distributed.py`` plans them), either one
per torchrun rank or one per ``--shard I/N`` call; each shard has its own ``.parts/`` chunks (so
a crashed rank redoes only its own shard) and ends as a shard file; ``merge_shards`` streams the
shard files, in order, into one cache identical in rows, order and provenance to a
single-process run. Memory never grows with the number of images: features go to disk chunk by
chunk and are streamed from there into the cache; only paths, labels and splits are held.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .. import __version__
from .._util import slug, atomic_path, atomic_write_json, ensure_dir, file_lock, now_iso, say, versions
from ..backbones.registry import DEFAULT_BACKBONE, load_backbone
from ..data.discovery import ImageDataset, ImageSet, discover, fingerprint
from ..data.images import collate_images
from ..errors import CacheError, DataError, FxtlError
from ..runtime import autocast, keep_freed_memory, resolve_device, resolve_precision
from .store import FORMAT_VERSION, read_attrs, write_cache

if TYPE_CHECKING:  # the class is built lazily (importing it imports torch)
    from ..backbones.registry import Backbone

__all__ = ["extract", "merge_shards", "ExtractResult", "embed_paths", "cache_path_for",
           "default_batch_size", "default_workers", "SHARD_FORMAT"]

# ``format`` attribute of a shard file: a fraction of a cache, never to be read as a whole one
# (docs/cache-format.md, "Shard files").
SHARD_FORMAT = "fxtl-features-shard"
# Root attributes only a shard file carries; the merged cache drops them.
_SHARD_ATTRS = ("shard_index", "shard_count", "row_start", "row_stop", "n_total", "cache_name")


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


def default_batch_size(device: str, precision: str = "bf16") -> int:
    """Images per forward pass: large on CUDA; on CPU the size that runs fastest per image.

    Measured on the 2-core EPYC (lite0, model only): bf16 100/105/129/122 img/s at batch
    4/8/16/32, fp32 105/91/75/56 -- fp32 slows down as activations outgrow the caches.
    """
    if device.startswith("cuda"):
        return 128
    return 4 if precision == "fp32" else 16


def default_workers(device: str) -> int:
    """Decoding worker processes: several on CUDA (decode overlaps the GPU), none on CPU.

    On CPU every core is already busy computing, and a worker process stealing a core makes
    torch's OpenMP threads wait for each other (measured on 2 cores: 63 img/s with a worker
    vs 105 model-only). Instead each batch is decoded by a thread pool on all cores, then
    computed on all cores: the two phases take turns and nothing contends.
    """
    if device.startswith("cuda"):
        from ..distributed import available_cores

        return max(1, min(8, available_cores() - 1))
    return 0



def cache_path_for(images: ImageSet, backbone: str, fp: str, cache_dir: Path) -> Path:
    """``<cache-dir>/<dataset>-<backbone>-<fingerprint[:16]>.h5``."""
    return Path(cache_dir) / f"{slug(images.name)}-{slug(Path(backbone).name)}-{fp[:16]}.h5"


def _make_loader(dataset, *, batch_size: int, workers: int, device: str):
    """Batches of ``(uint8 images, indices, errors)``: worker processes, or a decode thread pool."""
    import torch

    if workers == 0:
        return _ThreadedBatches(dataset, batch_size=batch_size, threads=torch.get_num_threads())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       collate_fn=collate_images,
                                       num_workers=workers, pin_memory=device.startswith("cuda"),
                                       prefetch_factor=4, persistent_workers=False)


class _ThreadedBatches:
    """Decode each batch with ``threads`` threads (Pillow releases the GIL while decoding and
    resizing), in order; the same batches as a DataLoader with ``shuffle=False``."""

    def __init__(self, dataset, *, batch_size: int, threads: int):
        self.dataset, self.batch_size, self.threads = dataset, batch_size, max(1, threads)

    def __len__(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        from concurrent.futures import ThreadPoolExecutor

        n = len(self.dataset)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="fxtl-decode") as pool:
            for lo in range(0, n, self.batch_size):
                yield collate_images(list(pool.map(self.dataset.__getitem__,
                                                   range(lo, min(n, lo + self.batch_size)))))


def embed_paths(backbone: Backbone, paths: Sequence[str | Path], *, device: str = "auto",
                precision: str = "auto", batch_size: int | None = None, workers: int | None = None,
                with_logits: bool = False, progress: bool = False,
                desc: str = "embed") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                       list[tuple[int, str]]]]:
    """Run ``backbone`` over image files, batch by batch.

    Yields ``(indices, features, logits_or_None, errors)`` per batch, where ``errors`` lists
    ``(index, reason)`` for images that could not be decoded (their feature rows are garbage
    and must be dropped by the caller). Used by ``extract`` and ``predict``.
    """
    import torch

    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    batch_size = batch_size or default_batch_size(device, precision)
    workers = default_workers(device) if workers is None else workers
    if device == "cpu":
        keep_freed_memory()
    backbone = backbone.to(device=device, memory_format=torch.channels_last).eval()
    loader = _make_loader(ImageDataset(paths, backbone.preprocessing), batch_size=batch_size,
                          workers=min(workers, max(0, (len(paths) + batch_size - 1) // batch_size)),
                          device=device)
    bar = _progress(len(paths), desc, progress)
    try:
        with torch.inference_mode(), autocast(device, precision):
            for x, idx, errs in loader:
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                if with_logits:
                    feats, logits = backbone.forward_with_logits(x)
                    logits = logits.float().cpu().numpy()
                else:
                    feats, logits = backbone(x), None
                bad = [(int(i), e) for i, e in zip(idx.tolist(), errs) if e]
                bar.update(len(idx))
                yield idx.numpy(), feats.float().cpu().numpy(), logits, bad
    finally:
        bar.close()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


def extract(data: str | Path, *, backbone: str = DEFAULT_BACKBONE, layer: str | None = None,
            precision: str = "auto", device: str = "auto", batch_size: int | None = None,
            workers: int | None = None, cache_dir: str | Path | None = None,
            output: str | Path | None = None, chunk_batches: int = 8, progress: bool = True,
            force: bool = False, shard: tuple[int, int] | None = None,
            distributed: bool | None = None) -> ExtractResult:
    """Extract features of every image under ``data`` into an HDF5 cache (or reuse one).

    Parameters
    ----------
    data : str or Path
        DATA_DIR (class folders or split folders) or a CSV manifest.
    backbone : str
        Backbone name (see ``fxtl backbones``); default ``lite0`` (offline).
    layer : str, optional
        Intermediate layer to pool instead of the penultimate features.
    precision : {"auto", "fp32", "bf16", "fp16"}
    device : {"auto", "cpu", "cuda"}
    batch_size, workers : int, optional
        Defaults depend on the device (32 and one decode worker per spare core on CPU).
    cache_dir : path, optional
        Where the cache goes (default ``./cache`` or ``$FXTL_CACHE``).
    output : path, optional
        Explicit cache file path instead of the fingerprint-derived name.
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

    Examples
    --------
    >>> res = extract("data/hymenoptera")   # doctest: +SKIP
    >>> res.n, res.dim, res.cache_hit       # doctest: +SKIP
    (398, 1280, False)
    >>> extract("data/hymenoptera", shard=(1, 4)).shard_file   # doctest: +SKIP
    PosixPath('cache/hymenoptera-lite0-1e2b80d0e2303460.h5.shards/shard-00001-of-00004.h5')
    """
    from .._util import default_cache_dir
    from ..distributed import place_rank, torchrun_env

    t0 = time.perf_counter()
    if batch_size is not None and batch_size < 1:
        raise FxtlError(f"batch size must be at least 1 (got {batch_size})")
    env = None if distributed is False else torchrun_env()
    if distributed and env is None:
        raise FxtlError("distributed extraction asked for, but this process was not launched by "
                        "torchrun (WORLD_SIZE unset or 1); launch with `torchrun -m fxtl extract`")
    if shard is not None:
        if env is not None:
            raise FxtlError("--shard cannot be combined with torchrun, which gives each rank its "
                            "own shard; drop --shard (or launch without torchrun)")
        index, count = (int(v) for v in shard)
        if count < 1 or not 0 <= index < count:
            raise FxtlError(f"shard {index}/{count}: need 0 <= I < N (I counts from 0)")
    images = discover(data)
    device = resolve_device(device)
    rank_workers = None
    if env is not None:
        device, rank_workers = place_rank(env, device)
    precision = resolve_precision(precision, device)
    bb = load_backbone(backbone, layer=layer, inference=True)
    pre = bb.preprocessing.to_dict()
    fp = fingerprint(images, backbone=bb.spec.name, weights_sha256=bb.weights_sha256,
                     preprocessing=pre, layer=bb.layer, precision=precision, graph=bb.graph,
                     format_version=FORMAT_VERSION)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path = Path(output) if output else cache_path_for(images, bb.spec.name, fp, cache_dir)
    if workers is None:
        workers = default_workers(device) if rank_workers is None else rank_workers
    job = _Job(images=images, bb=bb, path=path, fp=fp, device=device, precision=precision,
               batch_size=batch_size or default_batch_size(device, precision), workers=workers,
               chunk_batches=chunk_batches, progress=progress, t0=t0)
    if env is not None:
        return _extract_torchrun(job, env, force=force)
    if shard is not None:
        res = None if force else _hit_result(job)  # the merged cache exists: nothing to do
        return res if res is not None else _extract_shard(job, index, count, force=force)

    res = None if force else _hit_result(job)  # a hit needs no write access: caches can be shared read-only
    if res is not None:
        return res
    if output is not None and not force:
        _refuse_foreign_output(path)
    ensure_dir(path.parent)
    with file_lock(path.with_name(path.name + ".lock"), what=f"the cache {path.name}"):
        res = None if force else _hit_result(job)  # another process may have finished it while we waited
        if res is not None:
            return res
        _remove_stale_temporaries(path)
        return _extract_locked(job)


def _refuse_foreign_output(path: Path) -> None:
    """An explicit ``--output`` may replace an fxtl cache, never some other file."""
    if not path.exists():
        return
    try:
        read_attrs(path)
    except CacheError:
        raise FxtlError(f"--output {path} exists and is not an fxtl cache this version can read; "
                        "pass --force to replace it or choose another path") from None


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of a run killed while writing the final file (we hold the lock: none is live)."""
    for tmp in path.parent.glob(path.name + ".*.partial"):
        tmp.unlink(missing_ok=True)


@dataclass
class _Job:
    """Everything one extraction needs, resolved once (device, precision, batch size...)."""

    images: ImageSet
    bb: Backbone
    path: Path  # the final cache
    fp: str
    device: str
    precision: str
    batch_size: int
    workers: int
    chunk_batches: int
    progress: bool
    t0: float

    @property
    def device_kind(self) -> str:
        return "cuda" if self.device.startswith("cuda") else self.device


def _hit_result(job: _Job) -> ExtractResult | None:
    """The result for an existing cache at ``job.path`` made from the same inputs, else None."""
    path = job.path
    if not path.exists():
        return None
    try:
        attrs = read_attrs(path)
    except CacheError:
        return None
    if attrs.get("fingerprint") != job.fp:  # e.g. an explicit --output holding another cache
        return None
    from .store import summarize

    s = summarize(path)
    return ExtractResult(cache=path, n=s["n"], dim=s["dim"], splits=s["splits"],
                         errors=s["errors"], seconds=time.perf_counter() - job.t0,
                         images_per_second=0.0, cache_hit=True, backbone=job.bb.spec.name,
                         layer=job.bb.layer, precision=job.precision, device=job.device_kind,
                         fingerprint=job.fp, class_names=s["class_names"],
                         shards=int(attrs.get("shards", 1) or 1))


# ----------------------------------------------------------------------------- rows -> chunks
@dataclass
class _Computed:
    """What computing a block of rows into a ``.parts/`` folder left there."""

    parts: Path
    lo: int
    hi: int
    chunk_rows: int
    batch_size: int
    computed: int
    compute_seconds: float
    resumed_rows: int

    @property
    def n_chunks(self) -> int:
        return (self.hi - self.lo + self.chunk_rows - 1) // self.chunk_rows

    def chunk_file(self, k: int) -> Path:
        return self.parts / f"chunk-{k:06d}.npz"


def _compute_rows(job: _Job, parts: Path, lo: int, hi: int, *, label: str,
                  desc: str = "extract") -> _Computed:
    """Embed rows ``[lo, hi)`` of the dataset into chunk files in ``parts`` (resuming).

    Chunk k holds rows ``lo + k*chunk_rows ...``; a chunk's error indices are relative to ``lo``.
    """
    images = job.images
    n = hi - lo
    meta = {"fingerprint": job.fp, "n": n, "rows": [lo, hi], "batch_size": job.batch_size,
            "chunk_rows": job.batch_size * job.chunk_batches}
    meta_path = parts / "meta.json"
    if parts.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        if old and old.get("fingerprint") == job.fp and old.get("n") == n and \
                list(old.get("rows", [0, old.get("n")])) == [lo, hi]:
            meta = old  # resume with the same batch boundaries, so rows come out identical
        else:
            shutil.rmtree(parts, ignore_errors=True)
    ensure_dir(parts)
    if not meta_path.exists():
        atomic_write_json(meta_path, meta)
    chunk_rows = int(meta["chunk_rows"])
    batch_size = int(meta["batch_size"])
    n_chunks = (n + chunk_rows - 1) // chunk_rows
    done = {k for k in range(n_chunks) if _chunk_ok(parts, k)}
    todo = [k for k in range(n_chunks) if k not in done]
    resumed_rows = sum(min(chunk_rows, n - k * chunk_rows) for k in done)
    if resumed_rows:
        print(f"fxtl: resuming {label}: {resumed_rows}/{n} images already done", file=sys.stderr)

    t_compute = time.perf_counter()
    computed = 0
    # Contiguous runs of missing chunks are embedded in one loader each.
    for start_chunk, stop_chunk in _runs(todo):
        a, b = lo + start_chunk * chunk_rows, lo + min(n, stop_chunk * chunk_rows)
        paths = [str(images.abspath(s)) for s in images.samples[a:b]]
        buf_f: list[np.ndarray] = []
        buf_err: list[tuple[int, str]] = []
        k = start_chunk
        filled = 0
        for idx, feats, _, bad in embed_paths(job.bb, paths, device=job.device,
                                               precision=job.precision, batch_size=batch_size,
                                               workers=job.workers, progress=job.progress,
                                               desc=desc):
            buf_f.append(feats)
            buf_err.extend((a - lo + i, reason) for i, reason in bad)
            filled += len(idx)
            computed += len(idx)
            for i, reason in bad:
                say(f"fxtl: skipped {images.samples[a + i].path}: {reason}")
            rows_this_chunk = min(chunk_rows, n - k * chunk_rows)
            if filled == rows_this_chunk:
                _save_chunk(parts, k, np.concatenate(buf_f), buf_err)
                _fault_point(k)
                buf_f, buf_err, filled, k = [], [], 0, k + 1
        if filled:
            raise FxtlError("internal: extraction ended inside a chunk")
    return _Computed(parts=parts, lo=lo, hi=hi, chunk_rows=chunk_rows, batch_size=batch_size,
                     computed=computed, compute_seconds=time.perf_counter() - t_compute,
                     resumed_rows=resumed_rows)


def _chunk_errors(comp: _Computed) -> dict[int, str]:
    """Undecodable images of the computed rows: global row index -> reason."""
    errors: dict[int, str] = {}
    for k in range(comp.n_chunks):
        with np.load(comp.chunk_file(k)) as z:
            errors.update({comp.lo + int(i): str(r) for i, r in zip(z["err_index"], z["err_reason"])})
    return errors


def _kept_features(comp: _Computed, errors: dict[int, str]) -> Iterator[np.ndarray]:
    """The feature rows of the usable images, one chunk at a time (memory independent of n)."""
    for k in range(comp.n_chunks):
        with np.load(comp.chunk_file(k)) as z:
            feats = z["features"]
        base = comp.lo + k * comp.chunk_rows
        keep = [i - base for i in range(base, base + len(feats)) if i not in errors]
        yield feats[keep]


def _attrs_for(job: _Job, timings: dict[str, Any]) -> dict[str, Any]:
    bb, images = job.bb, job.images
    return {
        "backbone": bb.spec.name, "architecture": bb.spec.arch, "weights_sha256": bb.weights_sha256,
        "preprocessing": bb.preprocessing.to_dict(), "precision": job.precision, "layer": bb.layer,
        "graph": bb.graph, "fingerprint": job.fp, "created": now_iso(), "fxtl_version": __version__,
        "versions": versions(), "device": job.device_kind, "dataset_root": str(images.root),
        "dataset_name": images.name, "dataset_layout": images.layout, "timings": timings,
    }


def _write_rows(job: _Job, target: Path, comp: _Computed, errors: dict[int, str],
                extra_attrs: dict[str, Any] | None = None):
    """Write the usable rows of ``comp`` to ``target`` (cache layout); returns the kept samples."""
    images = job.images
    samples = [images.samples[i] for i in range(comp.lo, comp.hi) if i not in errors]
    timings = {"compute_seconds": round(comp.compute_seconds, 3), "images_computed": comp.computed,
               "batch_size": comp.batch_size}
    attrs = {**_attrs_for(job, timings), **(extra_attrs or {})}
    write_cache(target, chunks=_kept_features(comp, errors), n=len(samples), dim=job.bb.feature_dim,
                labels=[s.label for s in samples], paths=[s.path for s in samples],
                split=[s.split for s in samples], class_names=images.class_names,
                errors=[(images.samples[i].path, r) for i, r in sorted(errors.items())], attrs=attrs)
    return samples


def _count_splits(split: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in split:
        out[s] = out.get(s, 0) + 1
    return out


def _extract_locked(job: _Job) -> ExtractResult:
    """One process, all rows: chunks in ``<cache>.parts/``, then the cache (the lock is held)."""
    images, path = job.images, job.path
    n = len(images)
    comp = _compute_rows(job, path.with_name(path.name + ".parts"), 0, n, label=path.name)
    # Assemble the final file from the chunks, streaming (memory does not grow with n).
    errors = _chunk_errors(comp)
    if len(errors) == n:
        raise DataError(f"none of the {n} images under {images.root} could be decoded "
                        f"(first: {images.samples[0].path}: {errors.get(0)})")
    samples = _write_rows(job, path, comp, errors)
    shutil.rmtree(comp.parts, ignore_errors=True)
    return _computed_result(job, comp, samples, errors, cache=path)


def _computed_result(job: _Job, comp, samples, errors: dict[int, str], *, cache: Path,
                     **extra: Any) -> ExtractResult:
    """The result of rows just computed (a whole cache, or one shard with ``extra`` fields)."""
    images = job.images
    return ExtractResult(cache=cache, n=len(samples), dim=job.bb.feature_dim,
                         splits=_count_splits([s.split for s in samples]),
                         errors=[{"path": images.samples[i].path, "reason": r}
                                 for i, r in sorted(errors.items())],
                         seconds=time.perf_counter() - job.t0,
                         images_per_second=_rate(comp.computed, comp.compute_seconds),
                         cache_hit=False, resumed_rows=comp.resumed_rows, backbone=job.bb.spec.name,
                         layer=job.bb.layer, precision=job.precision, device=job.device_kind,
                         fingerprint=job.fp, class_names=images.class_names, **extra)


def _rate(images: int, seconds: float) -> float:
    return images / seconds if seconds > 0 else 0.0


# ----------------------------------------------------------------------------- shards
def _extract_shard(job: _Job, index: int, count: int, *, force: bool) -> ExtractResult:
    """Shard ``index`` of ``count`` into its shard file (reused when complete, else resumed)."""
    from ..distributed import shard_path, shard_rows

    lo, hi = shard_rows(len(job.images), count, job.batch_size)[index]
    spath = shard_path(job.path, index, count)
    res = None if force else _shard_hit(job, spath, index, count, lo, hi)
    if res is not None:
        return res
    ensure_dir(spath.parent)
    with file_lock(spath.with_name(spath.name + ".lock"), what=f"shard {index}/{count} of {job.path.name}"):
        res = None if force else _shard_hit(job, spath, index, count, lo, hi)
        if res is not None:
            return res
        comp = _compute_rows(job, spath.with_name(spath.name + ".parts"), lo, hi,
                             label=f"{job.path.name} shard {index}/{count}",
                             desc=f"extract {index}/{count}")
        errors = _chunk_errors(comp)
        extra = {"shard_index": index, "shard_count": count, "row_start": lo, "row_stop": hi,
                 "n_total": len(job.images), "cache_name": job.path.name}
        with atomic_path(spath) as tmp:  # a shard file too appears complete or not at all
            samples = _write_rows(job, tmp, comp, errors, extra)
            _mark_shard(tmp)
        shutil.rmtree(comp.parts, ignore_errors=True)
    return _computed_result(job, comp, samples, errors, cache=job.path, shards=count,
                            shard_index=index, shard_file=spath,
                            shard_runs=[{"index": index, "rows": [lo, hi], "n": len(samples),
                                         "images_computed": comp.computed,
                                         "compute_seconds": round(comp.compute_seconds, 3),
                                         "reused": False}])


def _mark_shard(path: Path) -> None:
    """Stamp a file written in cache layout as a shard, so no reader takes it for a whole cache."""
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs["format"] = SHARD_FORMAT


@dataclass
class _ShardInfo:
    """The header of one shard file."""

    path: Path
    index: int
    count: int
    fingerprint: str
    row_start: int
    row_stop: int
    n_total: int
    n: int
    dim: int
    attrs: dict[str, Any]

    @property
    def timings(self) -> dict[str, Any]:
        t = self.attrs.get("timings") or {}
        return {"index": self.index, "rows": [self.row_start, self.row_stop], "n": self.n,
                "images_computed": int(t.get("images_computed", 0)),
                "compute_seconds": float(t.get("compute_seconds", 0.0))}


def _read_shard(path: Path) -> _ShardInfo:
    """Read and check a shard file's header; a one-line CacheError for anything else."""
    import h5py

    from .store import cache_attrs

    path = Path(path)
    try:
        if not h5py.is_hdf5(path):
            raise CacheError(f"{path} is not an HDF5 file; pass shard files written by "
                             "`fxtl extract --shard I/N`")
        with h5py.File(path, "r") as f:
            attrs = cache_attrs(f)
            fmt = attrs.get("format")
            if fmt != SHARD_FORMAT:
                what = "a finished cache, not a shard" if fmt == "fxtl-features" else f"not a shard file (format={fmt!r})"
                raise CacheError(f"{path} is {what}; pass shard files written by "
                                 "`fxtl extract --shard I/N` (or their .shards folder)")
            missing = [k for k in _SHARD_ATTRS + ("fingerprint", "format_version", "complete")
                       if k not in attrs] + [f"/{d}" for d in ("features", "labels", "paths", "split")
                                             if d not in f]
            if missing or not attrs.get("complete"):
                raise CacheError(f"{path} is damaged (missing {', '.join(missing) or 'complete'}); "
                                 "delete it and re-run its `fxtl extract --shard I/N`")
            if int(attrs["format_version"]) > FORMAT_VERSION:
                raise CacheError(f"{path} has format_version {attrs['format_version']}, this fxtl "
                                 f"reads up to {FORMAT_VERSION}; upgrade fxtl (pip install -U fxtl)")
            n, dim = f["features"].shape
    except OSError as exc:
        raise CacheError(f"{path} cannot be read as HDF5 ({exc}); delete it and re-run its "
                         "`fxtl extract --shard I/N`") from None
    return _ShardInfo(path=path, index=int(attrs["shard_index"]), count=int(attrs["shard_count"]),
                      fingerprint=str(attrs["fingerprint"]), row_start=int(attrs["row_start"]),
                      row_stop=int(attrs["row_stop"]), n_total=int(attrs["n_total"]), n=int(n),
                      dim=int(dim), attrs=attrs)


def _shard_hit(job: _Job, spath: Path, index: int, count: int, lo: int, hi: int) -> ExtractResult | None:
    """The result for a complete shard file made from the same inputs and rows, else None."""
    if not spath.exists():
        return None
    try:
        info = _read_shard(spath)
    except CacheError:
        return None
    if (info.fingerprint, info.index, info.count, info.row_start, info.row_stop) != \
            (job.fp, index, count, lo, hi):
        return None
    import h5py

    from .store import decode_attr

    with h5py.File(spath, "r") as f:
        split = [decode_attr(s) for s in f["split"][...]]
        errors = [{"path": decode_attr(p), "reason": decode_attr(r)}
                  for p, r in zip(f["errors/path"][...], f["errors/reason"][...])]
    return ExtractResult(cache=job.path, n=info.n, dim=info.dim, splits=_count_splits(split),
                         errors=errors, seconds=time.perf_counter() - job.t0, images_per_second=0.0,
                         cache_hit=True, backbone=job.bb.spec.name, layer=job.bb.layer,
                         precision=job.precision, device=job.device_kind, fingerprint=job.fp,
                         class_names=job.images.class_names, shards=count, shard_index=index,
                         shard_file=spath, shard_runs=[{**info.timings, "reused": True}])


def _resolve_sources(sources: Sequence[str | Path]) -> tuple[list[Path], Path | None]:
    """Shard files named by ``sources`` (files, ``.shards`` folders, or cache paths), and the
    cache path the sources imply, if any."""
    from ..distributed import SHARD_RE, shards_dir

    files: list[Path] = []
    implied: Path | None = None
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if SHARD_RE.fullmatch(q.name))
            if not found:
                raise CacheError(f"{p} holds no shard files (shard-IIIII-of-NNNNN.h5); write them "
                                 "with `fxtl extract DATA_DIR --shard I/N` first")
            files += found
            if p.name.endswith(".shards") and implied is None:
                implied = p.with_name(p.name[:-len(".shards")])
        elif shards_dir(p).is_dir():  # a cache path: its shards live in <cache>.shards/
            found = sorted(q for q in shards_dir(p).iterdir() if SHARD_RE.fullmatch(q.name))
            if not found:
                raise CacheError(f"{shards_dir(p)} holds no shard files; write them with "
                                 "`fxtl extract DATA_DIR --shard I/N` first")
            files += found
            implied = implied or p
        elif p.is_file():
            files.append(p)
        else:
            raise CacheError(f"{p}: no such shard file, folder or {shards_dir(p).name}/; pass the "
                             "shard files `fxtl extract --shard I/N` wrote, or their folder")
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values()), implied


def _check_shards(infos: list[_ShardInfo]) -> list[_ShardInfo]:
    """Refuse mismatched, duplicated, missing or non-tiling shards; return them in order."""
    ref = min(infos, key=lambda s: s.index)
    odd = [s for s in infos if s.fingerprint != ref.fingerprint]
    if odd:
        raise CacheError(f"{', '.join(str(s.path) for s in odd)} do(es) not match {ref.path}: "
                         f"extracted from other images or options (fingerprint "
                         f"{odd[0].fingerprint[:12]} vs {ref.fingerprint[:12]}); re-extract with the "
                         "same DATA_DIR and options, or merge only one series")
    other_n = [s for s in infos if s.count != ref.count]
    if other_n:
        raise CacheError(f"{other_n[0].path} is shard {other_n[0].index} of {other_n[0].count} but "
                         f"{ref.path} is of {ref.count}; merge the shards of one --shard I/N series")
    by_index: dict[int, _ShardInfo] = {}
    for s in infos:
        if s.index in by_index:
            raise CacheError(f"{by_index[s.index].path} and {s.path} are both shard "
                             f"{s.index}/{s.count}; pass one of them")
        by_index[s.index] = s
    missing = [i for i in range(ref.count) if i not in by_index]
    if missing:
        from ..distributed import SHARD_NAME

        folder = ref.path.parent
        names = ", ".join(str(folder / SHARD_NAME.format(index=i, count=ref.count)) for i in missing)
        root = ref.attrs.get("dataset_root") or "DATA_DIR"
        ids = " ".join(str(i) for i in missing)
        raise CacheError(f"missing {len(missing)} of {ref.count} shards: {names}; run `fxtl extract "
                         f"{root} --shard I/{ref.count}` with the same options for I in {ids}, "
                         "then merge again")
    ordered = [by_index[i] for i in range(ref.count)]
    row = 0
    for s in ordered:
        if s.n_total != ref.n_total or s.row_start != row or s.row_stop < s.row_start:
            raise CacheError(f"{s.path} covers rows {s.row_start}-{s.row_stop} of {s.n_total} but "
                             f"the shards before it end at row {row} of {ref.n_total} (another "
                             "--batch-size?); re-extract it with the same options as the others")
        row = s.row_stop
    if row != ref.n_total:
        raise CacheError(f"{ordered[-1].path} ends at row {row} but the dataset has {ref.n_total} "
                         "images; re-extract it with the same options as the others")
    return ordered


def merge_shards(sources: Sequence[str | Path], *, output: str | Path | None = None,
                 force: bool = False, keep_shards: bool = False) -> ExtractResult:
    """Assemble complete shard files into one cache, identical to a single-process extraction.

    Parameters
    ----------
    sources : sequence of paths
        Shard files (``shard-IIIII-of-NNNNN.h5``), the ``<cache>.shards`` folder holding them, or
        the cache path itself (its ``.shards`` folder is used).
    output : path, optional
        The cache to write [default: the cache the shards belong to, beside their folder].
    force : bool
        Rewrite the cache even when it already exists with the same fingerprint.
    keep_shards : bool
        Keep the shard files after a successful merge (by default they are deleted).

    Returns
    -------
    ExtractResult
        Of the merged cache; ``shard_runs`` lists each shard's rows and compute time.

    Raises
    ------
    CacheError
        No shards, a file that is not a shard, shards from other inputs, a missing shard, or
        shards whose rows do not tile the dataset; the message names the files.

    Examples
    --------
    >>> merge_shards(["cache/hymenoptera-lite0-1e2b80d0e2303460.h5.shards"]).n   # doctest: +SKIP
    398
    """
    from ..distributed import shards_dir

    t0 = time.perf_counter()
    if not sources:
        raise CacheError("no shard files given; pass the shard files, their .shards folder or the cache path")
    if len(sources) == 1 and Path(sources[0]).is_file() and not shards_dir(Path(sources[0])).exists():
        try:  # a cache that is already merged: merging again is a no-op (scripts can re-run)
            fp = read_attrs(Path(sources[0])).get("fingerprint")
        except CacheError:
            fp = None
        if fp:
            hit = _merged_hit(Path(sources[0]), fp, t0)
            if hit is not None and (output is None or Path(output) == Path(sources[0])):
                return hit
    files, implied = _resolve_sources(sources)
    infos = [_read_shard(f) for f in files]
    ordered = _check_shards(infos)
    first = ordered[0]
    if output is not None:
        out = Path(output)
    elif implied is not None:
        out = implied
    else:
        folder = first.path.parent
        base = folder.parent if folder.name == first.attrs["cache_name"] + ".shards" else folder
        out = base / first.attrs["cache_name"]
    if not force:
        hit = _merged_hit(out, first.fingerprint, t0)
        if hit is not None:
            if not keep_shards:
                _remove_shards(ordered)
            return hit
    ensure_dir(out.parent)
    with file_lock(out.with_name(out.name + ".lock"), what=f"the cache {out.name}"):
        res = _merge_locked(ordered, out, t0)
    if not keep_shards:
        _remove_shards(ordered)
    return res


def _merged_hit(out: Path, fp: str, t0: float) -> ExtractResult | None:
    if not out.exists():
        return None
    try:
        attrs = read_attrs(out)
    except CacheError:
        return None
    if attrs.get("fingerprint") != fp:
        return None
    from .store import summarize

    s = summarize(out)
    return ExtractResult(cache=out, n=s["n"], dim=s["dim"], splits=s["splits"], errors=s["errors"],
                         seconds=time.perf_counter() - t0, images_per_second=0.0, cache_hit=True,
                         backbone=str(attrs.get("backbone", "")), layer=str(attrs.get("layer", "")),
                         precision=str(attrs.get("precision", "")),
                         device=str(attrs.get("device", "")), fingerprint=fp,
                         class_names=s["class_names"], shards=int(attrs.get("shards", 1) or 1))


# Rows copied per block while merging: about 20 MiB of float32 at D = 1280.
_MERGE_BLOCK_ROWS = 4096


def _merge_locked(ordered: list[_ShardInfo], out: Path, t0: float) -> ExtractResult:
    import h5py

    from .store import decode_attr

    first = ordered[0]
    dims = {s.dim for s in ordered if s.n}
    if len(dims) > 1:
        raise CacheError(f"shards of {out.name} have feature dimensions {sorted(dims)}; "
                         "re-extract them with the same options")
    dim = dims.pop() if dims else first.dim
    labels: list[int] = []
    paths: list[str] = []
    split: list[str] = []
    errors: list[tuple[str, str]] = []
    for s in ordered:  # per-image metadata only; features are streamed below
        with h5py.File(s.path, "r") as f:
            labels += f["labels"][...].tolist()
            paths += [decode_attr(p) for p in f["paths"][...]]
            split += [decode_attr(p) for p in f["split"][...]]
            errors += [(decode_attr(p), decode_attr(r)) for p, r in zip(f["errors/path"][...],
                                                                 f["errors/reason"][...])]
    if not paths:
        raise DataError(f"none of the {first.n_total} images under {first.attrs.get('dataset_root')} "
                        f"could be decoded (first: {errors[0][0] if errors else '?'}: "
                        f"{errors[0][1] if errors else '?'})")

    def blocks() -> Iterator[np.ndarray]:
        for s in ordered:
            with h5py.File(s.path, "r") as f:
                ds = f["features"]
                for a in range(0, s.n, _MERGE_BLOCK_ROWS):
                    yield ds[a:a + _MERGE_BLOCK_ROWS]

    runs = [s.timings for s in ordered]
    skip = set(_SHARD_ATTRS) | {"format", "format_version", "complete", "n", "dim", "class_names",
                                "timings", "created", "shards"}
    attrs = {k: v for k, v in first.attrs.items() if k not in skip}
    attrs["created"] = now_iso()
    attrs["shards"] = first.count
    attrs["timings"] = {"compute_seconds": round(sum(r["compute_seconds"] for r in runs), 3),
                        "images_computed": sum(r["images_computed"] for r in runs),
                        "batch_size": (first.attrs.get("timings") or {}).get("batch_size"),
                        "shards": runs}
    class_names = [str(c) for c in first.attrs.get("class_names", [])]
    write_cache(out, chunks=blocks(), n=len(paths), dim=dim, labels=labels, paths=paths,
                split=split, class_names=class_names, errors=errors, attrs=attrs)
    return ExtractResult(cache=out, n=len(paths), dim=dim, splits=_count_splits(split),
                         errors=[{"path": p, "reason": r} for p, r in errors],
                         seconds=time.perf_counter() - t0, images_per_second=0.0, cache_hit=False,
                         backbone=str(attrs.get("backbone", "")), layer=str(attrs.get("layer", "")),
                         precision=str(attrs.get("precision", "")), device=str(attrs.get("device", "")),
                         fingerprint=first.fingerprint, class_names=class_names, shards=first.count,
                         shard_runs=runs)


def _remove_shards(ordered: list[_ShardInfo]) -> None:
    """Delete merged shard files (and their locks); the folder too once it is empty."""
    for s in ordered:
        s.path.unlink(missing_ok=True)
        s.path.with_name(s.path.name + ".lock").unlink(missing_ok=True)
    folders = {s.path.parent for s in ordered}
    for folder in folders:
        if folder.name.endswith(".shards"):
            try:
                folder.rmdir()
            except OSError:
                pass  # something else (another series' work in progress) is still in there


# ----------------------------------------------------------------------------- torchrun
def _extract_torchrun(job: _Job, env, *, force: bool) -> ExtractResult:
    """Rank R of W extracts shard R/W; rank 0 merges; every rank returns the merged result.

    Collectives are reached by every rank on every path: a rank whose work fails reports the
    failure through them instead of leaving the others waiting, and all ranks raise it.
    """
    from dataclasses import replace

    from ..distributed import Coordinator, shard_path

    with Coordinator(env) as co:
        mine = {"fingerprint": job.fp, "n": len(job.images), "batch_size": job.batch_size,
                "host": os.uname().nodename}
        everyone = co.all_gather(mine)
        odd = [r for r, d in enumerate(everyone) if d["fingerprint"] != everyone[0]["fingerprint"]]
        if odd:
            raise DataError(f"rank(s) {', '.join(map(str, odd))} (host {everyone[odd[0]]['host']}) see "
                            f"other images or options than rank 0 ({everyone[odd[0]]['n']} vs "
                            f"{everyone[0]['n']} images, fingerprint {everyone[odd[0]]['fingerprint'][:12]} "
                            f"vs {everyone[0]['fingerprint'][:12]}); give every rank the same DATA_DIR "
                            "(on a shared filesystem) and the same options")
        # Rank 0's batch size fixes the shard boundaries, so all ranks cut the rows alike.
        job = replace(job, batch_size=everyone[0]["batch_size"],
                      progress=job.progress and env.is_primary)
        hit = _hit_result(job) if env.is_primary and not force else None
        hit = co.broadcast(hit.to_dict() if hit is not None else None)
        if hit is not None:
            return replace(ExtractResult.from_dict(hit), rank=env.rank, world_size=env.world_size)

        t_shards = time.perf_counter()
        try:
            res = _extract_shard(job, env.rank, env.world_size, force=force)
            status = {"ok": True, "run": res.shard_runs[0], "resumed_rows": res.resumed_rows}
        except FxtlError as exc:
            status = {"ok": False, "error": str(exc)}
        statuses = co.all_gather(status)
        wall = time.perf_counter() - t_shards
        failed = [r for r, s in enumerate(statuses) if not s["ok"]]
        if failed:
            raise FxtlError(f"rank {failed[0]} failed: {statuses[failed[0]]['error']}")
        if not env.is_primary:
            run = status["run"]
            print(f"fxtl: rank {env.rank}: shard {env.rank}/{env.world_size} "
                  f"{'reused' if run['reused'] else 'done'} ({run['n']} images)", file=sys.stderr)

        outcome = None
        if env.is_primary:
            try:
                expected = [shard_path(job.path, r, env.world_size) for r in range(env.world_size)]
                unseen = [str(p) for p in expected if not p.exists()]
                if unseen:
                    raise CacheError(f"rank 0 cannot see the shard files {', '.join(unseen)} that "
                                     "other ranks wrote; put --cache-dir (or --output) on a "
                                     "filesystem all nodes share")
                merged = merge_shards(expected, output=job.path, force=True)
                runs = [s["run"] for s in statuses]
                computed = sum(r["images_computed"] for r in runs)
                merged = replace(merged, seconds=time.perf_counter() - job.t0,
                                 images_per_second=_rate(computed, wall), device=job.device_kind,
                                 resumed_rows=sum(s["resumed_rows"] for s in statuses),
                                 shard_runs=runs)
                outcome = {"ok": True, "result": merged.to_dict()}
            except FxtlError as exc:
                outcome = {"ok": False, "error": str(exc)}
        outcome = co.broadcast(outcome)
        if not outcome["ok"]:
            raise FxtlError(outcome["error"] if env.is_primary else f"rank 0 failed: {outcome['error']}")
        return replace(ExtractResult.from_dict(outcome["result"]), rank=env.rank,
                       world_size=env.world_size)


def _fault_point(k: int) -> None:
    """Test hook: ``FXTL_TEST_KILL_AFTER_CHUNK=K`` SIGKILLs this process after chunk K is saved.

    The fault-injection tests use it to prove that a killed run resumes to identical features.
    """
    at = os.environ.get("FXTL_TEST_KILL_AFTER_CHUNK")
    if at is not None and int(at) == k:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _runs(ks: list[int]) -> Iterator[tuple[int, int]]:
    """[0,1,2,5,6] -> (0,3), (5,7)."""
    start = prev = None
    for k in ks:
        if start is None:
            start = prev = k
        elif k == prev + 1:
            prev = k
        else:
            yield start, prev + 1
            start = prev = k
    if start is not None:
        yield start, prev + 1


def _chunk_ok(parts: Path, k: int) -> bool:
    f = parts / f"chunk-{k:06d}.npz"
    if not f.exists():
        return False
    try:
        with np.load(f) as z:
            z["features"].shape  # noqa: B018 - touch the array to validate the file
        return True
    except Exception:
        f.unlink(missing_ok=True)
        return False


def _save_chunk(parts: Path, k: int, feats: np.ndarray, errors: list[tuple[int, str]]) -> None:
    with atomic_path(parts / f"chunk-{k:06d}.npz", suffix=".tmp") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, features=feats.astype(np.float32),
                     err_index=np.array([i for i, _ in errors], dtype=np.int64),
                     err_reason=np.array([r for _, r in errors], dtype=str))
