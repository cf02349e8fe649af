"""Command line: ``python -m fxgradnas inspect MODULE:FACTORY`` prints the analysis table of a model.

torch is imported only once a command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any


def load_factory(spec: str) -> Callable[[], Any]:
    """``package.module:function`` -> the function (it returns ``(model, example_inputs)``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise SystemExit(f"error: expected MODULE:FACTORY (e.g. tests.zoo:llama), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"error: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SystemExit(f"error: {module_name!r} has no function {attr!r}")
    return factory


def inspect_factory(spec: str, tablefmt: str = "simple") -> str:
    from .analysis import analyze
    from .errors import FxGradNasError

    made = load_factory(spec)()
    if not (isinstance(made, tuple) and len(made) == 2):
        raise SystemExit(f"error: {spec} must return (model, example_inputs), not {type(made).__name__}")
    model, example_inputs = made
    try:
        return analyze(model, example_inputs).table(tablefmt=tablefmt)
    except FxGradNasError as exc:
        raise SystemExit(f"error: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxgradnas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="print the analysis table of a model factory")
    inspect.add_argument("factory", help="MODULE:FACTORY returning (model, example_inputs)")
    inspect.add_argument("--tablefmt", default="simple", help="tabulate table format")
    args = parser.parse_args(argv)
    print(inspect_factory(args.factory, args.tablefmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
