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
