"""The command line's arguments: the parser, the argument types, and the option objects they make.

The choices and defaults of the pruning options are read from :mod:`fxgradnas.options`, so they are spelled
once. Building the parser imports no torch, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from .. import options
from ..options import CalibrationOptions, CompensationOptions, SearchOptions

DESCRIPTION = ("Prune a Hugging Face causal LM checkpoint (or any PyTorch model from MODULE:FACTORY) to a params "
               "or FLOPs budget on calibration text, inspect a model's prunable groups, or measure perplexity.")
NO_COMPENSATION = "none"
COMPENSATIONS = (*options.COMPENSATION_METHODS, NO_COMPENSATION)
DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a checkpoint's weights are loaded in
CORPORA = {
    "shakespeare": "Shakespeare's plays from 1M characters in (fxgradnas.datasets.CALIBRATION_SKIP)",
    "shakespeare-heldout": "the first 1M characters of the plays, disjoint from 'shakespeare'",
    "python-docs": "the Python language reference (pydoc_data, ships with CPython)",
    "stdlib": "CPython standard-library sources",
}
SAMPLED = "self"  # --calibration name of text the model samples itself (fxgradnas.datasets.sampled_windows)
BATCHES = 16  # --batches' default on the text given alone
BATCHES_SAMPLED = 64  # ... and when the model's own samples are read (half of the windows each)


def default_texts(texts: dict[str, tuple[str, ...]], *, checkpoint: bool, read: bool,
                  no_self: bool) -> dict[str, tuple[str, ...]]:
    """The texts a prune reads: for a checkpoint calibrated on text that names no :data:`SAMPLED` (and
    without ``--no-self``), the calibration text and as many windows again that the model samples itself, so
    that the scores and the re-fit cover text as broad as the model's own and not the calibration domain
    alone (``read``: anything reads the calibration batches). ``--refit``, when given, is read as given."""
    calibration = texts["--calibration"]
    if not (checkpoint and read) or no_self or not calibration or SAMPLED in (*calibration, *texts["--refit"]):
        return dict(texts)
    return {**texts, "--calibration": (*calibration, SAMPLED)}


class UsageError(Exception):
    """A mistake in the command line or in what it names: one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and go through :class:`UsageError`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


# --- what the arguments name -----------------------------------------------------------------------
def fraction(text: str) -> float | str:
    """``0.75`` or ``75%``: a share of the model in (0, 1], as :func:`fxgradnas.search` takes it."""
    match = re.fullmatch(r"\s*(\d*\.?\d+)\s*(%?)\s*", text)
    value = float(match[1]) / (100 if match[2] else 1) if match else -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1] like 0.75 or a percentage like 75%, got {text!r}")
    return f"{match[1]}%" if match[2] else value


def non_negative(text: str) -> float:
    """A finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive(text: str) -> int:
    """A count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def table_format(name: str) -> str:
    """A tabulate table format name (checked before the model is loaded)."""
    from tabulate import tabulate_formats

    if name not in tabulate_formats:
        raise argparse.ArgumentTypeError(f"unknown table format {name!r}; one of {', '.join(tabulate_formats)}")
    return name


# --- what prune is asked for ----------------------------------------------------------------------
@dataclass(frozen=True)
class PruneSettings:
    """Everything ``fxgradnas prune`` is asked for, read once from the command line.

    ``texts``: the names each text option gives (``--calibration``, ``--refit``, ``--eval``) with
    :func:`default_texts` applied; ``batches`` bounds both calibration and the re-fit; ``compensation`` is
    None for ``--compensate none``. ``--batches`` and ``--damping`` default to :data:`BATCHES_SAMPLED` and
    :data:`options.SAMPLED_DAMPING` when the model's own samples are read (by the re-fit, for the damping).
    """

    model: str
    out: Path
    constraint: dict[str, float | str]
    search: SearchOptions
    calibration: CalibrationOptions
    compensation: CompensationOptions | None
    texts: dict[str, tuple[str, ...]]
    data: str | None
    heal: int
    batches: int
    batch_size: int
    seq_len: int
    eval_batches: int
    device: str | None
    dtype: str
    prompt: str
    new_tokens: int
    command: tuple[str, ...]

    @classmethod
    def from_args(cls, args: argparse.Namespace, argv: Sequence[str]) -> PruneSettings:
        """The settings of a parsed ``prune`` command line ``argv``; the option objects check their values."""
        kinds = tuple(dict.fromkeys(args.kinds))
        unknown = [k for k in kinds if k not in options.KINDS]
        if unknown:
            raise UsageError(f"--kinds: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(options.KINDS)}")
        if args.heal < 0:
            raise UsageError(f"--heal takes a number of steps (0: no healing), not {args.heal}")
        if args.no_self and SAMPLED in (*(args.calibration or ()), *(args.refit or ())):
            raise UsageError(f"--no-self leaves out the model's own samples, which --calibration/--refit {SAMPLED} "
                             "asks for; give one of the two")
        texts = default_texts({"--calibration": tuple(args.calibration or ()), "--refit": tuple(args.refit or ()),
                               "--eval": tuple(args.eval or ())}, checkpoint=Path(args.model).is_dir(),
                              read=args.scorer == "gradnas" or args.compensate != NO_COMPENSATION or args.heal > 0,
                              no_self=args.no_self)
        refit_texts = texts["--refit"] or texts["--calibration"]
        batches = args.batches or (BATCHES_SAMPLED if SAMPLED in (*texts["--calibration"], *refit_texts) else BATCHES)
        damping = (args.damping if args.damping is not None else
                   options.SAMPLED_DAMPING if SAMPLED in refit_texts else CompensationOptions().damping)
        compensation = (None if args.compensate == NO_COMPENSATION else
                        CompensationOptions(method=args.compensate, damping=damping, max_batches=batches))
        return cls(
            model=args.model, out=args.out,
            constraint={"params": args.params} if args.params is not None else {"flops": args.flops},
            search=SearchOptions(kinds=kinds, multiple_of=args.multiple_of, uniform=args.uniform, searcher=args.searcher),
            calibration=CalibrationOptions(scorer=args.scorer, granularity=args.granularity, max_batches=batches,
                                           rounds=args.rounds, seed=args.seed, recompute=args.recompute),
            compensation=compensation,
            texts=texts, data=args.data, heal=args.heal, batches=batches, batch_size=args.batch_size, seq_len=args.seq_len,
            eval_batches=args.eval_batches, device=args.device, dtype=args.dtype, prompt=args.prompt,
            new_tokens=args.new_tokens, command=("fxgradnas", *argv))


# --- the parser ------------------------------------------------------------------------------------
def _add_model(parser: argparse.ArgumentParser) -> None:
    """The model argument every command takes."""
    parser.add_argument("model", metavar="MODEL", help="a Hugging Face causal LM checkpoint directory, or "
                                                       "MODULE:FACTORY: a function returning (model, example_inputs)")


def _add_windows(parser: argparse.ArgumentParser) -> None:
    """Window, device and dtype options of the commands that read text."""
    parser.add_argument("--batch-size", type=positive, metavar="N", default=8, help="windows per batch (default 8)")
    parser.add_argument("--seq-len", type=positive, metavar="N", default=128, help="tokens per window (default 128)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default cuda when present)")
    parser.add_argument("--dtype", choices=DTYPES, default=DTYPES[0], help=f"weights' dtype (default {DTYPES[0]})")


def _add_prune(sub: argparse._SubParsersAction, corpora: str) -> None:
    search, calibration, compensation = SearchOptions(), CalibrationOptions(), CompensationOptions()
    prune = sub.add_parser(
        "prune", help="prune a model to a params or FLOPs budget and write it with plan, report and picture",
        description="Calibrate gradnas scores on text, find the plan that meets the budget, rewrite the model, "
                    "optionally re-fit the layers consuming pruned units, and write into --out: the pruned "
                    "Hugging Face model (with --uniform a standard checkpoint, else fxgradnas.hf.load_pruned "
                    "loads it), plan.json, report.md/.json and pruned.png. "
                    f"Text arguments are UTF-8 files or built-in corpora ({corpora}).")
    _add_model(prune)
    budget = prune.add_mutually_exclusive_group(required=True)
    budget.add_argument("--params", type=fraction, metavar="RATIO", help="keep this share of the parameters (0.75 or 75%%)")
    budget.add_argument("--flops", type=fraction, metavar="RATIO", help="keep this share of the FLOPs (0.7 or 70%%)")
    prune.add_argument("--calibration", nargs="+", metavar="TEXT",
                       help=f"calibration text(s): windows of each taken in turn; {SAMPLED!r} is text the model "
                            "samples itself (its share of the windows, seeded by --seed; a file named self: ./self), "
                            f"which a checkpoint's calibration adds by default (--no-self: the text given alone)")
    prune.add_argument("--no-self", action="store_true",
                       help="calibrate and re-fit on the text given alone, without the model's own samples")
    prune.add_argument("--refit", nargs="+", metavar="TEXT",
                       help="text(s) the re-fit reads (default: the calibration batches)")
    prune.add_argument("--eval", nargs="+", metavar="TEXT", help="text(s) to measure perplexity on, before and after")
    prune.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    prune.add_argument("--batches", type=positive, metavar="N",
                       help=f"calibration (and re-fit) batches (default {BATCHES_SAMPLED} with {SAMPLED!r}, half of "
                            f"them sampled, else {BATCHES})")
    prune.add_argument("--eval-batches", type=positive, metavar="N", default=8, help="evaluation batches per text (default 8)")
    _add_windows(prune)
    prune.add_argument("--compensate", choices=COMPENSATIONS, default=compensation.method,
                       help="re-fit the layers consuming pruned units: ls (least squares), scale, none "
                            f"(default {compensation.method})")
    prune.add_argument("--damping", type=non_negative, metavar="D",
                       help=f"the re-fit's ridge towards the original weights (default {options.SAMPLED_DAMPING} when it "
                            f"reads {SAMPLED!r}, else {compensation.damping}: weaker on data as broad as what the "
                            "model will see)")
    prune.add_argument("--rounds", type=positive, metavar="N", default=calibration.rounds,
                       help="prune in N rounds, re-calibrating with the units pruned so far masked "
                            f"(default {calibration.rounds})")
    prune.add_argument("--heal", type=int, metavar="STEPS", default=0,
                       help="then distil the pruned model from the dense one on the calibration batches (default 0)")
    prune.add_argument("--kinds", nargs="+", default=list(search.kinds), metavar="KIND",
                       help=f"group kinds to prune: {', '.join(options.KINDS)} (blocks: whole layers; default "
                            f"{' '.join(search.kinds)})")
    prune.add_argument("--scorer", choices=options.SCORERS, default=calibration.scorer,
                       help=f"unit scores (default {calibration.scorer})")
    prune.add_argument("--granularity", choices=options.GRANULARITIES, default=calibration.granularity,
                       help=f"gradnas: square the gradient per batch or per sample (default {calibration.granularity})")
    prune.add_argument("--recompute", action="store_true", default=calibration.recompute,
                       help="calibrate with activation checkpointing per layer: long sequences in less memory")
    prune.add_argument("--multiple-of", type=positive, metavar="N", default=search.multiple_of,
                       help=f"kept channel counts are multiples of it (default {search.multiple_of})")
    prune.add_argument("--searcher", choices=options.SEARCHERS, default=search.searcher,
                       help=f"how the plan is chosen from the scores (default {search.searcher}; evolve: the binary "
                            f"plan refined by level trades measured on {search.evolve_batches} more calibration batches, "
                            f"{search.evolve_forwards} forward passes)")
    prune.add_argument("--uniform", action="store_true", default=search.uniform,
                       help="every layer keeps the same heads, KV heads and MLP width: a standard checkpoint that "
                            "plain transformers (and serving stacks) load")
    prune.add_argument("--prompt", default="Once upon a time",
                       help="greedy generation before/after in the report ('' for none)")
    prune.add_argument("--new-tokens", type=positive, metavar="N", default=24, help="tokens to generate (default 24)")
    prune.add_argument("--data", metavar="MODULE:FUNCTION",
                       help="for a MODULE:FACTORY model: a function returning (calibration batches, loss_fn)")
    prune.add_argument("--seed", type=int, default=calibration.seed,
                       help=f"torch seed, and the random scorer's (default {calibration.seed})")


def build_parser() -> Parser:
    """The command line; builds without importing torch. ``args.command`` names the command."""
    corpora = "; ".join(f"{name}: {what}" for name, what in CORPORA.items())
    parser = Parser(prog="fxgradnas", description=DESCRIPTION,
                    epilog="fxgradnas COMMAND --help for each command's options")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_prune(sub, corpora)

    inspect = sub.add_parser("inspect", help="print the prunable groups of a model",
                             description="Capture and analyse a model; print one row per group.")
    _add_model(inspect)
    inspect.add_argument("--seq-len", type=positive, metavar="N", default=16, help="tokens of the example input (default 16)")
    inspect.add_argument("--tablefmt", default="simple", type=table_format,
                         help="tabulate table format (default simple)")

    evaluate = sub.add_parser("eval", help="perplexity of a checkpoint (pruned or not) on text",
                              description=f"Perplexity on each text: UTF-8 files or built-in corpora ({corpora}).")
    _add_model(evaluate)
    evaluate.add_argument("texts", nargs="+", metavar="TEXT", help="text file(s) or corpus name(s)")
    evaluate.add_argument("--batches", type=positive, metavar="N", default=8, help="batches per text (default 8)")
    _add_windows(evaluate)
    evaluate.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    return parser
