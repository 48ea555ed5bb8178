"""The package has no import circles: imports between infokv_vllm's modules form a DAG, deferred ones inside
functions included (only those under TYPE_CHECKING, which never run, are not counted)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "infokv_vllm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.Module, modules: set[str]) -> set[str]:
    found = set()

    def scan(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        for child in ast.iter_child_nodes(node):
            scan(child)

    scan(tree)
    return found & modules


def test_no_import_cycles():
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {name: imported_modules(ast.parse(path.read_text()), modules) - {name} for name, path in paths.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail[trail.index(name):] + [name])
        state[name] = "open"
        for imported in sorted(graph[name]):
            visit(imported, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
    assert "infokv_vllm.core.runner" in graph and graph["infokv_vllm.plugin"], "the scan found the modules"
