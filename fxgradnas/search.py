"""From unit scores to a plan that just meets a params or FLOPs budget.

Each group offers *choices* (how many units to keep); keeping the top-scored units of a choice
loses ``degradation = sum of the pruned units' scores``. The binary searcher (the reference
algorithm) finds one threshold ``t``: every group keeps its smallest choice with degradation <= t.
It searches the sorted distinct degradation values rather than a float interval, so the result does
not depend on the scale of the loss, then grows groups greedily while the budget allows, so the
budget is used. ``searcher="greedy"`` starts from the smallest choices and only grows.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import torch

from .analysis import Analysis, Group
from .cost import METRICS, CostModel
from .errors import ConstraintError
from .plan import Plan

RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 21))
SEARCHERS = ("binary", "greedy")


@dataclass(frozen=True)
class Choice:
    """Keep ``units`` (flat indices); ``kept`` per unit axis; what is lost by pruning the rest."""

    kept: tuple[int, ...]
    units: tuple[int, ...]
    degradation: float


@dataclass
class SearchResult:
    plan: Plan
    choices: dict[str, Choice]
    costs: dict[str, int]
    base: dict[str, int]
    budget: tuple[str, int]
    params_removed: dict[str, int] = field(default_factory=dict)  # per group, by its own choice alone
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def achieved(self) -> dict[str, float]:
        return {m: self.costs[m] / self.base[m] for m in METRICS}


def parse_constraint(constraint: dict, base: dict[str, int]) -> tuple[str, int]:
    """``{"params": 0.75}``, ``{"params": "75%"}``, ``{"flops": 1e9}`` -> (metric, absolute budget)."""
    if not isinstance(constraint, dict) or len(constraint) != 1:
        raise ConstraintError(f"constraint must be one of {{'params': ...}} or {{'flops': ...}}, not {constraint!r}")
    (metric, value), = constraint.items()
    if metric not in METRICS:
        raise ConstraintError(f"constraint metric must be one of {METRICS}, not {metric!r}")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.]+)\s*%\s*", value)
        if not match:
            raise ConstraintError(f"constraint {value!r} is not a percentage like '75%'")
        value = float(match.group(1)) / 100
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConstraintError(f"constraint value must be a positive ratio, percentage or count, not {value!r}")
    if value <= 1:
        return metric, int(math.floor(value * base[metric]))
    return metric, int(value)


def _counts(width: int, ratios: tuple[float, ...], divisor: int) -> list[int]:
    step = divisor if width >= divisor else 1
    counts = {min(width, max(step, round(r * width / step) * step)) for r in ratios}
    return sorted(counts | {width})


def group_choices(group: Group, scores: torch.Tensor, *, ratios: tuple[float, ...] = RATIOS,
                  divisor: int = 32, gqa: str = "both") -> list[Choice]:
    """Choices of a group, smallest first, each keeping its top-scored units."""
    scores = scores.double().reshape(group.unit_shape)
    total = float(scores.sum())
    if group.kind == "heads":
        return _head_choices(group, scores, total, gqa)
    order = torch.argsort(scores, descending=True, stable=True)
    pruned_tail = torch.cumsum(scores[order].flip(0), 0).flip(0)  # pruned_tail[k] = sum of order[k:]
    choices = []
    for k in _counts(group.size, ratios, divisor):
        lost = float(pruned_tail[k]) if k < group.size else 0.0
        choices.append(Choice((k,), tuple(sorted(order[:k].tolist())), lost))
    return choices


def _head_choices(group: Group, scores: torch.Tensor, total: float, gqa: str) -> list[Choice]:
    """Heads keep 1..H; with grouped-query attention, whole KV groups and/or an equal number of
    queries in each kept KV group (``gqa``: "kv", "queries" or "both")."""
    if scores.dim() == 1:
        scores = scores.reshape(1, -1) if group.shared_kv else scores.reshape(-1, 1)
    kv, rep = scores.shape
    kv_counts = range(1, kv + 1) if gqa in ("kv", "both") else [kv]
    rep_counts = range(1, rep + 1) if gqa in ("queries", "both") else [rep]
    if len(group.unit_shape) == 1:  # plain multi-head (or multi-query) attention: any head count
        kv_counts, rep_counts = (range(1, kv + 1), [1]) if rep == 1 else ([1], range(1, rep + 1))
    ranked_reps = torch.argsort(scores, dim=1, descending=True, stable=True)
    choices = []
    for n_rep in rep_counts:
        best = torch.gather(scores, 1, ranked_reps[:, :n_rep])
        ranked_kv = torch.argsort(best.sum(1), descending=True, stable=True)
        for n_kv in kv_counts:
            kept_kv = ranked_kv[:n_kv].tolist()
            units = sorted(k * rep + int(r) for k in kept_kv for r in ranked_reps[k, :n_rep])
            lost = total - float(sum(scores.reshape(-1)[u] for u in units))
            kept = (n_kv, n_rep) if len(group.unit_shape) == 2 else (n_kv * n_rep,)
            choices.append(Choice(kept, tuple(units), max(lost, 0.0)))
    choices.sort(key=lambda c: (len(c.units), -c.degradation))
    return choices


class _State:
    """Current choice index per group, with the running cost."""

    def __init__(self, model: CostModel, options: dict[str, list[Choice]], index: dict[str, int]) -> None:
        self.model, self.options, self.index = model, options, dict(index)
        self.costs = model.evaluate(self.kept())

    def kept(self) -> dict[str, tuple[int, ...]]:
        return {g: self.options[g][i].kept for g, i in self.index.items()}

    def grow(self, metric: str, budget: int) -> int:
        """Grow groups one choice at a time, best degradation saved per cost first, while it fits."""
        steps = 0
        while True:
            best = None
            kept = self.kept()
            for g, i in self.index.items():
                if i + 1 >= len(self.options[g]):
                    continue
                here, there = self.options[g][i], self.options[g][i + 1]
                extra = self.model.delta(metric, g, kept, there.kept)
                if self.costs[metric] + extra > budget:
                    continue
                gain = here.degradation - there.degradation
                if gain < 0:
                    continue
                rank = (gain / extra if extra > 0 else math.inf, gain, g)
                if best is None or rank > best[0]:
                    best = (rank, g)
            if best is None:
                return steps
            self.index[best[1]] += 1
            self.costs = self.model.evaluate(self.kept())
            steps += 1


def search(
    analysis: Analysis,
    scores: dict[str, torch.Tensor],
    constraint: dict,
    *,
    searcher: str = "binary",
    kinds: tuple[str, ...] = ("heads", "channels"),
    divisor: int = 32,
    ratios: tuple[float, ...] = RATIOS,
    gqa: str = "both",
    cost_model: CostModel | None = None,
) -> SearchResult:
    """A plan meeting ``constraint`` with the least total degradation the searcher finds.

    ``kinds``: which group kinds are searched (the others stay whole); add ``"hidden"`` to prune
    the residual width too.
    """
    if searcher not in SEARCHERS:
        raise ValueError(f"searcher must be one of {SEARCHERS}, not {searcher!r}")
    start = time.perf_counter()
    model = cost_model or CostModel(analysis)
    metric, budget = parse_constraint(constraint, model.base)
    groups = [g for g in analysis.prunable if g.kind in kinds and g.name in scores]
    options = {g.name: group_choices(g, scores[g.name], ratios=ratios, divisor=divisor, gqa=gqa) for g in groups}
    smallest = _State(model, options, {g: 0 for g in options})
    if smallest.costs[metric] > budget:
        raise ConstraintError(
            f"cannot meet {metric} <= {budget:,} ({budget / model.base[metric]:.1%}): the smallest model "
            f"fxgradnas can make keeps {smallest.costs[metric]:,} {metric} "
            f"({smallest.costs[metric] / model.base[metric]:.1%}) with kinds={kinds}"
        )
    history: list[dict] = []
    if searcher == "greedy":
        state = smallest
    else:
        state = _binary(model, options, metric, budget, history)
    grown = state.grow(metric, budget)
    history.append({"step": "grow", "groups grown": grown, **state.costs})
    choices = {g: options[g][i] for g, i in state.index.items()}
    plan = Plan({g: list(c.units) for g, c in choices.items() if len(c.units) < analysis.group(g).size})
    removed = {g: -model.delta("params", g, {}, c.kept) for g, c in choices.items()}
    return SearchResult(plan, choices, state.costs, model.base, (metric, budget), removed, history,
                        time.perf_counter() - start)


def _binary(model: CostModel, options: dict[str, list[Choice]], metric: str, budget: int,
            history: list[dict]) -> _State:
    """Smallest threshold (over the sorted distinct degradations) whose configuration fits."""
    levels = sorted({c.degradation for choices in options.values() for c in choices})

    def at(threshold: float) -> _State:
        index = {g: next(i for i, c in enumerate(cs) if c.degradation <= threshold) for g, cs in options.items()}
        return _State(model, options, index)

    lo, hi = 0, len(levels) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        state = at(levels[mid])
        fits = state.costs[metric] <= budget
        history.append({"step": len(history), "threshold": levels[mid], "fits": fits, **state.costs})
        if fits:
            hi = mid
        else:
            lo = mid + 1
    return at(levels[lo])
