"""Errors a user can act on.

Every error fxtl raises on purpose is an :class:`FxtlError`: its message is one line that names
the file (or option) at fault and says how to fix it. The CLI prints it and exits with status 1;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["FxtlError", "DataError", "CacheError", "BackboneError", "ProvenanceError",
           "ParameterError", "FxtlWarning"]


class FxtlError(Exception):
    """Base class: a one-line, actionable failure (exit status 1 in the CLI).

    ``param``, when given, is the Python parameter (``cache_dir``) whose value the message asks
    the user to change; the message names that parameter, and the CLI shows the matching option
    (``--cache-dir``) in its place.
    """

    param: str | None = None

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        if param is not None:
            self.param = param

    def __reduce__(self):
        # Pickled whole (message, param, class), whatever the subclass's __init__ takes: an
        # error raised in a worker process (fxtl.heads.side_by_side) reaches the caller as itself.
        return _rebuild, (type(self), self.args, self.__dict__)


class DataError(FxtlError):
    """The dataset (folder, manifest, image) cannot be used as given."""


class CacheError(FxtlError):
    """A feature cache is missing, of another format or version, or damaged."""


class BackboneError(FxtlError):
    """A backbone name is unknown or its weights cannot be had (e.g. offline)."""


class ProvenanceError(FxtlError):
    """An artifact does not match what it is used with (other backbone, tampered file...)."""


class ParameterError(FxtlError, ValueError):
    """A keyword argument of a library call has a value it cannot take.

    ``param`` is the Python parameter's name (``lr``, ``test_size``); the message speaks of that
    name, never of a command-line option. The CLI maps ``param`` to its option and reports a usage
    error (exit status 2).
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _rebuild(cls: type, args: tuple, state: dict) -> FxtlError:
    err = Exception.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class FxtlWarning(UserWarning):
    """Something fxtl did on the user's behalf that they should know of (a skipped folder, a
    dropped duplicate row). The CLI prints it as one ``fxtl: warning: ...`` line on stderr."""
