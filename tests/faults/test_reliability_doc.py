"""docs/reliability.md names, for every case, the test that proves it: those tests must exist,
and every fault test must be cited by its exact name (not found as part of another word)."""
from __future__ import annotations

import ast
import re

from ._cli import ROOT

DOC = ROOT / "docs" / "reliability.md"
# `faults/test_x.py::name` or, after one, `::name` (same file); parametrised ids may follow.
CITATION = re.compile(r"`((?:faults/)?test_\w+\.py)?::(\w+)")
PLACEHOLDER = re.compile(r"\bTBD\((\w+)\)")


def _table_rows(text: str) -> list[str]:
    """Body rows of the tables whose last column is "proved by"."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = line
        elif "---" not in line and header.rstrip(" |").endswith("proved by"):
            rows.append(line)
    return rows


def _cited(text: str) -> set[tuple[str, str]]:
    """(file under tests/, test name) of every citation; a bare ``::name`` keeps the last file."""
    cited, current = set(), None
    for file, name in CITATION.findall(text):
        current = file or current
        assert current is not None, f"`::{name}` cited before any file"
        cited.add((current, name))
    return cited


def _tests_in(path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_test_the_doc_cites_exists():
    cited = _cited(DOC.read_text())
    assert len(cited) >= 40
    missing = []
    for file, name in sorted(cited):
        path = ROOT / "tests" / file
        if not path.is_file() or name not in _tests_in(path):
            missing.append(f"tests/{file}::{name}")
    assert missing == []


def test_every_fault_test_is_cited():
    cited = _cited(DOC.read_text())
    uncited = []
    for path in sorted((ROOT / "tests" / "faults").glob("test_*.py")):
        if path.name == "test_reliability_doc.py":
            continue
        for name in sorted(_tests_in(path)):
            if (f"faults/{path.name}", name) not in cited:
                uncited.append(f"faults/{path.name}::{name}")
    assert uncited == []


def test_each_row_is_proved_by_a_test_or_names_who_is_building_it():
    """A row proves its case by citing tests (which the test above finds), or says ``TBD(who)``;
    a fault found by a fault round (rows ``14.x``) is proved by a test under ``faults/``."""
    rows = _table_rows(DOC.read_text())
    assert len(rows) > 30
    for row in rows:
        proof = row.rstrip(" |").rsplit(" | ", 1)[-1]
        assert CITATION.search(proof) or PLACEHOLDER.search(proof) or \
            proof.startswith(("same", "`...")), f"row proves nothing: {row[:120]}"
        if row.startswith("| 14.") and not PLACEHOLDER.search(proof):
            assert "`faults/" in proof, f"issue-14 row without a fault test: {row[:120]}"
