"""What every rule module shares: the fallbacks that freeze what a rule does not handle, and the shapes
of a node's outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from ..state import Propagation, op_name

aten = torch.ops.aten


VALUE_PRESERVING = {aten.view, aten.reshape, aten._to_copy, aten.to, aten.clone, aten.contiguous, aten.alias,
                    aten.flatten, aten.squeeze, aten.unsqueeze, aten.detach}
"""Ops whose output entries are input entries (or casts of them): an index that names a space stays one."""


def unknown(p: Propagation, node: Node, reason: str) -> Any:
    """Freeze everything the op reads and writes, for ``reason``."""
    for x in p.tensor_inputs(node):
        for s in p.axes.get(x, []):
            p.freeze(s, reason)
    return fresh_like(p, p.val(node), reason)


def no_rule(p: Propagation, node: Node) -> Any:
    """The fallback of a rule for a form of its op that it does not handle."""
    return unknown(p, node, f"no rule for this form of {op_name(node)} at {node.name}")


def fresh_like(p: Propagation, value: Any, reason: str | None) -> Any:
    if isinstance(value, torch.Tensor):
        return p.fresh(p.shape_of(value), reason)
    return [fresh_like(p, v, reason) if isinstance(v, torch.Tensor) else None for v in value]


def output_shape(p: Propagation, node: Node) -> list:
    """Sizes of the node's output, or a list of them for ops that return several tensors."""
    value = p.val(node)
    return p.shape_of(value) if isinstance(value, torch.Tensor) else [p.shape_of(v) for v in value]
