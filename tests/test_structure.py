"""The package's shape, checked statically (``ast``, nothing imported): layers only import downwards, no two
modules import each other (directly or round a longer circle, lazy imports inside functions included), and no
source file outgrows ~600 lines (docs/design.md, "Codebase")."""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "libra_megatron"
MAX_LINES = 600
# model/ is the layer the rest builds on: it may use these and nothing else of the package
MODEL_MAY_IMPORT = ("libra_megatron.model", "libra_megatron.config", "libra_megatron.vocab", "libra_megatron.rope",
                    "libra_megatron.ops", "libra_megatron.utils")


def package_modules() -> Dict[str, str]:
    """Dotted module name -> file path for every ``.py`` of the package."""
    modules = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, PACKAGE)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, ".")
                modules[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, name)
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: str, module: str, known: Dict[str, str]) -> Set[str]:
    """Package modules ``module`` imports anywhere (top level or inside functions), ``TYPE_CHECKING`` blocks aside."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    skip: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    is_package = path.endswith("__init__.py")
    found: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base: Optional[str] = node.module
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base is None:
                continue
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:  # "pkg.mod.attr" -> "pkg.mod"
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    """The package's import graph, package ``__init__`` edges to their own submodules left out (re-exports)."""
    known = package_modules()
    graph = {}
    for module, path in known.items():
        edges = imported_modules(path, module, known)
        if path.endswith("__init__.py"):
            edges = {e for e in edges if not e.startswith(module + ".")}
        graph[module] = edges
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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


def test_no_import_cycles_among_the_package_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "modules that import each other (directly or round a circle): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_model_imports_nothing_above_it():
    graph = import_graph()
    upward = sorted(f"{m} imports {t}" for m, ts in graph.items() if m.startswith(PACKAGE + ".model")
                    for t in ts if not t.startswith(MODEL_MAY_IMPORT))
    assert not upward, "model/ must not depend on the layers built on it:\n" + "\n".join(upward)


def test_no_source_file_over_the_line_limit():
    too_long = []
    for folder in (PACKAGE, "tools", "bench", "tests", "examples"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                if name.endswith((".py", ".sh")):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8", errors="replace") as f:
                        lines = sum(1 for _ in f)
                    if lines > MAX_LINES:
                        too_long.append(f"{os.path.relpath(path, ROOT)}: {lines} lines")
    assert not too_long, f"split these by concern (limit {MAX_LINES}):\n" + "\n".join(too_long)


def test_the_checks_detect_what_they_are_for():
    """A two-module circle and a longer one are found; an acyclic graph is clean."""
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph()
    assert "libra_megatron.model.libra_model" in graph and graph["libra_megatron.model.libra_model"]
