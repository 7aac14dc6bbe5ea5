"""No import circles inside minialg: no module imports, directly or through others, a module that imports it back.

The graph is read from the source (every import statement, those inside functions too, and module names given
to importlib as strings, as the family registry does), so a lazy import cannot hide a circle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minialg"


def module_names() -> dict[str, Path]:
    names = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


def imports_of(name: str, file: Path, modules: dict) -> set[str]:
    """The minialg modules `name` imports explicitly (a package's __init__ only when its own names are taken)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from . import x`: the module x when there is one, else the package
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            found.add(node.value)  # importlib.import_module("minialg.families.wan")
    return {m for m in found if m in modules and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, file, modules) for name, file in modules.items()}


def test_the_cycle_finder_finds_direct_and_indirect_circles():
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_reader_sees_lazy_relative_and_string_imports():
    edges = graph()
    assert "minialg.pipeline" in edges["minialg.families.hunyuan"]  # from ..pipeline import Pipeline
    assert "minialg.families.wan" in edges["minialg.registry"]  # a string handed to import_module
    assert "minialg.alg" in edges["minialg.pipeline"]  # from . import alg as lowpass
    assert "minialg.motion" in edges["minialg.report"]  # an import inside a function


def test_minialg_has_no_import_circles():
    assert cycles(graph()) == []


def test_the_loop_and_the_report_know_no_family_and_no_comparison():
    edges = graph()
    reachable, todo = set(), ["minialg.pipeline"]
    while todo:
        for m in edges[todo.pop()] - reachable:
            reachable.add(m)
            todo.append(m)
    assert not {m for m in reachable if m.startswith(("minialg.families", "minialg.registry"))}, reachable
    assert "minialg.comparison" not in edges["minialg.report"]
