"""The packages are layered: no module imports, directly or through others, a module that imports it.

Every import counts, including those inside functions and ``if TYPE_CHECKING`` blocks: a cycle
hidden from the interpreter is still two modules that cannot be understood apart
(docs/architecture.md §1, the layers).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"iterflow": ROOT / "python" / "iterflow", "benches": ROOT / "benches"}


def _modules(package: str, root: Path) -> dict[str, Path]:
    """Every module of the package by dotted name (``pkg.sub.mod``; ``pkg.sub`` for ``__init__``):
    its ``.py`` files, and the compiled extension through its ``.pyi`` stub (a leaf that must be
    told apart from the package, or ``from .. import _core`` would read as importing ``__init__``)."""
    found = {}
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.pyi")]):
        if path.suffix == ".pyi" and path.with_suffix(".py").exists():
            continue
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _package_of(module: str, path: Path) -> str:
    """The package a relative import in ``module`` is resolved against."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that one import statement loads for its names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = node.module or ""
    if node.level:
        anchor = _package_of(module, path).split(".")
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, *([base] if base else [])])
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:
            out.add(sub)
        elif base in known:
            out.add(base)
    return out


def import_graph(package: str, root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source."""
    modules = _modules(package, root)
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, name, path, known)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_graph_sees_every_kind_of_import() -> None:
    graph = import_graph("iterflow", PACKAGES["iterflow"])
    assert "iterflow.errors" in graph["iterflow.validate"]
    assert "iterflow.cores.base" in graph["iterflow.cores.python"]
    assert "iterflow._core" in graph["iterflow.cores.rust"] and "iterflow" not in graph["iterflow.cores.rust"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package: str) -> None:
    cycle = find_cycle(import_graph(package, PACKAGES[package]))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
