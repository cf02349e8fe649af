"""The op rules: how each ATen op maps its inputs' axes to its outputs' axes.

A rule receives the walk state and the node, declares which axes share a space, records what the
later passes need (frozen spaces, heads, reductions, weight contractions and productions, size
constants) and returns the spaces of the node's output axes (a list per tensor output for ops that
return several). Rules are registered in :mod:`fxgradnas.analysis.registry` together with the
patcher of the size constants they record; importing this package registers every one of them. An op
without a rule freezes every space it touches, and so does an op whose rule fails
(:func:`fxgradnas.analysis.propagate.apply_rule`): never guess.

One module per family of ops: :mod:`.common` (the fallbacks), :mod:`.elementwise`, :mod:`.layout`,
:mod:`.factories`, :mod:`.contractions`, :mod:`.norms` (normalisation, reductions, pooling) and
:mod:`.routing` (mixture of experts).
"""

from . import common, contractions, elementwise, factories, layout, norms, routing

__all__ = ["common", "contractions", "elementwise", "factories", "layout", "norms", "routing"]
