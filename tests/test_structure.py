"""The package's import graph: no cycles, no private names across modules, layers point down.

Every module of src/tunelab is parsed (not imported), and every import in it counts, whether at
module level or inside a function: a lazy import hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tunelab"

# Lower layers never import higher ones (docs/DESIGN.md, "Layout"): data and model are below
# the run directory, which is below train, eval's pipeline, report, experiments and ship (it
# reads eval's typed result, eval/result.py, and nothing else of eval); train is a recipe, not a
# library for the others. The planner sits above data and model and below train, whose
# calibration it takes as a plain dict. The config reads only the registries of choices
# (data/formats.py FORMATS, model/adapters.py METHODS, eval/tasks.py TASKS, objectives.py
# OBJECTIVES), none of the stages that run. The API and the CLI are the top.
UPPER = ("tunelab.train", "tunelab.report", "tunelab.run", "tunelab.experiments", "tunelab.ship",
         "tunelab.api", "tunelab.cli")
FORBIDDEN = {
    "tunelab.config": (*UPPER, "tunelab.planner", "tunelab.eval.evaluate", "tunelab.data.prepare",
                       "tunelab.model.load"),
    "tunelab.planner": (*UPPER, "tunelab.eval"),
    "tunelab.api": ("tunelab.cli",),
    "tunelab.data": ("tunelab.train", "tunelab.eval", "tunelab.report", "tunelab.run"),
    "tunelab.model": ("tunelab.train", "tunelab.eval", "tunelab.report", "tunelab.run"),
    "tunelab.eval": ("tunelab.train", "tunelab.report"),
    "tunelab.run": ("tunelab.train", "tunelab.report", "tunelab.experiments", "tunelab.ship",
                    "tunelab.cli", "tunelab.eval.evaluate", "tunelab.eval.multitask"),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def parse_package(root: Path) -> dict[str, tuple[ast.Module, bool]]:
    """Module name → (syntax tree, is a package) for every .py file under ``root``."""
    return {module_name(path, root): (ast.parse(path.read_text(), str(path)),
                                      path.name == "__init__.py")
            for path in sorted(root.rglob("*.py"))}


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(tree: ast.Module, importer: str, is_package: bool, modules: set[str]
            ) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import of a package module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, importer, is_package)
            if target not in modules:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:  # ``from tunelab.model import varlen``
                    yield submodule, None, node.lineno
                else:
                    yield target, alias.name, node.lineno


def import_graph(parsed: dict[str, tuple[ast.Module, bool]]) -> dict[str, dict[str, int]]:
    """importer → {imported module: first line}; a package's own ``__init__`` is not an edge."""
    modules = set(parsed)
    graph: dict[str, dict[str, int]] = {}
    for name, (tree, is_package) in parsed.items():
        edges = graph.setdefault(name, {})
        for target, _, line in imports(tree, name, is_package, modules):
            if target != name and not name.startswith(target + "."):
                edges.setdefault(target, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def private_imports(parsed: dict[str, tuple[ast.Module, bool]]) -> list[str]:
    """``from a import _name`` and ``module._name`` uses of another module's private names."""
    modules = set(parsed)
    found = []
    for name, (tree, is_package) in parsed.items():
        aliases: dict[str, str] = {}
        for target, imported, line in imports(tree, name, is_package, modules):
            if imported and _private(imported) and target != name:
                found.append(f"{name}:{line} imports {target}.{imported}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(node, name, is_package)
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in modules:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                found.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.fixture(scope="module")
def parsed() -> dict[str, tuple[ast.Module, bool]]:
    return parse_package(PACKAGE)


def test_the_package_has_no_import_cycle(parsed):
    graph = import_graph(parsed)
    cycles = find_cycles(graph)
    described = ["; ".join(f"{a} → {b} (line {graph[a][b]})" for a in cycle for b in cycle
                           if b in graph[a]) for cycle in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_no_module_imports_another_modules_private_names(parsed):
    assert private_imports(parsed) == []


def test_lower_layers_do_not_import_higher_ones(parsed):
    graph = import_graph(parsed)
    wrong = [f"{importer} → {target} (line {line})"
             for importer, edges in graph.items() for target, line in edges.items()
             for layer, above in FORBIDDEN.items()
             if (importer == layer or importer.startswith(layer + "."))
             and target.startswith(above)]
    assert wrong == []


def test_the_checks_see_function_level_cycles_and_private_names(tmp_path):
    """The graph builder itself: a lazy import closing a cycle, and a private name, are found."""
    root = tmp_path / "tunelab"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "a.py").write_text("from tunelab.sub.b import helper\n")
    (root / "sub" / "b.py").write_text("def helper():\n    from . import a\n    return a._x\n")
    (root / "c.py").write_text("from tunelab.sub.a import _hidden\n")
    parsed = parse_package(root)
    assert find_cycles(import_graph(parsed)) == [["tunelab.sub.a", "tunelab.sub.b"]]
    assert private_imports(parsed) == ["tunelab.c:1 imports tunelab.sub.a._hidden",
                                       "tunelab.sub.b:3 uses tunelab.sub.a._x"]
