"""``prune``: analyse, score, search and rewrite in one call; each step is public on its own."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from .analysis import Analysis, ensure_analysis
from .batches import default_collect
from .calibrate import calibrate
from .capture import ExampleInputs
from .compensate import LayerReport, timed_compensation
from .plan import Plan
from .report import prune_summary, prune_table
from .rewrite import apply_plan
from .scores import Scores, l1_scores, random_scores
from .search import RATIOS, SearchResult, search

SCORERS = ("gradnas", "l1", "random")


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
    if scorer == "gradnas":
        if data is None or loss_fn is None:
            raise TypeError("scorer='gradnas' needs calibration data and a loss_fn")
        return calibrate(analysis, data, loss_fn, **calibrate_options)
    if scorer == "l1":
        return l1_scores(analysis)
    if scorer == "random":
        return random_scores(analysis, seed=seed)
    raise ValueError(f"scorer must be one of {SCORERS}, not {scorer!r}")


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
    kinds: tuple[str, ...] = ("heads", "channels"),
    divisor: int = 32,
    ratios: tuple[float, ...] = RATIOS,
    gqa: str = "both",
    collect_fn: Callable[[Any], Any] | None = None,
    max_batches: int | None = 128,
    seed: int = 0,
    check: bool = True,
    progress: bool = True,
    compensate: str | None = None,
    **calibrate_options: Any,
) -> PruneResult:
    """Prune ``model`` to meet ``constraint`` (e.g. ``{"params": 0.6}``) with the gradnas algorithm.

    The composition of :func:`fxgradnas.analyze`, :func:`score` (``scorer``: "gradnas", "l1",
    "random"), :func:`fxgradnas.search` (``searcher``: "binary" or "greedy") and
    :func:`fxgradnas.apply_plan`. The user's model is not modified. ``compensate="ls"`` (or
    ``"scale"``) then re-fits the Linear layers that consume pruned units on the calibration data,
    layer after layer (:func:`fxgradnas.compensate.compensate`, its defaults);
    ``result.compensation`` reports each layer's error before/after.
    """
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if example_inputs is None and data is not None and not isinstance(model, Analysis):
        example_inputs = (collect_fn or default_collect)(next(iter(data)))
    analysis = ensure_analysis(model, example_inputs)
    seconds["analyze"] = time.perf_counter() - start
    start = time.perf_counter()
    searched = [g for g in analysis.prunable if g.kind in kinds]  # only these need scores
    scores = score(analysis, scorer, data, loss_fn, seed=seed, collect_fn=collect_fn, max_batches=max_batches,
                   mode=mode, progress=progress, groups=searched, **calibrate_options)
    seconds["score"] = time.perf_counter() - start
    start = time.perf_counter()
    found = search(analysis, scores, constraint, searcher=searcher, kinds=kinds, divisor=divisor,
                             ratios=ratios, gqa=gqa)
    seconds["search"] = time.perf_counter() - start
    found.plan.fingerprint = analysis.captured.fingerprint
    start = time.perf_counter()
    pruned = apply_plan(analysis, found.plan, check=check)
    seconds["rewrite"] = time.perf_counter() - start
    reports = []
    if compensate is not None:
        if data is None:
            raise TypeError("compensate needs calibration data")
        reports, seconds["compensate"] = timed_compensation(
            analysis, found.plan, pruned, data, method=compensate, collect_fn=collect_fn, max_batches=max_batches,
            progress=progress)
    return PruneResult(pruned, found.plan, scores, found, analysis, seconds, reports)

