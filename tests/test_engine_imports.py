"""The import structure of llama_lib/: no import cycle, and only the engine package's
`__init__` and `pool` import `engine/core.py` (the phase modules take the parts they need).

Read with `ast`, nothing imported: every `import` and `from ... import` anywhere in a module
counts, those under `if TYPE_CHECKING:` and inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llama_lib"
CORE = "llama_lib.engine.core"
MAY_IMPORT_CORE = {"llama_lib.engine", "llama_lib.engine.pool"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def imports_of(name: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The llama_lib modules a module imports. `from pkg import x` is an edge to pkg.x when that
    is a module, else to pkg; importing a submodule is not counted as importing its parents."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in known:
                    out.add(f"{target}.{a.name}")
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path.read_text(), path.name == "__init__.py", known)
            for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_relative_and_type_checking_imports():
    graph = import_graph()
    assert CORE in graph["llama_lib.engine"] and CORE in graph["llama_lib.engine.pool"]
    assert "llama_lib.batch" in graph["llama_lib.engine.core"], "from ..batch import Batch"
    assert "llama_lib._bindings" in graph["llama_lib.engine.embedding"], "from .. import _bindings"
    hidden = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .core import Engine\n"
    assert imports_of("llama_lib.engine.decode", hidden, False, set(graph)) == {CORE}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_llama_lib():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_only_the_package_and_the_pool_import_the_engine_core():
    importers = {m for m, deps in import_graph().items() if CORE in deps}
    assert importers <= MAY_IMPORT_CORE, f"{sorted(importers - MAY_IMPORT_CORE)} import {CORE}"
