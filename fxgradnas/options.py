"""The choices of :func:`fxgradnas.prune` and its steps: every enumeration and every default, in one place.

:class:`SearchOptions` (how :func:`fxgradnas.search` chooses a plan), :class:`CalibrationOptions` (how
:func:`fxgradnas.score` and :func:`fxgradnas.calibrate` score units) and :class:`CompensationOptions` (how
:func:`fxgradnas.compensate.compensate` re-fits the layers consuming pruned units) are frozen dataclasses
that check their fields when built: a value fxgradnas cannot use raises
:class:`~fxgradnas.errors.ArgumentError` or :class:`~fxgradnas.errors.ArgumentTypeError` naming the field,
the value and the fix, before any model is captured. The command line reads its choices and defaults here.

This module imports no torch, so ``fxgradnas --help`` needs none.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ArgumentError, ArgumentTypeError

KINDS = ("heads", "channels", "experts", "hidden", "blocks")
"""The kinds of prunable groups (:class:`fxgradnas.Group`): attention heads, channels (an MLP's width, a
convolution's filters), experts of a mixture, the residual width, whole layers."""
DEFAULT_KINDS = ("heads", "channels", "experts")
"""The kinds searched by default: the residual width and whole layers are opt-in."""
SEARCHERS = ("binary", "greedy", "evolve")
"""``binary``: one degradation threshold for every group (the reference); ``greedy``: grow from the smallest;
``evolve``: the binary plan refined by level trades between groups, each scored by the masked model's loss on
held-out batches (:func:`fxgradnas.evolve.evolve`; :func:`fxgradnas.prune` only, it needs data and a loss)."""
EVOLVE_FORWARDS = 256
"""Forward passes ``searcher="evolve"`` may run by default (the start's evaluation included)."""
EVOLVE_BATCHES = 4
"""Batches of data ``searcher="evolve"`` holds out from scoring by default, to measure each candidate's loss on."""
GQA = ("both", "kv", "queries")
"""How grouped-query attention loses heads: whole KV groups, queries within each KV group, or both."""
RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))
"""The shares of a channel group's width that are tried: 5 %, 10 %, ..., 100 %."""
MULTIPLE_OF = 32
"""Kept channel counts are multiples of it (a group narrower than it: any count)."""

SCORERS = ("gradnas", "l1", "random")
"""``gradnas``: calibration (sum of squared mask gradients); ``l1``: weight magnitudes; ``random``: the baseline."""
GRANULARITIES = ("batch", "sample")
"""``batch``: square each batch's gradient (the reference); ``sample``: each sample's (an empirical Fisher)."""
AUTOCAST_DTYPES = ("bfloat16", "float16")
"""Names of the dtypes calibration may run its forward under autocast in (a floating torch.dtype works too)."""
MAX_BATCHES = 128
"""Calibration (and compensation) batches read by default."""
PATIENCE = 5

COMPENSATION_METHODS = ("ls", "scale")
"""``ls``: least squares with a ridge towards the original weights; ``scale``: one scale per kept unit."""
DAMPING = 0.3
"""The re-fit's ridge. Chosen on SmolLM2-135M calibrated on Python source and evaluated on prose and Shakespeare
(benchmarks/RESULTS.md, "Compensation"): 0.3 beat 0.1, 1, 3 and 10 on the prose at 75 % and 90 % params and
tied 1 on Shakespeare."""
SAMPLED_DAMPING = 0.03
"""The ridge for data that mixes the model's own samples into the calibration text
(:func:`fxgradnas.datasets.with_samples`): the data then covers more than its domain, and a weaker pull towards
the original weights fits it better (SmolLM2 at 75 % params: benchmarks/RESULTS.md, rows ° of the quality benchmark)."""
MAX_WIDTH = 16384
"""The widest consumer input re-fitted by default: its float64 Gram matrix takes width^2 x 8 bytes (2.1 GB
here; Llama-3-8B's down_proj reads 14,336 columns). A convolution flattened into a classifier (VGG's 25,088
columns: 5 GB, 13 GB at its peak) is left as pruned unless max_width allows it."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _one_of(owner: str, name: str, value: Any, choices: tuple[str, ...], hint: str = "") -> None:
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{owner}: {name} must be one of {', '.join(map(repr, choices))}{hint}, not {value!r}")


def _flag(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{owner}: {name} must be True or False, not {value!r}")


def check_max_batches(max_batches: Any, owner: str = "") -> None:
    """Raise unless ``max_batches`` is an int of at least 1 or None (every batch)."""
    where = f"{owner}: " if owner else ""
    if max_batches is None:
        return
    if not _is_int(max_batches):
        raise ArgumentTypeError(f"{where}max_batches must be an int (or None for every batch), not {max_batches!r}")
    if max_batches < 1:
        raise ArgumentError(f"{where}max_batches must be at least 1 (or None for every batch), not {max_batches}")


def check_instance(value: Any, cls: type, name: str, none: str = "") -> None:
    """Raise ArgumentTypeError unless ``value`` is a ``cls`` (``none``: what None means, where allowed)."""
    if value is None and none:
        return
    if not isinstance(value, cls):
        extra = f" (or None {none})" if none else ""
        raise ArgumentTypeError(f"{name} must be a fxgradnas.{cls.__name__}{extra}, not {type(value).__name__}; "
                                f"build one like fxgradnas.{cls.__name__}(...)")


@dataclass(frozen=True)
class SearchOptions:
    """How :func:`fxgradnas.search` turns unit scores into a plan.

    Attributes:
        searcher: ``"binary"`` (one degradation threshold for every group, then grown while the budget
            allows; the reference), ``"greedy"`` (grown from the smallest choices) or ``"evolve"`` (the binary
            plan, then trades of levels between groups within the budget, each candidate kept only when the
            masked model's mean loss on ``evolve_batches`` held-out batches is lower; :func:`fxgradnas.prune`
            holds out the last ``evolve_batches`` batches it reads from ``data`` and does not score them).
        kinds: Group kinds searched (the others stay whole): any of ``"heads"``, ``"channels"``,
            ``"experts"``, ``"hidden"`` (the residual width), ``"blocks"`` (whole layers). Kept as a tuple.
        multiple_of: Kept channel counts are multiples of it (a group narrower than it: any count).
        ratios: Shares of a channel group's width tried as choices, each in (0, 1]. Kept as a tuple.
        gqa: How grouped-query attention loses heads: ``"kv"`` (whole KV groups), ``"queries"`` (an equal
            number of queries in each KV group) or ``"both"``.
        uniform: Every group of one kind and unit shape (every MLP, every attention) keeps one count, so a
            Hugging Face model written back has a standard config.
        evolve_forwards: With ``searcher="evolve"``: the forward passes the refinement may run in all (each
            candidate, the start included, costs ``evolve_batches``); at least ``2 * evolve_batches``.
        evolve_batches: With ``searcher="evolve"``: how many batches of ``data`` are held out to measure the
            loss on (at least 1; ``data`` needs one more to score).

    Raises:
        ArgumentError: A field has a value outside its choices or range.
        ArgumentTypeError: A field has the wrong type (``kinds`` or ``ratios`` a string, ``uniform`` not a bool,
            ``evolve_forwards`` or ``evolve_batches`` not an int).
    """

    searcher: str = "binary"
    kinds: tuple[str, ...] = DEFAULT_KINDS
    multiple_of: int = MULTIPLE_OF
    ratios: tuple[float, ...] = RATIOS
    gqa: str = "both"
    uniform: bool = False
    evolve_forwards: int = EVOLVE_FORWARDS
    evolve_batches: int = EVOLVE_BATCHES

    def __post_init__(self) -> None:
        owner = "SearchOptions"
        _one_of(owner, "searcher", self.searcher, SEARCHERS)
        kinds = self.kinds
        if isinstance(kinds, str) or not isinstance(kinds, Iterable):
            raise ArgumentTypeError(f"{owner}: kinds must be a tuple of group kinds like ('heads', 'channels'), "
                                    f"not {kinds!r}")
        kinds = tuple(kinds)
        if not kinds or any(k not in KINDS for k in kinds):
            raise ArgumentError(f"{owner}: kinds must be a non-empty tuple of {', '.join(map(repr, KINDS))}, "
                                f"not {kinds!r}")
        object.__setattr__(self, "kinds", kinds)
        if not _is_int(self.multiple_of) or self.multiple_of < 1:
            raise ArgumentError(f"{owner}: multiple_of must be an int of at least 1 (kept channel counts are "
                                f"multiples of it), not {self.multiple_of!r}")
        ratios = self.ratios
        if isinstance(ratios, (str, Mapping)) or not isinstance(ratios, Iterable):
            raise ArgumentTypeError(f"{owner}: ratios must be a tuple of floats in (0, 1], not {ratios!r}")
        ratios = tuple(ratios)
        if not ratios or not all(_is_number(r) and 0 < r <= 1 for r in ratios):
            raise ArgumentError(f"{owner}: ratios must be a non-empty tuple of floats in (0, 1], not {ratios!r}")
        object.__setattr__(self, "ratios", ratios)
        _one_of(owner, "gqa", self.gqa, GQA)
        _flag(owner, "uniform", self.uniform)
        for name in ("evolve_batches", "evolve_forwards"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ArgumentTypeError(f"{owner}: {name} must be an int, not {value!r}")
        if self.evolve_batches < 1:
            raise ArgumentError(f"{owner}: evolve_batches must be at least 1 (the held-out batches the loss is "
                                f"measured on), not {self.evolve_batches}")
        if self.evolve_forwards < 2 * self.evolve_batches:
            raise ArgumentError(f"{owner}: evolve_forwards={self.evolve_forwards} cannot measure the start and one "
                                f"candidate on evolve_batches={self.evolve_batches} batches: pass evolve_forwards >= "
                                f"{2 * self.evolve_batches} or fewer evolve_batches")


@dataclass(frozen=True)
class CalibrationOptions:
    """How :func:`fxgradnas.score` and :func:`fxgradnas.calibrate` score units.

    Attributes:
        scorer: ``"gradnas"`` (calibration on data: the sum of squared mask gradients), ``"l1"`` (weight
            magnitudes) or ``"random"`` (the baseline); :func:`fxgradnas.calibrate` is the ``"gradnas"`` one.
        granularity: ``"batch"`` squares each batch's gradient (the reference); ``"sample"`` each sample's
            (an empirical Fisher), at the same backward cost.
        max_batches: At most this many calibration batches are read (None: every batch); a warning says
            when batches were left.
        rounds: :func:`fxgradnas.prune` prunes in this many rounds, re-calibrating with the units pruned so
            far masked (more than 1 needs ``scorer="gradnas"``).
        seed: The seed of ``scorer="random"`` and of ``SearchOptions(searcher="evolve")``'s mutations.
        autocast_dtype: Run the forward under autocast in this dtype (``"bfloat16"``, ``"float16"`` or a
            floating torch.dtype); None: the model's own dtype.
        converged_below: Stop early once the mean relative change of the averaged scores stays below it for
            ``patience`` batches (None: no early stop).
        patience: Batches the change must stay below ``converged_below``.
        shard: Shard the graph's blocks over the torch.distributed ranks (FSDP2) while calibrating.
        recompute: Run each block under activation checkpointing: backward holds one block's activations
            instead of all of them, for about one more forward of time; the scores are the same.

    Raises:
        ArgumentError: A field has a value outside its choices or range, or ``rounds`` > 1 with a scorer that
            does not calibrate.
        ArgumentTypeError: A field has the wrong type (``seed`` not an int, a flag not a bool, ...).
    """

    scorer: str = "gradnas"
    granularity: str = "batch"
    max_batches: int | None = MAX_BATCHES
    rounds: int = 1
    seed: int = 0
    autocast_dtype: Any = None
    converged_below: float | None = None
    patience: int = PATIENCE
    shard: bool = False
    recompute: bool = False

    def __post_init__(self) -> None:
        owner = "CalibrationOptions"
        _one_of(owner, "scorer", self.scorer, SCORERS)
        _one_of(owner, "granularity", self.granularity, GRANULARITIES)
        check_max_batches(self.max_batches, owner)
        if not _is_int(self.rounds) or self.rounds < 1:
            raise ArgumentError(f"{owner}: rounds must be an int of at least 1, not {self.rounds!r}")
        if self.rounds > 1 and self.scorer != "gradnas":
            raise ArgumentError(f"{owner}: rounds={self.rounds} re-calibrates between rounds; scorer={self.scorer!r} "
                                "does not calibrate (use scorer='gradnas' or rounds=1)")
        if not _is_int(self.seed):
            raise ArgumentTypeError(f"{owner}: seed must be an int, not {self.seed!r}")
        _check_autocast_dtype(owner, self.autocast_dtype)
        below = self.converged_below
        if below is not None and not (_is_number(below) and below >= 0):
            raise ArgumentError(f"{owner}: converged_below must be a non-negative number (or None: no early stop), "
                                f"not {below!r}")
        if not _is_int(self.patience) or self.patience < 1:
            raise ArgumentError(f"{owner}: patience must be an int of at least 1, not {self.patience!r}")
        _flag(owner, "shard", self.shard)
        _flag(owner, "recompute", self.recompute)


def _check_autocast_dtype(owner: str, dtype: Any) -> None:
    if dtype is None or (isinstance(dtype, str) and dtype in AUTOCAST_DTYPES):
        return
    torch = sys.modules.get("torch")  # a torch.dtype exists only once torch is imported
    if torch is not None and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return
    if isinstance(dtype, str):
        raise ArgumentError(f"{owner}: autocast_dtype must be one of {', '.join(map(repr, AUTOCAST_DTYPES))}, a "
                            f"floating torch.dtype like torch.bfloat16, or None; not {dtype!r}")
    raise ArgumentTypeError(f"{owner}: autocast_dtype must be a floating torch.dtype like torch.bfloat16 (or one of "
                            f"{', '.join(map(repr, AUTOCAST_DTYPES))}, or None), not {dtype!r}")


@dataclass(frozen=True)
class CompensationOptions:
    """How :func:`fxgradnas.compensate.compensate` re-fits the Linear layers consuming pruned units.

    Attributes:
        method: ``"ls"`` (least squares with a ridge towards the original kept columns) or ``"scale"``
            (one scale per kept unit, Kwon et al.'s mask tuning).
        damping: The ridge, scaled by the mean diagonal of the kept inputs' second moment; a finite number
            of at least 0 (lower when the calibration text is as broad as what the model will see).
        bias: With a bias, also shift it by the mean of what is left unexplained.
        sequential: Fit each layer on the inputs of the pruned model whose earlier layers are already
            re-fitted (all batches held at once); False: one streaming pass over the dense model.
        max_batches: At most this many batches are read (None: every batch).
        max_width: A consumer reading more columns is left as pruned, with a warning (None: no limit); its
            statistics need ``max_width^2`` float64 numbers.
        hidden: With ``"ls"``, also re-fit the Linears reading a pruned residual width (q/k/v and gate/up through
            the norms) to their dense outputs, in a second pass over the data. Off by default: on SmolLM2 at
            75 % params with 64 of 576 channels of the width cut it took Shakespeare from 3.20x to 7.00x the
            dense perplexity (benchmarks/RESULTS.md, "The residual width's readers").

    Raises:
        ArgumentError: A field has a value outside its choices or range.
        ArgumentTypeError: A flag is not a bool, or ``max_batches`` not an int.
    """

    method: str = "ls"
    damping: float = DAMPING
    bias: bool = True
    sequential: bool = True
    max_batches: int | None = MAX_BATCHES
    max_width: int | None = MAX_WIDTH
    hidden: bool = False

    def __post_init__(self) -> None:
        owner = "CompensationOptions"
        _one_of(owner, "method", self.method, COMPENSATION_METHODS, " (pass compensation=None to prune to skip the "
                                                                    "re-fit)")
        if not _is_number(self.damping) or not 0 <= self.damping < math.inf:
            raise ArgumentError(f"{owner}: damping must be a finite non-negative number, not {self.damping!r}")
        _flag(owner, "bias", self.bias)
        _flag(owner, "sequential", self.sequential)
        _flag(owner, "hidden", self.hidden)
        check_max_batches(self.max_batches, owner)
        if self.max_width is not None and (not _is_int(self.max_width) or self.max_width < 1):
            raise ArgumentError(f"{owner}: max_width must be a positive int or None (no limit), not {self.max_width!r}")
