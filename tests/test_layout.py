"""The package's floors: imports between infokv_vllm's modules run only down the layering below (or within one
floor), and form no circle. Every import counts: deferred ones inside functions and those under TYPE_CHECKING too
(an annotation that needs a module above is a dependency on it all the same). And the installed package holds what
serving needs, only: the test and benchmark support (infokv_testing/) stays in the checkout."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "infokv_vllm"
# What only the checkout holds, never installed: imported by the package, they would fail where it serves.
CHECKOUT_ONLY = {"infokv_testing", "tests", "benchmarks", "pytest", "hypothesis"}

# Bottom floor first. A module may import its own floor and the floors below it, never one above.
FLOORS = (
    ("infokv_vllm", "infokv_vllm.setting_checks"),  # the package's logger; typed settings and their checks
    ("infokv_vllm.kernels",),  # page layouts and the torch/Triton kernels
    ("infokv_vllm.messages",),  # what the scheduler and the workers tell each other
    ("infokv_vllm.signals",),  # what the workers record
    ("infokv_vllm.scoring",),  # the policies that score with it, each owning its parameters
    ("infokv_vllm.config",),  # the engine-wide settings and the chosen policy
    ("infokv_vllm.metrics",),
    ("infokv_vllm.vllm_internals",),  # the supported vLLM range, every vLLM internal relied on, the global swaps
    ("infokv_vllm.core",),  # scheduler, block manager, runner; the platform adapter interface
    ("infokv_vllm.recording_backends",),  # vLLM's attention backends, extended to record the attention signal
    ("infokv_vllm.platforms",),  # one adapter per platform
    # what the patches call: the --kv-* flags, the engine config's preparation and checks, per-request admission
    ("infokv_vllm.cli", "infokv_vllm.engine_config", "infokv_vllm.admission"),
    ("infokv_vllm.vllm_internals.patches",),  # the changes to vLLM's own objects, one module each
    ("infokv_vllm.plugin",),  # registration
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
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


def top_level_imports(tree: ast.Module) -> set[str]:
    """The top-level names of what a module imports (absolute imports; relative ones stay in its package)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


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


def test_the_registries_implement_exactly_the_names_their_settings_declare():
    from typing import get_args

    from infokv_vllm.config import method_names
    from infokv_vllm.scoring import POLICIES
    from infokv_vllm.scoring.infokv import FUSION_RULES, Fusion

    assert ("none", *POLICIES) == method_names()
    assert {name: policy.name for name, policy in POLICIES.items()} == {name: name for name in POLICIES}
    assert tuple(FUSION_RULES) == get_args(Fusion)


def test_the_package_imports_nothing_only_the_checkout_holds():
    imports = {module_name(path): top_level_imports(ast.parse(path.read_text())) for path in PACKAGE.rglob("*.py")}
    offending = [f"{module} imports {name}" for module, names in sorted(imports.items())
                 for name in sorted(names & CHECKOUT_ONLY)]
    assert not offending, "\n".join(offending)
    assert "vllm" in imports["infokv_vllm.plugin"], "the scan found the imports"


def test_the_wheel_holds_every_package_of_infokv_vllm_and_nothing_else():
    """pyproject's package discovery, run as setuptools runs it to build the wheel."""
    import tomllib

    from setuptools import find_namespace_packages, find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    finder = find_namespace_packages if find.get("namespaces", True) else find_packages
    packaged = set().union(*(finder(str(ROOT / where), include=find.get("include", ("*",)),
                                    exclude=find.get("exclude", ())) for where in find.get("where", ["."])))
    assert packaged == {".".join(path.parent.relative_to(ROOT).parts) for path in PACKAGE.rglob("*.py")}
