"""Elementwise ops (broadcasting, unary), ``getitem``, and which ops keep a masked zero a zero."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from ..registry import aten_overloads, register
from ..state import AxisSpaces, Propagation, node_arg
from .common import VALUE_PRESERVING, aten
from .contractions import CONVOLUTIONS, conv_group_count

POINTWISE = [op for op in aten_overloads(torch.Tag.pointwise) if torch.Tag.inplace not in op.tags]
"""Broadcasting elementwise ops, from torch's own ``pointwise`` tags (in-place forms are left to
:func:`fxgradnas.export_passes.functionalize`)."""
_POINTWISE_SET = set(POINTWISE)
UNTAGGED_POINTWISE = [
    aten.rsub.Tensor, aten.hardswish.default, aten.where.ScalarSelf, aten.where.ScalarOther,
    aten.where.Scalar, aten.masked_fill.Tensor, aten.__and__.Tensor, aten.__and__.Scalar,
    aten.__or__.Tensor, aten.__or__.Scalar, aten.floor_divide.default, aten.floor_divide.Scalar,
]
"""Elementwise ops whose ``pointwise`` tag torch does not set."""
UNARY = [
    aten.to, aten._to_copy, aten.contiguous, aten.detach, aten.alias, aten.lift_fresh_copy, aten.dropout,
    aten.alpha_dropout, aten.feature_dropout, aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like,
    aten.rand_like, aten.randn_like, aten.type_as, aten.fill, aten.bernoulli, aten.native_dropout,
]
"""Ops whose output (each output) has the axes of their first argument."""


# ops that map a zero entry to zero (with the other operand a scale or a weight): between the op that
# produces a value and its residual write, masking before them equals masking after them
ZERO_PRESERVING = {aten.mul, aten.div}  # by a scale or a weight
PASS_THROUGH = {aten._to_copy, aten.to, aten.type_as, aten.clone, aten.alias, aten.dropout, aten.contiguous}


ZERO_MOVING = {
    aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze,
    aten.permute, aten.transpose, aten.t, aten.expand, aten.slice, aten.select, aten.narrow, aten.repeat,
    aten.cat, aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.roll, aten.index,
    aten.index_select, aten.gather, aten.sum, aten.mean, aten.amax, aten.amin, aten.max_pool1d,
    aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices, aten.avg_pool1d, aten.avg_pool2d,
    aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
    aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.upsample_nearest2d, aten.upsample_bilinear2d,
    *PASS_THROUGH, *VALUE_PRESERVING,
}
"""Ops whose output entries are input entries (picked by an index or not), or sums, means or extremes of
them over other axes: all value inputs zero at a channel, the output is zero there."""


def keeps_zero(p: Propagation, node: Node, zero: set[Node]) -> bool:
    """Whether ``node``'s value is zero wherever its inputs in ``zero`` are (and finite elsewhere): a
    masked channel stays zero through it. False when unsure, which only costs a mask more."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return node.args[0] in zero
    packet = getattr(node.target, "overloadpacket", None)
    inputs = p.tensor_inputs(node)
    if not inputs or not any(x in zero for x in inputs):
        return False
    if packet in ZERO_MOVING or (packet is aten.constant_pad_nd and not node_arg(node, 2, "value", 0)):
        return all(x in zero for x in inputs if p.val(x).is_floating_point())  # not the indices
    if not p.is_tensor(node):
        return False
    same_shape = [x for x in inputs if x in zero and p.shape(x) == p.shape(node)]
    if packet is aten.mul:
        return bool(same_shape)
    if packet is aten.div:
        return node.args[0] in same_shape
    if packet in (aten.add, aten.sub):
        return all(a in zero for a in node.args[:2])  # a constant or a weight added is not zero
    if packet in CONVOLUTIONS:
        depthwise = p.shape(inputs[0])[1] == p.shape(node)[1] == conv_group_count(node)
        return inputs[0] in zero and depthwise and node_arg(node, 2, "bias") is None
    scalars = [*node.args[1:], *node.kwargs.values()]
    if inputs == [node.args[0]] and node.target in _POINTWISE_SET and not any(isinstance(a, Node) for a in scalars):
        return _maps_zero_to_zero(p, node)
    return False


def _maps_zero_to_zero(p: Propagation, node: Node) -> bool:
    """Evaluate a one-tensor pointwise op (an activation) at zero."""
    zero = torch.zeros((), dtype=p.val(node.args[0]).dtype)
    try:
        out = node.target(zero, *node.args[1:], **node.kwargs)
    except Exception:  # noqa: BLE001 - an op that cannot run on a scalar is judged unsure
        return False
    return isinstance(out, torch.Tensor) and not out.bool().any().item()


def _write_site(p: Propagation, x: Node, axis: int) -> Node:
    """Where a value written into the residual stream is masked: at the op that produced it from a weight
    (o_proj, down_proj, the embedding) when only zero-preserving ops lie between, so that a norm after the
    producer (Gemma2's and OLMo2's post-sublayer RMSNorm) sees the masked value; else at the value itself."""
    origin, node = p.origin.get(x), x
    if origin is None or not p.is_tensor(origin) or p.shape(origin) != p.shape(x):
        return x
    back = axis - len(p.shape(x))  # the axis counted from the end, as broadcasting aligns it
    size = p.shape(x)[back]
    while node is not origin:
        packet = getattr(node.target, "overloadpacket", None)
        if packet in PASS_THROUGH:
            node = node.args[0]
            continue
        if packet not in ZERO_PRESERVING:
            return x
        carrying = [a for a in p.tensor_inputs(node)
                    if not p.is_weight(a) and len(p.shape(a)) >= -back and p.shape(a)[back] == size]
        if len(carrying) != 1 or (packet is aten.div and carrying[0] is not node.args[0]):
            return x  # the value must be the one operand along the axis, not the scale (rsqrt of a mean)
        node = carrying[0]
    same = p.spaces.find(p.of(origin)[axis]) == p.spaces.find(p.of(x)[axis])
    return origin if same else x


@register(*POINTWISE, *UNTAGGED_POINTWISE)
def elementwise(p: Propagation, node: Node) -> Any:
    """Broadcasting: axes aligned from the right share a space unless one side has size 1."""
    value = p.val(node)
    if not isinstance(value, torch.Tensor):  # several outputs of one shape (frexp)
        first = elementwise_axes(p, node, p.shape_of(value[0]))
        return [list(first) for _ in value]
    return elementwise_axes(p, node, p.shape_of(value))


def elementwise_axes(p: Propagation, node: Node, out_shape: list) -> AxisSpaces:
    inputs = p.tensor_inputs(node)
    out: list[int | None] = [None] * len(out_shape)
    users: list[list[Node]] = [[] for _ in out_shape]
    for x in inputs:
        spaces, shape = p.of(x), p.shape(x)
        offset = len(out_shape) - len(spaces)
        for i, space in enumerate(spaces):
            j = offset + i
            if shape[i] == 1 and out_shape[j] != 1:
                continue
            users[j].append(x)
            if out[j] is None:
                out[j] = space
            else:
                p.same(out[j], space)
    activations = [x for x in inputs if not p.is_weight(x)]
    if node.target in (aten.add.Tensor, aten.sub.Tensor):
        for j, xs in enumerate(users):
            writers = [x for x in xs if not p.is_weight(x)]
            if len({p.origin.get(x, x) for x in writers}) >= 2 and out[j] is not None:
                p.records.residual.append((out[j], node.name))
                p.stream.add(node)
                for x in writers:
                    if x not in p.stream:
                        site = _write_site(p, x, j - (len(out_shape) - len(p.of(x))))
                        p.records.writes.append((site.name, site_axis := j - (len(out_shape) - len(p.of(site))),
                                                 p.of(site)[site_axis]))
    if len(activations) == 1 and activations[0] in p.stream:
        p.stream.add(node)
    if inputs and all(p.is_weight(x) for x in inputs):
        p.weightlike.add(node)
    return [s if s is not None else p.spaces.new(out_shape[j]) for j, s in enumerate(out)]


@register(*UNARY)
def unary(p: Propagation, node: Node) -> Any:
    src = node.args[0]
    if p.is_weight(src):
        p.weightlike.add(node)
    if src in p.stream:
        p.stream.add(node)
    out = p.val(node)
    if isinstance(out, (tuple, list)):  # native_dropout: (output, mask)
        return [list(p.of(src)) for _ in out]
    return list(p.of(src))


@register(operator.getitem)
def getitem(p: Propagation, node: Node) -> AxisSpaces:
    src, index = node.args
    if p.is_weight(src):
        p.weightlike.add(node)
    return p.axes[src][index]
