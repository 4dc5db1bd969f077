"""The import structure of the device package: no circles, and no development code in it.

Imports are read from the source (``ast``), all of them: at module level, inside functions and
under ``TYPE_CHECKING`` too, since a circle of type-only imports still ties the modules together
for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[1] / "agent"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(AGENT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from agent import x`` names module
    ``agent.x`` when there is one, else the package ``agent``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
    me = module_name(path)
    # A module's own parent packages are imported anyway, before it: not an edge of its own.
    parents = {me.rsplit(".", depth)[0] for depth in range(1, me.count(".") + 1)}
    return {name for name in found if name in modules and name != me and name not in parents}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(AGENT.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "agent.errors" in graph["agent.server"]
    assert "agent.routes" in graph["agent.openapi"]
    assert len(graph) > 25


def test_no_import_circles_in_the_package() -> None:
    assert circles(import_graph()) == []


def test_a_circle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_the_device_package_does_not_depend_on_development_tools() -> None:
    """Only the ``dev-api`` command's shim looks for them (and copes with their absence)."""
    users = sorted(
        module_name(path)
        for path in AGENT.rglob("*.py")
        if any(
            (
                isinstance(node, ast.Import)
                and any(a.name.startswith("azaion_loader_dev") for a in node.names)
            )
            or (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("azaion_loader_dev")
            )
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        )
    )
    assert users == ["agent.cli.devapi"]
