"""The ``fxgradnas`` command (also ``python -m fxgradnas``).

``prune`` a Hugging Face causal LM checkpoint directory (or any PyTorch model from a ``MODULE:FACTORY``)
to a params or FLOPs budget on calibration text, and write the pruned model, its plan, a report and a
picture; ``inspect`` the prunable groups of a model; ``eval`` the perplexity of a checkpoint on text.

Parsing the command line imports no torch, so ``--help`` answers at once; each command imports what it
needs when it runs. A mistake in the command or its inputs ends in a one-line ``error: ...`` and exit
code 2; an error fxgradnas raises on purpose (:class:`fxgradnas.FxGradNasError`) the same way with 1.

The modules: :mod:`~fxgradnas.cli.parser` (the arguments, their types, and the settings and option objects
they make), :mod:`~fxgradnas.cli.inputs` (model argument, texts, token windows, calibration batches),
:mod:`~fxgradnas.cli.models` (loading, generation, perplexity), :mod:`~fxgradnas.cli.prune` (the prune
command's steps), :mod:`~fxgradnas.cli.commands` (inspect and eval) and :mod:`~fxgradnas.cli.output` (step
lines, tables, the report).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import FxGradNasError
from .commands import run_eval, run_inspect
from .inputs import (
    Source,
    calibration_batches,
    evaluation_batches,
    read_named_texts,
    read_texts,
    sampled_text,
    text_windows,
    windows,
)
from .parser import (
    CORPORA,
    SAMPLED,
    PruneSettings,
    UsageError,
    build_parser,
    fraction,
    non_negative,
    positive,
)
from .prune import run_prune

__all__ = [
    "CORPORA", "SAMPLED", "PruneSettings", "Source", "UsageError", "build_parser", "calibration_batches",
    "evaluation_batches", "fraction", "main", "non_negative", "positive", "read_named_texts", "read_texts",
    "run_command", "run_eval", "run_inspect", "run_prune", "sampled_text", "text_windows", "windows",
]


def run_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the command ``args`` (parsed from ``argv``) names, with the settings it takes."""
    if args.command == "prune":
        return run_prune(PruneSettings.from_args(args, argv))
    if args.command == "inspect":
        return run_inspect(args.model, args.seq_len, args.tablefmt)
    return run_eval(args.model, args.texts, batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len,
                    device=args.device, dtype=args.dtype, as_json=args.json)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code (0, 1 for fxgradnas errors, 2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_command(build_parser().parse_args(argv), argv)
    except UsageError as exc:
        print(f"fxgradnas: error: {exc}", file=sys.stderr)
        return 2
    except FxGradNasError as exc:
        print(f"fxgradnas: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fxgradnas: interrupted", file=sys.stderr)
        return 130
