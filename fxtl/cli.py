"""The ``fxtl`` command line: parses options, calls the library, prints.

Every result-producing command takes ``--json`` (stdout then holds exactly one JSON object;
progress and logs go to stderr) and ``--cache-dir`` (default ``./cache`` or ``$FXTL_CACHE``).
Exit codes: 0 success, 1 runtime failure with a one-line reason, 2 usage error.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from ._util import default_cache_dir, json_default
from .errors import FxtlError
from .runtime import DEVICES, PRECISIONS

__all__ = ["main", "cli"]


# ----------------------------------------------------------------------------- shared options
def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object with the results on stdout (logs go to stderr).")(f)


def cache_dir_option(f: Callable) -> Callable:
    return click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None, envvar="FXTL_CACHE", show_envvar=True,
                        help="Where caches, heads and runs go [default: ./cache].")(f)


def device_options(f: Callable) -> Callable:
    f = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="auto uses CUDA when present, else CPU.")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32 (fp16 on older GPUs).")(f)
    return f


def resolve_cache_dir(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def emit(result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    """Print ``result`` as one JSON object, or as the human text ``human(result)``."""
    if as_json:
        click.echo(json.dumps(result, default=json_default))
    else:
        click.echo(human(result))


def log(msg: str) -> None:
    click.echo(msg, err=True)


def handle_errors(f: Callable) -> Callable:
    """FxtlError -> one line on stderr, exit 1 (never a traceback for a user's mistake)."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except FxtlError as exc:
            click.echo(f"fxtl: error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("fxtl: interrupted (work done so far is kept; run again to resume)", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fxtl")
def cli() -> None:
    """fxtl: transfer learning on images.

    Extract frozen-CNN features once, fit scikit-learn heads on them in seconds, fine-tune the
    same backbone for comparison, and ask `fxtl advise` which fits your data.
    """


def main() -> None:
    cli()


# ============================================================================ extract stage
# (commands are added below, one section per stage)
@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--backbone", "-b", default="lite0", show_default=True,
              help="Registry name, torchvision name, timm:<name>, ARCH=PATH, or a finetune run folder.")
@click.option("--layer", default=None, help="Pool this intermediate layer instead of the penultimate features.")
@device_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="[default: 32 on CPU, 128 on CUDA]")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding processes [default: one per spare core].")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cache file path [default: <cache-dir>/<dataset>-<backbone>-<fingerprint>.h5].")
@click.option("--force", is_flag=True, help="Re-extract even if a matching cache exists.")
@cache_dir_option
@json_option
@handle_errors
def extract(data_dir, backbone, layer, device, precision, batch_size, workers, output, force,
            cache_dir, as_json):
    """Run a frozen backbone over DATA_DIR once and cache the features (HDF5).

    DATA_DIR holds class folders, or split folders (train, val, test) of class folders, or is
    a CSV manifest path,label[,split]. A matching cache is reused; a killed run resumes.
    """
    from .extract import extract as run_extract

    res = run_extract(data_dir, backbone=backbone, layer=layer, precision=precision, device=device,
                      batch_size=batch_size, workers=workers, cache_dir=resolve_cache_dir(cache_dir),
                      output=output, force=force, progress=True)

    def human(d):
        splits = ", ".join(f"{k} {v}" for k, v in d["splits"].items())
        how = "reused (cache hit)" if d["cache_hit"] else \
            f"{d['images_per_second']:.1f} images/s, {d['precision']} on {d['device']}"
        lines = [f"{d['cache']}", f"  {d['n']} images x {d['dim']} features ({splits}); "
                 f"{len(d['errors'])} skipped; {d['seconds']:.1f} s, {how}"]
        return "\n".join(lines)

    emit(res.to_dict(), as_json, human)


@cli.command()
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@handle_errors
def info(cache, as_json):
    """Print a cache's provenance, shape, splits and skipped images."""
    from .store import load_features

    fc = load_features(cache)
    d = {"cache": str(cache), "n": fc.n, "dim": fc.dim, "splits": fc.splits,
         "class_names": fc.class_names,
         "class_counts": {c: int((fc.labels == i).sum()) for i, c in enumerate(fc.class_names)},
         "errors": [{"path": p, "reason": r} for p, r in fc.errors],
         "format": fc.attrs.get("format"), "format_version": fc.attrs.get("format_version"),
         **fc.provenance}

    def human(d):
        pre = d.get("preprocessing") or {}
        lines = [f"{d['cache']}  ({d['format']} v{d['format_version']})",
                 f"  rows x dim     {d['n']} x {d['dim']}",
                 f"  splits         " + ", ".join(f"{k} {v}" for k, v in d["splits"].items()),
                 f"  classes        " + ", ".join(f"{c} ({n})" for c, n in d["class_counts"].items()),
                 f"  backbone       {d.get('backbone')}  layer {d.get('layer')}  precision {d.get('precision')}",
                 f"  weights sha256 {d.get('weights_sha256')}",
                 f"  preprocessing  resize {pre.get('resize')} ({pre.get('interpolation')}), crop {pre.get('crop')}, "
                 f"mean {pre.get('mean')}, std {pre.get('std')}",
                 f"  fingerprint    {d.get('fingerprint')}",
                 f"  dataset        {d.get('dataset_root')}",
                 f"  created        {d.get('created')} by fxtl {d.get('fxtl_version')}",
                 f"  skipped        {len(d['errors'])} image(s)"]
        lines += [f"    {e['path']}: {e['reason']}" for e in d["errors"][:20]]
        return "\n".join(lines)

    emit(d, as_json, human)


@cli.command()
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["npz", "csv", "parquet"]), default="npz", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file [default: the cache path with the format's suffix].")
@json_option
@handle_errors
def export(cache, fmt, output, as_json):
    """Write a cache's features, labels, paths and split as npz, csv or parquet."""
    from .export import export_cache

    out = export_cache(cache, fmt=fmt, output=output)
    emit({"output": str(out), "format": fmt}, as_json, lambda d: d["output"])


@cli.command()
@click.option("--layers", "layers_of", default=None, metavar="NAME",
              help="List the layer names of backbone NAME usable with --layer.")
@json_option
@handle_errors
def backbones(layers_of, as_json):
    """List the registered backbones and whether their weights are available offline."""
    from .backbones import list_backbones, load_backbone

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


# ============================================================================ advise stage
@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--backbone", "-b", default="lite0", show_default=True)
@click.option("--sample", type=click.IntRange(min=10), default=240, show_default=True,
              help="Images decoded to estimate similarity (stratified; the rest are only counted).")
@click.option("--large-per-class", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Median training images per class from which a dataset counts as large.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--run", "run_plan", is_flag=True, help="Execute the recommended commands, then compare.")
@device_options
@cache_dir_option
@json_option
@handle_errors
def advise(data_dir, backbone, sample, large_per_class, seed, run_plan, device, precision, cache_dir,
           as_json):
    """Say which of the four transfer-learning scenarios DATA_DIR is in, and what to run."""
    from .advise import advise as run_advise

    a = run_advise(data_dir, backbone=backbone, sample=sample, large_per_class=large_per_class,
                   seed=seed, device=device, precision=precision, progress=not as_json)
    d = a.to_dict()
    if run_plan:
        from .advise import run_plan as execute

        d["plan"] = execute(a, cache_dir=resolve_cache_dir(cache_dir), device=device,
                            precision=precision, seed=seed, log=log)

    def human(d):
        s, m = d["size"], d["similarity"]
        lines = [f"Scenario {d['scenario']}: {d['size']['category']} and {m['category']}",
                 f"  size        {s['train_images']} training images, {s['classes']} classes, "
                 f"median {s['images_per_class_median']:.0f}/class (min {s['images_per_class_min']}, "
                 f"imbalance {s['imbalance']:.1f}x); large from {s['large_per_class']}/class",
                 f"  similarity  {m['score']:.2f} (similar from {m['similar_at']}) on {m['sample']} sampled images:",
                 f"              linear probe on frozen features {m['probe_accuracy_features']:.3f} vs raw "
                 f"pixels {m['probe_accuracy_pixels']:.3f} (chance {m['chance']:.2f})"]
        if "imagenet_familiarity" in m:
            tops = ", ".join(f"{c.split(',')[0]} ({n})" for c, n in m["imagenet_top_predictions"])
            lines.append(f"              ImageNet familiarity {m['imagenet_familiarity']:.2f} "
                         f"(mean top-1 softmax {m['imagenet_mean_max_softmax']:.2f}; top: {tops})")
        lines += ["", d["explanation"], "", "Next:"] + [f"  {c}" for c in d["commands"]]
        if d.get("plan"):
            lines += ["", "Ran the plan:"] + [f"  {r}" for r in d["plan"].get("summary", [])]
        return "\n".join(lines)

    emit(d, as_json, human)
