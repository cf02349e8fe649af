"""Exact parameter and FLOP counts of a pruned model as products of every group's kept counts.

Every parameter and every contraction (linear, matmul, conv, attention) is a product of axis sizes;
each axis is a product of leaf spaces (or a concatenation of such products: a fused q/k/v projection's
rows), and a leaf is either a unit axis of a prunable group (its size is that group's kept count) or
fixed. So each count is a sum of monomials in the kept counts: a Linear reading the hidden width and
writing MLP channels costs hidden' x mlp'. FLOPs are
for the example input shape (batch and sequence as captured), 2 per multiply-add, as
``torch.utils.flop_counter`` counts them (matmuls, convolutions, attention).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import sympy
import torch

from .analysis import Analysis, check_analysis
from .analysis.spaces import Size

Var = tuple[str, int]  # (group name, unit axis)
METRICS = ("params", "flops")


@dataclass(frozen=True)
class Term:
    coef: int
    variables: tuple[Var, ...]

    def value(self, kept: dict[str, tuple[int, ...]]) -> int:
        return self.coef * math.prod(kept[g][a] for g, a in self.variables)


class CostModel:
    """``evaluate({group: kept per unit axis})`` -> ``{"params": n, "flops": n}``; groups not named
    are kept whole."""

    def __init__(self, analysis: Analysis) -> None:
        check_analysis(analysis, "CostModel")
        self.analysis = analysis
        self.full = {g.name: tuple(g.unit_shape) for g in analysis.prunable}
        self.owner = {leaf: (g.name, i) for g in analysis.prunable for i, leaf in enumerate(g.leaves)}
        self.hints = analysis.captured.symbol_values
        counted = set()
        params = []
        for tensor, axes in analysis.parameter_leaves():
            if isinstance(tensor, torch.nn.Parameter):
                counted.add(id(tensor))
                params += self._terms(axes, 1)
        for p in analysis.captured.module.parameters():
            if id(p) not in counted:  # held by the module but never read by the graph
                counted.add(id(p))
                params.append(Term(p.numel(), ()))
        self.terms = {
            "params": _merge(params),
            "flops": _merge([t for axes in analysis.multiply_adds() for t in self._terms(axes, 2)]),
        }
        self.by_group: dict[str, dict[str, list[Term]]] = {
            m: {g: [t for t in terms if any(v[0] == g for v in t.variables)] for g in self.full}
            for m, terms in self.terms.items()
        }
        self.base = self.evaluate({})

    def _terms(self, axes: list[list[list[int]]], coef: int) -> list[Term]:
        """The monomials of a product of axes, each the sum of its segments' products (a fused projection's
        q, k and v rows)."""
        terms = [Term(coef, ())]
        for segments in axes:
            options = [self._term(segment, 1) for segment in segments]
            terms = [Term(a.coef * b.coef, tuple(sorted(a.variables + b.variables))) for a in terms for b in options]
        return terms

    def _term(self, leaves: list[int], coef: int) -> Term:
        variables: list[Var] = []
        for leaf in leaves:
            if leaf in self.owner:
                variables.append(self.owner[leaf])
            else:
                coef *= self._concrete(self.analysis.leaf_size(leaf))
        return Term(coef, tuple(sorted(variables)))

    def _concrete(self, size: Size) -> int:
        if isinstance(size, int):
            return size
        return int(sympy.sympify(size).subs(self.hints))

    def evaluate(self, kept: dict[str, tuple[int, ...]]) -> dict[str, int]:
        full = {**self.full, **kept}
        return {m: sum(t.value(full) for t in terms) for m, terms in self.terms.items()}

    def delta(self, metric: str, group: str, kept: dict[str, tuple[int, ...]], new: tuple[int, ...]) -> int:
        """Change of ``metric`` when ``group`` moves from its entry in ``kept`` to ``new``."""
        full = {**self.full, **kept}
        before = sum(t.value(full) for t in self.by_group[metric][group])
        full[group] = new
        return sum(t.value(full) for t in self.by_group[metric][group]) - before


def _merge(terms: list[Term]) -> list[Term]:
    merged: dict[tuple[Var, ...], int] = defaultdict(int)
    for t in terms:
        merged[t.variables] += t.coef
    return [Term(c, v) for v, c in merged.items()]

