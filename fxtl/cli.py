"""The ``fxtl`` command line: parses options, calls the library, prints.

Every result-producing command takes ``--json`` (stdout then holds exactly one JSON object;
progress and logs go to stderr) and ``--cache-dir`` (default ``./cache`` or ``$FXTL_CACHE``).
Exit codes: 0 success, 1 runtime failure with a one-line reason, 2 usage error.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click
from PIL import Image

from ._util import default_cache_dir, dumps_json, say
from .errors import FxtlError, FxtlWarning, ParameterError
from .features.cache_guard import CacheGuard
from .heads.params import MAX_SEED
from .runtime import DEVICES, PRECISIONS

__all__ = ["main", "cli"]


# ----------------------------------------------------------------------------- shared options
# Every --seed: numpy and scikit-learn take 0 .. 2**32 - 1, so every command refuses the same.
SEED = click.IntRange(0, MAX_SEED)


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


def _backbone_value(ctx, param, value):
    """An unknown backbone name is a usage error (exit 2); the weights are loaded later."""
    if value is None:
        return None
    from .backbones.registry import parse_backbone_name

    try:
        parse_backbone_name(value)
    except FxtlError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def resolve_cache_dir(cache_dir: Path | None) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def emit(result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    """Print ``result`` as one JSON object, or as the human text ``human(result)``."""
    if as_json:
        try:
            text = dumps_json(result)
        except ValueError as exc:  # NaN is not JSON: a strict reader would reject the output
            raise Failure(f"the result holds a number JSON cannot carry ({exc}); please report "
                          "this, with the command") from None
        click.echo(text)
    else:
        click.echo(human(result))


# Set by the group's --quiet/--verbose for the command it runs.
_VERBOSITY = {"quiet": False, "verbose": False}


def log(msg: str) -> None:
    """A note on stderr (none under --quiet; warnings and errors print either way)."""
    if not _VERBOSITY["quiet"]:
        click.echo(msg, err=True)


def show_progress(as_json: bool = False) -> bool:
    """Progress bars and per-epoch lines: not under --quiet (bars only on a terminal, which the
    library's bars check themselves)."""
    return not _VERBOSITY["quiet"] and not as_json


def _option_for(param: str) -> click.Parameter | None:
    """The current command's option whose Python name is ``param`` (``test_size`` -> --test-size)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    return next((p for p in ctx.command.params if p.name == param), None)


class Failure(click.ClickException):
    """A user-facing failure: ``fxtl: error: <message>`` on stderr and ``exit_code`` (1)."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int = 1, prefix: str = "fxtl: error: ") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.prefix = prefix

    def show(self, file=None) -> None:
        click.echo(f"{self.prefix}{self.format_message()}", err=True)


# ``name=value`` in a library message: True, a quoted string or a bare word/number.
_ASSIGNMENT = re.compile(r"(?<![\w/.-])([a-z][a-z0-9_]*)=(True|'[^']*'|\"[^\"]*\"|[\w.-]+)")


def _flag(option: click.Parameter) -> str | None:
    opts = [o for o in getattr(option, "opts", []) if o.startswith("--")]
    return max(opts, key=len) if opts else None  # --cache-dir rather than -c


def _in_flags(exc: FxtlError) -> str:
    """The library's message, speaking this command's options instead of Python parameters.

    ``force=True`` -> ``--force``; ``device='cpu'`` -> ``--device cpu``; a ``name=value`` hint
    naming no option of this command (``nonfinite='drop'`` is Python only) is dropped with the
    clause it sits in; ``run_name`` (a Python name with an underscore) -> ``--run-name``; and
    the parameter the error is about (``exc.param``), at its last mention, becomes its option.
    """
    text = str(exc)
    if exc.param == "params":  # its KEY=VALUE are --param values (solver=saga), not options
        return text

    def assignment(m: re.Match) -> str:
        option = _option_for(m.group(1))
        flag = _flag(option) if option is not None else None
        if flag is None:
            return m.group(0)
        value = m.group(2).strip("'\"")
        return flag if getattr(option, "is_flag", False) else f"{flag} {value}"

    def python_only(m: re.Match) -> bool:
        option = _option_for(m.group(1))
        return option is None or _flag(option) is None

    # A fix that only the Python API offers: drop its clause (", or load it with x='y' ...").
    for m in reversed([m for m in _ASSIGNMENT.finditer(text) if python_only(m)]):
        comma, bare = text.rfind(", or ", 0, m.start()), text.rfind(" or ", 0, m.start())
        start = comma if comma >= 0 and bare == comma + 1 else max(comma, bare)
        end = text.find(";", m.end())
        end = len(text) if end < 0 else end
        if start >= 0 and text.rfind(";", start, m.start()) < 0:
            text = text[:start] + text[end:]
    text = _ASSIGNMENT.sub(assignment, text)
    for option in (click.get_current_context(silent=True).command.params
                   if click.get_current_context(silent=True) else []):
        flag = _flag(option)
        if flag and option.name and "_" in option.name:
            text = re.sub(rf"(?<![\w/.-]){re.escape(option.name)}(?![\w/.-])", flag, text)
    option = _option_for(exc.param) if exc.param else None
    flag = _flag(option) if option is not None else None
    if flag is None or flag in text:  # already named as an option (by a name=value hint)
        return text
    # the last mention: messages end with the fix; a path holding the same word is left alone
    spots = list(re.finditer(rf"(?<![\w/.-]){re.escape(exc.param)}(?![\w/.-])", text))
    return text if not spots else text[:spots[-1].start()] + flag + text[spots[-1].end():]


def handle_errors(f: Callable) -> Callable:
    """FxtlError -> one line on stderr, exit 1 (never a traceback for a user's mistake).

    A :class:`ParameterError` about a parameter that is one of the command's options is a usage
    error: click reports it against that option (exit 2). Both reach :class:`FxtlGroup.main`,
    which also prints them as one JSON object on stdout under ``--json``.
    """
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except ParameterError as exc:
            option = _option_for(exc.param)
            if option is not None:
                raise click.BadParameter(_in_flags(exc), param=option) from None
            raise Failure(_in_flags(exc)) from None
        except FxtlError as exc:
            raise Failure(_in_flags(exc)) from None
        except KeyboardInterrupt:
            raise Failure("interrupted (work done so far is kept; run again to resume)",
                          exit_code=130, prefix="fxtl: ") from None
    return wrapper


def _wants_json(args: list[str]) -> bool:
    """``--json`` among the options (not after a ``--`` that ends them)."""
    return "--json" in (args[:args.index("--")] if "--" in args else args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """fxtl's own warnings as one ``fxtl: warning:`` line; others as Python shows them."""
    if issubclass(category, FxtlWarning):
        say(f"fxtl: warning: {message}")  # on its own line, even while a progress bar is drawn
    else:
        click.echo(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"),
                   err=True)


class FxtlGroup(click.Group):
    """The command group; its ``main`` keeps the exit-code and ``--json`` contract.

    Every failure, click's own usage errors included, ends with ``exit_code`` (1 runtime, 2
    usage, 130 interrupted) and, under ``--json``, with exactly one JSON object
    ``{"error": ..., "exit_code": N}`` on stdout. fxtl's warnings print as one line each.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        args = list(sys.argv[1:] if args is None else args)
        as_json = _wants_json(args)

        def fail(message: str, code: int) -> None:
            if as_json:
                click.echo(json.dumps({"error": message, "exit_code": code}))
            sys.exit(code)

        with warnings.catch_warnings():
            warnings.simplefilter("default", FxtlWarning)  # each distinct warning once
            # fxtl refuses images over its own pixel limit by name (data.images.MAX_PIXELS);
            # Pillow's lower warning threshold would add a second, anonymous line.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.showwarning = _show_warning
            try:
                rv = super().main(args, prog_name, complete_var, False, **extra)
            except click.ClickException as exc:
                exc.show()
                fail(exc.format_message(), exc.exit_code)
            except click.Abort:
                click.echo("Aborted!", err=True)
                fail("aborted", 1)
            except Exception as exc:  # a bug: keep its traceback, but keep the JSON contract
                if as_json:
                    click.echo(json.dumps({"error": f"internal error: {type(exc).__name__}: {exc}",
                                           "exit_code": 1}))
                raise
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=FxtlGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fxtl")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bars or notes on stderr (warnings and errors still print).")
@click.option("-v", "--verbose", is_flag=True, help="Also fxtl's debug log on stderr.")
@click.option("--cache-probe/--no-cache-probe", default=True, envvar="FXTL_CACHE_PROBE",
              show_envvar=True,
              help="Read each feature cache in a child process first, so a file that crashes "
                   "the HDF5 library is one error line [default: on].")
@click.option("--malloc-tuning/--no-malloc-tuning", default=True, envvar="FXTL_MALLOC_TUNING",
              show_envvar=True, hidden=True,
              help="Let malloc keep freed activation buffers in commands that run a network.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, verbose: bool, cache_probe: bool,
        malloc_tuning: bool) -> None:
    """fxtl: transfer learning on images.

    Extract frozen-CNN features once, fit scikit-learn heads on them in seconds, fine-tune the
    same backbone for comparison, and ask `fxtl advise` which fits your data.

    Progress bars are drawn only when stderr is a terminal; elsewhere (CI logs) a fine-tune
    prints one plain line per epoch.
    """
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose cannot be combined; pick one")
    _VERBOSITY.update(quiet=quiet, verbose=verbose)
    logger = logging.getLogger("fxtl")
    for h in [h for h in logger.handlers if getattr(h, "_fxtl_cli", False)]:
        logger.removeHandler(h)
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fxtl: %(name)s: %(message)s"))
        handler._fxtl_cli = True
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    else:
        logger.setLevel(logging.NOTSET)
    # One guard per command: each cache is probed once, and the verdicts end with the command.
    ctx.with_resource(CacheGuard(isolate=cache_probe))
    ctx.obj = {"malloc_tuning": malloc_tuning}


def main() -> None:
    cli.main()


# ============================================================================ extract stage
# (commands are added below, one section per stage)
def _prepare_compute_process() -> None:
    """Process-wide settings for a command that runs a network; the library never makes them.

    malloc keeps freed activation buffers (fewer page faults per CPU forward pass), and a
    file-size limit (``ulimit -f``) makes writes fail with EFBIG, reported in one line, instead
    of SIGXFSZ killing the process half-way through a file.
    """
    import signal

    from .runtime import keep_freed_memory

    ctx = click.get_current_context(silent=True)
    if ctx is None or (ctx.find_root().obj or {}).get("malloc_tuning", True):
        keep_freed_memory()
    if hasattr(signal, "SIGXFSZ"):
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # not the main thread (an embedding application): leave it
            pass


def _parse_shard_option(ctx, param, value):
    if value is None:
        return None
    from .distributed import parse_shard

    try:
        return parse_shard(value)
    except FxtlError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--backbone", "-b", default="lite0", show_default=True, callback=_backbone_value,
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
    from .features.extraction import extract as run_extract

    _prepare_compute_process()
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


@cli.command()
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
    from .features.extraction import merge_shards

    res = merge_shards(list(shards), output=output, force=force, keep_shards=keep_shards)

    def human(d):
        splits = ", ".join(f"{k} {v}" for k, v in d["splits"].items())
        how = "already merged" if d["cache_hit"] else f"merged from {d['shards']} shards"
        return "\n".join([d["cache"], f"  {d['n']} images x {d['dim']} features ({splits}); "
                                      f"{len(d['errors'])} skipped; {d['seconds']:.1f} s, {how}"])

    emit(res.to_dict(), as_json, human)


@cli.command()
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
@handle_errors
def info(cache, as_json):
    """Print a cache's provenance, shape, splits and skipped images."""
    from .features.store import load_features, summarize

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


@cli.command()
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
    from .features.export import export_cache, export_format

    fmt = export_format(fmt, output)
    out = export_cache(cache, fmt=fmt, output=output)
    emit({"output": str(out), "format": fmt}, as_json, lambda d: d["output"])


@cli.command()
@click.option("--layers", "layers_of", default=None, metavar="NAME", callback=_backbone_value,
              help="List the layer names of backbone NAME usable with --layer.")
@json_option
@handle_errors
def backbones(layers_of, as_json):
    """List the registered backbones and whether their weights are available offline."""
    from .backbones.registry import list_backbones, load_backbone

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
@click.option("--backbone", "-b", default="lite0", show_default=True, callback=_backbone_value)
@click.option("--sample", type=click.IntRange(min=10), default=240, show_default=True,
              help="Images decoded to estimate similarity (stratified; the rest are only counted).")
@click.option("--large-per-class", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Median training images per class from which a dataset counts as large.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--run", "run_plan", is_flag=True, help="Execute the recommended commands, then compare.")
@device_options
@cache_dir_option
@json_option
@handle_errors
def advise(data_dir, backbone, sample, large_per_class, seed, run_plan, device, precision, cache_dir,
           as_json):
    """Say which of the four transfer-learning scenarios DATA_DIR is in, and what to run."""
    from .advice import advise as run_advise

    a = run_advise(data_dir, backbone=backbone, sample=sample, large_per_class=large_per_class,
                   seed=seed, device=device, precision=precision,
                   progress=show_progress(as_json))
    d = a.to_dict()
    if run_plan:
        from .advice import run_plan as execute

        d["plan"] = execute(a, cache_dir=resolve_cache_dir(cache_dir), device=device,
                            precision=precision, seed=seed, log=log)

    def human(d):
        s, m = d["size"], d["similarity"]
        lines = [f"Scenario {d['scenario']}: {d['size']['category']} and {m['category']}",
                 f"  size        {s['train_images']} training images, {s['classes']} classes, "
                 f"median {s['images_per_class_median']:.0f}/class (min {s['images_per_class_min']}, "
                 f"imbalance {s['imbalance']:.1f}x); large from {s['large_per_class']}/class",
                 f"  similarity  {m['score']:.2f}"
                 + (f" [95% {m['score_ci95'][0]:.2f}-{m['score_ci95'][1]:.2f}]" if m.get("score_ci95") else "")
                 + f" (similar from {m['similar_at']}) on {m['sample']} sampled images:",
                 f"              linear probe on frozen features {m['probe_accuracy_features']:.3f} vs raw "
                 f"pixels {m['probe_accuracy_pixels']:.3f} (chance {m['chance']:.2f})"]
        if "imagenet_familiarity" in m:
            tops = ", ".join(f"{c.split(',')[0]} ({n})" for c, n in m["imagenet_top_predictions"])
            lines.append(f"              ImageNet familiarity {m['imagenet_familiarity']:.2f} "
                         f"(mean top-1 softmax {m['imagenet_mean_max_softmax']:.2f}; top: {tops})")
        lines += ["", d["explanation"], "", "Next:"] + [f"  {c}" for c in d["commands"]]
        if d.get("plan"):
            from .report.comparison import format_table

            plan = d["plan"]
            lines += ["", "Ran the plan:"] + [f"  {r}" for r in plan.get("summary", [])[:-1]]
            lines += ["", format_table(plan["compare"]["rows"], paired=plan["compare"]["paired"]),
                      "", plan["verdict"]["text"]]
        return "\n".join(lines)

    emit(d, as_json, human)


@cli.command()
@click.option("--per-class", type=click.IntRange(min=8), default=60, show_default=True,
              help="Digits per class (10 classes).")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Epochs of the short fine-tune.")
@click.option("--image-size", type=click.IntRange(min=32), default=128, show_default=True,
              help="Input side of a fine-tune from a zero classifier (small keeps it quick on a CPU); "
                   "the digits land in scenario 3, whose LP-FT fine-tune runs at the head's input size.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@device_options
@cache_dir_option
@json_option
@handle_errors
def demo(per_class, epochs, image_size, seed, device, precision, cache_dir, as_json):
    """Run the whole job offline on a small real dataset (scikit-learn's digits).

    advise -> extract -> every head -> a short fine-tune -> compare; prints where the report
    and the plots are.
    """
    from .demo import run_demo

    r = run_demo(cache_dir=resolve_cache_dir(cache_dir), per_class=per_class, epochs=epochs,
                 image_size=image_size, seed=seed, device=device, precision=precision, log=log)

    def human(r):
        lines = ["", f"fxtl demo: scenario {r['advice']['scenario']} "
                     f"({r['advice']['size']['category']}, {r['advice']['similarity']['category']}) "
                     f"in {r['seconds']} s", ""]
        names = [("head " if run["kind"] == "head" else "") + run["model"] for run in r["plan"]["runs"]]
        w = max([22, *map(len, names)])
        lines.append(f"  {'method':<{w}} {'split':<6} {'accuracy [95% CI]':>22} {'macro-F1':>8}")
        for name, run in zip(names, r["plan"]["runs"]):
            ci = run.get("accuracy_ci95")
            ci = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(f"  {name:<{w}} {run['split']:<6} "
                         f"{run['accuracy']:>7.3f} {ci:>14} {run['macro_f1']:>8.3f}")
        if r["plan"].get("verdict"):
            lines += ["", r["plan"]["verdict"]["text"]]
        lines += ["", f"Report: {r['report']}", f"Embedding map: {r['embedding_png']}"]
        chart = r["plan"].get("compare", {}).get("chart")
        if chart:
            lines.append(f"Comparison chart: {chart}")
        lines.append("Run folders (metrics.json, confusion.png, learning_curves.png):")
        lines += [f"  {run['run_dir']}" for run in r["plan"]["runs"]]
        return "\n".join(lines)

    emit(r, as_json, human)


# ============================================================================ heads stage
import contextlib  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from .heads.config import HeadConfig  # noqa: E402
from .heads.dask_backend import BACKENDS  # noqa: E402
from .heads.fitting import fit_heads, stop_workers  # noqa: E402
from .heads.runs import check_destination, destination, save_runs  # noqa: E402
from .heads.source import LARGE_ROWS  # noqa: E402
from .heads.registry import head_names, parse_params  # noqa: E402 - --model's choices
from .report.plots import METHODS as EMBEDDING_METHODS  # noqa: E402


def _pca_value(ctx, param, value):
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter("give a number of components (e.g. 64) or a variance fraction "
                                 "(e.g. 0.95)") from None
    if v >= 1 and v.is_integer():
        return int(v)
    if 0 < v < 1:
        return v
    raise click.BadParameter("give a whole number of components >= 1 or a fraction in (0, 1)")


def _jobs_value(ctx, param, value):
    if value == 0:  # joblib: -1 is every core, -2 all but one; 0 means nothing
        raise click.BadParameter("0 jobs cannot run anything; give a count >= 1, or -1 for every core")
    return value


@contextlib.contextmanager
def _workers_stopped_on_exit(stop: Callable[[], None]):
    """SIGTERM ends the command like Ctrl-C; every exit path stops the search's worker processes
    (loky's reusable pool would otherwise outlive us, re-parented to init)."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        yield
    finally:
        stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _ProgressBar:
    """``fxtl: svm: 12/16 candidates, ETA 3 s`` on stderr, redrawn in place on a terminal."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, model: str) -> None:
        now = time.perf_counter()
        t0 = self.started.setdefault(model, now)
        eta = (now - t0) / max(done, 1) * (total - done)
        line = f"fxtl: {model}: {done}/{total} candidates, ETA {eta:.0f} s"
        if self.tty:
            click.echo("\r" + line + ("\n" if done >= total else ""), err=True, nl=False)
        elif done >= total:
            click.echo(line.replace(", ETA 0 s", f" in {now - t0:.1f} s"), err=True)


def _fmt_params(p: dict) -> str:
    def short(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k}={short(v)}" for k, v in (p or {}).items()) or "defaults"


@cli.command("fit-head")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "-m", "models", multiple=True, default=("logreg",), show_default=True,
              type=click.Choice([*head_names(), "all"]), help="Head to fit; repeat for several, or all.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Estimator parameter, fixed (not searched), e.g. --param C=0.1; repeatable.")
@click.option("--no-search", is_flag=True, help="Fit the default parameters, no hyper-parameter search.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seeds folds, hold-out and estimators.")
@click.option("--jobs", "-j", type=int, default=-1, show_default=True, callback=_jobs_value,
              help="Parallel search jobs (joblib); -1 uses every core.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Hold-out fraction (per class) when the cache has only train.")
@click.option("--cv-folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="k of the stratified k-fold CV used when there is no val split to select on.")
@click.option("--l2-normalize", is_flag=True, help="L2-normalise feature rows before scaling.")
@click.option("--pca", default=None, callback=_pca_value, metavar="N|FRACTION",
              help="PCA after scaling: components, or explained-variance fraction.")
@click.option("--large-threshold", type=click.IntRange(min=1), default=LARGE_ROWS, show_default=True,
              help="Above this many rows, fit scalable streaming estimators (SGD, partial_fit).")
@click.option("--run-name", default=None, help="Run folder name [default: <dataset>-<backbone>-<model>-<time>].")
@click.option("--backend", type=click.Choice(BACKENDS), default="loky", show_default=True,
              help="Where the search's fits run: this process (loky, threading: threads) "
                   "or a Dask cluster (pip install \"fxtl[dask]\"; docs/scaling.md).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Dask scheduler for --backend dask, e.g. tcp://host:8786 [default: "
                   "$DASK_SCHEDULER_ADDRESS, else a local cluster].")
@click.option("--budget", default=None, metavar="DURATION",
              help="Time the searches may take in all, e.g. 60s or 2m (shared by the heads; "
                   "each search stops between candidates and says so).")
@click.option("--solver", type=click.Choice(["auto", "sklearn", "torch"]), default="auto",
              show_default=True,
              help="logreg, linear-svm and mlp in scikit-learn or in torch (L-BFGS/Adam, every "
                   "core, CUDA when present); auto takes torch on large data.")
@cache_dir_option
@json_option
@handle_errors
def fit_head(cache, models, params, no_search, seed, jobs, test_size, cv_folds, l2_normalize, pca,
             large_threshold, run_name, backend, scheduler, budget, solver, cache_dir, as_json):
    """Fit scikit-learn heads on a feature CACHE and report honest scores.

    Hyper-parameters are selected on val when a test split exists, else by stratified k-fold
    CV on train; scores are reported on test, else val, else a seeded hold-out of train. Each head
    is saved in <cache-dir>/runs/<run>/ with metrics.json, rows.json, confusion.png and
    head.skops. Large data is searched on a subsample with one held-out split, then refitted on
    every row; metrics.json's "strategy" says what was done.
    """
    if scheduler and backend != "dask":
        raise click.BadParameter("needs --backend dask", param_hint="--scheduler")
    config = HeadConfig(models=models, params=parse_params(params), search=not no_search,
                        seed=seed, jobs=jobs, test_size=test_size, cv_folds=cv_folds,
                        l2_normalize=l2_normalize, pca=pca, large_threshold=large_threshold,
                        backend=backend, scheduler=scheduler, budget=budget, solver=solver)
    where = destination(cache_dir=resolve_cache_dir(cache_dir), run_name=run_name)
    check_destination(where, config.models)  # before the fit: a taken name costs no fitting
    results = []
    try:
        with _workers_stopped_on_exit(stop_workers):
            results = fit_heads(cache, config=config, log=log,
                                progress=_ProgressBar() if show_progress() else None)
            save_runs(results, where)
    except KeyboardInterrupt:
        saved = [r.run_dir.name for r in results if r.run_dir is not None]
        kept = f"kept {', '.join(saved)}; the others were not written" if saved else \
            "no run folder was written (a head's folder appears only whole, after the fit)"
        raise Failure(f"interrupted; {kept}: running the command again fits the heads from "
                      "the start", exit_code=130, prefix="fxtl: ") from None
    runs = [r.to_dict() for r in results]
    for r in runs:
        for note in r["notes"] or []:
            log(f"fxtl: {r['model']}: {note}")
    best = max(runs, key=lambda r: (r["accuracy"], r["macro_f1"]))
    d = {"cache": str(cache), "runs": runs, "best": best["model"]}

    def human(d):
        head = (f"{'model':<11} {'split':<8} {'accuracy':>8} {'bal.acc':>8} {'macro-F1':>8} "
                f"{'fit s':>7} {'pred s':>7}  {'selection':<10} best params")
        lines = [head, "-" * len(head)]
        for r in d["runs"]:
            lines.append(f"{r['model']:<11} {r['split']:<8} {r['accuracy']:>8.4f} "
                         f"{r['balanced_accuracy']:>8.4f} {r['macro_f1']:>8.4f} {r['fit_seconds']:>7.2f} "
                         f"{r['predict_seconds']:>7.3f}  {r['selection']:<10} {_fmt_params(r['best_params'])}")
        if len(results) == 1:
            from .report.metrics import format_metrics

            lines += ["", format_metrics(results[0].metrics)]
        b = next(r for r in d["runs"] if r["model"] == d["best"])
        lines += ["", f"best: {b['model']} ({b['accuracy']:.4f} on {b['split']}); head: {b['head']}"]
        if len(d["runs"]) > 1:
            lines.append(f"runs: {Path(b['run_dir']).parent}")
        return "\n".join(lines)

    emit(d, as_json, human)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="List the k most likely classes per image.")
@click.option("--trust", is_flag=True,
              help="Load a head whose JSON sidecar is missing or does not match, or a fine-tuned "
                   "run whose fxtl-model.json records no weights_sha256. A joblib file is a "
                   "pickle: loading one can run arbitrary code, so only for files you made yourself.")
@device_options
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: 128 on CUDA; on CPU 16 at bf16, 4 at fp32].")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Decoding processes.")
@click.option("--format", "fmt", type=click.Choice(["text", "csv"]), default="text",
              show_default=True,
              help="csv: one row per input on stdout (path,label,probability,top_k,error); "
                   "--json overrides it.")
@cache_dir_option
@json_option
@handle_errors
def predict(model, inputs, top_k, trust, device, precision, batch_size, workers, fmt, cache_dir,
            as_json):
    """Label images with a saved head (MODEL: a fit-head run folder or its head.skops), a
    fine-tuned run folder (fxtl-model.json) or an exported model.onnx (`fxtl export-model`).

    INPUTS are image files, folders (searched recursively) or feature caches (.h5, heads only).
    The head's backbone runs with the same weights, preprocessing, layer and precision (auto =
    the precision of the head's cache). Unreadable images are reported and skipped.
    """
    from .prediction import predict as run_predict

    _prepare_compute_process()
    res = run_predict(model, inputs, top_k=top_k, trust=trust, device=device, precision=precision,
                      batch_size=batch_size, workers=workers, cache_dir=resolve_cache_dir(cache_dir),
                      progress=show_progress(as_json))
    for note in res.notes:
        log(f"fxtl: {note}")

    def human(d):
        width = min(60, max([len(p["path"]) for p in d["predictions"]] + [4]))
        lines = []
        for p in d["predictions"]:
            line = f"{p['path']:<{width}}  {p['label']:<16} {p['probability']:.4f}"
            if len(p["top_k"]) > 1:
                line += "   " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in p["top_k"])
            lines.append(line)
        lines += [f"skipped {e['path']}: {e['reason']}" for e in d["errors"]]
        return "\n".join(lines)

    emit(res.to_dict(), as_json, _predictions_csv if fmt == "csv" else human)


def _predictions_csv(d: dict[str, Any]) -> str:
    """``fxtl predict --format csv``: a header, one row per prediction, then one per skipped
    input (empty label, the reason in ``error``); ``top_k`` holds ``label=p;label=p``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "probability", "top_k", "error"])
    for p in d["predictions"]:
        w.writerow([p["path"], p["label"], f"{p['probability']:.6f}",
                    ";".join(f"{t['label']}={t['probability']:.6f}" for t in p["top_k"]), ""])
    for e in d["errors"]:
        w.writerow([e["path"], "", "", "", e["reason"]])
    return buf.getvalue().rstrip("\n")


@cli.command("plot-embedding")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(EMBEDDING_METHODS), default="pca", show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
              help="Only this split [default: all, told apart by marker].")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG path [default: <cache-dir>/plots/<cache>-<method>.png].")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--max-points", type=click.IntRange(min=3), default=5000, show_default=True,
              help="Subsample larger caches (stratified by class).")
@click.option("--perplexity", type=click.FloatRange(min=1.0), default=30.0, show_default=True,
              help="t-SNE perplexity.")
@cache_dir_option
@json_option
@handle_errors
def plot_embedding(cache, method, split, output, seed, max_points, perplexity, cache_dir, as_json):
    """Draw a 2-D map (PCA or t-SNE) of a CACHE's features, coloured by class, as a PNG."""
    from .report.plots import plot_embedding as run_plot

    res = run_plot(cache, method=method, split=split, output=output, seed=seed,
                   max_points=max_points, perplexity=perplexity, cache_dir=resolve_cache_dir(cache_dir))
    for note in res.notes:
        log(f"fxtl: {note}")
    emit(res.to_dict(), as_json, lambda d: d["plot"])


# ============================================================================ finetune stage
from .training.config import BN_FROZEN_BELOW, BN_MODES, INITS, MONITORS, OPTIMIZERS  # noqa: E402


class _Trainable(click.ParamType):
    """``all``, ``head`` or ``last:N`` (N checked against the backbone by the library)."""

    name = "all|head|last:N"

    def convert(self, value, param, ctx):
        import re

        text = str(value).strip().lower()
        if text in ("all", "head") or re.fullmatch(r"last:[1-9]\d*", text):
            return text
        self.fail(f"{value!r} is not all, head or last:N (e.g. last:2)", param, ctx)


@cli.command()
@click.argument("data_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--backbone", "-b", default="lite0", show_default=True, callback=_backbone_value,
              help="Registry name, torchvision name, timm:<name>, ARCH=PATH, or a finetune run folder.")
@click.option("--trainable", type=_Trainable(), default="all", show_default=True,
              help="What trains: all, head (the new classifier), or last:N (last N blocks + classifier).")
@click.option("--epochs", type=click.IntRange(min=0), default=10, show_default=True,
              help="Epochs (0: only evaluate the initial model, e.g. an --init-head probe).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Peak learning rate of the classifier [default: 5e-4 adamw, 1e-2 sgd; 0.4x "
                   "that from the probe].")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per optimizer step; under torchrun, of all processes together "
                   "(each takes batch-size / world-size).")
@click.option("--image-size", type=click.IntRange(min=16), default=None,
              help="Input side in pixels [default: the backbone's, 224 for lite0].")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
              help="AdamW, or SGD with Nesterov momentum.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="On weights only (not biases or norm layers).")
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True, help="SGD only.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Linear warm-up, then cosine decay (per step).")
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Discriminative learning rates: each block down from the classifier trains at "
                   "this factor of the one above (1: the same rate everywhere).")
@click.option("--bn", type=click.Choice(BN_MODES), default="auto", show_default=True,
              help=f"BatchNorm statistics; auto freezes them when a class has under "
                   f"{BN_FROZEN_BELOW} training images.")
@click.option("--patience", type=click.IntRange(min=0), default=3, show_default=True,
              help="Early stopping: epochs without improvement on the selection split (val "
                   "when a test split reports; a hold-out of train with train only; none with "
                   "two splits) (0: never stop early).")
@click.option("--monitor", type=click.Choice(MONITORS), default="accuracy", show_default=True,
              help="Selection-split metric for early stopping and the kept epoch (ties: lower loss).")
@click.option("--crop-scale", type=click.FloatRange(0, 1, min_open=True), nargs=2, default=(0.25, 1.0),
              show_default=True, help="Area fraction range of the random resized crop.")
@click.option("--no-flip", "no_flip", is_flag=True,
              help="No random horizontal flips (for data where a mirror image is another class: digits, text).")
@click.option("--init", type=click.Choice(INITS), default="probe", show_default=True,
              help="How the classifier starts: probe = a logistic regression fitted on the "
                   "training images' features (LP-FT, Kumar et al. 2022; kept as epoch 0 unless "
                   "an epoch beats it on val); zero = a zero classifier.")
@click.option("--init-head", type=click.Path(exists=True, path_type=Path), default=None,
              help="Start the classifier from a fit-head logreg run refitted on the training "
                   "images (LP-FT with that head's settings; overrides --init).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seeds the classifier, shuffling, augmentation and hold-out.")
@click.option("--test-size", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Stratified hold-out fraction when DATA_DIR has only train.")
@device_options
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding processes [default: none on a CPU with <= 2 cores, else one per spare core].")
@click.option("--run-name", default=None,
              help="Run folder name [default: <dataset>-<backbone>-ft-<trainable>-<config hash>].")
@click.option("--resume", is_flag=True,
              help="Continue a killed run (--run-name, else the latest of the same settings).")
@cache_dir_option
@json_option
@handle_errors
def finetune(data_dir, run_name, resume, cache_dir, as_json, no_flip, patience, **options):
    """Fine-tune the backbone on DATA_DIR (same splits and metrics as fit-head).

    The classifier starts from a logistic regression fitted on the training images' features
    (--init zero: from zeros). Trains on train, keeps the best epoch on val (epoch 0 is that
    start) and reports on test. With two splits the second
    is only reported on and the last epoch is kept; with only train, it reports on fit-head's
    stratified hold-out and selects on a second one. No image both selects and reports. The run folder
    <cache-dir>/runs/<run>/ holds the model (usable as --backbone and by predict), metrics.json,
    rows.json, learning curves and confusion matrix.

    \b
    Distributed (DistributedDataParallel; gloo on CPU, NCCL on CUDA):
      torchrun --nproc-per-node 2 -m fxtl finetune DATA_DIR    one node
      torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 --nproc-per-node 4 \\
               -m fxtl finetune DATA_DIR                        several (shared file system)
    --batch-size stays the batch of one optimizer step, so results match a single process and
    --resume works with another number of processes.
    """
    from .training.config import FinetuneConfig
    from .training.loop import finetune as run_finetune

    _prepare_compute_process()

    # Every other option is a FinetuneConfig field of the same name.
    config = FinetuneConfig(flip=not no_flip, patience=patience or None, **options)
    res = run_finetune(data_dir, config=config, cache_dir=resolve_cache_dir(cache_dir),
                       run_name=run_name, resume=resume, progress=show_progress())
    if res.rank != 0:  # under torchrun only rank 0 reports, so stdout holds one result
        return
    for note in res.metrics.get("notes", []):
        log(f"fxtl: {note}")

    def human(d):
        from .report.metrics import format_metrics

        return "\n".join([
            f"{d['run_dir']}",
            f"  {d['model']}: {d['epochs']} epoch(s), kept epoch {d['best_epoch']}"
            f"{' (stopped early)' if d['stopped_early'] else ''}; {d['trainable_params']:,} trained "
            f"parameters; {d['fit_seconds']:.1f} s training at {d['train_images_per_second']:.1f} "
            f"images/s ({d['precision']} on {d['device']}, BatchNorm {d['bn']})",
            f"  on {d['split']}: " + format_metrics(res.metrics).replace("\n", "\n  ")])

    emit(res.to_dict(), as_json, human)


@cli.command()
@click.argument("runs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--dataset", default=None,
              help="Only runs of this dataset (its name, or a prefix of its fingerprint).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Bar chart PNG [default: <cache-dir>/comparison-<dataset>.png].")
@click.option("--pair", "pairs", nargs=2, multiple=True, metavar="A B",
              help="Also test run A against run B (folder path or name) with the exact McNemar "
                   "test on the images both scored; repeatable.")
@cache_dir_option
@json_option
@handle_errors
def compare(runs, dataset, output, pairs, cache_dir, as_json):
    """Heads and fine-tunes side by side: accuracy and macro-F1 with 95% intervals, trained
    parameters, training time (feature extraction counted once for heads) and inference speed.

    Runs scored on different images (another dataset fingerprint or split) go in separate
    tables. The best head and the best fine-tune of a table are compared with an exact McNemar
    test on the images both scored.

    RUNS are run folders; default: every run under <cache-dir>/runs.
    """
    from .report.comparison import compare as run_compare
    from .report.comparison import format_table

    res = run_compare(cache_dir=resolve_cache_dir(cache_dir), runs=runs, dataset=dataset,
                      output=output, pairs=pairs)
    for note in res.notes:
        log(f"fxtl: {note}")
    emit(res.to_dict(), as_json,
         lambda d: f"{format_table(d['rows'], paired=d['paired'])}\nchart: {d['chart']}")


# ============================================================================ deploy stage
@cli.command("export-model")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The .onnx file to write [default: RUN/model.onnx]; a sidecar OUTPUT.json "
                   "holds the same metadata.")
@click.option("--input-dtype", type=click.Choice(["uint8", "float32"]), default="uint8",
              show_default=True, help="Type of the image input (float32 holds 0..255 values).")
@click.option("--opset", type=click.IntRange(min=13), default=17, show_default=True,
              help="ONNX opset of the default domain.")
@cache_dir_option
@json_option
@handle_errors
def export_model(run, output, input_dtype, opset, cache_dir, as_json):
    """Write a head run (backbone + head in one graph) or a fine-tuned RUN as one ONNX file.

    The graph takes RGB images already resized and centre-cropped to the model's input size
    (uint8 NCHW, any batch size), normalises them itself and returns probabilities per class;
    the resize recipe and class names are in its metadata. Run it with
    `fxtl predict model.onnx IMAGES...` or with onnxruntime alone (docs/onnx.md).
    Needs the onnx extra: pip install 'fxtl[onnx]'.
    """
    from .deploy.onnx_graph import export_model as run_export

    res = run_export(run, output=output, input_dtype=input_dtype, opset=opset,
                     cache_dir=resolve_cache_dir(cache_dir))
    emit(res.to_dict(), as_json,
         lambda d: (f"{d['output']}  ({d['kind']} {d['model']}, {len(d['class_names'])} classes, "
                    f"input {d['input']['dtype']} {d['input']['shape']}, opset {d['opset']}, "
                    f"max diff vs fxtl {d['max_abs_diff']:.1e})\nsidecar: {d['sidecar']}"))
