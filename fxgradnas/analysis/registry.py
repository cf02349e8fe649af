"""The one registry of ops: per op, the analysis rule and, for ops whose arguments spell axis sizes,
the patcher that the rewrite uses to change those sizes.

A rule (see :mod:`fxgradnas.analysis.rules`) maps an op's input axes to its output axes. A rule that
records *size constants* (``Propagation.constants``: the spaces that the entries of a shape list, a
split size, a slice's bounds, a repeat count or a conv's ``groups`` spell) must come with a patcher:
the analysis freezes a group whose constants belong to an op without one, and dry-runs the patcher of every
constant of a prunable group, so that a group reported prunable is one the rewrite can shrink.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from ..errors import RewriteError
from .state import Propagation, node_arg

Rule = Callable[[Propagation, Node], Any]
Edit = tuple[Node, tuple, dict[str, Any]]  # a node with its new args and kwargs
Patch = Callable[[Node, int, list[int | None]], list[Edit]]
"""``patch(node, index, sizes)``: the edits that make size constant ``index`` of ``node`` spell the
product of ``sizes`` (the row-major factors of the constant after pruning; None for a dynamic one).
Raises :class:`~fxgradnas.errors.RewriteError` when the constant is spelled in a way it cannot change.
Patchers only read the graph; the caller applies the edits."""


@dataclass(frozen=True)
class OpEntry:
    """How the analysis reads an op (``rule``) and how the rewrite patches its size constants."""

    rule: Rule
    patch: Patch | None = None


REGISTRY: dict[Any, OpEntry] = {}
"""OpOverload, OpOverloadPacket, Python callable, or the qualified name (``"namespace::op"``) of a custom op
that a library defines on import (so that the registry need not import that library) -> entry."""


def register(*ops: Any, patch: Patch | None = None) -> Callable[[Rule], Rule]:
    """Register ``rule`` (the decorated function) for ``ops``; registering an op twice raises."""

    def decorate(rule: Rule) -> Rule:
        for op in ops:
            if op in REGISTRY:
                raise ValueError(f"{op} is registered twice (rules {REGISTRY[op].rule.__name__} and {rule.__name__})")
            REGISTRY[op] = OpEntry(rule, patch)
        return rule

    return decorate


def entry_for(target: Any) -> OpEntry | None:
    """The entry of a node target: its overload's own entry first, then its packet's, then its qualified name's."""
    if isinstance(target, torch._ops.OpOverload):
        return (REGISTRY.get(target) or REGISTRY.get(target.overloadpacket)
                or REGISTRY.get(target.overloadpacket._qualified_op_name))
    return REGISTRY.get(target)


def aten_overloads(tag: torch.Tag) -> list[torch._ops.OpOverload]:
    """Every ATen overload with ``tag`` (``out=`` variants excluded), from torch's own op tags."""
    found = []
    for name in torch._C._dispatch_get_all_op_names():
        namespace, _, rest = name.partition("::")
        op, _, overload = rest.partition(".")
        if namespace != "aten" or not hasattr(torch.ops.aten, op):
            continue
        packet = getattr(torch.ops.aten, op)
        target = getattr(packet, overload or "default", None)
        if target is not None and tag in target.tags and torch.Tag.out not in target.tags:
            found.append(target)
    return found


# --- patchers --------------------------------------------------------------------------------------
def fixed_size(node: Node, sizes: list[int | None]) -> int:
    """The product of ``sizes``; a dynamic factor cannot be written as a constant."""
    if any(s is None for s in sizes):
        raise RewriteError(f"{node.name}: a size constant has a dynamic factor")
    return math.prod(s for s in sizes if s is not None)


def with_arg(node: Node, index: int | None, keyword: str, value: Any) -> Edit:
    """``node`` with its argument ``index`` (passed by position, or by name as ``keyword``; None for a
    keyword-only one) set to ``value``."""
    if index is not None and len(node.args) > index:
        return node, tuple(value if i == index else a for i, a in enumerate(node.args)), dict(node.kwargs)
    return node, node.args, {**node.kwargs, keyword: value}


def size_list(arg: int, keyword: str) -> Patch:
    """Patcher of a size list in argument ``arg`` (``keyword``): constant ``index`` is its entry
    ``index``. An entry may be an int (-1 is inferred and left alone) or a SymInt product of one
    literal and dynamic sizes (``B * H`` of a folded batch-heads axis), whose literal is patched."""

    def patch(node: Node, index: int, sizes: list[int | None]) -> list[Edit]:
        shape = list(node.args[arg] if len(node.args) > arg else node.kwargs[keyword])
        value = shape[index]
        if isinstance(value, int):
            if value == -1:
                return []
            shape[index] = fixed_size(node, sizes)
            return [with_arg(node, arg, keyword, shape)]
        if isinstance(value, Node) and value.target is operator.mul:
            literal = [i for i, a in enumerate(value.args) if isinstance(a, int)]
            if len(literal) != 1:
                raise RewriteError(f"{node.name}: cannot find the constant in {value.name}")
            fixed = math.prod(s for s in sizes if s is not None)
            return [(value, tuple(fixed if i == literal[0] else a for i, a in enumerate(value.args)), dict(value.kwargs))]
        raise RewriteError(f"{node.name}: size {index} is spelled by {value!r}, which fxgradnas cannot patch")

    return patch


def int_arg(arg: int, keyword: str) -> Patch:
    """Patcher of one int argument (a split size, a repeat count, a conv's ``groups``)."""

    def patch(node: Node, index: int, sizes: list[int | None]) -> list[Edit]:
        value = node_arg(node, arg, keyword)
        if not isinstance(value, int):
            raise RewriteError(f"{node.name}: {keyword} is spelled by {value!r}, which fxgradnas cannot patch")
        return [with_arg(node, arg, keyword, fixed_size(node, sizes))]

    return patch


def apply_edits(edits: Iterable[Edit]) -> None:
    """Write the edits a patcher returned into the graph."""
    for node, args, kwargs in edits:
        node.args, node.kwargs = args, kwargs
