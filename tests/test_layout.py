"""The package's floors: imports between infokv_vllm's modules run only down the layering below (or within one
floor), and form no circle. Every import counts: deferred ones inside functions and those under TYPE_CHECKING too
(an annotation that needs a module above is a dependency on it all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

from infokv_vllm.config import FUSIONS, METHODS

PACKAGE = Path(__file__).parent.parent / "infokv_vllm"

# Bottom floor first. A module may import its own floor and the floors below it, never one above.
FLOORS = (
    ("infokv_vllm", "infokv_vllm.config"),  # the package's logger and the settings
    ("infokv_vllm.kernels",),  # page layouts and the torch/Triton kernels
    ("infokv_vllm.messages",),  # what the scheduler and the workers tell each other
    ("infokv_vllm.signals",),  # what the workers record
    ("infokv_vllm.scoring",),  # the policies that score with it
    ("infokv_vllm.metrics",),
    ("infokv_vllm.vllm_internals",),  # the supported vLLM range, every vLLM internal relied on, the global swaps
    ("infokv_vllm.core",),  # scheduler, block manager, runner; the platform adapter interface
    ("infokv_vllm.recording_backends",),  # vLLM's attention backends, extended to record the attention signal
    ("infokv_vllm.platforms",),  # one adapter per platform
    # what the patches call: the --kv-* flags, the engine config's preparation and checks, per-request admission
    ("infokv_vllm.cli", "infokv_vllm.engine_config", "infokv_vllm.admission"),
    ("infokv_vllm.vllm_internals.patches",),  # the changes to vLLM's own objects, one module each
    ("infokv_vllm.plugin",),  # registration
    ("infokv_vllm.testing",),  # test and benchmark support
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.Module, modules: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imported_modules(ast.parse(path.read_text()), modules) - {name} for name, path in paths.items()}


def floor_of(module: str) -> int:
    matches = [(len(prefix), index) for index, floor in enumerate(FLOORS) for prefix in floor
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} stands on no floor of FLOORS: give it one"
    return max(matches)[1]


def test_no_import_cycles():
    graph = import_graph()
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


def test_imports_run_down_the_floors():
    graph = import_graph()
    upward = [f"{module} (floor {floor_of(module)}) imports {imported} (floor {floor_of(imported)})"
              for module, imports in sorted(graph.items()) for imported in sorted(imports)
              if floor_of(imported) > floor_of(module)]
    assert not upward, "\n".join(upward)
    assert "infokv_vllm.core.adapter" in graph["infokv_vllm.platforms.cpu"], "the scan found the imports"


def test_the_registries_implement_exactly_the_names_config_declares():
    from infokv_vllm.scoring import POLICIES
    from infokv_vllm.scoring.infokv import FUSION_RULES

    assert ("none", *POLICIES) == METHODS
    assert {name: policy.name for name, policy in POLICIES.items()} == {name: name for name in POLICIES}
    assert tuple(FUSION_RULES) == FUSIONS
