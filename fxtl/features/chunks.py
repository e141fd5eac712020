"""Rows -> chunk files -> cache: the resumable part of an extraction.

Rows are computed in chunks, each saved atomically to ``<cache>.parts/``; a run killed at any
point (SIGKILL included) resumes at the first missing chunk with the same batch boundaries, so
features are identical to an uninterrupted run. Memory never grows with the number of images:
features go to disk chunk by chunk and are streamed from there into the cache.
"""
from __future__ import annotations

import errno
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import __version__
from .._util import atomic_path, atomic_write_json, ensure_dir, now_iso, say, versions
from ..data.discovery import fingerprint
from ..errors import FxtlError
from .embedding import embed_layers, embed_paths
from .job import ExtractJob
from .store import write_cache

__all__ = ["Computed", "compute_rows", "chunk_errors", "write_rows", "save_chunk", "file_too_large"]

# Chunk-file key prefix of a further layer's rows (``layer__blocks.4``).
_LAYER_KEY = "layer__"


def file_too_large(exc: BaseException) -> bool:
    """A write refused by a file-size limit (``ulimit -f``: EFBIG once SIGXFSZ is ignored)."""
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return True
    return isinstance(exc, (OSError, RuntimeError)) and "File too large" in str(exc)


def too_large_error(path: Path) -> FxtlError:
    return FxtlError(f"cannot write {path}: file too large for this process's file-size limit "
                     "(ulimit -f) or no space; raise the limit or choose another cache directory "
                     "(nothing was overwritten)")


@dataclass
class Computed:
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


def compute_rows(job: ExtractJob, parts: Path, lo: int, hi: int, *, label: str,
                  desc: str = "extract") -> Computed:
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
        say(f"fxtl: resuming {label}: {resumed_rows}/{n} images already done")

    # Built before the clock starts (and only when rows remain): compute_seconds, and so
    # images_per_second, time the embedding itself, not loading the weights.
    model = job.backbone_model() if todo else None
    t_compute = time.perf_counter()
    computed = 0
    # Contiguous runs of missing chunks are embedded in one loader each.
    for start_chunk, stop_chunk in _runs(todo):
        a, b = lo + start_chunk * chunk_rows, lo + min(n, stop_chunk * chunk_rows)
        paths = [str(images.abspath(s)) for s in images.samples[a:b]]
        buf_f: list[np.ndarray] = []
        buf_l: list[dict[str, np.ndarray]] = []
        buf_err: list[tuple[int, str]] = []
        k = start_chunk
        filled = 0
        # With layers, one pass gives the features and every layer (embed_layers).
        embed = embed_layers if job.layers else embed_paths
        for idx, feats, extra, bad in embed(model, paths, device=job.device,
                                            precision=job.precision, batch_size=batch_size,
                                            workers=job.workers, progress=job.progress, desc=desc):
            buf_f.append(feats)
            if job.layers:
                buf_l.append(extra)
            buf_err.extend((a - lo + i, reason) for i, reason in bad)
            filled += len(idx)
            computed += len(idx)
            for i, reason in bad:
                say(f"fxtl: skipped {images.samples[a + i].path}: {reason}")
            rows_this_chunk = min(chunk_rows, n - k * chunk_rows)
            if filled == rows_this_chunk:
                layers = {name: np.concatenate([b[name] for b in buf_l]) for name in
                          (buf_l[0] if buf_l else {})}
                save_chunk(parts, k, np.concatenate(buf_f), buf_err, layers=layers)
                buf_f, buf_l, buf_err, filled, k = [], [], [], 0, k + 1
        if filled:
            raise FxtlError("internal: extraction ended inside a chunk")
    return Computed(parts=parts, lo=lo, hi=hi, chunk_rows=chunk_rows, batch_size=batch_size,
                     computed=computed, compute_seconds=time.perf_counter() - t_compute,
                     resumed_rows=resumed_rows)


def chunk_errors(comp: Computed) -> dict[int, str]:
    """Undecodable images of the computed rows: global row index -> reason."""
    errors: dict[int, str] = {}
    for k in range(comp.n_chunks):
        with np.load(comp.chunk_file(k)) as z:
            errors.update({comp.lo + int(i): str(r) for i, r in zip(z["err_index"], z["err_reason"])})
    return errors


def _kept_features(comp: Computed, errors: dict[int, str],
                   key: str = "features") -> Iterator[np.ndarray]:
    """The rows of array ``key`` (the features, or a layer's) of the usable images, one chunk at
    a time (memory independent of n)."""
    for k in range(comp.n_chunks):
        with np.load(comp.chunk_file(k)) as z:
            feats = z[key]
        base = comp.lo + k * comp.chunk_rows
        keep = [i - base for i in range(base, base + len(feats)) if i not in errors]
        yield feats[keep]


def _attrs_for(job: ExtractJob, timings: dict[str, Any]) -> dict[str, Any]:
    bb, images = job.backbone_model(), job.images
    return {
        "backbone": job.backbone, "architecture": bb.spec.arch, "weights_sha256": bb.weights_sha256,
        "preprocessing": bb.preprocessing.to_dict(), "precision": job.precision, "layer": job.layer,
        "graph": bb.graph, "fingerprint": job.fp, "created": now_iso(), "fxtl_version": __version__,
        "versions": versions(), "device": job.device_kind, "dataset_root": str(images.root),
        "dataset_name": images.name, "dataset_layout": images.layout, "timings": timings,
        # the dataset alone (no backbone), so a head and a fine-tune of these images share it
        "data_fingerprint": fingerprint(images),
    }


def write_rows(job: ExtractJob, target: Path, comp: Computed, errors: dict[int, str],
               extra_attrs: dict[str, Any] | None = None):
    """Write the usable rows of ``comp`` to ``target`` (cache layout); returns the kept samples."""
    images = job.images
    samples = [images.samples[i] for i in range(comp.lo, comp.hi) if i not in errors]
    timings = {"compute_seconds": round(comp.compute_seconds, 3), "images_computed": comp.computed,
               "batch_size": comp.batch_size}
    attrs = {**_attrs_for(job, timings), **(extra_attrs or {})}
    bb = job.backbone_model()
    layers = {name: (bb.layer_dims[name], _kept_features(comp, errors, _LAYER_KEY + name))
              for name in (bb.extra_layers if job.layers else ())}
    try:
        write_cache(target, chunks=_kept_features(comp, errors), n=len(samples),
                    dim=bb.feature_dim, labels=[s.label for s in samples],
                    paths=[s.path for s in samples], split=[s.split for s in samples],
                    class_names=images.class_names,
                    errors=[(images.samples[i].path, r) for i, r in sorted(errors.items())],
                    attrs=attrs, layers=layers)
    except (OSError, RuntimeError) as exc:
        if file_too_large(exc):
            raise too_large_error(target) from None
        raise
    return samples


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


def save_chunk(parts: Path, k: int, feats: np.ndarray, errors: list[tuple[int, str]], *,
               layers: dict[str, np.ndarray] | None = None) -> None:
    """Chunk ``k`` of a ``.parts/`` folder, written atomically (it exists whole or not at all);
    ``layers``: the same rows of further layers."""
    final = parts / f"chunk-{k:06d}.npz"
    arrays = {_LAYER_KEY + name: v.astype(np.float32) for name, v in (layers or {}).items()}
    try:
        with atomic_path(final, suffix=".tmp") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, features=feats.astype(np.float32),
                         err_index=np.array([i for i, _ in errors], dtype=np.int64),
                         err_reason=np.array([r for _, r in errors], dtype=str), **arrays)
    except OSError as exc:
        if file_too_large(exc):
            raise too_large_error(final) from None
        raise
