"""Command line: ``python -m fxgradnas inspect MODULE:FACTORY`` prints the analysis table of a model.

torch is imported only once a command runs, so ``--help`` answers at once. A mistake in the command
(a bad factory, a model fxgradnas cannot capture) is one ``error:`` line on stderr and exit status 1 (2
for a bad option), never a traceback.
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
    if not sep or not module_name or not attr:
        raise SystemExit(f"error: expected MODULE:FACTORY (e.g. tests.zoo:llama), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"error: cannot import {module_name!r}: {exc}") from exc
    except Exception as exc:  # the module itself fails while it is imported
        raise SystemExit(f"error: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        what = "nothing" if factory is None else f"a {type(factory).__name__}"
        raise SystemExit(f"error: {module_name}:{attr} is {what}, not a function returning (model, example_inputs)")
    return factory


def inspect_factory(spec: str, tablefmt: str = "simple") -> str:
    from .analysis import analyze
    from .errors import FxGradNasError

    factory = load_factory(spec)
    try:
        made = factory()
    except Exception as exc:
        raise SystemExit(f"error: {spec}() failed: {type(exc).__name__}: {exc}; FACTORY must run without "
                         "arguments and return (model, example_inputs)") from exc
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
    from tabulate import tabulate_formats

    if args.tablefmt not in tabulate_formats:
        parser.error(f"--tablefmt {args.tablefmt!r} is not a tabulate format; choose from {', '.join(tabulate_formats)}")
    try:
        print(inspect_factory(args.factory, args.tablefmt))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
