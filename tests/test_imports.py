"""The import graph of the project's packages: no circle, and ``pipeline`` (the bottom layer) imports neither
``dicom_node`` nor ``training``. Every import counts, also inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "training", "dicom_node")
# Being moved into their own packages (issue #16, parts 1-2); their circles are that step's to remove.
_MOVING = ("dicom_node.cli", "dicom_node.headers", "dicom_node.rules")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import name`` counts as ``pkg.name`` when that is one)."""
    modules = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: one level up per dot beyond the first
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle() -> None:
    graph = import_graph()
    # Package __init__ modules re-export their children; the edges that matter run between modules.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    kept = {m: {d for d in deps if not d.startswith(_MOVING)} for m, deps in graph.items() if not m.startswith(_MOVING)}
    assert circles(kept) == []


def test_pipeline_is_the_bottom_layer() -> None:
    upward = {(m, d) for m, deps in import_graph().items() if m.startswith("pipeline")
              for d in deps if d.startswith(("dicom_node", "training"))}
    assert upward == set()
