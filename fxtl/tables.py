"""Results as pandas tables (``.to_frame()``); pandas is optional, imported only when asked.

Nested values (a ``top_k`` list, a ``[lo, hi]`` interval) stay one cell each, so a frame holds
exactly what the result's ``to_dict()`` holds, one record per row.
"""
from __future__ import annotations

from typing import Any, Sequence

from .errors import FxtlError

__all__ = ["require_pandas", "records_frame"]


def require_pandas():
    """The pandas module, or a one-line FxtlError saying how to install it."""
    try:
        import pandas
    except ImportError:
        raise FxtlError("to_frame() needs pandas, an optional dependency; install it with "
                        "`pip install pandas` (or `pip install 'fxtl[export]'`)") from None
    return pandas


def records_frame(records: Sequence[dict[str, Any]], *, first: Sequence[str] = ()):
    """A DataFrame of ``records`` (one row each), with the columns named in ``first`` leading."""
    pd = require_pandas()
    frame = pd.DataFrame.from_records(list(records))
    lead = [c for c in first if c in frame.columns]
    return frame[lead + [c for c in frame.columns if c not in lead]]
