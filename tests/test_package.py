"""The package's shape: its modules import each other without cycles (function-local imports included),
the report and the picture are leaves, and importing it stays cheap."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

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


# The documented public API: every name of ``fxgradnas.__all__`` but the errors (with the public methods of
# its classes), and the functions of the other modules that README.md names or that the package points to.
PUBLIC_FUNCTIONS = {
    "fxgradnas.hf": ["write_back", "save_pruned", "load_pruned", "prune_checkpoint"],
    "fxgradnas.datasets": ["stdlib_text", "shakespeare_text", "python_docs_text", "token_windows", "interleaved",
                           "sampled_windows", "with_samples", "batched", "causal_lm_loss", "perplexity"],
    "fxgradnas.report": ["analysis_table", "prune_table", "prune_summary", "markdown_report"],
    "fxgradnas.plot": ["plot_result"],
    "fxgradnas.compensate": ["compensate", "width_readers"],
    "fxgradnas.shard": ["split_blocks"],
}
_SECTIONS = ("Args", "Attributes", "Returns", "Yields", "Raises", "Example", "Examples", "Note", "Notes")


def _section(doc: str, title: str) -> list[str]:
    """The names a Google-style ``title:`` section lists (``name:``, ``name (type):``, ``a, b:``, ``**kw:``)."""
    lines = inspect.cleandoc(doc).splitlines()
    names, inside, indent = [], False, None
    for line in lines:
        stripped = line.strip()
        if not line.startswith(" ") and stripped.rstrip(":") in _SECTIONS and stripped.endswith(":"):
            inside, indent = stripped[:-1] == title, None
            continue
        if not inside or not stripped:
            continue
        depth = len(line) - len(line.lstrip())
        if not depth:
            inside = False
            continue
        indent = depth if indent is None else indent
        if depth == indent and ":" in stripped:
            head = stripped.split(":", 1)[0].split(" (", 1)[0]
            names += [n.strip().lstrip("*") for n in head.split(",")]
    return names


def _public_objects() -> list[tuple[str, Any]]:
    import importlib

    import fxgradnas.errors

    found = []
    for name in fxgradnas.__all__:
        value = getattr(fxgradnas, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            continue
        found.append((f"fxgradnas.{name}", value))
        if isinstance(value, type):
            found += [(f"fxgradnas.{name}.{attr}", getattr(value, attr)) for attr, member in vars(value).items()
                      if not attr.startswith("_") and isinstance(member, (types.FunctionType, classmethod,
                                                                             staticmethod))]
    for module, names in PUBLIC_FUNCTIONS.items():
        found += [(f"{module}.{n}", getattr(importlib.import_module(module), n)) for n in names]
    assert fxgradnas.errors.FxGradNasError not in [v for _, v in found]
    return found


def _raises_on_purpose(function: Any) -> bool:
    """Whether ``function``'s own body raises an fxgradnas error or calls a ``check_*`` / ``ensure_*`` helper."""
    import fxgradnas.errors

    errors = {n for n, v in vars(fxgradnas.errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in errors:
                return True
        if isinstance(node, ast.Call):
            called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if called.startswith(("check_", "ensure_")):
                return True
    return False


def test_every_public_function_documents_its_parameters_and_errors() -> None:
    import dataclasses

    missing = []
    checked = _public_objects()
    assert len(checked) > 50
    for qualname, value in checked:
        function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        doc = inspect.getdoc(function) or ""
        if isinstance(function, type):
            if dataclasses.is_dataclass(function):
                wanted = [f.name for f in dataclasses.fields(function) if f.init]
            else:
                wanted = [p for p in inspect.signature(function).parameters if p not in ("self", "cls")]
            listed = _section(doc, "Attributes") + _section(doc, "Args")
            init = function.__dict__.get("__init__")
            if init is not None and not dataclasses.is_dataclass(function):
                listed += _section(inspect.getdoc(init) or "", "Args")
            missing += [f"{qualname}: {p}" for p in wanted if p not in listed]
            continue
        parameters = [p for p in inspect.signature(function).parameters if p not in ("self", "cls")]
        listed = _section(doc, "Args")
        missing += [f"{qualname}: {p}" for p in parameters if p not in listed]
        if _raises_on_purpose(function) and not _section(doc, "Raises"):
            missing.append(f"{qualname}: Raises")
    assert missing == [], "\n".join(missing)


def test_the_docstring_checker_reads_google_sections() -> None:
    doc = ("Summary.\n\nArgs:\n    a: one.\n    b (int): two,\n        continued: here.\n    *args, **kw: rest.\n\n"
           "Raises:\n    ArgumentError, DataError: when.\n")
    assert _section(doc, "Args") == ["a", "b", "args", "kw"]
    assert _section(doc, "Raises") == ["ArgumentError", "DataError"]
    assert _section(doc, "Returns") == []
