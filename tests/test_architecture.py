"""The shape of the package, read from its source with ``ast`` (nothing is imported):
the module graph has no cycle, counting imports inside functions; no function is
longer than 60 lines; the training loop imports none of the commands built on it."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ember"
MAX_FUNCTION_LINES = 60
# What training/ may never import: commands and features built on top of training.
ABOVE_TRAINING = (
    "ember.compress",
    "ember.eval",
    "ember.search",
    "ember.continual",
    "ember.plan",
    "ember.reporting",
    "ember.cli",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Every Import/ImportFrom under ``node``, function bodies included; ``if TYPE_CHECKING:``
    blocks (not their ``else``) are skipped."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                yield from _import_nodes(ast.Module(body=[sub], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _known(name: str) -> str | None:
    """``name`` or its nearest enclosing module that is one of ember's."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, packages: bool = True) -> dict[str, int]:
    """The ember modules ``module`` imports, each with the line of its first import; with ``packages``,
    also the packages whose ``__init__`` those imports run."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import submodule`` imports the submodule; ``from mod import name`` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            known = _known(target)
            # importing ember.a.b also runs ember/a/__init__.py, unless ``module`` is inside ember.a
            for name in ((known, *_packages(known)) if packages else (known,)) if known else ():
                if name != module and not module.startswith(name + "."):
                    found.setdefault(name, node.lineno)
    return found


def _packages(name: str) -> list[str]:
    """The packages enclosing module ``name``: ember.a.b -> [ember.a, ember]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


GRAPH = {module: _imports(module) for module in MODULES}
DIRECT = {module: _imports(module, packages=False) for module in MODULES}


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), each as a
    shortest chain back to its first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    chains = []
    for component in components:  # the shortest cycle through each member, each cycle once
        for member in component:
            chain = _chain(graph, set(component), member)
            turn = chain.index(min(chain[:-1]))
            chain = [*chain[turn:-1], *chain[:turn], chain[turn]]
            if chain not in chains:
                chains.append(chain)
    return chains


def _chain(graph: dict[str, dict[str, int]], members: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``members`` (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    return [start]


def _describe(chain: list[str]) -> str:
    steps = " -> ".join(chain)
    lines = ", ".join(f"{a}:{GRAPH[a][b]}" for a, b in itertools.pairwise(chain))
    return f"{steps}   (import lines: {lines})"


def test_module_graph_has_no_cycle():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(map(_describe, cycles))


def test_cycle_finder_reports_a_chain():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_60_lines():
    offenders = []
    for path in MODULES.values():
        for node in _functions(ast.parse(path.read_text(), str(path))):
            length = node.end_lineno - node.lineno + 1  # from ``def`` (decorators excluded) to the last line
            if length > MAX_FUNCTION_LINES:
                offenders.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {node.name}: {length} lines")
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_training_imports_no_command():
    offenders = []
    for module, imported in DIRECT.items():
        if not module.startswith("ember.training"):
            continue
        for target, line in imported.items():
            if any(target == above or target.startswith(above + ".") for above in ABOVE_TRAINING):
                offenders.append(f"{module}:{line} imports {target}")
    assert not offenders, "training/ imports a module built on top of it:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module", ["ember.training.checkpoint", "ember.eval.evaluate"])
def test_graph_sees_the_package(module):
    assert GRAPH.get(module), f"{module} has no ember imports in the graph; the parser is broken"
