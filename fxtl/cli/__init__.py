"""The ``fxtl`` command line: parses options, calls the library, prints.

Every result-producing command takes ``--json`` (stdout then holds exactly one JSON object;
progress and logs go to stderr); those that find or write caches, heads and runs by themselves
take ``--cache-dir`` (default ``./cache`` or ``$FXTL_CACHE``), while ``info``, ``export`` and
``merge`` work on the files they are given.
Exit codes: 0 success, 1 runtime failure with a one-line reason, 2 usage error.

This module holds the group and its exit-code contract; ``common`` the options and error
plumbing every command shares; one module per command group adds its commands.
"""
from __future__ import annotations

import json
import logging
import sys
import warnings

import click
from PIL import Image

from .._util import say
from ..errors import FxtlWarning
from ..features.cache_guard import CacheGuard
from . import features, heads, reporting, training
from .common import set_verbosity

__all__ = ["main", "cli"]


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
    set_verbosity(quiet=quiet, verbose=verbose)
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


for _command in (features.extract, features.merge, features.info, features.export,
                 features.backbones, heads.fit_head, heads.predict, heads.plot_embedding,
                 training.finetune, reporting.advise, reporting.demo, reporting.compare,
                 reporting.export_model):
    cli.add_command(_command)


def main() -> None:
    cli.main()
