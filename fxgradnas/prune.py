"""``prune``: analyse, score, search and rewrite in one call; each step is public on its own."""

from __future__ import annotations

import dataclasses
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
from .calibrate import autocast_dtype, calibrate, check_sharding
from .capture import ExampleInputs, check_example_inputs
from .compensate import LayerReport, timed_compensation
from .cost import CostModel
from .errors import ArgumentError, ArgumentTypeError
from .evolve import check_held_out, evolve
from .modules import check_weights, device_of
from .options import CalibrationOptions, CompensationOptions, SearchOptions, check_instance
from .plan import Plan
from .report import prune_summary, prune_table
from .rewrite import SelfCheck, apply_plan
from .scores import Scores, l1_scores, random_scores
from .search import SearchResult, check_constraint, parse_constraint
from .search import search as search_plan
from .units import keep_grid


@dataclass
class PruneResult:
    """What :func:`prune` made: the physically smaller ``model``, the ``plan`` that made it, and how it was found.

    Attributes:
        model: The pruned module (a ``torch.fx.GraphModule``; the user's model is not modified).
        plan: The units each pruned group keeps (``plan.to_json()`` saves it).
        scores: The unit scores the plan was searched on (the last round's).
        search: The search's result: choices, costs, budget and history.
        analysis: The analysis of the original model.
        seconds: Seconds per step (analyze, score, search, evolve, rewrite, compensate).
        compensation: One report per re-fitted layer (empty without compensation).
    """

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
        """The search's steps with their costs."""
        return self.search.history

    @property
    def self_check(self) -> SelfCheck | None:
        """How far the pruned module is from the masked reference (None when not checked)."""
        return self.model.meta.get("self_check")

    def table(self, tablefmt: str = "simple") -> str:
        """One row per group: its units before and after.

        Args:
            tablefmt: A tabulate table format.
        """
        return prune_table(self, tablefmt=tablefmt)

    def summary(self) -> str:
        """The constraint, what was achieved, the scores, the self-check and the times, one line each."""
        return prune_summary(self)

    def plot(self, path: str | Path, *, scores: bool = False, title: str | None = None) -> Path:
        """Draw the units kept per layer against the original (and with ``scores`` every unit's score) to
        ``path``; needs matplotlib (the ``plot`` extra). See :func:`fxgradnas.plot.plot_result`.

        Args:
            path: The image file to write (its suffix picks the format).
            scores: Also draw every unit's score.
            title: The title's lead, before the params and FLOPs ratios (default: "pruned model").

        Returns:
            The path written.
        """
        from .plot import plot_result

        return plot_result(self, path, scores=scores, title=title)

    def __str__(self) -> str:
        return self.summary()


def score(
    analysis: Analysis,
    data: Iterable | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    options: CalibrationOptions = CalibrationOptions(),
    **calibrate_keywords: Any,
) -> Scores:
    """Unit scores of every prunable group by ``options.scorer``: "gradnas" (:func:`fxgradnas.calibrate` on
    ``data``), "l1" (weight magnitudes) or "random" (from ``options.seed``).

    Args:
        analysis: The analysed model (:func:`fxgradnas.analyze`).
        data: Calibration batches (needed by "gradnas" only).
        loss_fn: ``loss_fn(output, batch)`` returning a scalar (needed by "gradnas" only).
        options: The scorer and how it calibrates (:class:`fxgradnas.CalibrationOptions`).
        **calibrate_keywords: ``collect_fn``, ``groups``, ``plan``, ``progress``, ... for
            :func:`fxgradnas.calibrate`; the baselines ignore them.

    Returns:
        The unit scores per group.

    Raises:
        ArgumentTypeError: ``options`` is not a CalibrationOptions, or "gradnas" has no data or loss_fn.
        ArgumentError, DataError, CalibrationError: as :func:`fxgradnas.calibrate` raises them.
    """
    check_instance(options, CalibrationOptions, "options")
    if options.scorer == "gradnas":
        if data is None or loss_fn is None:
            raise ArgumentTypeError("scorer='gradnas' needs calibration data and a loss_fn (or use "
                                    "CalibrationOptions(scorer='l1'))")
        return calibrate(analysis, data, loss_fn, options, **calibrate_keywords)
    if options.scorer == "l1":
        return l1_scores(analysis)
    return random_scores(analysis, seed=options.seed)


def _keep_pruned(analysis: Analysis, scores: Scores, plan: Plan) -> Scores:
    """``scores`` with the units ``plan`` prunes at zero, so that a later round prunes them first."""
    return scores.replaced({name: value * keep_grid(analysis.group(name), plan.kept(name)).reshape(-1)
                            for name, value in scores.items()})


def _hold_out(data: Iterable, batches: int, calibration: CalibrationOptions,
              compensation: CompensationOptions | None) -> tuple[list, list]:
    """The batches scored (and re-fitted on) and the last ``batches`` of those read, held out for
    ``searcher="evolve"``: at most the most batches a step reads plus ``batches`` are read."""
    limits = [calibration.max_batches] + ([compensation.max_batches] if compensation is not None else [])
    most = None if None in limits else max(limits) + batches
    read = list(itertools.islice(data, most))
    check_held_out(read, batches)
    return read[:-batches], read[-batches:]


def _check_arguments(model: Any, example_inputs: Any, data: Any, loss_fn: Any, *, constraint: Any,
                     search: Any, calibration: Any, compensation: Any, compensation_data: Any,
                     collect_fn: Any) -> None:
    """Every argument of :func:`prune`, before anything runs."""
    if not isinstance(model, (torch.nn.Module, Analysis)):
        raise ArgumentTypeError(f"model must be a torch.nn.Module or an Analysis, not {type(model).__name__}")
    check_weights(model.captured.model if isinstance(model, Analysis) else model,
                  "prune (the rewrite slices the weights)")
    check_constraint(constraint)
    check_instance(search, SearchOptions, "search")
    check_instance(calibration, CalibrationOptions, "calibration")
    check_instance(compensation, CompensationOptions, "compensation", none="to skip the re-fit")
    check_sharding(calibration)
    check_callable(collect_fn, "collect_fn", "batch")
    if example_inputs is not None:
        check_example_inputs(example_inputs)
    if compensation_data is not None:
        if compensation is None:
            raise ArgumentError("compensation_data is what the re-fit reads; with compensation=None there is no re-fit "
                                "(pass compensation=fxgradnas.CompensationOptions() or leave compensation_data out)")
        check_data(compensation_data, "compensation_data")
        if compensation_data is data and is_one_shot(data):
            raise ArgumentError("compensation_data is the iterator data is: the scores would use up its batches; "
                                "leave compensation_data out to re-fit on data (it is then kept in a list)")
    gradnas = calibration.scorer == "gradnas"
    evolving = search.searcher == "evolve"
    needs_data = [why for why, needed in (("scorer='gradnas'", gradnas), ("searcher='evolve'", evolving),
                                          (f"compensation method {compensation.method!r}" if compensation else "",
                                           compensation is not None and compensation_data is None),
                                          ("example_inputs=None (the first batch captures the model)",
                                           example_inputs is None and not isinstance(model, Analysis))) if needed]
    if needs_data:
        if data is None:
            skip = " (or compensation=None to skip the re-fit)" if compensation is not None else ""
            raise ArgumentTypeError(f"{' and '.join(needs_data)} need(s) calibration data; pass data{skip}")
        check_data(data)
    if gradnas or evolving:
        if evolving and loss_fn is None:
            raise ArgumentTypeError("searcher='evolve' measures the loss of each candidate plan: pass a loss_fn "
                                    "(or use SearchOptions(searcher='binary'))")
        check_callable(loss_fn, "loss_fn", "output, batch", optional=False)


def prune(
    model: torch.nn.Module | Analysis, example_inputs: ExampleInputs | None = None, data: Iterable | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, *, constraint: dict,
    search: SearchOptions = SearchOptions(), calibration: CalibrationOptions = CalibrationOptions(),
    compensation: CompensationOptions | None = CompensationOptions(), compensation_data: Iterable | None = None,
    collect_fn: Callable[[Any], Any] | None = None, check: bool = True, progress: bool = True,
) -> PruneResult:
    """Prune ``model`` to meet ``constraint`` (e.g. ``{"params": 0.6}``) with the gradnas algorithm.

    The composition of :func:`fxgradnas.analyze`, :func:`score`, :func:`fxgradnas.search`,
    :func:`fxgradnas.apply_plan` and :func:`fxgradnas.compensate.compensate`. Every argument is checked before
    the model is captured; the user's model is not modified. ``data`` is read once per round: with
    ``example_inputs=None`` its first batch captures the model and is scored like the others (a one-shot iterator
    read twice, by several rounds or the re-fit, is kept in a list). The self-check compares the rewrite with
    the masked model before the re-fit.

    With ``calibration.rounds`` > 1 round r calibrates with the units pruned so far masked and searches for
    ``r / rounds`` of the way from the whole model to the budget; units pruned in earlier rounds score zero, so
    they go first. With ``search.searcher="evolve"`` the last ``search.evolve_batches`` batches read from
    ``data`` are held out (neither scored nor re-fitted on) and the binary search's plan is refined by level
    trades measured on them (:func:`fxgradnas.evolve.evolve`); ``result.search.evolve`` says what it did. With
    ``search.uniform`` a Hugging Face model written back (:func:`fxgradnas.hf.write_back`)
    has a standard config: plain ``from_pretrained`` loads it.

    Args:
        model: The module to prune, or its analysis (:func:`fxgradnas.analyze`).
        example_inputs: What the model is captured with (None: the first batch of ``data``).
        data: Calibration batches, read through ``collect_fn`` (needed by the gradnas scorer, by the re-fit
            without ``compensation_data``, and without ``example_inputs``).
        loss_fn: ``loss_fn(output, batch)`` returning a scalar tensor (needed by the gradnas scorer and by
            ``searcher="evolve"``).
        constraint: One budget: ``{"params": 0.75}``, ``{"flops": "70%"}`` or ``{"params": 100_000_000}``.
        search: How the plan is searched (:class:`fxgradnas.SearchOptions`).
        calibration: How units are scored (:class:`fxgradnas.CalibrationOptions`).
        compensation: How the Linear layers consuming pruned units are re-fitted on the calibration data
            (:class:`fxgradnas.CompensationOptions`), or None for the reference algorithm's plain rewrite;
            ``result.compensation`` reports each layer's error before and after.
        compensation_data: Batches of model inputs the re-fit reads instead of ``data`` (no loss): the scores
            choose units on ``data``, the re-fit reproduces the layers on text as broad as the model will
            meet (e.g. ``data`` plus :func:`fxgradnas.datasets.sampled_windows`).
        collect_fn: ``collect_fn(batch)`` gives the model inputs (default: the batch, or its first item).
        check: Compare the pruned module with the masked model on the example inputs (``result.self_check``).
        progress: Show progress bars.

    Returns:
        The pruned module with its plan, scores, search result, analysis, step times and re-fit reports.

    Raises:
        ArgumentTypeError: An argument has a type prune cannot use (the options not option objects, no data
            or loss where they are needed).
        ArgumentError: An argument has a value prune cannot use.
        ConstraintError: The constraint is malformed or cannot be met.
        DataError: ``data`` is empty, a batch does not match the example inputs, or ``searcher="evolve"`` holds
            out every batch.
        CaptureError, AnalysisError, CalibrationError, RewriteError: a step fails on this model.
    """
    _check_arguments(model, example_inputs, data, loss_fn, constraint=constraint, search=search,
                     calibration=calibration, compensation=compensation, compensation_data=compensation_data,
                     collect_fn=collect_fn)
    rounds = calibration.rounds
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    held_out = None
    if search.searcher == "evolve":
        data, held_out = _hold_out(data, search.evolve_batches, calibration, compensation)
    if ((compensation is not None and compensation_data is None) or rounds > 1) and is_one_shot(data):  # read twice
        limits = [calibration.max_batches] + ([compensation.max_batches] if compensation is not None else [])
        most = None if None in limits else max(limits)
        data = list(itertools.islice(data, None if most is None else most + 1))
    if example_inputs is None and not isinstance(model, Analysis):
        first, data = peek(data)
        example_inputs = to_device((collect_fn or default_collect)(first), device_of(model))
    analysis = ensure_analysis(model, example_inputs)
    seconds["analyze"] = time.perf_counter() - start
    start = time.perf_counter()
    searched = [g for g in analysis.prunable if g.kind in search.kinds]  # only these need scores
    cost_model = CostModel(analysis)
    metric, budget = parse_constraint(constraint, cost_model.base)
    plan: Plan | None = None
    seconds["score"] = seconds["search"] = 0.0
    binary = dataclasses.replace(search, searcher="binary") if held_out is not None else search  # evolve's start
    for round_ in range(1, rounds + 1):
        start = time.perf_counter()
        scores = score(analysis, data, loss_fn, calibration, collect_fn=collect_fn, progress=progress,
                       groups=searched, plan=plan)
        if plan is not None:
            scores = _keep_pruned(analysis, scores, plan)
        seconds["score"] += time.perf_counter() - start
        start = time.perf_counter()
        base = cost_model.base[metric]
        target = base - (base - budget) * round_ // rounds  # the budget itself in the last round
        found = search_plan(analysis, scores, {metric: target}, binary, cost_model=cost_model)
        plan = found.plan
        seconds["search"] += time.perf_counter() - start
    if held_out is not None:
        start = time.perf_counter()
        found = evolve(analysis, found, scores, held_out, loss_fn, search, seed=calibration.seed, collect_fn=collect_fn,
                       cost_model=cost_model, autocast_dtype=autocast_dtype(calibration), progress=progress)
        seconds["evolve"] = time.perf_counter() - start
    found.plan.fingerprint = analysis.captured.fingerprint
    start = time.perf_counter()
    pruned = apply_plan(analysis, found.plan, check=check)
    seconds["rewrite"] = time.perf_counter() - start
    reports = []
    if compensation is not None:
        reports, seconds["compensate"] = timed_compensation(
            analysis, found.plan, pruned, data if compensation_data is None else compensation_data, compensation,
            collect_fn=collect_fn, progress=progress)
    return PruneResult(pruned, found.plan, scores, found, analysis, seconds, reports)
