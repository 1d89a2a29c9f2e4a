"""The package's modules import each other without circles: the graph of every import written in mambaquant/
(top-level, in functions and in methods) has no cycle. An import of `a.b` is an edge to `a.b` alone, not to the
packages above it that Python initialises first (else every module would import `mambaquant/__init__`)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mambaquant"


def module_name(path: Path) -> str:
    parts = ("mambaquant", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package's modules an import statement of `module` names: `from pkg import x` is `pkg.x` where that is a
    module, else `pkg` (its `__init__`, where the name x is defined)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names} & MODULES.keys()
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        base = ".".join(filter(None, (base, node.module)))
    else:
        base = node.module
    if base not in MODULES:
        return set()
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}


def imports_of(module: str, source: str) -> dict[str, int]:
    """{module of the package that `source` (the text of `module`) imports: line of its first import}, imports in
    functions and methods included."""
    edges = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in imported(module, node) - {module}:
                edges[target] = min(edges.get(target, node.lineno), node.lineno)
    return edges


def import_graph() -> dict[str, dict[str, int]]:
    return {module: imports_of(module, path.read_text()) for module, path in MODULES.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, found = {}, {}, [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    inside = set(component)
    return "\n".join(f"  {module} -> {target}  ({MODULES[module].relative_to(ROOT.parent)}:{line})"
                     for module in component for target, line in sorted(graph[module].items()) if target in inside)


def test_every_kind_of_import_is_an_edge():
    source = """
from ..runtime import MambaLM
from . import hf, load
from ..evaluation import user_data, evaluate
import mambaquant.zoo, torch

def f():
    from .. import errors

class C:
    def m(self):
        from mambaquant.runtime.conv import SSMState
"""
    assert imports_of("mambaquant.loaders.vim", source) == {
        "mambaquant.runtime": 2,  # a package: its __init__
        "mambaquant.loaders.hf": 3, "mambaquant.loaders": 3,  # a submodule; a name of the parent's __init__
        "mambaquant.evaluation.user_data": 4, "mambaquant.evaluation": 4,
        "mambaquant.zoo": 5,
        "mambaquant.errors": 8,  # in a function
        "mambaquant.runtime.conv": 12,  # in a method
    }
    assert imports_of("mambaquant.loaders", "from . import hf\nfrom .weights import x") == {
        "mambaquant.loaders.hf": 1, "mambaquant.loaders.weights": 2}  # relative to the package itself


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n\n".join(describe(component, graph) for component in found)
