"""The import graph of fxtl/ points one way, and no module reaches into another's private names.

docs/architecture.md: "one package per stage; data flows one way", "no module imports another's
`_private` names". Read with ``ast`` from the sources: every ``import`` counts, at the top of a
module or inside a function (a function-level import hides a cycle, it does not remove it).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fxtl"


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name ``from <node.module> import ...`` refers to, inside ``module``."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, str | None, int]]:
    """``(importer, imported module, imported name or None, line)`` for every import of the
    package's own modules."""
    out = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [(module, a.name, None, node.lineno) for a in node.names
                        if a.name.split(".")[0] == module.split(".")[0]]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                if target.split(".")[0] != module.split(".")[0]:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:  # `from . import store`: the module store
                        out.append((module, sub, None, node.lineno))
                    else:
                        out.append((module, target, a.name, node.lineno))
    return out


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for importer, target, _, _ in _imports(modules):
        # importing fxtl.a.b runs fxtl/a/__init__.py too, but a package's own modules may import
        # their package's __init__ freely only if it imports nothing back: count the module only
        if target in modules and target != importer:
            graph[importer].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_function_level_imports_and_private_names(tmp_path):
    """The checks below can fail: a cycle through a function-level import is found, and so is
    a private name imported from a sibling."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n_x = 1\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import _x\n    return _x\n")
    modules = _modules(pkg)
    assert _cycles(_graph(modules)) == [["pkg.a", "pkg.sub.b"]]
    assert [(i, t, n) for i, t, n, _ in _imports(modules) if n] == [("pkg.sub.b", "pkg.a", "_x")]
    assert len(_modules()) > 60


def test_no_import_cycles():
    cycles = _cycles(_graph(_modules()))
    assert cycles == [], "import cycles (function-level imports included): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    private = [f"{importer}:{line} imports {name} from {target}"
               for importer, target, name, line in _imports(modules)
               if name and name.startswith("_") and not name.startswith("__")
               and target != importer]
    assert private == []
