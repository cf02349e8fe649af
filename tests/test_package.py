"""The package's shape: its modules import each other without cycles (function-local imports included),
the report and the picture are leaves, and importing it stays cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

import fxgradnas

PACKAGE = Path(fxgradnas.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["fxgradnas", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(source: str, name: str, is_package: bool = False) -> set[str]:
    """fxgradnas modules that module ``name`` imports at run time: every import statement, in functions
    too, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fxgradnas")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.startswith("fxgradnas"):
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}
    return found


def import_graph() -> nx.DiGraph:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _runtime_imports(path.read_text(), name, path.name == "__init__.py"):
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


def test_no_import_cycles() -> None:
    graph = import_graph()
    graph.remove_node("fxgradnas")  # the package's lazy names import on first use, not at import
    assert graph.number_of_edges() > 20
    assert list(nx.simple_cycles(graph)) == []


def test_report_and_plot_are_leaves() -> None:
    graph = import_graph()
    assert list(graph.successors("fxgradnas.report")) == list(graph.successors("fxgradnas.plot")) == []


def test_function_local_imports_count_and_type_checking_ones_do_not() -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .plan import Plan\n"
              "def f():\n    from .report import prune_table\n    from ..capture import capture\n")
    assert _runtime_imports(source, "fxgradnas.analysis.groups") == {
        "fxgradnas.analysis.report", "fxgradnas.analysis.report.prune_table", "fxgradnas.capture",
        "fxgradnas.capture.capture"}


def test_import_does_not_load_torch() -> None:
    code = "import sys, fxgradnas; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_public_names_are_the_functions_not_the_modules() -> None:
    import fxgradnas.calibrate  # noqa: F401  (binds the submodule on the package)

    for name in fxgradnas.__all__:
        value = getattr(fxgradnas, name)
        assert not isinstance(value, type(fxgradnas)), name


def test_analysis_does_not_load_the_presentation_layer() -> None:
    code = ("import sys, fxgradnas.analysis, fxgradnas.capture, fxgradnas.instrument\n"
            "print(sorted(m for m in ('fxgradnas.report', 'tabulate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
