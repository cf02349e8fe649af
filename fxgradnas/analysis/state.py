"""The state of one walk over the captured graph: the space of every tensor axis, and the records.

The walk (:mod:`fxgradnas.analysis.propagate`) applies the op rules of :mod:`fxgradnas.analysis.rules`,
which read and declare facts through :class:`Propagation`; it collects *records* (what
freezes a space, which spaces are attention heads, residual streams, reductions, where a space is
contracted against a weight, what is written into a residual stream, which size constants spell it,
which spaces are a router's experts). Records hold space ids and are resolved to final leaf spaces only
after the walk, since later unions refine earlier spaces. Besides axes, the walk follows integer tensors
whose *values* index a space (a router's top-k expert ids, ``Propagation.values``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..capture import Captured
from .spaces import ShapeConflict, Size, SpaceGraph, as_size

AxisSpaces = list[int]  # the space of each axis of one tensor


@dataclass
class Records:
    """Facts gathered during the walk, keyed by (not yet resolved) space ids."""

    frozen: list[tuple[int, str]] = field(default_factory=list)
    reductions: list[tuple[int, str, str]] = field(default_factory=list)  # space, kind, node
    heads: list[tuple[int, int | None]] = field(default_factory=list)  # query-head space, KV heads
    residual: list[tuple[int, str]] = field(default_factory=list)
    consumed: list[tuple[str, int, int]] = field(default_factory=list)  # input node, axis, space
    writes: list[tuple[str, int, int]] = field(default_factory=list)  # residual-add operand, axis, space
    shape_ops: list[tuple[str, list[int]]] = field(default_factory=list)  # node, spaces of its size constants
    internal: list[int] = field(default_factory=list)  # weight axes that are never units (kernels)
    flops: list[tuple[str, list[int]]] = field(default_factory=list)  # contraction, axes: 2 x their product
    tensors: dict[str, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)  # get_attr
    experts: list[tuple[str, int, int]] = field(default_factory=list)  # router logits, axis, experts space
    min_units: list[tuple[int, int]] = field(default_factory=list)  # space, fewest units a plan may keep
    routed: list[int] = field(default_factory=list)  # expert spaces whose rows a routing histogram counts


class Propagation:
    """The state of one walk: spaces of every node's axes plus the records."""

    def __init__(self, captured: Captured) -> None:
        self.captured = captured
        self.gm: GraphModule = captured.module
        self.spaces = SpaceGraph()
        self.records = Records()
        self.axes: dict[Node, Any] = {}  # node -> AxisSpaces (a list of them for multi-output ops)
        self.weightlike: set[Node] = set()
        self.origin: dict[Node, Node] = {}  # the op that last wrote each activation (residual adds)
        self.stream: set[Node] = set()  # residual adds and what follows them elementwise
        self.values: dict[Node, Any] = {}  # integer tensors whose entries index a space (top-k expert ids)
        self.node: Node | None = None

    # --- reading nodes -------------------------------------------------------------------------
    @staticmethod
    def val(x: Any) -> Any:
        return x.meta.get("val") if isinstance(x, Node) else None

    @classmethod
    def is_tensor(cls, x: Any) -> bool:
        return isinstance(cls.val(x), torch.Tensor)

    @classmethod
    def shape(cls, x: Node) -> list[Size]:
        return cls.shape_of(cls.val(x))

    @staticmethod
    def shape_of(value: torch.Tensor) -> list[Size]:
        return [as_size(s) for s in value.shape]

    def tensor_inputs(self, node: Node) -> list[Node]:
        """Every tensor-valued node among the args and kwargs, lists flattened, in order."""
        found: list[Node] = []

        def visit(a: Any) -> None:
            if isinstance(a, Node):
                if self.is_tensor(a) and a not in found:
                    found.append(a)
            elif isinstance(a, (list, tuple)):
                for b in a:
                    visit(b)

        visit(node.args)
        visit(list(node.kwargs.values()))
        return found

    def of(self, x: Node) -> AxisSpaces:
        return self.axes[x]

    def is_weight(self, x: Any) -> bool:
        return isinstance(x, Node) and x in self.weightlike

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        assert self.node is not None
        return node_arg(self.node, index, name, default)

    # --- declaring facts -----------------------------------------------------------------------
    def fresh(self, shape: list[Size], reason: str | None = None) -> AxisSpaces:
        spaces = [self.spaces.new(s) for s in shape]
        if reason:
            for s in spaces:
                self.freeze(s, reason)
        return spaces

    def freeze(self, space: int, reason: str) -> None:
        """Record that ``space`` cannot be pruned. A data-sized space is recorded too: it may be (or become)
        a product with a constant factor (a batch folded with the heads), which must freeze with it."""
        if not self.spaces.is_trivial(space):
            self.records.frozen.append((space, reason))

    def same(self, a: int, b: int) -> None:
        """Declare two axes one index space; incompatible ones are frozen, never forced."""
        if self.spaces.is_trivial(a) or self.spaces.is_trivial(b):
            return
        try:
            self.spaces.union(a, b)
        except ShapeConflict as exc:
            reason = f"incompatible shapes at {self.where()}: {exc}"
            self.freeze(a, reason)
            self.freeze(b, reason)

    def regroup(self, in_spaces: AxisSpaces, out_shape: list[Size]) -> AxisSpaces:
        try:
            return self.spaces.regroup(in_spaces, out_shape)
        except ShapeConflict as exc:
            reason = f"reshape not understood at {self.where()}: {exc}"
            for s in in_spaces:
                self.freeze(s, reason)
            return self.fresh(out_shape, reason)

    def where(self) -> str:
        node = self.node
        if node is None:
            return "?"
        return f"{node.name} ({op_name(node)})"

    def reduce(self, space: int, kind: str) -> None:
        if not self.spaces.is_trivial(space) and not self.spaces.is_data(space):
            self.records.reductions.append((space, kind, self.node.name))

    def heads(self, space: int, kv_heads: int | None = None) -> None:
        self.records.heads.append((space, kv_heads))

    def consumed(self, x: Node, axis: int) -> None:
        spaces = self.of(x)
        self.records.consumed.append((x.name, axis % len(spaces), spaces[axis]))

    def constants(self, spaces: list[int]) -> None:
        """The current node's arguments spell the sizes of ``spaces``: one space per size constant,
        in the order the op's patcher (:mod:`fxgradnas.analysis.registry`) indexes them."""
        self.records.shape_ops.append((self.node.name, list(spaces)))

    def produced(self) -> None:
        """The current node writes a new activation from a weight (linear, conv, embedding)."""
        self.origin[self.node] = self.node


def node_arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of ``node``, passed by position or by keyword as ``name``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def op_name(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.overloadpacket.__name__}" if target.namespace == "aten" else str(target)
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))
