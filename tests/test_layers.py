"""The house's import rules (docs/architecture.md, "Layers"): imports run one way, with no cycle.

Every import of the product code, at module level or inside a function, is read with ``ast``; each module belongs
to one layer, and a layer may import only the layers its row names. A new module lands in a layer by its path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "steps", "entrypoints")

# layer -> the layers it may import (itself included where listed)
MAY_IMPORT: dict[str, set[str]] = {
    "util": {"util"},
    "definition": {"definition", "util"},
    "contract": {"contract"},
    "container": {"container", "contract"},
    "template": {"template", "container", "contract", "definition", "util"},
    "engine": {"engine", "definition", "util"},
    "serving": {"serving", "contract", "definition", "util"},
    "runner": {"runner", "engine", "serving", "template", "container", "contract", "definition", "util"},
    "aws": {"aws", "template", "container", "contract", "definition", "util"},
    "cli": {"cli", "aws", "runner", "engine", "serving", "template", "container", "contract", "definition", "util"},
}
RUNNER_MODULES = {"pipelines.local.runner", "pipelines.local.deploy_function", "pipelines.local.tracking_store"}


def layer_of(module: str) -> str:
    if module == "entrypoints.contract":
        return "contract"
    if module.startswith(("entrypoints", "steps")):
        return "container"
    if module in RUNNER_MODULES:
        return "runner"
    for prefix, layer in (
        ("pipelines.util", "util"),
        ("pipelines.definition", "definition"),
        ("pipelines.local", "engine"),
        ("pipelines.serving", "serving"),
        ("pipelines.aws", "aws"),
        ("pipelines.cli", "cli"),
        ("pipelines.run", "cli"),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "template"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from x import name`` counts x.name where that is a module)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = product_modules()
    known = set(modules)
    return {module: imports_of(path, module, known) for module, path in modules.items()}


def test_every_import_runs_down_the_layers(graph: dict[str, set[str]]) -> None:
    upward = sorted(
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) not in MAY_IMPORT[layer_of(module)] and not target.endswith("__init__")
    )
    assert upward == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    # package __init__ modules that only hold a docstring are not part of any cycle
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target] if target in trail else [node, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_layer_rules_catch_an_upward_import() -> None:
    assert "aws" not in MAY_IMPORT[layer_of("pipelines.pipeline")]
    assert "template" not in MAY_IMPORT[layer_of("pipelines.local.executor")]
    assert layer_of("pipelines.local.runner") == "runner"
    assert layer_of("entrypoints.train") == "container"
