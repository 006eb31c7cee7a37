"""The package's layout shows its architecture, and keeps showing it.

- ``sparsex_sgl.core`` (the method) imports nothing of the package outside itself, ``kernels`` (as the
  op sets) excepted, and no engine: no SGLang, no Triton at import time.
- The SGLang adapter (``sparsex_sgl.sglang``) is imported by nothing but itself.
- The user tools (CLI, assets, client, evaluation, harness, test-server launcher) are not imported by the
  core, the adapter or the kernels.
- No two modules import each other, directly or around a circle (imports inside functions included), and
  no two subpackages do.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparsex_sgl"
KERNELS = ROOT / "kernels"
TOOLS = ("sparsex_sgl.cli", "sparsex_sgl.prewarm_cli", "sparsex_sgl.assets", "sparsex_sgl.client", "sparsex_sgl.testing",
         "sparsex_sgl.eval",
         "sparsex_sgl.harness")


def module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ("sparsex_sgl", "kernels", *path.relative_to(KERNELS).with_suffix("").parts)
    else:
        parts = ("sparsex_sgl", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """Module -> the package modules it imports (anywhere in it, ``TYPE_CHECKING`` blocks excluded)."""
    files = [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")]
    modules = {module_name(p): p for p in files}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        type_only = {id(child) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(node.test) for stmt in node.body for child in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("sparsex_sgl"):
                    graph.add_edge(name, target)
    return graph


def test_no_import_circles() -> None:
    graph = import_graph()
    # a package's __init__ re-exporting its modules is not a circle of the code's dependencies
    graph.remove_edges_from([(a, b) for a, b in list(graph.edges) if b.startswith(a + ".")])
    assert list(nx.simple_cycles(graph)) == []


def test_no_circles_between_subpackages() -> None:
    """Collapsed to its subpackages (core, sglang, kernels, reference, eval, harness; the top-level modules
    each alone), the package imports form no circle either: evaluation and harness depend one way."""
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph = import_graph()
    parts = nx.DiGraph((part(a), part(b)) for a, b in graph.edges if part(a) != part(b))
    assert list(nx.simple_cycles(parts)) == []


def test_the_core_depends_on_nothing_but_itself_and_the_kernels() -> None:
    graph = import_graph()
    for module in graph:
        if module.startswith("sparsex_sgl.core"):
            outside = {t for t in graph.successors(module)
                       if not t.startswith(("sparsex_sgl.core", "sparsex_sgl.kernels"))}
            assert not outside, (module, outside)


def test_the_adapter_and_the_tools_stay_apart() -> None:
    graph = import_graph()
    for source, target in graph.edges:
        if target.startswith("sparsex_sgl.sglang"):
            assert source.startswith("sparsex_sgl.sglang"), (source, target)
        if target.startswith(TOOLS):
            assert not source.startswith(("sparsex_sgl.core", "sparsex_sgl.sglang", "sparsex_sgl.kernels",
                                          "sparsex_sgl.reference")), (source, target)
