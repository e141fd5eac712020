"""The feature-cache commands: extract, merge, info, export, backbones."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import FxtlError
from .common import (backbone_value, cache_dir_option, device_options, emit, handle_errors,
                     json_option, prepare_compute_process, resolve_cache_dir, show_progress)


def _parse_shard_option(ctx, param, value):
    if value is None:
        return None
    from ..distributed import parse_shard

    try:
        return parse_shard(value)
    except FxtlError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--backbone", "-b", default="lite0", show_default=True, callback=backbone_value,
              help="Registry name, torchvision name, timm:<name>, ARCH=PATH, or a finetune run folder.")
@click.option("--layer", default=None, help="Pool this intermediate layer instead of the penultimate features.")
@click.option("--layers", default=None, metavar="auto|NAME,NAME",
              help="Also store these layers' average-pooled outputs (one pass): 'auto' = the "
                   "backbone's later stages, or module names (`fxtl backbones --layers NAME`).")
@device_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: 128 on CUDA; on CPU 16 at bf16, 4 at fp32].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes [default: up to 8 on CUDA; none on CPU, where threads decode].")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cache file path [default: <cache-dir>/<dataset>-<backbone>-<fingerprint>.h5].")
@click.option("--force", is_flag=True, help="Re-extract even if a matching cache exists.")
@click.option("--shard", metavar="I/N", default=None, callback=_parse_shard_option,
              help="Extract only shard I of N (I counts from 0) into <cache>.shards/shard-IIIII-of-NNNNN.h5, "
                   "for array jobs; then `fxtl merge`. Not needed under torchrun.")
@cache_dir_option
@json_option
@handle_errors
def extract(data_dir, backbone, layer, layers, device, precision, batch_size, workers, output, force,
            shard, cache_dir, as_json):
    """Run a frozen backbone over DATA_DIR once and cache the features (HDF5).

    DATA_DIR holds class folders, or split folders (train, val, test) of class folders, or is
    a CSV manifest path,label[,split]. A matching cache is reused; a killed run resumes.

    \b
    Across processes and machines (docs/scaling.md):
      torchrun --nproc-per-node 2 -m fxtl extract DATA_DIR   each rank one shard, rank 0 merges
      fxtl extract DATA_DIR --shard I/N ; fxtl merge ...     array jobs without torchrun
    Either way the cache equals a single-process one (rows, order, fingerprint).
    """
    from ..features.extraction import extract as run_extract

    prepare_compute_process()
    res = run_extract(data_dir, backbone=backbone, layer=layer, layers=layers, precision=precision,
                      device=device,
                      batch_size=batch_size, workers=workers, cache_dir=resolve_cache_dir(cache_dir),
                      output=output, force=force, shard=shard, progress=show_progress())
    if res.rank != 0:  # under torchrun only rank 0 reports, so stdout holds one result
        return

    def human(d):
        splits = ", ".join(f"{k} {v}" for k, v in d["splits"].items())
        how = "reused (cache hit)" if d["cache_hit"] else \
            f"{d['images_per_second']:.1f} images/s, {d['precision']} on {d['device']}"
        if d["shard_index"] is not None:
            i, n = d["shard_index"], d["shards"]
            return "\n".join([d["shard_file"], f"  shard {i}/{n}: {d['n']} images x {d['dim']} "
                              f"features ({splits}); {len(d['errors'])} skipped; {d['seconds']:.1f} s, {how}",
                              f"  when all {n} shards are written: fxtl merge {d['shard_file'].rsplit('/', 1)[0]}"])
        if d["world_size"] > 1 and not d["cache_hit"]:
            how += f", {d['world_size']} processes"
        lines = [f"{d['cache']}", f"  {d['n']} images x {d['dim']} features ({splits}); "
                 f"{len(d['errors'])} skipped; {d['seconds']:.1f} s, {how}"]
        if d["layers"]:
            lines.append("  layers: " + ", ".join(f"{k} ({v})" for k, v in d["layers"].items()))
        return "\n".join(lines)

    emit(res.to_dict(), as_json, human)


@click.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cache file path [default: the cache the shards belong to, beside their .shards folder].")
@click.option("--keep-shards", is_flag=True, help="Keep the shard files after merging (default: delete them).")
@click.option("--force", is_flag=True, help="Rewrite the cache even if it already exists.")
@json_option
@handle_errors
def merge(shards, output, keep_shards, force, as_json):
    """Assemble the shards of `fxtl extract --shard I/N` into one cache.

    SHARDS: the shard files, the <cache>.h5.shards folder holding them, or the cache path
    itself (its .shards folder is used). The cache equals what a single-process `fxtl extract`
    writes: same rows, order and fingerprint, one self-contained HDF5 file. Refuses, naming
    them, missing shards, shards of other images or options, and shards that do not tile the
    dataset. Merging a cache that is already merged is a no-op.

    \b
    Example, a SLURM array of 4 tasks:
      sbatch --array=0-3 --wrap 'fxtl extract DATA --shard $SLURM_ARRAY_TASK_ID/4'
      fxtl merge cache/<dataset>-<backbone>-<fingerprint>.h5.shards
    """
    from ..features.extraction import merge_shards

    res = merge_shards(list(shards), output=output, force=force, keep_shards=keep_shards)

    def human(d):
        splits = ", ".join(f"{k} {v}" for k, v in d["splits"].items())
        how = "already merged" if d["cache_hit"] else f"merged from {d['shards']} shards"
        return "\n".join([d["cache"], f"  {d['n']} images x {d['dim']} features ({splits}); "
                                      f"{len(d['errors'])} skipped; {d['seconds']:.1f} s, {how}"])

    emit(res.to_dict(), as_json, human)


@click.command()
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@handle_errors
def info(cache, as_json):
    """Print a cache's provenance, shape, splits and skipped images."""
    from ..features.store import load_features, summarize

    fc = load_features(cache)
    d = {"cache": str(cache), "n": fc.n, "dim": fc.dim, "splits": fc.splits,
         "layer_dims": summarize(cache)["layers"],
         "class_names": fc.class_names,
         "class_counts": {c: int((fc.labels == i).sum()) for i, c in enumerate(fc.class_names)},
         "errors": [{"path": p, "reason": r} for p, r in fc.errors],
         "format": fc.attrs.get("format"), "format_version": fc.attrs.get("format_version"),
         **fc.provenance}

    def human(d):
        pre = d.get("preprocessing") or {}
        lines = [f"{d['cache']}  ({d['format']} v{d['format_version']})",
                 f"  rows x dim     {d['n']} x {d['dim']}",
                 "  splits         " + ", ".join(f"{k} {v}" for k, v in d["splits"].items()),
                 "  classes        " + ", ".join(f"{c} ({n})" for c, n in d["class_counts"].items()),
                 f"  backbone       {d.get('backbone')}  layer {d.get('layer')}  precision {d.get('precision')}",
                 *([f"  layers         " + ", ".join(f"{k} ({v})" for k, v in d["layer_dims"].items())]
                   if d["layer_dims"] else []),
                 f"  weights sha256 {d.get('weights_sha256')}",
                 f"  preprocessing  resize {pre.get('resize')} ({pre.get('interpolation')}), crop {pre.get('crop')}, "
                 f"mean {pre.get('mean')}, std {pre.get('std')}",
                 f"  fingerprint    {d.get('fingerprint')}",
                 *([f"  data fp        {d['data_fingerprint']}"] if d.get("data_fingerprint") else []),
                 f"  dataset        {d.get('dataset_root')}",
                 f"  created        {d.get('created')} by fxtl {d.get('fxtl_version')}",
                 f"  skipped        {len(d['errors'])} image(s)"]
        lines += [f"    {e['path']}: {e['reason']}" for e in d["errors"][:20]]
        return "\n".join(lines)

    emit(d, as_json, human)


@click.command()
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["npz", "csv", "parquet"]), default=None,
              help="npz, csv or parquet [default: the one the --output suffix names, else npz].")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file [default: the cache path with the format's suffix]; never an "
                   "fxtl cache, head or run file.")
@json_option
@handle_errors
def export(cache, fmt, output, as_json):
    """Write a cache's features, labels, paths and split as npz, csv or parquet."""
    from ..features.export import export_cache, export_format

    fmt = export_format(fmt, output)
    out = export_cache(cache, fmt=fmt, output=output)
    emit({"output": str(out), "format": fmt}, as_json, lambda d: d["output"])


@click.command()
@click.option("--layers", "layers_of", default=None, metavar="NAME", callback=backbone_value,
              help="List the layer names of backbone NAME usable with --layer.")
@json_option
@handle_errors
def backbones(layers_of, as_json):
    """List the registered backbones and whether their weights are available offline."""
    from ..backbones.registry import list_backbones, load_backbone

    if layers_of:
        bb = load_backbone(layers_of)
        emit({"backbone": layers_of, "layers": bb.layer_names(), "default": "pooled",
              "feature_dim": bb.feature_dim}, as_json,
             lambda d: "\n".join(["pooled (default)"] + d["layers"]))
        return
    rows = list_backbones()
    emit({"backbones": rows}, as_json, lambda d: "\n".join(
        f"{r['name']:<38} {str(r['feature_dim'] or '?'):>5}  "
        f"{'offline' if r['available_offline'] else 'download'}  {r['description']}"
        for r in d["backbones"]) + "\nAlso: any torchvision model name, timm:<name>, ARCH=PATH, a finetune run folder.")
