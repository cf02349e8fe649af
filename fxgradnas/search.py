"""From unit scores to a plan that just meets a params or FLOPs budget.

Each group offers *choices* (how many units to keep); keeping the top-scored units of a choice
loses ``degradation = sum of the pruned units' scores``. The binary searcher (the reference
algorithm) finds one threshold ``t``: every group keeps its smallest choice with degradation <= t.
It searches the sorted distinct degradation values rather than a float interval, so the result does
not depend on the scale of the loss, then grows groups greedily while the budget allows, so the
budget is used. ``searcher="greedy"`` starts from the smallest choices and only grows.

With whole layers (a ``blocks`` group) one threshold cannot trade a layer for width, so each count of
kept layers is searched in turn (the widths by the searcher, the layers held) and the plan with the
least total degradation is kept. The heads and channels of a removed layer stay whole: they cost
nothing more and lose nothing more.
"""

from __future__ import annotations

import math
import numbers
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .analysis import Analysis, Group, check_analysis
from .cost import METRICS, CostModel
from .errors import ArgumentError, ArgumentTypeError, ConstraintError
from .options import SearchOptions, check_instance
from .plan import Plan

if TYPE_CHECKING:
    from .evolve import EvolveReport


@dataclass(frozen=True)
class Choice:
    """Keep ``units`` (flat indices); ``kept`` per unit axis (a blocks group: 1 or 0 per block); what is lost by
    pruning the rest."""

    kept: tuple[int, ...]
    units: tuple[int, ...]
    degradation: float


@dataclass
class SearchResult:
    """What :func:`fxgradnas.search` found.

    Attributes:
        plan: The units each pruned group keeps.
        choices: Each searched group's choice (kept counts, kept units, degradation).
        costs: Params and FLOPs of the plan's model.
        base: Params and FLOPs of the whole model.
        budget: The constraint as ``(metric, absolute budget)``.
        params_removed: Per group, the params its own choice alone removes.
        history: The search's steps (thresholds tried, groups grown, layers traded, the loss-measured refinement)
            with their costs.
        seconds: How long the search took (the refinement's time is in ``evolve``).
        evolve: What ``searcher="evolve"`` did (held-out loss before and after, candidates, forward passes,
            seconds); None for the other searchers.
    """

    plan: Plan
    choices: dict[str, Choice]
    costs: dict[str, int]
    base: dict[str, int]
    budget: tuple[str, int]
    params_removed: dict[str, int] = field(default_factory=dict)  # per group, by its own choice alone
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    evolve: EvolveReport | None = None

    @property
    def achieved(self) -> dict[str, float]:
        """Params and FLOPs of the plan as ratios of the whole model's."""
        return {m: self.costs[m] / self.base[m] for m in METRICS}


def check_constraint(constraint: Any) -> tuple[str, str, float | int]:
    """``(metric, "ratio" | "count", value)`` of a constraint, or ConstraintError naming what is wrong.

    One rule: a float in (0, 1] or a percentage string in (0 %, 100 %] is a ratio of the original model;
    an int above 1 is a count; anything else (a float above 1, 0, 1 as an int, a negative, a bool) is an
    error. Nothing is read from the model, so a malformed constraint fails before any capture."""
    example = "{'params': 0.6}, {'flops': '70%'} or {'params': 100_000_000}"
    if not isinstance(constraint, Mapping) or len(constraint) != 1:
        raise ConstraintError(f"constraint must be a dict with one entry, like {example}; not {constraint!r}")
    (metric, value), = constraint.items()
    if metric not in METRICS:
        raise ConstraintError(f"constraint metric must be one of {METRICS}, not {metric!r}")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*", value)
        percent = float(match.group(1)) if match else math.nan
        if not 0 < percent <= 100:
            raise ConstraintError(f"constraint {metric}={value!r} is not a percentage in (0%, 100%] like '75%'")
        return metric, "ratio", percent / 100
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConstraintError(f"constraint {metric}={value!r} must be a ratio in (0, 1], a percentage string or an "
                              f"int count above 1, not {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        if value > 1:
            return metric, "count", int(value)
        hint = "write 1.0 or '100%' for the whole model" if value == 1 else "a count is an int above 1"
        raise ConstraintError(f"constraint {metric}={value!r} is neither a ratio nor a count: {hint}")
    value = float(value)
    if math.isfinite(value) and 0 < value <= 1:
        return metric, "ratio", value
    hint = (f"for a count of {metric} write the int {int(value):_}" if math.isfinite(value) and value > 1
            and value.is_integer() else "a ratio is in (0, 1], a count an int above 1")
    raise ConstraintError(f"constraint {metric}={value!r} is neither a ratio nor a count: {hint}")


def parse_constraint(constraint: Any, base: dict[str, int]) -> tuple[str, int]:
    """``{"params": 0.75}``, ``{"params": "75%"}``, ``{"flops": 10**9}`` -> (metric, absolute budget); see
    :func:`check_constraint`. A count above the model's own is an error."""
    metric, kind, value = check_constraint(constraint)
    if kind == "ratio":
        return metric, int(math.floor(value * base[metric]))
    if value > base[metric]:
        per = " (per example input)" if metric == "flops" else ""
        raise ConstraintError(f"constraint {metric}={value:,} is more than the model has: {base[metric]:,}{per}; "
                              f"give a smaller count or a ratio like 0.75")
    return metric, value


def _counts(width: int, ratios: tuple[float, ...], multiple_of: int) -> list[int]:
    step = multiple_of if width >= multiple_of else 1
    counts = {min(width, max(step, round(r * width / step) * step)) for r in ratios}
    return sorted(counts | {width})


def group_choices(group: Group, scores: torch.Tensor, options: SearchOptions = SearchOptions()) -> list[Choice]:
    """Choices of a group, smallest first, each keeping its top-scored units (channel counts from
    ``options.ratios`` and ``options.multiple_of``, head counts by ``options.gqa``)."""
    scores = scores.double().reshape(group.unit_shape)
    total = float(scores.sum())
    if group.kind == "heads":
        return _head_choices(group, scores, total, options.gqa)
    order = torch.argsort(scores, descending=True, stable=True)
    pruned_tail = torch.cumsum(scores[order].flip(0), 0).flip(0)  # pruned_tail[k] = sum of order[k:]
    choices = []
    # experts and blocks: every count from the fewest up (few, and each one large)
    every = group.kind in ("experts", "blocks")
    counts = range(group.min_units, group.size + 1) if every else _counts(group.size, options.ratios, options.multiple_of)
    for k in counts:
        lost = float(pruned_tail[k]) if k < group.size else 0.0
        units = tuple(order[:k].sort().values.tolist())
        kept = tuple(int(u in units) for u in range(group.size)) if group.kind == "blocks" else (k,)  # per block
        choices.append(Choice(kept, units, lost))
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
    flat = scores.reshape(-1)
    choices = []
    for n_rep in rep_counts:
        best = torch.gather(scores, 1, ranked_reps[:, :n_rep])
        ranked_kv = torch.argsort(best.sum(1), descending=True, stable=True)
        for n_kv in kv_counts:
            kept_kv = ranked_kv[:n_kv].tolist()
            units = sorted(k * rep + int(r) for k in kept_kv for r in ranked_reps[k, :n_rep])
            lost = total - float(flat[torch.tensor(units, dtype=torch.long)].sum())
            kept = (n_kv, n_rep) if len(group.unit_shape) == 2 else (n_kv * n_rep,)
            choices.append(Choice(kept, tuple(units), max(lost, 0.0)))
    choices.sort(key=lambda c: (len(c.units), -c.degradation))
    return choices


def uniform_classes(groups: list[Group]) -> dict[str, list[str]]:
    """Groups that ``uniform=True`` makes keep one count: those of one kind and one unit shape (every MLP of a
    decoder, every attention with its KV layout), named by their first member; a stack of blocks is its own."""
    classes: dict[tuple, list[str]] = {}
    for g in groups:
        classes.setdefault((g.kind, g.unit_shape, g.shared_kv) if g.kind != "blocks" else (g.name,), []).append(g.name)
    return {members[0]: members for members in classes.values()}


def _shared_choices(options: dict[str, list[Choice]], members: list[str]) -> list[Choice]:
    """The choices every member offers (by kept counts), each losing the members' degradations summed;
    smallest first, as one group's choices are."""
    by_kept = [{c.kept: c for c in options[g]} for g in members]
    shared = [kept for kept in by_kept[0] if all(kept in other for other in by_kept[1:])]
    choices = [Choice(kept, by_kept[0][kept].units, sum(b[kept].degradation for b in by_kept)) for kept in shared]
    choices.sort(key=lambda c: (math.prod(c.kept), -c.degradation))
    return choices


def search_slots(groups: list[Group], scores: Mapping[str, torch.Tensor], options: SearchOptions
                 ) -> tuple[dict[str, list[Choice]], dict[str, list[str]], dict[str, list[Choice]]]:
    """What the search chooses among: the choices of each slot (a group, or under ``options.uniform`` a
    :func:`uniform_classes` class whose members keep one count), the members of each slot, and each group's own
    choices (:func:`group_choices`)."""
    own = {g.name: group_choices(g, scores[g.name], options) for g in groups}
    members = uniform_classes(groups) if options.uniform else {g.name: [g.name] for g in groups}
    slots = {s: _shared_choices(own, m) if len(m) > 1 else own[s] for s, m in members.items()}
    return slots, members, own


class SlotState:
    """A plan as the searchers walk it: the choice index of each slot (a group, or a class of groups that keep one
    count; :func:`search_slots`) and the plan's costs (``costs``), kept current by whoever changes ``index``."""

    def __init__(self, model: CostModel, options: dict[str, list[Choice]], index: dict[str, int],
                 members: dict[str, list[str]]) -> None:
        self.model, self.options, self.index, self.members = model, options, dict(index), members
        self.costs = model.evaluate(self.kept())

    def kept(self) -> dict[str, tuple[int, ...]]:
        """The kept counts of every group at the current choices."""
        return {g: self.options[s][i].kept for s, i in self.index.items() for g in self.members[s]}

    def delta(self, metric: str, slot: str, kept: dict[str, tuple[int, ...]], new: tuple[int, ...]) -> int:
        """How much ``metric`` changes when every member of ``slot`` keeps ``new`` instead of its count in ``kept``
        (the current :meth:`kept`)."""
        if len(self.members[slot]) == 1:
            return self.model.delta(metric, slot, kept, new)
        return self.model.evaluate({**kept, **dict.fromkeys(self.members[slot], new)})[metric] - self.costs[metric]

    def lost(self) -> float:
        """The summed degradation of the current choices."""
        return sum(self.options[s][i].degradation for s, i in self.index.items())

    def settle(self) -> None:
        """Keep whole every group whose size changes no cost here (its layer is removed)."""
        kept = self.kept()
        for s, i in self.index.items():
            last = len(self.options[s]) - 1
            if i < last and len(self.members[s]) == 1 and not any(
                    self.model.delta(m, s, kept, self.options[s][last].kept) for m in METRICS):
                self.index[s] = last
        self.costs = self.model.evaluate(self.kept())

    def grow(self, metric: str, budget: int) -> int:
        """Grow slots one choice at a time, best degradation saved per cost first, while it fits."""
        steps = 0
        while True:
            best = None
            kept = self.kept()
            for g, i in self.index.items():
                if i + 1 >= len(self.options[g]):
                    continue
                here, there = self.options[g][i], self.options[g][i + 1]
                extra = self.delta(metric, g, kept, there.kept)
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
    options: SearchOptions = SearchOptions(),
    *,
    cost_model: CostModel | None = None,
) -> SearchResult:
    """A plan meeting ``constraint`` with the least total degradation the searcher finds.

    Only the groups of ``options.kinds`` are searched (the others stay whole); add ``"hidden"`` to prune the
    residual width too, ``"blocks"`` to remove whole layers. With ``options.uniform`` the groups of one kind and
    unit shape (:func:`uniform_classes`: every MLP, every attention) keep one count, chosen by their degradations
    summed; each group keeps its own best units. A Hugging Face model pruned so has one size per config entry: a
    standard checkpoint.

    Args:
        analysis: The analysed model (:func:`fxgradnas.analyze`).
        scores: Unit scores per group name (:func:`fxgradnas.score` or :func:`fxgradnas.calibrate`); a group
            without scores stays whole.
        constraint: One budget: a ratio ``{"params": 0.75}``, a percentage ``{"flops": "70%"}`` or a count
            ``{"params": 100_000_000}``.
        options: The searcher, the kinds searched and the choices each group offers (:class:`SearchOptions`).
        cost_model: The cost model of ``analysis``, when the caller already has one (it is built otherwise).

    Returns:
        The plan, each group's choice, the plan's costs against the model's and the search's history.

    Raises:
        ConstraintError: The constraint is malformed, more than the model has, or smaller than the smallest
            model the options allow.
        ArgumentTypeError: ``analysis`` is not an Analysis, ``options`` not a SearchOptions or ``scores`` not a
            mapping.
        ArgumentError: ``scores`` name a group the analysis has not, or are not finite unit scores of its size;
            ``options.searcher`` is ``"evolve"`` (it needs data: :func:`fxgradnas.prune` or
            :func:`fxgradnas.evolve.evolve`).
    """
    check_constraint(constraint)
    check_instance(options, SearchOptions, "options")
    searcher, kinds, uniform = options.searcher, options.kinds, options.uniform
    if searcher == "evolve":
        raise ArgumentError("searcher='evolve' measures the masked model's loss on data, which search has not: use "
                            "fxgradnas.prune(..., search=SearchOptions(searcher='evolve')), or search with "
                            "searcher='binary' and refine with fxgradnas.evolve.evolve(...)")
    check_analysis(analysis, "search")
    _check_scores(analysis, scores)
    start = time.perf_counter()
    model = cost_model or CostModel(analysis)
    metric, budget = parse_constraint(constraint, model.base)
    groups = [g for g in analysis.prunable if g.kind in kinds and g.name in scores]
    slots, members, options_of = search_slots(groups, scores, options)
    smallest = SlotState(model, slots, {s: 0 for s in slots}, members)
    if smallest.costs[metric] > budget:
        raise ConstraintError(
            f"cannot meet {metric} <= {budget:,} ({budget / model.base[metric]:.1%}): the smallest model "
            f"fxgradnas can make keeps {smallest.costs[metric]:,} {metric} "
            f"({smallest.costs[metric] / model.base[metric]:.1%}) with kinds={kinds}{', uniform' if uniform else ''}"
        )
    history: list[dict] = []
    state = _searched(model, slots, members, metric, budget, searcher, history, smallest)
    layers = [s for s in slots if analysis.group(s).kind == "blocks"]
    if layers:
        state = _trade_layers(model, slots, members, metric, budget, searcher, state, layers, history)
    kept = state.kept()
    choices = {g: next(c for c in options_of[g] if c.kept == kept[g]) for g in options_of}
    plan = Plan({g: list(c.units) for g, c in choices.items() if len(c.units) < analysis.group(g).size})
    removed = {g: -model.delta("params", g, {}, c.kept) for g, c in choices.items()}
    return SearchResult(plan, choices, state.costs, model.base, (metric, budget), removed, history,
                        time.perf_counter() - start)


def _check_scores(analysis: Analysis, scores: Any) -> None:
    """Raise ArgumentError unless ``scores`` maps prunable groups of ``analysis`` to finite unit scores of the
    group's size."""
    if not isinstance(scores, Mapping):
        raise ArgumentTypeError(f"scores must map group names to unit scores (fxgradnas.calibrate(...)), not "
                                f"{type(scores).__name__}")
    prunable = {g.name: g for g in analysis.prunable}
    for name, value in scores.items():
        group = prunable.get(name)
        if group is None:
            raise ArgumentError(f"scores name {name!r}, which is not a prunable group of this analysis; "
                                "were they computed for another model?")
        if not isinstance(value, torch.Tensor) or value.numel() != group.size:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ArgumentError(f"scores of {name!r} must be a tensor of its {group.size} unit scores, not {shape}")
        if not bool(torch.isfinite(value).all()):
            raise ArgumentError(f"scores of {name!r} are not all finite; were they calibrated on a batch that "
                                "gave NaN or infinity?")


def _searched(model: CostModel, slots: dict[str, list[Choice]], members: dict[str, list[str]], metric: str,
              budget: int, searcher: str, history: list[dict], smallest: SlotState) -> SlotState:
    """The searcher's state (binary threshold or the smallest choices), its free groups settled, grown."""
    state = smallest if searcher == "greedy" else _binary(model, slots, members, metric, budget, history)
    state.settle()
    grown = state.grow(metric, budget)
    history.append({"step": "grow", "groups grown": grown, **state.costs})
    return state


def _trade_layers(model: CostModel, slots: dict[str, list[Choice]], members: dict[str, list[str]], metric: str,
                  budget: int, searcher: str, state: SlotState, layers: list[str], history: list[dict]) -> SlotState:
    """Each blocks slot tried at each of its counts, the others held and the widths searched again; the state
    with the least total degradation (rounds until no count changes)."""
    best, tried = state, 0
    for _ in range(1 if len(layers) == 1 else len(layers) + 1):  # one slot: one round finds its best count
        start = best
        for slot in layers:
            for index in range(len(slots[slot])):
                if index == best.index[slot]:
                    continue
                held = {s: best.index[s] for s in layers if s != slot} | {slot: index}
                options = {s: [cs[held[s]]] if s in held else cs for s, cs in slots.items()}
                smallest = SlotState(model, options, {s: 0 for s in options}, members)
                if smallest.costs[metric] > budget:
                    continue
                found = _searched(model, options, members, metric, budget, searcher, [], smallest)
                tried += 1
                if found.lost() < best.lost():  # the held slots' one choice is the same in both
                    best = SlotState(model, slots, {**found.index, **held}, members)
        if best is start:
            break
    history.append({"step": "trade layers", "tried": tried, "layers kept": {s: sum(best.options[s][best.index[s]].kept)
                                                                          for s in layers}, **best.costs})
    return best


def _binary(model: CostModel, options: dict[str, list[Choice]], members: dict[str, list[str]], metric: str,
            budget: int, history: list[dict]) -> SlotState:
    """Smallest threshold (over the sorted distinct degradations) whose configuration fits."""
    levels = sorted({c.degradation for choices in options.values() for c in choices})

    def at(threshold: float) -> SlotState:
        index = {g: next((i for i, c in enumerate(cs) if c.degradation <= threshold), len(cs) - 1)  # held: its one
                 for g, cs in options.items()}
        return SlotState(model, options, index, members)

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
