"""Contractions: matmul, einsum, linear, convolutions, attention, embedding."""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from ..registry import Edit, int_arg, register
from ..state import AxisSpaces, Propagation, node_arg
from .common import aten, no_rule, output_shape


def contract(p: Propagation, node: Node, a: Node, b: Node, out: AxisSpaces, a_axis: int | list[int],
              b_axis: int | list[int], out_of_a: dict[int, int], out_of_b: dict[int, int]) -> None:
    """``a`` and ``b`` are contracted over ``a_axis``/``b_axis`` (one axis each, or lists of pairs);
    ``out_of_x`` maps output axes to the operand axis they come from. Against a weight, the activation
    side is a consumer site (one contracted axis only); two activations (attention) freeze their own
    axes and mark the shared batch axes that have a constant factor as heads (a batch folded with the
    heads, as BLOOM's ``baddbmm`` has, included)."""
    da, db = p.of(a), p.of(b)
    a_axes = [a_axis] if isinstance(a_axis, int) else a_axis
    b_axes = [b_axis] if isinstance(b_axis, int) else b_axis
    for i, j in zip(a_axes, b_axes, strict=True):
        p.same(da[i], db[j])
    p.records.flops.append((node.name, [*out, *(da[i] for i in a_axes)]))
    for j, i in out_of_a.items():
        p.same(out[j], da[i])
    for j, i in out_of_b.items():
        p.same(out[j], db[i])
    wa, wb = p.is_weight(a), p.is_weight(b)
    if (wa or wb) and not (wa and wb) and len(a_axes) != 1:
        raise ValueError("a weight contracted over several axes at once")
    if wa and wb:
        p.weightlike.add(node)
    elif wb:
        p.consumed(a, a_axes[0])
        p.produced()
    elif wa:
        p.consumed(b, b_axes[0])
        p.produced()
    else:
        reason = f"contracted between two activations at {node.name} (per-head width)"
        for i in a_axes:
            p.freeze(da[i], reason)
        free = [j for j in range(len(out)) if (j in out_of_a) != (j in out_of_b)]
        for j in free:
            p.freeze(out[j], reason)
        for j in range(len(out)):
            if j in out_of_a and j in out_of_b and any(not p.spaces.is_data(x) for x in p.spaces.leaves(out[j])):
                p.heads(out[j])


def _matmul_maps(na: int, nb: int, nout: int) -> tuple[int, int, dict[int, int], dict[int, int]]:
    """Axis maps of broadcasting matmul for operands of rank >= 2."""
    out_a: dict[int, int] = {nout - 2: na - 2}
    out_b: dict[int, int] = {nout - 1: nb - 1}
    for j in range(nout - 2):
        ia, ib = j - (nout - na), j - (nout - nb)
        if ia >= 0:
            out_a[j] = ia
        if ib >= 0:
            out_b[j] = ib
    return na - 1, nb - 2, out_a, out_b


@register(aten.mm, aten.bmm, aten.matmul)
def matmul(p: Propagation, node: Node) -> AxisSpaces:
    a, b = node.args[0], node.args[1]
    out_shape = output_shape(p, node)
    if p.val(a).dim() < 2 or p.val(b).dim() < 2:
        return no_rule(p, node)
    out = p.fresh(out_shape)
    a_axis, b_axis, out_a, out_b = _matmul_maps(p.val(a).dim(), p.val(b).dim(), len(out_shape))
    out_a = {j: i for j, i in out_a.items() if p.shape(a)[i] != 1 or out_shape[j] == 1}
    out_b = {j: i for j, i in out_b.items() if p.shape(b)[i] != 1 or out_shape[j] == 1}
    contract(p, node, a, b, out, a_axis, b_axis, out_a, out_b)
    return out


def _einsum_letters(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """The axis letters of each operand and of the output of an einsum ``equation`` (an ellipsis spelled out
    as upper-case-free placeholder digits); None for a form the rule does not read (a repeated letter)."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    operands = inputs.split(",")
    if len(operands) != len(ranks):
        return None
    widest = max((rank - len(op.replace("...", "")) for op, rank in zip(operands, ranks, strict=True)
                  if "..." in op), default=0)
    ellipsis = "".join(str(d) for d in range(widest))
    spelled = [op.replace("...", ellipsis[widest - (rank - len(op.replace("...", ""))):])
               for op, rank in zip(operands, ranks, strict=True)]
    if not arrow:
        once = sorted(c for c in set("".join(spelled)) if "".join(spelled).count(c) == 1 and not c.isdigit())
        output = ellipsis + "".join(once)
    else:
        output = output.replace("...", ellipsis)
    if any(len(set(letters)) != len(letters) for letters in [*spelled, output]):
        return None
    return spelled, output


@register(aten.einsum)
def einsum(p: Propagation, node: Node) -> AxisSpaces:
    """Two operands: letters in both and the output are batch axes, letters in both only are contracted,
    letters of one operand and the output are its free axes (as a contraction of :func:`contract`). One
    operand: a permutation. Other forms (sums over a letter of one operand, diagonals, three operands)
    have no rule."""
    equation, operands = node.args[0], list(node.args[1])
    parsed = _einsum_letters(equation, [p.val(x).dim() for x in operands]) if isinstance(equation, str) else None
    if parsed is None or len(operands) not in (1, 2):
        return no_rule(p, node)
    letters, output = parsed
    out_shape = output_shape(p, node)
    out = p.fresh(out_shape)
    if len(operands) == 1:
        if sorted(letters[0]) != sorted(output):
            return no_rule(p, node)
        for j, c in enumerate(output):
            p.same(out[j], p.of(operands[0])[letters[0].index(c)])
        if p.is_weight(operands[0]):
            p.weightlike.add(node)
        return out
    a, b = operands
    (la, lb), sa, sb = letters, p.shape(a), p.shape(b)
    if any(c not in output and c not in lb for c in la) or any(c not in output and c not in la for c in lb):
        return no_rule(p, node)  # a letter summed over within one operand
    contracted = [c for c in la if c in lb and c not in output]
    out_a = {j: la.index(c) for j, c in enumerate(output) if c in la and (sa[la.index(c)] != 1 or out_shape[j] == 1)}
    out_b = {j: lb.index(c) for j, c in enumerate(output) if c in lb and (sb[lb.index(c)] != 1 or out_shape[j] == 1)}
    contract(p, node, a, b, out, [la.index(c) for c in contracted], [lb.index(c) for c in contracted], out_a, out_b)
    return out


@register(aten.addmm, aten.baddbmm)
def addmm(p: Propagation, node: Node) -> AxisSpaces:
    bias, a, b = node.args[0], node.args[1], node.args[2]
    out_shape = output_shape(p, node)
    out = p.fresh(out_shape)
    a_axis, b_axis, out_a, out_b = _matmul_maps(len(out_shape), len(out_shape), len(out_shape))
    contract(p, node, a, b, out, a_axis, b_axis, out_a, out_b)
    _broadcast_into(p, bias, out, out_shape)
    return out


def _broadcast_into(p: Propagation, x: Any, out: AxisSpaces, out_shape: list) -> None:
    if not p.is_tensor(x):
        return
    spaces, shape = p.of(x), p.shape(x)
    offset = len(out) - len(spaces)
    for i, s in enumerate(spaces):
        if shape[i] != 1 or out_shape[offset + i] == 1:
            p.same(out[offset + i], s)


@register(aten.linear)
def linear(p: Propagation, node: Node) -> AxisSpaces:
    x, w = node.args[0], node.args[1]
    bias = p.arg(2, "bias")
    out_shape = output_shape(p, node)
    out = p.fresh(out_shape)
    n = len(out_shape)
    if p.val(w).dim() != 2:
        return no_rule(p, node)
    contract(p, node, x, w, out, -1, 1, {j: j for j in range(n - 1)}, {n - 1: 0})
    _broadcast_into(p, bias, out, out_shape)
    return out


def _groups_index(node: Node) -> int:
    """Where a convolution's ``groups`` is: argument 8 of ``convolution``, 6 of the others."""
    return 8 if node.target.overloadpacket is aten.convolution else 6


def _patch_conv_groups(node: Node, index: int, sizes: list[int | None]) -> list[Edit]:
    return int_arg(_groups_index(node), "groups")(node, index, sizes)


CONV_TRANSPOSE = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
CONVOLUTIONS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, *CONV_TRANSPOSE)


def conv_group_count(node: Node) -> Any:
    return node_arg(node, _groups_index(node), "groups", 1)


@register(*CONVOLUTIONS, patch=_patch_conv_groups)
def conv(p: Propagation, node: Node) -> AxisSpaces:
    """Channels of input, weight, output and bias; spatial axes are new spaces, never units.

    With ``groups`` G the input channels are [G, per-group input] and the output channels [G,
    per-group output]; the weight's axes are the output channels and the per-group input (transposed:
    the input channels and the per-group output). Conv group g of the input feeds only conv group g
    of the output, so the G space couples them and a unit of G is a whole conv group; a unit of a
    per-group space is one channel of every conv group. ``groups`` spells G. A depthwise conv (one
    channel per group) couples input channel c to output channel c.
    """
    x, w = node.args[0], node.args[1]
    bias = p.arg(2, "bias")
    packet = node.target.overloadpacket
    transposed = node.args[6] if packet is aten.convolution else packet in CONV_TRANSPOSE
    groups = conv_group_count(node)
    if not p.is_weight(w) or not isinstance(groups, int):
        return no_rule(p, node)
    out_shape = output_shape(p, node)
    out = p.fresh(out_shape)
    dx, dw = p.of(x), p.of(w)
    spatial = f"spatial axis of {node.name}"
    for j in range(2, len(out)):
        p.freeze(out[j], spatial)
        p.freeze(dx[j], spatial)
        p.records.internal.append(dw[j])
    p.same(out[0], dx[0])
    cin, cout = p.shape(x)[1], out_shape[1]
    p.records.flops.append((node.name, [*(dx if transposed else out), *dw[1:]]))
    conv_groups = p.spaces.new(groups)
    per_in = p.spaces.new(cin // groups) if transposed else dw[1]
    per_out = dw[1] if transposed else p.spaces.new(cout // groups)
    p.same(dx[1], p.spaces.compose([conv_groups, per_in]))
    p.same(out[1], p.spaces.compose([conv_groups, per_out]))
    p.same(dw[0], dx[1] if transposed else out[1])
    p.consumed(x, 1)
    p.produced()
    if groups > 1:
        p.constants([conv_groups])
    _broadcast_into(p, bias, [out[1]], [cout])
    return out


@register(aten.scaled_dot_product_attention)
def sdpa(p: Propagation, node: Node) -> AxisSpaces:
    """q (..., Hq, L, E), k (..., Hkv, S, E), v (..., Hkv, S, Ev) -> (..., Hq, L, Ev).
    With Hq = Hkv * n_rep (grouped-query attention), query head h reads KV head h // n_rep."""
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = p.arg(3, "attn_mask")
    dq, dk, dv = p.of(q), p.of(k), p.of(v)
    out = list(dq[:-1]) + [dv[-1]]
    reason = f"per-head width of attention {node.name}"
    p.same(dq[-1], dk[-1])
    p.same(dk[-2], dv[-2])
    for s in (dq[-1], dv[-1]):
        p.freeze(s, reason)
    for i in range(len(dq) - 3):
        p.same(dk[i], dq[i])
        p.same(dv[i], dq[i])
    p.same(dk[-3], dv[-3])
    hq, hkv = p.shape(q)[-3], p.shape(k)[-3]
    if hq == hkv:
        p.same(dq[-3], dk[-3])
    else:
        rep = p.spaces.new(hq // hkv)
        p.same(dq[-3], p.spaces.compose([dk[-3], rep]))
    if p.is_tensor(mask):
        _broadcast_into(p, mask, out[:-1] + [dk[-2]], p.shape(q)[:-1] + [p.shape(k)[-2]])
    p.heads(dq[-3], kv_heads=hkv)
    p.records.flops.append((node.name, [*dq, dk[-2]]))  # q @ k^T
    p.records.flops.append((node.name, [*out, dk[-2]]))  # weights @ v
    return out


@register(aten.embedding)
def embedding(p: Propagation, node: Node) -> AxisSpaces:
    w, idx = node.args[0], node.args[1]
    dw = p.of(w)
    p.freeze(dw[0], f"embedding rows are looked up by index at {node.name}")
    out = list(p.of(idx)) + [dw[1]]
    p.produced()
    return out
