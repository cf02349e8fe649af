"""Walk the captured graph once and label every tensor axis with a dimension space.

Each node's rule (:mod:`fxgradnas.analysis.rules`) runs in graph order on the shared
:class:`~fxgradnas.analysis.state.Propagation` (:func:`apply_rule`, which also freezes what no rule
handles); records hold space ids and are resolved to final leaf spaces only after the walk, since later
unions refine earlier spaces.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from ..capture import Captured
from ..export_passes import mutated_argument
from .registry import entry_for
from .rules.common import VALUE_PRESERVING, aten, unknown  # loads the rules package: every rule registers
from .state import Propagation, op_name


def propagate(captured: Captured) -> Propagation:
    """Label every axis of every tensor in ``captured`` with a space and gather the records."""
    p = Propagation(captured)
    tensor_spaces: dict[int, list[int]] = {}
    for node in p.gm.graph.nodes:
        p.node = node
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(p.gm)
            if isinstance(value, torch.Tensor) and node.users:
                p.axes[node] = tensor_spaces.get(id(value)) or p.fresh([int(s) for s in value.shape])
                p.weightlike.add(node)
                if id(value) in tensor_spaces:
                    continue  # a tied weight: one tensor, one set of spaces
                tensor_spaces[id(value)] = p.axes[node]
                if captured.names_of(value):
                    p.records.tensors[node.name] = (value, p.axes[node])
                else:
                    for s in p.axes[node]:
                        p.freeze(s, f"constant tensor {node.target} has a fixed shape")
        elif node.op == "placeholder":
            if p.is_tensor(node):
                p.axes[node] = p.fresh(p.shape(node), f"model input {node.name}")
        elif node.op == "output":
            for x in p.tensor_inputs(node):
                for s in p.of(x):
                    p.freeze(s, "reaches the model output")
                if isinstance(p.values.get(x), int):
                    p.freeze(p.values[x], "its indices reach the model output")
        elif node.op == "call_function":
            apply_rule(p, node)
    p.node = None
    return p


def apply_rule(p: Propagation, node: Node) -> None:
    """Label the outputs of ``node`` with its rule; without a rule, or when the rule fails, freeze
    every space the node touches with a reason naming the op and the node."""
    out = p.val(node)
    _read_values(p, node)
    if not _holds_tensor(out):
        return  # shape arithmetic, assertions, guards: nothing to label
    entry = entry_for(node.target)
    if mutated_argument(node.target) is not None:
        p.axes[node] = unknown(p, node, f"{op_name(node)} at {node.name} writes in place into a tensor that other "
                                        "nodes can see (a view, an input or a parameter)")
    elif entry is None:
        p.axes[node] = unknown(p, node, f"no rule for {op_name(node)} at {node.name}")
    else:
        try:
            axes = entry.rule(p, node)
            _check_axes(out, axes)
        except Exception as exc:  # a rule that does not understand its node must not stop the analysis
            first = next((line for line in str(exc).splitlines() if line.strip()), "")
            reason = f"the rule for {op_name(node)} failed at {node.name}: {type(exc).__name__}: {first}"
            axes = unknown(p, node, reason)
        p.axes[node] = axes
    _carry_values(p, node)
    if node not in p.origin:
        sources = [x for x in p.tensor_inputs(node) if not p.is_weight(x)]
        p.origin[node] = p.origin.get(sources[0], sources[0]) if sources else node


VALUE_READERS = {aten.sort, aten.argsort, aten.histc}
"""Ops that read index values in a way the pruned model reproduces with the space's entries renumbered in
order (sorting them; counting them per entry, which :func:`~fxgradnas.analysis.rules.routing.histc` checks)."""
METADATA = {aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset}


def _read_values(p: Propagation, node: Node) -> None:
    """Freeze a space whose index values (``Propagation.values``: a router's expert ids) any op other than
    the ones that keep, sort or count them reads: pruning renumbers the entries of that space."""
    packet = getattr(node.target, "overloadpacket", None)
    if node.target is operator.getitem or packet in VALUE_PRESERVING or packet in VALUE_READERS or packet in METADATA:
        return
    for x in p.tensor_inputs(node):
        named = p.values.get(x)
        if named is not None and not isinstance(named, list):
            p.freeze(named, f"its indices are read by {op_name(node)} at {node.name}")


def _carry_values(p: Propagation, node: Node) -> None:
    """Carry ``Propagation.values`` (which space an integer tensor's entries index) through ops that keep
    the entries; a multi-output op's value is a list, one per output."""
    if node in p.values or not node.args or not isinstance(node.args[0], Node) or node.args[0] not in p.values:
        return
    source = p.values[node.args[0]]
    if node.target is operator.getitem and isinstance(source, list):
        if source[node.args[1]] is not None:
            p.values[node] = source[node.args[1]]
    elif not isinstance(source, list) and getattr(node.target, "overloadpacket", None) in VALUE_PRESERVING:
        p.values[node] = source


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)


def _check_axes(value: Any, axes: Any) -> None:
    """A rule returns one space per axis of each tensor output."""
    if isinstance(value, torch.Tensor):
        if not isinstance(axes, list) or len(axes) != value.dim():
            raise ValueError(f"the rule gave {axes!r} for a tensor of rank {value.dim()}")
        return
    if not isinstance(axes, list) or len(axes) != len(value):
        raise ValueError(f"the rule gave {axes!r} for {len(value)} outputs")
    for v, a in zip(value, axes, strict=True):
        if isinstance(v, torch.Tensor):
            _check_axes(v, a)
