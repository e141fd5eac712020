"""Run a frozen backbone once over a dataset and cache the embeddings (``fxtl extract``).

Speed comes from what the field knows: DataLoader workers decode (with JPEG draft mode) while
the main process computes; uint8 tensors cross process boundaries; ``inference_mode``,
``channels_last`` and bf16 autocast where the hardware runs it natively; pinned memory and
non-blocking copies on CUDA.

Robustness: rows are computed in chunks, each saved atomically to ``<cache>.parts/``; a run
killed at any point (SIGKILL included) resumes at the first missing chunk with the same batch
boundaries, so features are identical to an uninterrupted run. The cache appears at its final
path in one rename. A lock file makes a second process on the same cache wait, then reuse it.
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
from typing import Any, Iterator, Sequence

import numpy as np

from . import __version__
from ._util import atomic_path, atomic_write_json, ensure_dir, file_lock, now_iso, versions
from .backbones import DEFAULT_BACKBONE, Backbone, load_backbone
from .data import ImageDataset, ImageSet, discover, fingerprint
from .errors import CacheError, DataError, FxtlError
from .runtime import autocast, resolve_device, resolve_precision
from .store import FORMAT_VERSION, read_attrs, write_cache

__all__ = ["extract", "ExtractResult", "embed_paths", "cache_path_for", "default_batch_size",
           "default_workers"]


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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cache"] = str(self.cache)
        return d


def default_batch_size(device: str) -> int:
    return 128 if device.startswith("cuda") else 32


def default_workers(device: str) -> int:
    """One decoding worker per spare core: on 2 cores, 1 worker + the main process computing."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda"):
        return max(1, min(8, cores - 1))
    return max(0, min(4, cores // 2))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:40] or "x"


def cache_path_for(images: ImageSet, backbone: str, fp: str, cache_dir: Path) -> Path:
    """``<cache-dir>/<dataset>-<backbone>-<fingerprint[:16]>.h5``."""
    return Path(cache_dir) / f"{_slug(images.name)}-{_slug(Path(backbone).name)}-{fp[:16]}.h5"


def _make_loader(dataset, *, batch_size: int, workers: int, device: str):
    import torch

    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       num_workers=workers, pin_memory=device.startswith("cuda"),
                                       **kwargs)


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
    batch_size = batch_size or default_batch_size(device)
    workers = default_workers(device) if workers is None else workers
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
            force: bool = False) -> ExtractResult:
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
        Re-extract even when a matching cache exists.

    Returns
    -------
    ExtractResult

    Examples
    --------
    >>> res = extract("data/hymenoptera")   # doctest: +SKIP
    >>> res.n, res.dim, res.cache_hit       # doctest: +SKIP
    (398, 1280, False)
    """
    from ._util import default_cache_dir

    t0 = time.perf_counter()
    if batch_size is not None and batch_size < 1:
        raise FxtlError(f"batch size must be at least 1 (got {batch_size})")
    images = discover(data)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    bb = load_backbone(backbone, layer=layer)
    pre = bb.preprocessing.to_dict()
    fp = fingerprint(images, backbone=bb.spec.name, weights_sha256=bb.weights_sha256,
                     preprocessing=pre, layer=bb.layer, precision=precision,
                     format_version=FORMAT_VERSION)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path = Path(output) if output else cache_path_for(images, bb.spec.name, fp, cache_dir)

    def hit_result() -> ExtractResult | None:
        if force or not path.exists():
            return None
        try:
            attrs = read_attrs(path)
        except CacheError:
            return None
        if attrs.get("fingerprint") != fp:  # e.g. an explicit --output holding another cache
            return None
        from .store import summarize

        s = summarize(path)
        return ExtractResult(cache=path, n=s["n"], dim=s["dim"], splits=s["splits"],
                             errors=s["errors"], seconds=time.perf_counter() - t0,
                             images_per_second=0.0, cache_hit=True, backbone=bb.spec.name,
                             layer=bb.layer, precision=precision, device=device, fingerprint=fp,
                             class_names=s["class_names"])

    res = hit_result()  # a hit needs no write access: caches can be shared read-only
    if res is not None:
        return res
    ensure_dir(path.parent)
    with file_lock(path.with_name(path.name + ".lock"), what=f"the cache {path.name}"):
        res = hit_result()  # another process may have finished it while we waited
        if res is not None:
            return res
        return _extract_locked(images, bb, path, fp, device=device, precision=precision,
                               batch_size=batch_size or default_batch_size(device),
                               workers=default_workers(device) if workers is None else workers,
                               chunk_batches=chunk_batches, progress=progress, t0=t0)


def _extract_locked(images: ImageSet, bb: Backbone, path: Path, fp: str, *, device: str,
                    precision: str, batch_size: int, workers: int, chunk_batches: int,
                    progress: bool, t0: float) -> ExtractResult:
    parts = path.with_name(path.name + ".parts")
    n = len(images)
    meta = {"fingerprint": fp, "n": n, "batch_size": batch_size, "chunk_rows": batch_size * chunk_batches}
    meta_path = parts / "meta.json"
    if parts.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        if old and old.get("fingerprint") == fp and old.get("n") == n:
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
        print(f"fxtl: resuming {path.name}: {resumed_rows}/{n} images already done", file=sys.stderr)

    t_compute = time.perf_counter()
    computed = 0
    # Contiguous runs of missing chunks are embedded in one loader each.
    for start_chunk, stop_chunk in _runs(todo):
        lo, hi = start_chunk * chunk_rows, min(n, stop_chunk * chunk_rows)
        paths = [str(images.abspath(s)) for s in images.samples[lo:hi]]
        buf_f: list[np.ndarray] = []
        buf_err: list[tuple[int, str]] = []
        k = start_chunk
        filled = 0
        for idx, feats, _, bad in embed_paths(bb, paths, device=device, precision=precision,
                                               batch_size=batch_size, workers=workers,
                                               progress=progress, desc="extract"):
            buf_f.append(feats)
            buf_err.extend((lo + i, reason) for i, reason in bad)
            filled += len(idx)
            computed += len(idx)
            for i, reason in bad:
                print(f"fxtl: skipped {images.samples[lo + i].path}: {reason}", file=sys.stderr)
            rows_this_chunk = min(chunk_rows, n - k * chunk_rows)
            if filled == rows_this_chunk:
                _save_chunk(parts, k, np.concatenate(buf_f), buf_err)
                _fault_point(k)
                buf_f, buf_err, filled, k = [], [], 0, k + 1
        if filled:
            raise FxtlError("internal: extraction ended inside a chunk")
    compute_seconds = time.perf_counter() - t_compute

    # Assemble the final file from the chunks, streaming (memory does not grow with n).
    errors: dict[int, str] = {}
    for k in range(n_chunks):
        with np.load(parts / f"chunk-{k:06d}.npz") as z:
            errors.update({int(i): str(r) for i, r in zip(z["err_index"], z["err_reason"])})
    good = [i for i in range(n) if i not in errors]
    if not good:
        raise DataError(f"none of the {n} images under {images.root} could be decoded "
                        f"(first: {images.samples[0].path}: {errors.get(0)})")

    def chunks() -> Iterator[np.ndarray]:
        for k in range(n_chunks):
            with np.load(parts / f"chunk-{k:06d}.npz") as z:
                feats = z["features"]
            base = k * chunk_rows
            keep = [i - base for i in range(base, base + len(feats)) if i not in errors]
            yield feats[keep]

    samples = [images.samples[i] for i in good]
    dim = bb.feature_dim
    attrs = {
        "backbone": bb.spec.name, "architecture": bb.spec.arch, "weights_sha256": bb.weights_sha256,
        "preprocessing": bb.preprocessing.to_dict(), "precision": precision, "layer": bb.layer,
        "fingerprint": fp, "created": now_iso(), "fxtl_version": __version__,
        "versions": versions(), "device": device, "dataset_root": str(images.root),
        "dataset_name": images.name, "dataset_layout": images.layout,
        "timings": {"compute_seconds": round(compute_seconds, 3), "images_computed": computed,
                    "batch_size": batch_size},
    }
    write_cache(path, chunks=chunks(), n=len(good), dim=dim, labels=[s.label for s in samples],
                paths=[s.path for s in samples], split=[s.split for s in samples],
                class_names=images.class_names,
                errors=[(images.samples[i].path, r) for i, r in sorted(errors.items())], attrs=attrs)
    shutil.rmtree(parts, ignore_errors=True)
    seconds = time.perf_counter() - t0
    splits: dict[str, int] = {}
    for s in samples:
        splits[s.split] = splits.get(s.split, 0) + 1
    return ExtractResult(cache=path, n=len(good), dim=dim, splits=splits,
                         errors=[{"path": images.samples[i].path, "reason": r}
                                 for i, r in sorted(errors.items())],
                         seconds=seconds,
                         images_per_second=computed / compute_seconds if compute_seconds > 0 else 0.0,
                         cache_hit=False, resumed_rows=resumed_rows, backbone=bb.spec.name,
                         layer=bb.layer, precision=precision, device=device, fingerprint=fp,
                         class_names=images.class_names)


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
