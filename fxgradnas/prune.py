"""``prune``: analyse, score, search and rewrite in one call; each step is public on its own."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from .analysis import Analysis, ensure_analysis
from .batches import check_callable, check_data, default_collect, is_one_shot, peek, to_device
from .calibrate import calibrate, check_calibration_options
from .capture import ExampleInputs, check_example_inputs
from .compensate import DAMPING, LayerReport, check_compensation_options, timed_compensation
from .cost import CostModel
from .errors import ArgumentError, ArgumentTypeError
from .modules import check_weights, device_of
from .plan import Plan
from .report import prune_summary, prune_table
from .rewrite import SelfCheck, apply_plan
from .scores import Scores, l1_scores, random_scores
from .search import RATIOS, SearchResult, check_constraint, check_search_options, parse_constraint, search
from .units import keep_grid

SCORERS = ("gradnas", "l1", "random")
CALIBRATE_OPTIONS = ("autocast_dtype", "converged_below", "patience", "shard", "recompute")


@dataclass
class PruneResult:
    """The physically smaller ``model``, the ``plan`` that made it, and how it was found."""

    model: GraphModule
    plan: Plan
    scores: Scores
    search: SearchResult
    analysis: Analysis = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)
    compensation: list[LayerReport] = field(default_factory=list)

    @property
    def achieved(self) -> dict[str, float]:
        """Params and FLOPs of the pruned model as ratios of the original's."""
        return self.search.achieved

    @property
    def history(self) -> list[dict]:
        return self.search.history

    @property
    def self_check(self) -> SelfCheck | None:
        """How far the pruned module is from the masked reference (None when not checked)."""
        return self.model.meta.get("self_check")

    def table(self, tablefmt: str = "simple") -> str:
        return prune_table(self, tablefmt=tablefmt)

    def summary(self) -> str:
        return prune_summary(self)

    def plot(self, path: str | Path, *, scores: bool = False, title: str | None = None) -> Path:
        """Draw the units kept per layer against the original (and with ``scores`` every unit's score) to
        ``path``; needs matplotlib (the ``plot`` extra). See :func:`fxgradnas.plot.plot_result`."""
        from .plot import plot_result

        return plot_result(self, path, scores=scores, title=title)

    def __str__(self) -> str:
        return self.summary()


def score(
    analysis: Analysis,
    scorer: str = "gradnas",
    data: Iterable | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    *,
    seed: int = 0,
    **calibrate_options: Any,
) -> Scores:
    """Unit scores of every prunable group by ``scorer``: "gradnas" (calibration), "l1" or "random".
    ``calibrate_options`` go to :func:`fxgradnas.calibrate` and are ignored by the baselines."""
    if scorer not in SCORERS:
        raise ArgumentError(f"scorer must be one of {SCORERS}, not {scorer!r}")
    if scorer == "gradnas":
        if data is None or loss_fn is None:
            raise ArgumentTypeError("scorer='gradnas' needs calibration data and a loss_fn (or use scorer='l1')")
        return calibrate(analysis, data, loss_fn, **calibrate_options)
    if scorer == "l1":
        return l1_scores(analysis)
    return random_scores(analysis, seed=seed)


def _keep_pruned(analysis: Analysis, scores: Scores, plan: Plan) -> Scores:
    """``scores`` with the units ``plan`` prunes at zero, so that a later round prunes them first."""
    return scores.replaced({name: value * keep_grid(analysis.group(name), plan.kept(name)).reshape(-1)
                            for name, value in scores.items()})


def _check_arguments(model: Any, example_inputs: Any, data: Any, loss_fn: Any, *, constraint: Any, scorer: Any,
                     mode: Any, searcher: Any, kinds: Any, divisor: Any, ratios: Any, gqa: Any, uniform: Any,
                     collect_fn: Any,
                     max_batches: Any, seed: Any, compensate: Any, damping: Any, compensation_data: Any,
                     calibrate_options: dict[str, Any]) -> tuple[str, ...]:
    """Every argument of :func:`prune`, before anything runs; returns ``kinds`` as a tuple."""
    if not isinstance(model, (torch.nn.Module, Analysis)):
        raise ArgumentTypeError(f"model must be a torch.nn.Module or an Analysis, not {type(model).__name__}")
    check_weights(model.captured.model if isinstance(model, Analysis) else model,
                  "prune (the rewrite slices the weights)")
    check_constraint(constraint)
    if scorer not in SCORERS:
        raise ArgumentError(f"scorer must be one of {SCORERS}, not {scorer!r}")
    kinds = check_search_options(searcher=searcher, kinds=kinds, divisor=divisor, ratios=ratios, gqa=gqa,
                                 uniform=uniform)
    unknown = sorted(set(calibrate_options) - set(CALIBRATE_OPTIONS))
    if unknown:
        raise ArgumentTypeError(f"prune got unknown option(s) {', '.join(unknown)}; the calibration options it passes "
                                f"on are {', '.join(CALIBRATE_OPTIONS)}")
    check_calibration_options(mode=mode, max_batches=max_batches, collect_fn=collect_fn, **calibrate_options)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentTypeError(f"seed must be an int, not {seed!r}")
    if example_inputs is not None:
        check_example_inputs(example_inputs)
    if compensation_data is not None:
        if compensate is None:
            raise ArgumentError("compensation_data is what the re-fit reads; with compensate=None there is no re-fit "
                                "(pass compensate='ls' or leave compensation_data out)")
        check_data(compensation_data, "compensation_data")
        if compensation_data is data and is_one_shot(data):
            raise ArgumentError("compensation_data is the iterator data is: the scores would use up its batches; "
                                "leave compensation_data out to re-fit on data (it is then kept in a list)")
    needs_data = [why for why, needed in (("scorer='gradnas'", scorer == "gradnas"),
                                          (f"compensate={compensate!r}",
                                           compensate is not None and compensation_data is None),
                                          ("example_inputs=None (the first batch captures the model)",
                                           example_inputs is None and not isinstance(model, Analysis))) if needed]
    if needs_data:
        if data is None:
            skip = " (or compensate=None to skip the re-fit)" if compensate is not None else ""
            raise ArgumentTypeError(f"{' and '.join(needs_data)} need(s) calibration data; pass data{skip}")
        check_data(data)
    if scorer == "gradnas":
        check_callable(loss_fn, "loss_fn", "output, batch", optional=False)
    check_compensation_options(method="ls" if compensate is None else compensate, damping=damping)
    return kinds


def prune(
    model: torch.nn.Module | Analysis,
    example_inputs: ExampleInputs | None,
    data: Iterable | None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    *,
    constraint: dict,
    scorer: str = "gradnas",
    mode: str = "batch",
    searcher: str = "binary",
    kinds: tuple[str, ...] = ("heads", "channels", "experts"),
    divisor: int = 32,
    ratios: tuple[float, ...] = RATIOS,
    gqa: str = "both",
    uniform: bool = False,
    collect_fn: Callable[[Any], Any] | None = None,
    max_batches: int | None = 128,
    seed: int = 0,
    check: bool = True,
    progress: bool = True,
    compensate: str | None = "ls",
    damping: float = DAMPING,
    compensation_data: Iterable | None = None,
    rounds: int = 1,
    **calibrate_options: Any,
) -> PruneResult:
    """Prune ``model`` to meet ``constraint`` (e.g. ``{"params": 0.6}``) with the gradnas algorithm.

    The composition of :func:`fxgradnas.analyze`, :func:`score` (``scorer``: "gradnas", "l1",
    "random"), :func:`fxgradnas.search` (``searcher``: "binary" or "greedy") and
    :func:`fxgradnas.apply_plan`. Every argument is checked before the model is captured. The user's
    model is not modified. ``data`` is read once: with ``example_inputs=None`` its first batch captures
    the model and is scored like the others; at most ``max_batches`` are scored (a warning and
    ``summary()`` say when batches were left). ``compensate="ls"`` (the default; ``"scale"``, or ``None`` for
    the reference algorithm's plain rewrite) then re-fits the Linear layers that consume pruned units on the
    calibration data, layer after layer (:func:`fxgradnas.compensate.compensate` with its ridge ``damping``;
    a one-shot iterator is kept in a list for the second pass); ``result.compensation`` reports each layer's error
    before/after. The self-check compares the rewrite with the masked model before this re-fit.
    ``compensation_data`` (batches of model inputs, read through ``collect_fn``; no loss) gives the re-fit its
    own data: the scores then choose units on ``data``, and the re-fit reproduces the layers on text as broad as
    the model will meet, e.g. ``data`` plus what the model samples itself (:func:`fxgradnas.datasets.sampled_windows`).

    ``rounds`` > 1 prunes iteratively: round r calibrates with the units pruned so far masked and searches
    for ``r / rounds`` of the way from the whole model to the budget; units pruned in earlier rounds score
    zero, so they go first (``data`` is read once per round; ``result.scores`` are the last round's).

    ``uniform=True`` keeps one count per kind and unit shape (every MLP the same width, every attention the
    same heads and KV heads; see :func:`fxgradnas.search`), so that a Hugging Face model written back
    (:func:`fxgradnas.hf.write_back`) has a standard config: plain ``from_pretrained`` loads it.
    """
    kinds = _check_arguments(model, example_inputs, data, loss_fn, constraint=constraint, scorer=scorer, mode=mode,
                             searcher=searcher, kinds=kinds, divisor=divisor, ratios=ratios, gqa=gqa, uniform=uniform,
                             collect_fn=collect_fn, max_batches=max_batches, seed=seed, compensate=compensate, damping=damping,
                             compensation_data=compensation_data, calibrate_options=calibrate_options)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ArgumentError(f"rounds must be an int of at least 1, not {rounds!r}")
    if rounds > 1 and scorer != "gradnas":
        raise ArgumentError(f"rounds={rounds} re-calibrates between rounds; scorer={scorer!r} does not calibrate")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if ((compensate is not None and compensation_data is None) or rounds > 1) and is_one_shot(data):  # read twice
        data = list(itertools.islice(data, None if max_batches is None else max_batches + 1))
    if example_inputs is None and not isinstance(model, Analysis):
        first, data = peek(data)
        example_inputs = to_device((collect_fn or default_collect)(first), device_of(model))
    analysis = ensure_analysis(model, example_inputs)
    seconds["analyze"] = time.perf_counter() - start
    start = time.perf_counter()
    searched = [g for g in analysis.prunable if g.kind in kinds]  # only these need scores
    cost_model = CostModel(analysis)
    metric, budget = parse_constraint(constraint, cost_model.base)
    plan: Plan | None = None
    seconds["score"] = seconds["search"] = 0.0
    for round_ in range(1, rounds + 1):
        start = time.perf_counter()
        scores = score(analysis, scorer, data, loss_fn, seed=seed, collect_fn=collect_fn, max_batches=max_batches,
                       mode=mode, progress=progress, groups=searched, plan=plan, **calibrate_options)
        if plan is not None:
            scores = _keep_pruned(analysis, scores, plan)
        seconds["score"] += time.perf_counter() - start
        start = time.perf_counter()
        base = cost_model.base[metric]
        target = base - (base - budget) * round_ // rounds  # the budget itself in the last round
        found = search(analysis, scores, {metric: target}, searcher=searcher, kinds=kinds, divisor=divisor,
                       ratios=ratios, gqa=gqa, uniform=uniform, cost_model=cost_model)
        plan = found.plan
        seconds["search"] += time.perf_counter() - start
    found.plan.fingerprint = analysis.captured.fingerprint
    start = time.perf_counter()
    pruned = apply_plan(analysis, found.plan, check=check)
    seconds["rewrite"] = time.perf_counter() - start
    reports = []
    if compensate is not None:
        reports, seconds["compensate"] = timed_compensation(
            analysis, found.plan, pruned, data if compensation_data is None else compensation_data, method=compensate,
            damping=damping, collect_fn=collect_fn,
            max_batches=max_batches, progress=progress)
    return PruneResult(pruned, found.plan, scores, found, analysis, seconds, reports)
