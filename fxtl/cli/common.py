"""What every ``fxtl`` command shares: its options, printing, and how errors become exit codes.

Every result-producing command takes ``--json`` (stdout then holds exactly one JSON object;
progress and logs go to stderr); those that find or write caches, heads and runs by themselves
take ``--cache-dir`` (default ``./cache`` or ``$FXTL_CACHE``), while ``info``, ``export`` and
``merge`` work on the files they are given.
Exit codes: 0 success, 1 runtime failure with a one-line reason, 2 usage error.
"""
from __future__ import annotations

import functools
import re
import signal
from pathlib import Path
from typing import Any, Callable

import click

from .._util import default_cache_dir, dumps_json
from ..errors import FxtlError, ParameterError
from ..heads.params import MAX_SEED
from .. import runtime
from ..runtime import DEVICES, PRECISIONS

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


def backbone_value(ctx, param, value):
    """An unknown backbone name is a usage error (exit 2); the weights are loaded later."""
    if value is None:
        return None
    from ..backbones.registry import parse_backbone_name

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


def set_verbosity(*, quiet: bool, verbose: bool) -> None:
    """The group's --quiet/--verbose, for :func:`log` and :func:`show_progress`."""
    _VERBOSITY.update(quiet=quiet, verbose=verbose)


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


# ``finetune(data, resume=True, run_name='x')`` in a library message: a call of a command.
_CALL = re.compile(r"\b(extract|finetune|fit_head|advise|export_model)\(([^()]*)\)")


def _as_command(m: re.Match) -> str:
    """A library call named in a message, as its command line (``fxtl finetune DATA --resume``)."""
    words = [f"fxtl {m.group(1).replace('_', '-')}"]
    for arg in (a.strip() for a in m.group(2).split(",") if a.strip()):
        name, eq, value = arg.partition("=")
        if not eq:
            words.append(name.upper())
            continue
        flag = "--" + name.replace("_", "-")
        value = value.strip("'\"")
        words.append(flag if value == "True" else f"{flag} {value}")
    return "`" + " ".join(words) + "`"


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
    text = _CALL.sub(_as_command, text)

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



def prepare_compute_process() -> None:
    """Process-wide settings for a command that runs a network; the library never makes them.

    malloc keeps freed activation buffers (fewer page faults per CPU forward pass), and a
    file-size limit (``ulimit -f``) makes writes fail with EFBIG, reported in one line, instead
    of SIGXFSZ killing the process half-way through a file.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is None or (ctx.find_root().obj or {}).get("malloc_tuning", True):
        runtime.keep_freed_memory()  # through its module, which tests patch
    if hasattr(signal, "SIGXFSZ"):
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # not the main thread (an embedding application): leave it
            pass
