"""Exact parameter and FLOP counts of a pruned model as products of every group's kept counts.

Every parameter and every contraction (linear, matmul, conv, attention) is a product of axis sizes;
each axis is a product of leaf spaces (or a concatenation of such products: a fused q/k/v projection's
rows), and a leaf is either a unit axis of a prunable group (its size is that group's kept count) or
fixed. So each count is a sum of monomials in the kept counts: a Linear reading the hidden width and
writing MLP channels costs hidden' x mlp'. FLOPs are
for the example input shape (batch and sequence as captured), 2 per multiply-add, as
``torch.utils.flop_counter`` counts them (matmuls, convolutions, attention).

A blocks group has one variable per block, 1 kept and 0 removed (its kept tuple holds one entry per block):
every parameter and contraction is multiplied by what keeps it needed (:func:`fxgradnas.analysis.blocks.needs`):
one block's variable for what only that block reads (the heads and channels inside it included, whatever
they keep), or, for what several blocks read, a variable that is 1 while any of them is kept.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass

import sympy
import torch

from .analysis import Analysis, check_analysis
from .analysis.blocks import Need, needs
from .analysis.spaces import Size

Var = tuple[str, int]  # (group name, unit axis; for a blocks group: the block)
METRICS = ("params", "flops")
ANY = "*"  # (ANY, k): 1 while any block of the k-th set that several blocks read is kept (no group is named so)


@dataclass(frozen=True)
class Term:
    coef: int
    variables: tuple[Var, ...]

    def value(self, kept: dict[str, tuple[int, ...]]) -> int:
        return self.coef * math.prod(kept[g][a] for g, a in self.variables)


class CostModel:
    """``evaluate({group: kept per unit axis})`` -> ``{"params": n, "flops": n}``; groups not named
    are kept whole; a blocks group's tuple has 1 (kept) or 0 (removed) per block.

    Args:
        analysis: The analysed model whose params and FLOPs it counts.
    """

    def __init__(self, analysis: Analysis) -> None:
        check_analysis(analysis, "CostModel")
        self.analysis = analysis
        self.full = {g.name: (1,) * g.size if g.kind == "blocks" else tuple(g.unit_shape) for g in analysis.prunable}
        self.owner = {leaf: (g.name, i) for g in analysis.prunable for i, leaf in enumerate(g.leaves)}
        self.hints = analysis.captured.symbol_values
        self.unions: list[frozenset[Var]] = []
        blocks = {b.path: (g.name, i) for g in analysis.prunable if g.kind == "blocks" for i, b in enumerate(g.blocks)}
        gm = analysis.captured.module
        need = {n.name: v for n, v in needs(gm.graph, {add: (branch, blocks[b.path]) for g in analysis.prunable
                                                       for b in g.blocks for add, _, branch in b.adds}).items()}
        read: dict[int, Need] = {}  # by tensor: what keeps one of the nodes reading it needed
        for node in gm.graph.find_nodes(op="get_attr"):
            key = id(operator.attrgetter(node.target)(gm))
            before = read.get(key, frozenset())
            read[key] = None if before is None or need[node.name] is None else before | need[node.name]
        counted = set()
        params = []
        for tensor, axes in analysis.parameter_leaves():
            if isinstance(tensor, torch.nn.Parameter):
                counted.add(id(tensor))
                params += self._terms(axes, 1, read.get(id(tensor)))
        for name, p in gm.named_parameters():
            if id(p) not in counted:  # held by the module but never read by the graph: goes with its block
                counted.add(id(p))
                block = next((v for path, v in blocks.items() if name.startswith(path + ".")), None)
                params.append(Term(p.numel(), (block,) if block else ()))
        self.terms = {
            "params": _merge(params),
            "flops": _merge([t for node, axes in analysis.multiply_adds() for t in self._terms(axes, 2, need[node])]),
        }
        self.by_group: dict[str, dict[str, list[Term]]] = {
            m: {g: [t for t in terms if any(g in self._groups(v) for v in t.variables)] for g in self.full}
            for m, terms in self.terms.items()
        }
        self.base = self.evaluate({})

    def _groups(self, var: Var) -> set[str]:
        """The groups a variable depends on."""
        return {g for g, _ in self.unions[var[1]]} if var[0] == ANY else {var[0]}

    def _terms(self, axes: list[list[list[int]]], coef: int, need: Need) -> list[Term]:
        """The monomials of a product of axes, each the sum of its segments' products (a fused projection's
        q, k and v rows), times the variable of the blocks whose being kept keeps them (``need``)."""
        terms = [Term(coef, self._needed(need))]
        for segments in axes:
            options = [self._term(segment, 1) for segment in segments]
            terms = [Term(a.coef * b.coef, tuple(sorted(a.variables + b.variables))) for a in terms for b in options]
        return terms

    def _needed(self, need: Need) -> tuple[Var, ...]:
        """The variable that is 1 while what ``need`` names is kept (none for what is always needed)."""
        if not need:  # needed whatever is kept, or read by nothing (and there in the pruned module too)
            return ()
        if len(need) == 1:
            return tuple(need)
        if need not in self.unions:
            self.unions.append(need)
        return ((ANY, self.unions.index(need)),)

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

    def _values(self, kept: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        full = {**self.full, **kept}
        full[ANY] = tuple(int(any(full[g][i] for g, i in union)) for union in self.unions)
        return full

    def evaluate(self, kept: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """Params and FLOPs of the model keeping ``kept``.

        Args:
            kept: Group name -> units kept per unit axis (groups not named are kept whole).
        """
        full = self._values(kept)
        return {m: sum(t.value(full) for t in terms) for m, terms in self.terms.items()}

    def delta(self, metric: str, group: str, kept: dict[str, tuple[int, ...]], new: tuple[int, ...]) -> int:
        """Change of ``metric`` when ``group`` moves from its entry in ``kept`` to ``new``.

        Args:
            metric: "params" or "flops".
            group: The group that changes.
            kept: Group name -> units kept per unit axis, as :meth:`evaluate` takes it.
            new: The group's new units kept per unit axis.
        """
        terms = self.by_group[metric][group]
        before, after = self._values(kept), self._values({**kept, group: new})
        return sum(t.value(after) - t.value(before) for t in terms)


def _merge(terms: list[Term]) -> list[Term]:
    merged: dict[tuple[Var, ...], int] = defaultdict(int)
    for t in terms:
        merged[t.variables] += t.coef
    return [Term(c, v) for v, c in merged.items()]

