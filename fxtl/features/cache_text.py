"""Text in the feature cache: fixed-length UTF-8 and the lossless escape for non-UTF-8 names.

docs/cache-format.md, "Text". A file name arrives as the ``str`` that ``os.fsdecode`` gives, which
holds surrogate escapes (U+DC80..U+DCFF) for bytes that are not UTF-8. Such a str cannot be stored
as UTF-8, so the whole element (dataset or attribute) it belongs to is written *escaped*: each
value's bytes, with ``\\`` written as ``\\\\`` and each byte that is not part of valid UTF-8 as
``\\xNN``. The element's name is listed in the root attribute ``escaped``. Every other element is
plain UTF-8, readable as is.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

import h5py
import numpy as np

from .spec import JSON_ATTRS

__all__ = ["ESCAPED_ATTR", "encode_text", "decode_text", "escape", "unescape", "fixed_utf8",
           "read_string_array", "escaped_names", "decode_attr", "cache_attrs", "read_strings"]

# Root attribute listing the elements written escaped: "/dataset/path" or "@attribute".
ESCAPED_ATTR = "escaped"
_ESCAPE_RE = re.compile(rb"\\(\\|x([0-9a-fA-F]{2}))")


def _needs_escape(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def escape(value: str) -> str:
    """The escaped text of one name: its bytes, ``\\`` doubled, non-UTF-8 bytes as ``\\xNN``.

    >>> escape("bad\\udcff.jpg")
    'bad\\\\xff.jpg'
    """
    raw = value.encode("utf-8", "surrogateescape")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def unescape(text: str) -> str:
    """Inverse of :func:`escape`: the str ``os.fsdecode`` gives for the original bytes.

    >>> unescape(escape("bad\\udcff\\\\x41.jpg")) == "bad\\udcff\\\\x41.jpg"
    True
    """
    raw = _ESCAPE_RE.sub(lambda m: b"\\" if m.group(1) == b"\\" else bytes([int(m.group(2), 16)]),
                         text.encode("utf-8"))
    return raw.decode("utf-8", "surrogateescape")


def encode_text(values: Sequence[str]) -> tuple[list[str], bool]:
    """``(texts, escaped)``: the values as they are stored, and whether they were escaped.

    Values are escaped all together, and only when one of them is not valid Unicode text.
    """
    values = [str(v) for v in values]
    if not any(_needs_escape(v) for v in values):
        return values, False
    return [escape(v) for v in values], True


def decode_text(text: str, escaped: bool) -> str:
    return unescape(text) if escaped else text


def fixed_utf8(texts: Sequence[str]):
    """``(array, dtype)`` of fixed-length UTF-8 strings sized to the longest value (at least 1)."""
    raw = [t.encode("utf-8") for t in texts]
    dtype = h5py.string_dtype("utf-8", length=max([1] + [len(b) for b in raw]))
    return np.array(raw, dtype=dtype).reshape(len(raw)), dtype


def read_string_array(values: np.ndarray, escaped: bool) -> list[str]:
    """Stored strings (fixed-length bytes in version 2, variable-length in 1) as str."""
    out = []
    for v in np.asarray(values).reshape(-1).tolist():
        text = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        out.append(unescape(text) if escaped else text)
    return out


def escaped_names(value: Any) -> set[str]:
    """The element names of the root attribute ``escaped`` (absent: none)."""
    if value is None:
        return set()
    if isinstance(value, (bytes, str)):
        value = [value]
    return {v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value}


def decode_attr(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (bytes -> str, numpy -> list or scalar)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, np.ndarray):
        return [decode_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def cache_attrs(f) -> dict[str, Any]:
    """Root attributes of an open cache, decoded: JSON text -> dicts, escaped text -> names."""
    raw = {key: decode_attr(value) for key, value in f.attrs.items()}
    escaped = escaped_names(raw.get(ESCAPED_ATTR))
    out = {}
    for key, value in raw.items():
        if key == ESCAPED_ATTR:
            continue
        if "@" + key in escaped:
            value = [decode_text(v, True) for v in value] if isinstance(value, list) \
                else decode_text(value, True)
        if key in JSON_ATTRS and isinstance(value, str) and value:
            value = json.loads(value)
        if key == "complete" and isinstance(value, (bool, int)):
            value = bool(value)
        out[key] = value
    return out


def read_strings(f, name: str) -> list[str]:
    """The string dataset ``name`` of an open cache (any version) as Python str, lossless.

    Rows the writer escaped (file names that are not UTF-8) come back as the ``os.fsdecode``
    str they were written from, surrogate escapes included.
    """
    escaped = escaped_names(decode_attr(f.attrs.get(ESCAPED_ATTR)))
    ds = f[name]
    return read_string_array(ds[...], ds.name in escaped)
