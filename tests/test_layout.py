"""The tree keeps the shape STYLE.md describes: no circle of imports between the project's modules (a circle
makes import order matter and hides which module owns what), and one direction of flow — `servers` never
imports `wallet_tui`, `wallet_tui` never imports `servers`, `protofiles` imports neither.

Imports are read from the source (every `import`, also inside functions and `if TYPE_CHECKING:` blocks), so
nothing is executed."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.harness import REPO

PACKAGES = ("protofiles", "servers", "wallet_tui", "bench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    found["run_all"] = REPO / "run_all.py"
    return found


def _imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports: `from a.b import c` counts a.b, and a.b.c when c is a module."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in known and t != name}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imported(name, path, known) for name, path in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
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


def test_the_import_graph_is_read_from_every_package() -> None:
    graph = _graph()
    assert {"servers.gateway_server", "wallet_tui.app", "bench.chaos", "bench.chaos_faults"} <= set(graph)
    assert "bench.chaos_faults" in graph["bench.chaos"]   # the reader sees `from bench.chaos_faults import …`


def test_no_module_imports_itself_through_others() -> None:
    assert _cycles(_graph()) == []


def test_imports_flow_one_way_wallet_to_gateway_to_banks() -> None:
    crossing = {(name, target) for name, targets in _graph().items() for target in targets
                if (name.startswith("servers") and target.startswith("wallet_tui"))
                or (name.startswith("wallet_tui") and target.startswith("servers"))
                or (name.startswith("protofiles") and not target.startswith("protofiles"))}
    assert crossing == set()
