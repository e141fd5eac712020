"""Shard files and merging: one extraction's rows cut into blocks computed apart, then joined.

Each shard has its own ``.parts/`` chunks (so a crashed rank or array task redoes only its own
shard) and ends as a shard file; :func:`merge_shards` streams the shard files, in order, into one
cache identical in rows, order and provenance to a single-process run.

Shard files are in cache layout with ``format = "fxtl-features-shard"``, which the store's
readers refuse on purpose (a shard is never a whole cache), so their headers are read here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .._util import atomic_path, now_iso
from ..errors import CacheError, DataError
from .chunks import chunk_errors, compute_rows, write_rows
from .job import ExtractJob, ExtractResult, cache_hit, make_result, reuse_or_compute
from .store import FORMAT_VERSION, cache_attrs, read_attrs, read_strings, write_cache

__all__ = ["merge_shards", "extract_shard", "SHARD_FORMAT"]

# ``format`` attribute of a shard file: a fraction of a cache, never to be read as a whole one
# (docs/cache-format.md, "Shard files").
SHARD_FORMAT = "fxtl-features-shard"
# Root attributes only a shard file carries; the merged cache drops them.
_SHARD_ATTRS = ("shard_index", "shard_count", "row_start", "row_stop", "n_total", "cache_name")


def extract_shard(job: ExtractJob, index: int, count: int, *, force: bool) -> ExtractResult:
    """Shard ``index`` of ``count`` into its shard file (reused when complete, else resumed)."""
    from ..distributed import shard_path, shard_rows

    lo, hi = shard_rows(len(job.images), count, job.batch_size)[index]
    spath = shard_path(job.path, index, count)

    def compute() -> ExtractResult:
        comp = compute_rows(job, spath.with_name(spath.name + ".parts"), lo, hi,
                            label=f"{job.path.name} shard {index}/{count}",
                            desc=f"extract {index}/{count}")
        errors = chunk_errors(comp)
        extra = {"shard_index": index, "shard_count": count, "row_start": lo, "row_stop": hi,
                 "n_total": len(job.images), "cache_name": job.path.name}
        with atomic_path(spath) as tmp:  # a shard file too appears complete or not at all
            samples = write_rows(job, tmp, comp, errors, extra)
            _mark_shard(tmp)
        import shutil

        shutil.rmtree(comp.parts, ignore_errors=True)
        return make_result(cache=job.path, attrs=job_attrs(job), n=len(samples),
                           dim=job.backbone_model().feature_dim, split=[s.split for s in samples],
                           errors=[{"path": job.images.samples[i].path, "reason": r}
                                   for i, r in sorted(errors.items())],
                           t0=job.t0, cache_hit=False, class_names=job.images.class_names,
                           computed=comp.computed, compute_seconds=comp.compute_seconds,
                           resumed_rows=comp.resumed_rows, shards=count, shard_index=index,
                           shard_file=spath,
                           shard_runs=[{"index": index, "rows": [lo, hi], "n": len(samples),
                                        "images_computed": comp.computed,
                                        "compute_seconds": round(comp.compute_seconds, 3),
                                        "reused": False}])

    return reuse_or_compute(spath, hit=lambda: _shard_hit(job, spath, index, count, lo, hi),
                            compute=compute, force=force,
                            what=f"shard {index}/{count} of {job.path.name}")


def job_attrs(job: ExtractJob) -> dict[str, Any]:
    """The provenance fields a result reports for ``job``."""
    return {"backbone": job.backbone, "layer": job.layer, "precision": job.precision,
            "device": job.device_kind, "fingerprint": job.fp}


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

    path = Path(path)
    try:
        if not h5py.is_hdf5(path):
            raise CacheError(f"{path} is not an HDF5 file; pass shard files written by "
                             "extract(shard=(I, N))")
        with h5py.File(path, "r") as f:
            attrs = cache_attrs(f)
            fmt = attrs.get("format")
            if fmt != SHARD_FORMAT:
                what = "a finished cache, not a shard" if fmt == "fxtl-features" else f"not a shard file (format={fmt!r})"
                raise CacheError(f"{path} is {what}; pass shard files written by "
                                 "extract(shard=(I, N)) (or their .shards folder)")
            missing = [k for k in _SHARD_ATTRS + ("fingerprint", "format_version", "complete")
                       if k not in attrs] + [f"/{d}" for d in ("features", "labels", "paths", "split")
                                             if d not in f]
            if missing or not attrs.get("complete"):
                raise CacheError(f"{path} is damaged (missing {', '.join(missing) or 'complete'}); "
                                 "delete it and re-run its extract(shard=(I, N))")
            if int(attrs["format_version"]) > FORMAT_VERSION:
                raise CacheError(f"{path} has format_version {attrs['format_version']}, this fxtl "
                                 f"reads up to {FORMAT_VERSION}; upgrade fxtl (pip install -U fxtl)")
            n, dim = _check_shard_storage(f, path)
    except OSError as exc:
        raise CacheError(f"{path} cannot be read as HDF5 ({exc}); delete it and re-run its "
                         "extract(shard=(I, N))") from None
    return _ShardInfo(path=path, index=int(attrs["shard_index"]), count=int(attrs["shard_count"]),
                      fingerprint=str(attrs["fingerprint"]), row_start=int(attrs["row_start"]),
                      row_stop=int(attrs["row_stop"]), n_total=int(attrs["n_total"]), n=int(n),
                      dim=int(dim), attrs=attrs)


def _check_shard_storage(f: Any, path: Path) -> tuple[int, int]:
    """``(n, dim)`` of a shard whose datasets are its own: no links, external or virtual
    storage (a shard could otherwise bring another file's bytes into the merged cache), and
    per-row datasets as long as ``/features``."""
    import h5py

    for name in ("features", "labels", "paths", "split"):
        link = f.get(name, getlink=True)
        ds = f.get(name) if isinstance(link, h5py.HardLink) else None
        if not isinstance(ds, h5py.Dataset) or ds.external or ds.is_virtual:
            raise CacheError(f"{path}: /{name} is not a dataset stored in the file (a link, "
                             "external or virtual storage); delete it and re-run its "
                             "`fxtl extract --shard I/N`")
    shape = f["features"].shape
    if len(shape) != 2:
        raise CacheError(f"{path}: /features has shape {shape}, not [rows, dim]; delete it and "
                         "re-run its `fxtl extract --shard I/N`")
    other = [name for name in ("labels", "paths", "split") if f[name].shape[:1] != shape[:1]]
    if other:
        raise CacheError(f"{path}: /{other[0]} has {f[other[0]].shape[0] if f[other[0]].shape else 0} "
                         f"rows but /features {shape[0]}; delete it and re-run its "
                         "`fxtl extract --shard I/N`")
    return int(shape[0]), int(shape[1])


def _shard_hit(job: ExtractJob, spath: Path, index: int, count: int, lo: int, hi: int) -> ExtractResult | None:
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

    with h5py.File(spath, "r") as f:
        split = read_strings(f, "split")
        errors = [{"path": p, "reason": r}
                  for p, r in zip(read_strings(f, "errors/path"), read_strings(f, "errors/reason"))]
    return make_result(cache=job.path, attrs=job_attrs(job), n=info.n, dim=info.dim, split=split,
                       errors=errors, t0=job.t0, cache_hit=True, class_names=job.images.class_names,
                       shards=count, shard_index=index, shard_file=spath,
                       shard_runs=[{**info.timings, "reused": True}])


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
                                 "with extract(data, shard=(I, N)) first")
            files += found
            if p.name.endswith(".shards") and implied is None:
                implied = p.with_name(p.name[:-len(".shards")])
        elif shards_dir(p).is_dir():  # a cache path: its shards live in <cache>.shards/
            found = sorted(q for q in shards_dir(p).iterdir() if SHARD_RE.fullmatch(q.name))
            if not found:
                raise CacheError(f"{shards_dir(p)} holds no shard files; write them with "
                                 "extract(data, shard=(I, N)) first")
            files += found
            implied = implied or p
        elif p.is_file():
            files.append(p)
        else:
            raise CacheError(f"{p}: no such shard file, folder or {shards_dir(p).name}/; pass the "
                             "shard files extract(shard=(I, N)) wrote, or their folder")
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
                         f"{ref.path} is of {ref.count}; merge the shards of one series (one N)")
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
        root = repr(str(ref.attrs["dataset_root"])) if ref.attrs.get("dataset_root") else "data"
        ids = " ".join(str(i) for i in missing)
        raise CacheError(f"missing {len(missing)} of {ref.count} shards: {names}; run "
                         f"extract({root}, shard=(I, {ref.count})) with the same options for "
                         f"I in {ids}, then merge again")
    ordered = [by_index[i] for i in range(ref.count)]
    row = 0
    for s in ordered:
        if s.n_total != ref.n_total or s.row_start != row or s.row_stop < s.row_start:
            raise CacheError(f"{s.path} covers rows {s.row_start}-{s.row_stop} of {s.n_total} but "
                             f"the shards before it end at row {row} of {ref.n_total} (another "
                             "batch size?); re-extract it with the same options as the others")
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

    t0 = time.perf_counter()
    if not sources:
        raise CacheError("no shard files given; pass the shard files, their .shards folder or the cache path")
    merged = _already_merged(Path(sources[0])) if len(sources) == 1 else None
    if merged is not None:
        try:  # a cache that is already merged: merging again is a no-op (scripts can re-run)
            fp = read_attrs(merged).get("fingerprint")
        except CacheError:
            fp = None
        if fp and (output is None or Path(output) == merged):
            hit = cache_hit(merged, fp, t0)
            if hit is not None:
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
    res = reuse_or_compute(out, hit=lambda: cache_hit(out, first.fingerprint, t0),
                           compute=lambda: _merge_locked(ordered, out, t0), force=force,
                           what=f"the cache {out.name}")
    if not keep_shards:
        _remove_shards(ordered)
    return res


def _already_merged(source: Path) -> Path | None:
    """The cache ``source`` names when its shards are gone (merged): the cache path itself, or a
    ``<cache>.shards`` folder deleted by the merge that made ``<cache>``; else None."""
    from ..distributed import shards_dir

    if source.is_file() and not shards_dir(source).exists():
        return source
    if source.name.endswith(".shards") and not source.exists():
        cache = source.with_name(source.name[:-len(".shards")])
        return cache if cache.is_file() else None
    return None


# Rows copied per block while merging: about 20 MiB of float32 at D = 1280.
_MERGE_BLOCK_ROWS = 4096


def _merge_locked(ordered: list[_ShardInfo], out: Path, t0: float) -> ExtractResult:
    import h5py

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
            # read_strings undoes the writer's escaping of non-UTF-8 names, so merging keeps them
            paths += read_strings(f, "paths")
            split += read_strings(f, "split")
            errors += list(zip(read_strings(f, "errors/path"), read_strings(f, "errors/reason")))
    if not paths:
        raise DataError(f"none of the {first.n_total} images under {first.attrs.get('dataset_root')} "
                        f"could be decoded (first: {errors[0][0] if errors else '?'}: "
                        f"{errors[0][1] if errors else '?'})")

    def blocks() -> Iterator[np.ndarray]:
        for s in ordered:
            with h5py.File(s.path, "r") as f:
                ds = f["features"]
                for a in range(0, s.n, _MERGE_BLOCK_ROWS):
                    block = ds[a:a + _MERGE_BLOCK_ROWS]
                    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
                    if len(bad):  # the merged cache would be refused by every reader
                        raise CacheError(f"{s.path} is damaged: its feature row {a + int(bad[0])} "
                                         f"holds NaN or infinity ({len(bad)} row(s) in this "
                                         "block); delete it and re-run its `fxtl extract --shard "
                                         "I/N` (nothing was merged)")
                    yield block

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
    return make_result(cache=out, attrs={**attrs, "fingerprint": first.fingerprint}, n=len(paths),
                       dim=dim, split=split, errors=[{"path": p, "reason": r} for p, r in errors],
                       t0=t0, cache_hit=False, class_names=class_names, shards=first.count,
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


