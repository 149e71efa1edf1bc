"""The code's shape, as docs/architecture.md promises it: layers without import circles, the
engine's loop imported only by its facade and the pool, one switch on the request kind (the wire
format lookup), and files short enough to have one job.

Plain ast over the source files: nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llama_lib", "server")
MAX_LINES = 460           # "files under ~450 lines"; the ctypes mirror of llama.h is exempt
EXEMPT_LENGTH = {"llama_lib/_bindings.py"}
ENGINE_CORE = "llama_lib.engine.core"
MAY_IMPORT_CORE = {"llama_lib.engine", "llama_lib.engine.pool"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """Absolute names an ImportFrom may refer to (the module, and module.name for submodules)."""
    if node.level:
        base = module.split(".")
        if path.name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """Every import between our modules, TYPE_CHECKING and function-level ones included."""
    files = source_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = resolve(module, path, node)
            else:
                continue
            graph[module] |= {n for n in names if n in files and n != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_package_facade(importer: str, imported: str) -> bool:
    """A package's __init__ re-exporting its own submodules is a facade, not a dependency."""
    return imported.startswith(importer + ".")


def test_no_import_circles():
    graph = import_graph()
    # a facade importing its submodules, while a submodule imports a sibling through the
    # facade, would be a false circle: drop package -> own submodule edges
    graph = {m: {d for d in deps if not is_package_facade(m, d)} for m, deps in graph.items()}
    assert cycles(graph) == []


def test_only_the_facade_and_the_pool_import_the_engine_loop():
    importers = sorted(m for m, deps in import_graph().items() if ENGINE_CORE in deps)
    assert set(importers) <= MAY_IMPORT_CORE, importers


def test_lower_layers_never_import_upper_ones():
    for module, deps in import_graph().items():
        if module.startswith("llama_lib"):
            assert not [d for d in deps if d.startswith("server")], module
    service = "server.service"
    above = ("server.__main__", "server.info", "server.http")
    callers = sorted(m for m, deps in import_graph().items()
                     if service in deps and not m.startswith(above))
    assert callers == [], f"modules below service.py import it: {callers}"


def kind_switches() -> list[str]:
    """Comparisons on a request's kind: `x.kind == ...`, `... in (KIND_A, KIND_B)`, and friends."""
    def mentions_kind(node: ast.AST) -> bool:
        for n in ast.walk(node):
            if isinstance(n, ast.Attribute) and n.attr == "kind":
                return True
            if isinstance(n, ast.Name) and n.id.startswith("KIND_"):
                return True
        return False

    found = []
    for module, path in source_files().items():
        if not module.startswith("server"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare) and mentions_kind(node):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            elif isinstance(node, ast.Match) and mentions_kind(node.subject):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_one_switch_on_the_request_kind():
    """Each wire format formats itself (server/api/shapes/); the kind picks the shape once."""
    assert len(kind_switches()) <= 1, kind_switches()


@pytest.mark.parametrize("module", sorted(source_files()))
def test_files_are_short(module):
    path = source_files()[module]
    rel = str(path.relative_to(ROOT))
    if rel in EXEMPT_LENGTH:
        return
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{rel} has {lines} lines"
