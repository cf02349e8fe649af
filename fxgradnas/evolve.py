"""``searcher="evolve"``: a searched plan refined by the loss the masked model measures on held-out batches.

The binary search ranks choices by summed scores, a first-order proxy of the loss. The refinement starts from
its choices and tries *level trades*: a mutation moves one to three groups (slots, under ``uniform``: classes
of groups) one choice down, then moves other slots up one choice at a time, in a random order, while the plan
still fits the budget (by the exact :class:`~fxgradnas.cost.CostModel`), until none fits. Each candidate is
scored by the mean loss of the masked model (:func:`fxgradnas.instrument` with read-only views, its masks set
per candidate; eval mode, no grad) on the held-out batches; a (1+1) selection keeps a candidate only when its
loss is lower than the best so far, so the result is never worse on those batches than its start. It stops
when the next candidate would exceed the forward-pass budget. The mutations are drawn from a
``random.Random(seed)``: one seed, one result. A level keeps the top-scored units of its count, as the
binary search's do, so only the counts per group change.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .analysis import Analysis, check_analysis
from .batches import check_callable, default_collect, to_device
from .cost import CostModel
from .errors import ArgumentError, ArgumentTypeError, CalibrationError, DataError
from .instrument import instrument
from .modules import device_of
from .options import SearchOptions, check_instance
from .plan import Plan
from .search import Choice, SearchResult, SlotState, search_slots

MAX_DOWN = 3
"""At most this many slots move down in one mutation."""
MAX_REPEATS = 100
"""Mutations in a row that give only plans already measured before the refinement stops."""


@dataclass(frozen=True)
class EvolveReport:
    """What the refinement did.

    Attributes:
        loss_before: The start plan's mean loss on the held-out batches.
        loss_after: The returned plan's (never above ``loss_before``).
        batches: Held-out batches each candidate was measured on.
        forwards: Forward passes run (the start's included).
        candidates: Candidates measured (the start not included).
        accepted: Candidates that lowered the best loss.
        seconds: How long the refinement took.
    """

    loss_before: float
    loss_after: float
    batches: int
    forwards: int
    candidates: int
    accepted: int
    seconds: float

    def __str__(self) -> str:
        return (f"held-out loss {self.loss_before:.4f} -> {self.loss_after:.4f} ({self.batches} batches), "
                f"{self.candidates} candidates, {self.accepted} accepted, {self.forwards} forwards, "
                f"{self.seconds:.2f}s")


def evolve(
    analysis: Analysis,
    found: SearchResult,
    scores: dict[str, torch.Tensor],
    data: Sequence[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    options: SearchOptions = SearchOptions(searcher="evolve"),
    *,
    seed: int = 0,
    collect_fn: Callable[[Any], Any] | None = None,
    cost_model: CostModel | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> SearchResult:
    """Refine ``found`` (a :func:`fxgradnas.search` result on ``scores`` with the same ``options``' kinds,
    ratios, multiple_of, gqa and uniform) by level trades that keep its budget, each candidate measured by the
    masked model's mean loss on ``data``.

    Args:
        analysis: The analysed model.
        found: The plan to start from and its budget.
        scores: The unit scores ``found`` was searched on (each level keeps its top-scored units).
        data: The held-out batches (a list; every candidate is measured on all of them), not those scored.
        loss_fn: ``loss_fn(output, batch)`` returning a scalar tensor.
        options: The choices per group and the forward-pass budget (``evolve_forwards``).
        seed: The seed of the mutations.
        collect_fn: ``collect_fn(batch)`` gives the model inputs (default: the batch, or its first item).
        cost_model: The cost model of ``analysis``, when the caller has one.
        autocast_dtype: Run the forward under autocast in this dtype (None: the model's own).
        progress: Show a progress bar.

    Returns:
        A search result meeting ``found``'s budget whose plan has a held-out loss no higher than ``found``'s,
        its history ending in an ``"evolve"`` step and ``evolve`` saying what was done.

    Raises:
        ArgumentTypeError: An argument has the wrong type.
        ArgumentError: ``found`` does not come from these scores and options.
        DataError: ``data`` is empty.
        CalibrationError: The loss is not a finite scalar.
    """
    check_analysis(analysis, "evolve")
    check_instance(options, SearchOptions, "options")
    if not isinstance(found, SearchResult):
        raise ArgumentTypeError(f"found must be a fxgradnas.SearchResult (fxgradnas.search(...)), not "
                                f"{type(found).__name__}")
    check_callable(loss_fn, "loss_fn", "output, batch", optional=False)
    check_callable(collect_fn, "collect_fn", "batch")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentTypeError(f"seed must be an int, not {seed!r}")
    batches = list(data)
    if not batches:
        raise DataError("evolve got no held-out batch: pass a list of at least one batch")
    start = time.perf_counter()
    model = cost_model or CostModel(analysis)
    metric, budget = found.budget
    groups = [analysis.group(name) for name in found.choices]
    slots, members, own, index = _slots(analysis, found, scores, options)
    collect = collect_fn or default_collect
    inst = instrument(analysis, groups, read_only=True)
    device = device_of(inst.module)
    batches = [to_device(b, device) for b in batches]
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()

    def loss_of(at: dict[str, int]) -> float:
        inst.set_plan(groups, _plan(analysis, _choices(slots, members, own, at)))
        total = 0.0
        with torch.no_grad(), autocast:
            for k, batch in enumerate(batches):
                loss = loss_fn(analysis.captured.call(inst.module, collect(batch), f"held-out batch {k}"), batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not bool(torch.isfinite(loss).all()):
                    raise CalibrationError(f"loss_fn must return a finite scalar tensor; held-out batch {k} gave "
                                           f"{loss!r}")
                total += float(loss)
        return total / len(batches)

    per = len(batches)
    rng = random.Random(seed)
    best = dict(index)
    best_loss = first_loss = loss_of(best)
    forwards, candidates, accepted, repeats = per, 0, 0, 0
    seen = {_key(best)}
    bar = tqdm(total=max(0, options.evolve_forwards // per - 1), desc="evolving", unit="candidate",
               disable=not progress, leave=False)
    with bar:
        while forwards + per <= options.evolve_forwards and repeats < MAX_REPEATS:
            child = _mutate(rng, model, slots, members, best, metric, budget)
            if child is None:  # no slot can move down
                break
            if _key(child) in seen:
                repeats += 1
                continue
            repeats = 0
            seen.add(_key(child))
            loss = loss_of(child)
            forwards += per
            candidates += 1
            if loss < best_loss:
                best, best_loss, accepted = child, loss, accepted + 1
            bar.update(1)
            bar.set_postfix(loss=f"{best_loss:.4g}", accepted=accepted)
    state = SlotState(model, slots, best, members)
    if state.costs[metric] > budget:  # _mutate keeps every candidate within it
        raise AssertionError(f"evolve left the budget: {state.costs[metric]} > {budget}")
    choices = _choices(slots, members, own, best)
    seconds = time.perf_counter() - start
    report = EvolveReport(first_loss, best_loss, per, forwards, candidates, accepted, seconds)
    history = [*found.history, {"step": "evolve", "loss before": first_loss, "loss after": best_loss,
                                "candidates": candidates, "accepted": accepted, "forwards": forwards,
                                "seconds": seconds, **state.costs}]
    removed = {g: -model.delta("params", g, {}, c.kept) for g, c in choices.items()}
    return SearchResult(_plan(analysis, choices), choices, state.costs, found.base, found.budget, removed, history,
                        found.seconds, report)


def _slots(analysis: Analysis, found: SearchResult, scores: dict[str, torch.Tensor], options: SearchOptions
           ) -> tuple[dict[str, list[Choice]], dict[str, list[str]], dict[str, list[Choice]], dict[str, int]]:
    """The choices of every slot as :func:`fxgradnas.search` makes them, the members of each slot, each group's
    own choices and the index of ``found``'s choice in each slot."""
    groups = [analysis.group(name) for name in found.choices]
    missing = [g.name for g in groups if g.name not in scores]
    if missing:
        raise ArgumentError(f"scores have no entry for group(s) {', '.join(missing)} that found chose for: pass the "
                            "scores found was searched on")
    slots, members, options_of = search_slots(groups, scores, options)
    index = {}
    for s, choices in slots.items():
        kept = found.choices[s].kept
        at = [i for i, c in enumerate(choices) if c.kept == kept]
        if not at or any(found.choices[m].kept != kept for m in members[s]):
            raise ArgumentError(f"found's choice for {s!r} (kept {kept}) is none of the choices these scores and "
                                "options give: pass the scores and SearchOptions found was searched with")
        index[s] = at[0]
    return slots, members, options_of, index


def _choices(slots: dict[str, list[Choice]], members: dict[str, list[str]], own: dict[str, list[Choice]],
             index: dict[str, int]) -> dict[str, Choice]:
    """Each group's choice at ``index``: its own choice of its slot's count (a uniform class's members keep
    their own best units of the shared count, as :func:`fxgradnas.search` gives them)."""
    return {g: next(c for c in own[g] if c.kept == slots[s][index[s]].kept) for s in slots for g in members[s]}


def _plan(analysis: Analysis, choices: dict[str, Choice]) -> Plan:
    return Plan({g: list(c.units) for g, c in choices.items() if len(c.units) < analysis.group(g).size})


def _key(index: dict[str, int]) -> tuple[int, ...]:
    return tuple(index[s] for s in sorted(index))


def _mutate(rng: random.Random, model: CostModel, slots: dict[str, list[Choice]], members: dict[str, list[str]],
            parent: dict[str, int], metric: str, budget: int) -> dict[str, int] | None:
    """A level trade from ``parent``: one to three slots down one choice (each freeing some of ``metric``), then
    others up one choice at a time in a random order while the plan fits ``budget``, until none fits."""
    state = SlotState(model, slots, parent, members)
    kept = state.kept()
    order = sorted(slots)
    downs = [s for s in order if parent[s] > 0
             and state.delta(metric, s, kept, slots[s][parent[s] - 1].kept) < 0]
    if not downs:
        return None
    count = 1
    while count < min(MAX_DOWN, len(downs)) and rng.random() < 0.5:
        count += 1
    lowered = rng.sample(downs, count)
    for s in lowered:
        state.index[s] -= 1
    state.costs = model.evaluate(state.kept())
    others = [s for s in order if s not in lowered]
    grown = True
    while grown:
        grown = False
        rng.shuffle(others)
        for s in others:
            i = state.index[s]
            if i + 1 >= len(slots[s]):
                continue
            kept = state.kept()
            extra = state.delta(metric, s, kept, slots[s][i + 1].kept)
            if state.costs[metric] + extra <= budget:
                state.index[s] += 1
                state.costs = model.evaluate(state.kept())
                grown = True
    if state.costs[metric] > budget:  # the lowered slots alone cannot exceed what the parent used
        return None
    return dict(state.index)


def check_held_out(data: Sequence[Any], batches: int) -> None:
    """Raise DataError unless ``data`` (a list) leaves a batch to score after ``batches`` are held out."""
    if len(data) <= batches:
        raise DataError(f"searcher='evolve' holds out the last {batches} batch(es) of data to measure the loss on "
                        f"and scores the rest, but data has {len(data)}: pass more batches or "
                        f"SearchOptions(evolve_batches=...) below {len(data)}" + (
                            "" if len(data) > 1 else " (with at least 2 batches)"))


__all__ = ["EvolveReport", "check_held_out", "evolve"]
