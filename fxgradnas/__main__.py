"""Command line: ``python -m fxgradnas inspect MODULE:FACTORY`` and ``python -m fxgradnas demo``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .analysis import analyze


def load_factory(spec: str):
    """``package.module:function`` -> the function (it returns ``(model, example_inputs)``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise SystemExit(f"expected MODULE:FACTORY (e.g. fxgradnas.zoo:llama), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise SystemExit(f"{module_name!r} has no attribute {attr!r}") from exc


def inspect_factory(spec: str, tablefmt: str = "simple") -> str:
    made = load_factory(spec)()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise SystemExit(f"{spec} must return (model, example_inputs), got {type(made).__name__}")
    model, example_inputs = made
    return analyze(model, example_inputs).table(tablefmt=tablefmt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxgradnas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print the analysis table of a model factory")
    inspect.add_argument("factory", help="MODULE:FACTORY returning (model, example_inputs)")
    inspect.add_argument("--tablefmt", default="simple", help="tabulate table format")
    demo = sub.add_parser("demo", help="analyse a bundled Llama-style example model")
    demo.add_argument("--tablefmt", default="simple")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        print(inspect_factory(args.factory, args.tablefmt))
    else:
        print("fxgradnas demo: the prunable groups of a bundled Llama-style decoder (fxgradnas.zoo:llama)\n")
        print(inspect_factory("fxgradnas.zoo:llama", args.tablefmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
