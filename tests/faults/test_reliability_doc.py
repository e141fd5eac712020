"""docs/reliability.md names, for every case, the test that proves it: those tests must exist."""
from __future__ import annotations

import ast
import re

from ._cli import ROOT

DOC = ROOT / "docs" / "reliability.md"


def test_every_test_the_doc_cites_exists():
    cited, current = [], None
    for file, name in re.findall(r"`((?:faults/)?test_\w+\.py)?::(\w+)", DOC.read_text()):
        current = file or current
        cited.append((current, name))
    assert len(cited) >= 40
    missing = []
    for file, name in cited:
        tree = ast.parse((ROOT / "tests" / file).read_text())
        if name not in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}:
            missing.append(f"tests/{file}::{name}")
    assert missing == []


def test_every_fault_test_is_cited():
    text = DOC.read_text()
    for path in sorted((ROOT / "tests" / "faults").glob("test_*.py")):
        if path.name == "test_reliability_doc.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                assert node.name in text, f"{path.name}::{node.name} is not in docs/reliability.md"
