"""Random pruning plans: the one generator of random keep sets the tests use (tests/conftest.py gives it as
the ``random_plan`` fixture)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

import fxgradnas

__all__ = ["random_plan"]


def random_plan(analysis: fxgradnas.Analysis, seed: int | torch.Generator = 0, *, half: bool = False,
                exact_only: bool = True, kinds: Iterable[str] | None = None, skip: float = 0.0,
                allow_empty: bool = False) -> fxgradnas.Plan:
    """A random keep set for the prunable groups of ``analysis``, drawn from ``seed`` (an int or a
    ``torch.Generator``, which the draws advance).

    - ``exact_only`` (the default): only exact groups, so the pruned module equals the masked one;
      ``exact_only=False``: every prunable group.
    - ``skip``: each group is left out of the plan (kept whole) with this probability.
    - Each group keeps a random subset of its units of random size, at least its ``min_units`` (a
      router's top-k); ``half``: about half its units (at least ``min_units``).
    - Grouped-query heads (unit shape ``(kv, q_per_kv)``) keep the same number of queries in every kept
      KV head; ``half``: whole KV heads (half the queries of the one KV head when there is only one),
      so the plan is physical.
    - ``kinds``: only the groups of these kinds are in the plan. The draws are those of the full plan,
      so plans of different kinds from one seed agree on the groups they share.
    - ``allow_empty=False`` (the default): a plan that keeps no group fails the test, which would
      otherwise check nothing.
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)

    def subset(n: int, fewest: int = 1) -> list[int]:
        k = max(fewest, n // 2) if half else int(torch.randint(fewest, n + 1, (1,), generator=gen))
        return sorted(torch.randperm(n, generator=gen)[:k].tolist())

    keep = {}
    for g in analysis.prunable:
        if (exact_only and not g.exact) or (skip and float(torch.rand((), generator=gen)) < skip):
            continue
        if g.kind == "heads" and len(g.unit_shape) == 2:
            kv, rep = g.unit_shape
            if half:
                keep[g.name] = [k * rep + r for k in subset(kv) for r in range(rep)] if kv > 1 else subset(rep)
            else:
                count = len(subset(rep))
                keep[g.name] = sorted(k * rep + r for k in subset(kv)
                                      for r in torch.randperm(rep, generator=gen)[:count].tolist())
        else:
            keep[g.name] = subset(g.size, g.min_units)
    if kinds is not None:
        kinds = set(kinds)
        keep = {name: units for name, units in keep.items() if analysis.group(name).kind in kinds}
    assert allow_empty or keep, "the random plan keeps no group (no prunable exact group?): it would test nothing"
    return fxgradnas.Plan(keep)
