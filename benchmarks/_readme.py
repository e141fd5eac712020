"""Sections of README.md that benchmark scripts write from their results (never typed by hand).

A section is the text between ``<!-- fxtl:NAME -->`` and ``<!-- /fxtl:NAME -->`` (NAME: lower
case letters, digits and ``-``). Two shapes:

- **block**: the opening marker ends its line and the closing one starts a line; the body is
  whole lines (a table, a code block, a paragraph);
- **inline**: anything else, e.g. inside a sentence or a table cell (markdown hides the
  comments); the body is one line of text.

A name may appear more than once (the same number quoted in two places): every copy gets the
same body. Used by ``benchmarks/readme_numbers.py`` (which knows every section's renderer) and by
any script that writes its own table::

    from _readme import replace_section
    text = replace_section(text, "backbones-table", body)

Outside the sections the README may hold no number that reads as a measurement
(:func:`typed_numbers`, which `tests/test_readme_numbers.py` runs with a short allowlist).
"""
from __future__ import annotations

import re

__all__ = ["replace_section", "section_names", "get_section", "typed_numbers", "MEASUREMENT",
           "MarkerError"]

_NAME = r"[a-z0-9][a-z0-9-]*"
_OPEN = re.compile(rf"<!-- fxtl:({_NAME}) -->")


class MarkerError(ValueError):
    """A section's markers are missing, unbalanced or nested."""


def _spans(text: str, name: str) -> list[tuple[int, int]]:
    """(start, end) of the body of every copy of section ``name``, in order."""
    opening, closing = f"<!-- fxtl:{name} -->", f"<!-- /fxtl:{name} -->"
    spans, pos = [], 0
    while True:
        start = text.find(opening, pos)
        if start < 0:
            break
        body = start + len(opening)
        end = text.find(closing, body)
        if end < 0:
            raise MarkerError(f"README section {name!r} opened without {closing}")
        if _OPEN.search(text, body, end):
            raise MarkerError(f"README section {name!r} holds another section's marker")
        spans.append((body, end))
        pos = end + len(closing)
    if not spans:
        raise MarkerError(f"README has no section {name!r}: add {opening} ... {closing} where it goes")
    if text.count(closing) != len(spans):
        raise MarkerError(f"README section {name!r} has a {closing} without its opening marker")
    return spans


def section_names(text: str) -> list[str]:
    """Names of the marked sections, each once, in order of first appearance."""
    return list(dict.fromkeys(_OPEN.findall(text)))


def _is_block(text: str, body: int, end: int) -> bool:
    return text.startswith("\n", body) and (end == 0 or text[end - 1] == "\n")


def get_section(text: str, name: str) -> str:
    """The body of section ``name`` (its first copy), as :func:`replace_section` takes it."""
    body, end = _spans(text, name)[0]
    return text[body + 1:end - 1] if _is_block(text, body, end) else text[body:end]


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with every copy of section ``name`` holding ``body``.

    Parameters
    ----------
    text : str
        The README.
    name : str
        The section (``<!-- fxtl:NAME -->``).
    body : str
        Its new content: whole lines for a block section (a final newline is optional), one
        line for an inline section.

    Raises
    ------
    MarkerError
        No such section, unbalanced markers, or a newline in an inline section's body.

    Examples
    --------
    >>> replace_section("x <!-- fxtl:n -->1<!-- /fxtl:n --> y", "n", "2")
    'x <!-- fxtl:n -->2<!-- /fxtl:n --> y'
    >>> replace_section("<!-- fxtl:t -->\\nold\\n<!-- /fxtl:t -->\\n", "t", "a\\nb")
    '<!-- fxtl:t -->\\na\\nb\\n<!-- /fxtl:t -->\\n'
    """
    out, pos = [], 0
    for start, end in _spans(text, name):
        if _is_block(text, start, end):
            new = "\n" + body.strip("\n") + "\n"
        elif "\n" in body.strip("\n"):
            raise MarkerError(f"README section {name!r} is inline (inside a line): its body must "
                              "be one line; put the markers on lines of their own for a block")
        else:
            new = body.strip("\n")
        out += [text[pos:start], new]
        pos = end
    out.append(text[pos:])
    return "".join(out)


# What reads as a measurement: a number (or a range, or "a -> b") with a unit of time, size,
# rate, ratio or share; an accuracy with three decimals; a difference like 3e-7.
MEASUREMENT = re.compile(
    r"(?<![\w.])[~±]?\d[\d,]*(?:\.\d+)?(?:\s?(?:-|->)\s?\d[\d,]*(?:\.\d+)?)?"
    r" ?(?:img/s|images/s|ms|s|min|minutes|hours|KB|MB|GB|x|%)(?!\w)"
    r"|(?<![\w.])0\.\d{3}(?!\d)"
    r"|(?<![\w.])\d(?:\.\d+)?e-\d+(?!\w)")
_MARKED = re.compile(rf"<!-- fxtl:({_NAME}) -->.*?<!-- /fxtl:\1 -->", re.S)
_LINK_TARGET = re.compile(r"\]\([^)\s]*\)")  # where a link goes, e.g. an anchor "#...-12s-work"


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))  # same lines, so line numbers still hold


def typed_numbers(text: str, allowed: tuple[str, ...] = ()) -> list[tuple[int, str, str]]:
    """Numbers that look measured and sit outside every marked section: ``(line, number, the
    line's text)`` each.

    ``allowed`` are phrases (within one line) whose numbers are not measurements (a default, a
    target, a test's tolerance); every occurrence of each is skipped.

    Examples
    --------
    >>> typed_numbers("took **0.41 s** and <!-- fxtl:x -->0.30 s<!-- /fxtl:x --> (`--epochs 5`)")
    [(1, '0.41 s', 'took **0.41 s** and <!-- fxtl:x -->0.30 s<!-- /fxtl:x --> (`--epochs 5`)')]
    """
    scan = _LINK_TARGET.sub(_blank, _MARKED.sub(_blank, text))
    for phrase in allowed:
        scan = scan.replace(phrase, " " * len(phrase))
    lines = text.splitlines()
    found = []
    for number, line in enumerate(scan.splitlines(), 1):
        found += [(number, m.group(0).strip(), lines[number - 1]) for m in MEASUREMENT.finditer(line)]
    return found
