"""Tensor factories: ops that make a tensor from sizes alone."""

from __future__ import annotations

from torch.fx import Node

from ..registry import register, size_list
from ..state import AxisSpaces, Propagation
from .common import aten, output_shape


@register(aten.arange, aten.scalar_tensor, aten.rand, aten.randn, aten.tensor, aten.randint, aten.eye, aten.linspace)
def factory(p: Propagation, node: Node) -> AxisSpaces:
    """Entries that depend on their position (``arange``: ALiBi's per-head slopes): the axes are frozen."""
    return p.fresh(output_shape(p, node), f"created with a fixed shape at {node.name}")


def _filled(p: Propagation, node: Node) -> AxisSpaces:
    """One value in every entry (T5's zero position bias of cross-attention, one per head): any entries can
    go, so the sizes are size constants the rewrite patches."""
    out = p.fresh(output_shape(p, node))
    p.constants(out)
    return out


register(aten.zeros, aten.ones, aten.empty, aten.full, patch=size_list(0, "size"))(_filled)
register(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, patch=size_list(1, "size"))(_filled)
