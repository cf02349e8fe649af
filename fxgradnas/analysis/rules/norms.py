"""Normalisation, reductions and pooling."""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..registry import register, size_list
from ..state import AxisSpaces, Propagation
from .common import aten, fresh_like


def _reduce_axes(p: Propagation, node: Node, dim_arg: Any, keepdim: bool, kind: str) -> Any:
    spaces = p.of(node.args[0])
    n = len(spaces)
    if dim_arg is None or dim_arg == []:
        reduced = set(range(n))
    elif isinstance(dim_arg, int):
        reduced = {dim_arg % n}
    else:
        reduced = {d % n for d in dim_arg}
    for d in reduced:
        p.reduce(spaces[d], kind)
    out = [p.spaces.new(1) if i in reduced else s for i, s in enumerate(spaces) if keepdim or i not in reduced]
    if isinstance(p.val(node), (tuple, list)):  # (values, indices) or (var, mean)
        return [out, list(out)]
    return out


def _is_square(p: Propagation, x: Any) -> bool:
    if not isinstance(x, Node):
        return False
    if x.target is aten.pow.Tensor_Scalar and x.args[1] == 2 or x.target is aten.square.default:
        return True
    return x.target is aten.mul.Tensor and x.args[0] is x.args[1]


@register(aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.prod, aten.logsumexp,
          aten.linalg_vector_norm, aten.norm, aten.max, aten.min, aten.argmax, aten.argmin, aten.any,
          aten.all, aten.var_mean, aten.std_mean)
def reduction(p: Propagation, node: Node) -> Any:
    packet = node.target.overloadpacket
    if packet in (aten.linalg_vector_norm, aten.norm):
        dim, keepdim = p.arg(2, "dim"), p.arg(3, "keepdim", False)
    elif packet in (aten.var, aten.std, aten.var_mean, aten.std_mean):
        dim, keepdim = p.arg(1, "dim"), p.arg(3, "keepdim", False)
    else:
        dim, keepdim = p.arg(1, "dim"), p.arg(2, "keepdim", False)
    if packet is aten.sum:
        kind = "sum"
    elif packet is aten.mean:
        kind = "mean of squares" if _is_square(p, node.args[0]) else "mean"
    else:
        kind = packet.__name__
    return _reduce_axes(p, node, dim, bool(keepdim), kind)


@register(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum, aten.cumprod,
          aten.cummax, aten.logcumsumexp)
def along_axis(p: Propagation, node: Node) -> Any:
    """Same shape out, but every output entry depends on the whole axis ``dim``."""
    src = node.args[0]
    spaces = p.of(src)
    p.reduce(spaces[node.args[1] % len(spaces)], node.target.overloadpacket.__name__.lstrip("_"))
    if isinstance(p.val(node), (tuple, list)):
        return [list(spaces), list(spaces)]
    return list(spaces)


@register(aten.layer_norm, aten.rms_norm, patch=size_list(1, "normalized_shape"))
def layer_norm(p: Propagation, node: Node) -> AxisSpaces:
    """Normalises over the trailing axes that ``normalized_shape`` spells (a reduction over them)."""
    x, normalized = node.args[0], list(node.args[1])
    weight = p.arg(2, "weight")
    bias = p.arg(3, "bias") if node.target.overloadpacket is not aten.rms_norm else None
    spaces = p.of(x)
    tail = spaces[len(spaces) - len(normalized):]
    kind = "rms_norm" if node.target.overloadpacket is aten.rms_norm else "layer_norm"
    for s in tail:
        p.reduce(s, kind)
    p.constants(tail)  # normalized_shape spells the tail axes
    for param in (weight, bias):
        if p.is_tensor(param):
            for s, t in zip(tail, p.of(param), strict=True):
                p.same(s, t)
    return list(spaces)


@register(aten.group_norm, aten.native_group_norm)
def group_norm(p: Propagation, node: Node) -> Any:
    x = node.args[0]
    spaces = p.of(x)
    p.reduce(spaces[1], "group_norm")
    for param in (p.arg(2, "weight"), p.arg(3, "bias")):
        if p.is_tensor(param):
            p.same(spaces[1], p.of(param)[0])
    if isinstance(p.val(node), (tuple, list)):
        return [list(spaces)] + fresh_like(p, list(p.val(node))[1:], None)
    return list(spaces)


@register(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit,
          aten.native_batch_norm, aten.instance_norm)
def batch_norm(p: Propagation, node: Node) -> Any:
    """Per-channel affine with running statistics: channels stay independent (exact)."""
    x = node.args[0]
    spaces = p.of(x)
    if node.target.overloadpacket is aten.instance_norm:
        for s in spaces[2:]:
            p.reduce(s, "instance_norm")
    for param in node.args[1:5]:
        if p.is_tensor(param):
            p.same(spaces[1], p.of(param)[0])
    if isinstance(p.val(node), (tuple, list)):
        return [list(spaces)] + fresh_like(p, list(p.val(node))[1:], None)
    return list(spaces)


@register(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d,
          aten.avg_pool3d, aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
          aten.adaptive_max_pool2d, aten.max_pool2d_with_indices, aten._adaptive_avg_pool2d)
def pool(p: Propagation, node: Node) -> Any:
    """Pooling mixes spatial positions only; batch and channel axes pass through."""
    x = node.args[0]
    spaces = p.of(x)
    value = p.val(node)
    first = value[0] if isinstance(value, (tuple, list)) else value
    spatial = first.dim() - 2 if first.dim() > 2 else 1
    keep = len(spaces) - spatial
    out = list(spaces[:keep]) + p.fresh(p.shape_of(first)[keep:], f"spatial axis of {node.name}")
    for s in spaces[keep:]:
        p.freeze(s, f"spatial axis of {node.name}")
    if isinstance(value, (tuple, list)):
        return [out, list(out)]
    return out
