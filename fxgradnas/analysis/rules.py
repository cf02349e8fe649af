"""The op rules: how each ATen op maps its inputs' axes to its outputs' axes.

A rule receives the walk state and the node, declares which axes share a space, records what the
later passes need (frozen spaces, heads, reductions, weight contractions and productions, size
constants) and returns the spaces of the node's output axes (a list per tensor output for ops that
return several). Rules are registered in :mod:`fxgradnas.analysis.registry` together with the
patcher of the size constants they record. An op without a rule freezes every space it touches, and
so does an op whose rule fails: never guess.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from ..errors import RewriteError
from ..export_passes import mutated_argument
from .registry import Edit, aten_overloads, entry_for, fixed_size, int_arg, register, size_list, with_arg
from .spaces import ShapeConflict, as_size, same_size
from .state import AxisSpaces, Propagation, node_arg, op_name

aten = torch.ops.aten


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


VALUE_PRESERVING = {aten.view, aten.reshape, aten._to_copy, aten.to, aten.clone, aten.contiguous, aten.alias,
                    aten.flatten, aten.squeeze, aten.unsqueeze, aten.detach}
"""Ops whose output entries are input entries (or casts of them): an index that names a space stays one."""


VALUE_READERS = {aten.sort, aten.argsort, aten.histc}
"""Ops that read index values in a way the pruned model reproduces with the space's entries renumbered in
order (sorting them; counting them per entry, which :func:`histc` checks)."""
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


def unknown(p: Propagation, node: Node, reason: str) -> Any:
    """Freeze everything the op reads and writes, for ``reason``."""
    for x in p.tensor_inputs(node):
        for s in p.axes.get(x, []):
            p.freeze(s, reason)
    return _fresh_like(p, p.val(node), reason)


def no_rule(p: Propagation, node: Node) -> Any:
    """The fallback of a rule for a form of its op that it does not handle."""
    return unknown(p, node, f"no rule for this form of {op_name(node)} at {node.name}")


def _fresh_like(p: Propagation, value: Any, reason: str | None) -> Any:
    if isinstance(value, torch.Tensor):
        return p.fresh(p.shape_of(value), reason)
    return [_fresh_like(p, v, reason) if isinstance(v, torch.Tensor) else None for v in value]


def _out_shape(p: Propagation, node: Node) -> list:
    """Sizes of the node's output, or a list of them for ops that return several tensors."""
    value = p.val(node)
    return p.shape_of(value) if isinstance(value, torch.Tensor) else [p.shape_of(v) for v in value]


# --- elementwise ---------------------------------------------------------------------------------
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
        depthwise = p.shape(inputs[0])[1] == p.shape(node)[1] == _conv_groups(node)
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


# --- layout ----------------------------------------------------------------------------------------
@register(aten.view, aten.reshape, patch=size_list(1, "size"))
def reshape(p: Propagation, node: Node) -> AxisSpaces:
    """Row-major reshapes: output axes regroup the input's leaves; the size list spells them."""
    out = regroup(p, node)
    p.constants(out)
    return out


@register(aten.unflatten, patch=size_list(2, "sizes"))
def unflatten(p: Propagation, node: Node) -> AxisSpaces:
    """Like a reshape; the sizes list spells the axes that replace ``dim``."""
    out = regroup(p, node)
    sizes = node.args[2]
    dim = node.args[1] % (len(out) - len(sizes) + 1)
    p.constants(out[dim:dim + len(sizes)])
    return out


@register(aten.view_as, aten.reshape_as, aten.flatten, aten.squeeze, aten.unsqueeze)
def regroup(p: Propagation, node: Node) -> AxisSpaces:
    """Row-major reshapes without size constants (squeeze/unsqueeze included)."""
    src = node.args[0]
    out = p.regroup(p.of(src), _out_shape(p, node))
    if p.is_weight(src):
        p.weightlike.add(node)
    return out


@register(aten.transpose, aten.swapaxes, aten.t, aten.permute, aten.movedim, aten.numpy_T)
def permute(p: Propagation, node: Node) -> AxisSpaces:
    src = node.args[0]
    spaces = p.of(src)
    n = len(spaces)
    packet = node.target.overloadpacket
    if packet is aten.permute:
        order = [d % n for d in node.args[1]]
    elif packet is aten.movedim:
        order = [int(i) for i in torch.arange(n).movedim(node.args[1], node.args[2]).tolist()]
    elif packet in (aten.t, aten.numpy_T):
        order = list(reversed(range(n)))
    else:
        a, b = node.args[1] % n, node.args[2] % n
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
    if p.is_weight(src):
        p.weightlike.add(node)
    return [spaces[i] for i in order]


@register(aten.expand, aten.broadcast_to, patch=size_list(1, "size"))
def expand(p: Propagation, node: Node) -> AxisSpaces:
    """Axes of size 1 grown to n become new spaces (e.g. the queries-per-KV axis of GQA); the size
    list spells every output axis."""
    out = broadcast(p, node)
    p.constants(out)
    return out


@register(aten.expand_as)
def broadcast(p: Propagation, node: Node) -> AxisSpaces:
    src = node.args[0]
    spaces, shape = p.of(src), p.shape(src)
    out_shape = _out_shape(p, node)
    offset = len(out_shape) - len(spaces)
    out = []
    for j, size in enumerate(out_shape):
        i = j - offset
        out.append(spaces[i] if i >= 0 and shape[i] == size else p.spaces.new(size))
    if p.is_weight(src):
        p.weightlike.add(node)
    return out


@register(aten.repeat, patch=size_list(1, "repeats"))
def repeat(p: Propagation, node: Node) -> AxisSpaces:
    """Axis j becomes [tile j, input axis]; the repeats list spells the tiles. A count that is a
    SymInt (a dynamic size) makes a data-sized tile."""
    src, repeats = node.args[0], list(node.args[1])
    spaces = p.of(src)
    offset = len(repeats) - len(spaces)
    out, tiles = [], []
    for j, r in enumerate(repeats):
        inner = spaces[j - offset] if j >= offset else None
        tile = p.spaces.new(as_size(r.meta["val"]) if isinstance(r, Node) else r)
        tiles.append(tile)
        out.append(p.spaces.compose([tile] + ([inner] if inner is not None else [])))
    p.constants(tiles)
    return out


def _patch_repeat_interleave(node: Node, index: int, sizes: list[int | None]) -> list[Edit]:
    """Constant 0 is ``repeats``; constant 1, when given, ``output_size``."""
    if index == 0:
        return int_arg(1, "repeats")(node, index, sizes)
    return [with_arg(node, None, "output_size", fixed_size(node, sizes))]


@register(aten.repeat_interleave.self_int, patch=_patch_repeat_interleave)
def repeat_interleave(p: Propagation, node: Node) -> AxisSpaces:
    """``repeat_interleave(x, n, dim)``: axis ``dim`` becomes [axis, n] (grouped-query KV heads)."""
    src, repeats = node.args[0], p.arg(1, "repeats")
    dim = p.arg(2, "dim")
    if not isinstance(repeats, int) or dim is None:
        return no_rule(p, node)
    spaces = list(p.of(src))
    dim %= len(spaces)
    rep = p.spaces.new(repeats)
    spaces[dim] = p.spaces.compose([spaces[dim], rep])
    p.constants([rep, spaces[dim]] if node.kwargs.get("output_size") is not None else [rep])
    return spaces


def _patch_split(node: Node, index: int, sizes: list[int | None]) -> list[Edit]:
    """The split size: an int, or a list of equal sizes whose every entry is patched."""
    value = node.args[1]
    if not isinstance(value, (list, tuple)):
        return int_arg(1, "split_size")(node, index, sizes)
    if not all(isinstance(v, int) for v in value):
        raise RewriteError(f"{node.name}: split sizes {value!r} are not all constants")
    return [with_arg(node, 1, "split_sizes", [fixed_size(node, sizes)] * len(value))]


@register(aten.split, aten.unsafe_split, patch=_patch_split)
def split(p: Propagation, node: Node) -> list[AxisSpaces]:
    """Equal pieces: the axis becomes [pieces, piece] and every output's axis is the piece space,
    which the split size spells."""
    result, piece = _equal_pieces(p, node, p.arg(2, "dim", 0))
    if piece is not None:
        p.constants([piece])
    return result


@register(aten.split_with_sizes, patch=size_list(1, "split_sizes"))
def split_with_sizes(p: Propagation, node: Node) -> list[AxisSpaces]:
    """Equal pieces as :func:`split` does; unequal ones (a fused projection's q, k and v of different
    widths) cut the axis into consecutive parts, each output's axis its own part. Entry i of the sizes
    spells the space of output i."""
    src, dim = node.args[0], p.arg(2, "dim", 0)
    spaces = p.of(src)
    dim %= len(spaces)
    sizes = [as_size(v.shape[dim]) for v in p.val(node)]
    if len(set(sizes)) > 1 and all(isinstance(n, int) and n > 0 for n in sizes):
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        try:
            parts = [p.spaces.cut(spaces[dim], a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
        except ShapeConflict as exc:
            p.freeze(spaces[dim], f"split into pieces at {node.name}: {exc}")
        else:
            p.constants(parts)
            if p.is_weight(src):
                p.weightlike.add(node)
            return [[part if i == dim else t for i, t in enumerate(spaces)] for part in parts]
    result, piece = _equal_pieces(p, node, dim)
    if piece is not None:
        p.constants([piece] * len(sizes))
    return result


@register(aten.chunk)
def chunk(p: Propagation, node: Node) -> list[AxisSpaces]:
    """Equal pieces; the piece count is given, so no size constant changes."""
    return _equal_pieces(p, node, p.arg(2, "dim", 0))[0]


def _equal_pieces(p: Propagation, node: Node, dim: int) -> tuple[list[AxisSpaces], int | None]:
    """Each output's axis ``dim`` and, when the pieces are equal, the piece space (else the axis is
    frozen)."""
    src = node.args[0]
    spaces = p.of(src)
    dim %= len(spaces)
    sizes = [as_size(v.shape[dim]) for v in p.val(node)]
    whole = spaces[dim]
    piece = None
    if p.spaces.is_data(whole) or len(set(sizes)) != 1:
        reason = f"split into unequal pieces at {node.name}"
        p.freeze(whole, reason)
        piece_spaces = [p.spaces.new(s) for s in sizes]
        for s in piece_spaces:
            p.freeze(s, reason)
    else:
        count, piece = p.spaces.new(len(sizes)), p.spaces.new(sizes[0])
        p.freeze(count, f"index of the pieces of split {node.name}")
        p.same(whole, p.spaces.compose([count, piece]))
        piece_spaces = [piece] * len(sizes)
    if p.is_weight(src):
        p.weightlike.add(node)
    return [[s if i == dim else t for i, t in enumerate(spaces)] for s in piece_spaces], piece


@register(aten.unbind)
def unbind(p: Propagation, node: Node) -> list[AxisSpaces]:
    src = node.args[0]
    spaces = p.of(src)
    dim = p.arg(1, "dim", 0) % len(spaces)
    p.freeze(spaces[dim], f"unbound (one tensor per index) at {node.name}")
    return [[s for i, s in enumerate(spaces) if i != dim] for _ in p.val(node)]


@register(aten.cat, aten.concat, aten.concatenate)
def cat(p: Propagation, node: Node) -> AxisSpaces:
    """Along a constant-sized axis the output axis is the concatenation of the inputs' axes (DenseNet's
    running features, Inception's and SqueezeNet's branches): each input keeps its own units, as the parts
    of a fused projection do. A data-sized concatenation (a class token before the patches of a dynamic
    sequence) freezes the axis."""
    tensors = [t for t in node.args[0] if p.is_tensor(t) and p.val(t).dim() > 0]
    out_shape = _out_shape(p, node)
    dim = p.arg(1, "dim", 0) % len(out_shape)
    out = p.fresh(out_shape)
    for t in tensors:
        for i, s in enumerate(p.of(t)):
            if i != dim:
                p.same(out[i], s)
    sizes = [p.shape(t)[dim] for t in tensors]
    if all(isinstance(n, int) for n in sizes) and [n for n in sizes if n > 0]:
        p.same(out[dim], p.spaces.concat([p.of(t)[dim] for t, n in zip(tensors, sizes, strict=True) if n > 0]))
        if tensors and all(p.is_weight(t) for t in tensors):
            p.weightlike.add(node)  # a fused weight built at run time: its rows are the parts' rows
        return out
    reason = f"concatenated along a data-sized axis at {node.name}"
    p.freeze(out[dim], reason)
    for t in tensors:
        p.freeze(p.of(t)[dim], reason)
    return out


@register(aten.stack)
def stack(p: Propagation, node: Node) -> AxisSpaces:
    tensors = list(node.args[0])
    out_shape = _out_shape(p, node)
    dim = p.arg(1, "dim", 0) % len(out_shape)
    out = p.fresh(out_shape)
    p.freeze(out[dim], f"stacked at {node.name}")
    for t in tensors:
        for i, s in enumerate(p.of(t)):
            p.same(out[i if i < dim else i + 1], s)
    return out


def _patch_slice(node: Node, index: int, sizes: list[int | None]) -> list[Edit]:
    """Constant 0 spells the start, 1 the end: the entries before the bound, or, for a bound counted
    from the end (negative), the entries from the bound on."""
    arg, keyword = (2, "start") if index == 0 else (3, "end")
    value = node_arg(node, arg, keyword)
    if not isinstance(value, int):
        raise RewriteError(f"{node.name}: the {keyword} is spelled by {value!r}, which fxgradnas cannot patch")
    size = fixed_size(node, sizes)
    return [with_arg(node, arg, keyword, -size if value < 0 else size)]


def _bound_space(p: Propagation, space: int, bound: int, from_end: bool) -> int:
    """The space a constant bound spells: the entries before it, or (counted from the end) from it on;
    a trivial space for a bound no pruning moves (the start at 0)."""
    size = int(p.spaces.size(space))
    if from_end:
        return p.spaces.cut(space, bound, size)
    return p.spaces.cut(space, 0, bound) if bound > 0 else p.spaces.new(1)


@register(aten.slice, patch=_patch_slice)
def slice_(p: Propagation, node: Node) -> AxisSpaces:
    """A slice of constant bounds (step 1) of a constant-sized axis is a part of it (a fused projection's
    q, k or v): the axis is cut there (:meth:`~fxgradnas.analysis.spaces.SpaceGraph.cut`), and the start and
    end spell the parts before them (see :func:`_patch_slice`); an end at or past the last entry stays.
    Any other slice freezes the axis."""
    src = node.args[0]
    spaces, shape = p.of(src), p.shape(src)
    out_shape = _out_shape(p, node)
    dim = p.arg(1, "dim", 0) % len(spaces)
    start, end, step = p.arg(2, "start"), p.arg(3, "end"), p.arg(4, "step", 1)
    out = list(spaces)
    if p.is_weight(src):
        p.weightlike.add(node)
    if out_shape[dim] == shape[dim] and step == 1:
        return out
    size = shape[dim]
    if (isinstance(size, int) and step == 1 and isinstance(start, (int, type(None)))
            and isinstance(end, (int, type(None))) and out_shape[dim] != 0):
        first = 0 if start is None else max(start + size, 0) if start < 0 else min(start, size)
        last = size if end is None else max(end + size, 0) if end < 0 else min(end, size)
        try:
            out[dim] = p.spaces.cut(spaces[dim], first, last)
            p.constants([_bound_space(p, spaces[dim], first, start is not None and start < 0),
                         p.spaces.new(1) if last == size else _bound_space(p, spaces[dim], last, end < 0)])
            return out
        except ShapeConflict as exc:
            reason = f"sliced at {node.name}: {exc}"
    else:
        reason = f"sliced at {node.name}"
    p.freeze(spaces[dim], reason)
    out[dim] = p.fresh([out_shape[dim]], reason)[0]
    return out


def _patch_select(node: Node, index: int, sizes: list[int | None]) -> list[Edit]:
    """Constant 0 spells the index: the entries before it, or, for an index counted from the end
    (negative), the entries from it on."""
    value = node_arg(node, 2, "index")
    if not isinstance(value, int):
        raise RewriteError(f"{node.name}: the index is spelled by {value!r}, which fxgradnas cannot patch")
    size = fixed_size(node, sizes)
    return [with_arg(node, 2, "index", -size if value < 0 else size)]


@register(aten.select, patch=_patch_select)
def select(p: Propagation, node: Node) -> AxisSpaces:
    """An integer index of a constant-sized axis reads a one-entry part of it, like a slice of length 1
    (Falcon's ``grouped[..., -2, :]`` picks each KV group's key): the axis is cut there, the picked entry
    leaves the output, and the index spells the part before it (see :func:`_patch_select`). An index of a
    data-sized axis (a token position) freezes the axis."""
    src = node.args[0]
    spaces = list(p.of(src))
    dim = p.arg(1, "dim") % len(spaces)
    index = p.arg(2, "index")
    size = p.shape(src)[dim]
    if p.is_weight(src):
        p.weightlike.add(node)
    reason = f"indexed by select at {node.name}"
    if isinstance(size, int) and isinstance(index, int) and -size <= index < size:
        first = index + size if index < 0 else index
        try:
            p.spaces.cut(spaces[dim], first, first + 1)
            p.constants([_bound_space(p, spaces[dim], first, index < 0)])
            del spaces[dim]
            return spaces
        except ShapeConflict as exc:
            reason = f"{reason}: {exc}"
    p.freeze(spaces[dim], reason)
    del spaces[dim]
    return spaces


@register(aten.constant_pad_nd, aten.pad)
def pad(p: Propagation, node: Node) -> AxisSpaces:
    src = node.args[0]
    spaces, shape = p.of(src), p.shape(src)
    out_shape = _out_shape(p, node)
    out = []
    for i, s in enumerate(spaces):
        if shape[i] == out_shape[i]:
            out.append(s)
        else:
            p.freeze(s, f"padded at {node.name}")
            out.append(p.fresh([out_shape[i]], f"padded at {node.name}")[0])
    return out


# --- factories -------------------------------------------------------------------------------------
@register(aten.arange, aten.scalar_tensor, aten.rand, aten.randn, aten.tensor, aten.randint, aten.eye, aten.linspace)
def factory(p: Propagation, node: Node) -> AxisSpaces:
    """Entries that depend on their position (``arange``: ALiBi's per-head slopes): the axes are frozen."""
    return p.fresh(_out_shape(p, node), f"created with a fixed shape at {node.name}")


def _filled(p: Propagation, node: Node) -> AxisSpaces:
    """One value in every entry (T5's zero position bias of cross-attention, one per head): any entries can
    go, so the sizes are size constants the rewrite patches."""
    out = p.fresh(_out_shape(p, node))
    p.constants(out)
    return out


register(aten.zeros, aten.ones, aten.empty, aten.full, patch=size_list(0, "size"))(_filled)
register(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, patch=size_list(1, "size"))(_filled)


# --- contractions ----------------------------------------------------------------------------------
def _contract(p: Propagation, node: Node, a: Node, b: Node, out: AxisSpaces, a_axis: int | list[int],
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
    out_shape = _out_shape(p, node)
    if p.val(a).dim() < 2 or p.val(b).dim() < 2:
        return no_rule(p, node)
    out = p.fresh(out_shape)
    a_axis, b_axis, out_a, out_b = _matmul_maps(p.val(a).dim(), p.val(b).dim(), len(out_shape))
    out_a = {j: i for j, i in out_a.items() if p.shape(a)[i] != 1 or out_shape[j] == 1}
    out_b = {j: i for j, i in out_b.items() if p.shape(b)[i] != 1 or out_shape[j] == 1}
    _contract(p, node, a, b, out, a_axis, b_axis, out_a, out_b)
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
    letters of one operand and the output are its free axes (as a contraction of :func:`_contract`). One
    operand: a permutation. Other forms (sums over a letter of one operand, diagonals, three operands)
    have no rule."""
    equation, operands = node.args[0], list(node.args[1])
    parsed = _einsum_letters(equation, [p.val(x).dim() for x in operands]) if isinstance(equation, str) else None
    if parsed is None or len(operands) not in (1, 2):
        return no_rule(p, node)
    letters, output = parsed
    out_shape = _out_shape(p, node)
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
    _contract(p, node, a, b, out, [la.index(c) for c in contracted], [lb.index(c) for c in contracted], out_a, out_b)
    return out


@register(aten.addmm, aten.baddbmm)
def addmm(p: Propagation, node: Node) -> AxisSpaces:
    bias, a, b = node.args[0], node.args[1], node.args[2]
    out_shape = _out_shape(p, node)
    out = p.fresh(out_shape)
    a_axis, b_axis, out_a, out_b = _matmul_maps(len(out_shape), len(out_shape), len(out_shape))
    _contract(p, node, a, b, out, a_axis, b_axis, out_a, out_b)
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
    out_shape = _out_shape(p, node)
    out = p.fresh(out_shape)
    n = len(out_shape)
    if p.val(w).dim() != 2:
        return no_rule(p, node)
    _contract(p, node, x, w, out, -1, 1, {j: j for j in range(n - 1)}, {n - 1: 0})
    _broadcast_into(p, bias, out, out_shape)
    return out


def _groups_index(node: Node) -> int:
    """Where a convolution's ``groups`` is: argument 8 of ``convolution``, 6 of the others."""
    return 8 if node.target.overloadpacket is aten.convolution else 6


def _patch_conv_groups(node: Node, index: int, sizes: list[int | None]) -> list[Edit]:
    return int_arg(_groups_index(node), "groups")(node, index, sizes)


CONV_TRANSPOSE = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
CONVOLUTIONS = (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, *CONV_TRANSPOSE)


def _conv_groups(node: Node) -> Any:
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
    groups = _conv_groups(node)
    if not p.is_weight(w) or not isinstance(groups, int):
        return no_rule(p, node)
    out_shape = _out_shape(p, node)
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


# --- normalisation and reductions ------------------------------------------------------------------
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
        return [list(spaces)] + _fresh_like(p, list(p.val(node))[1:], None)
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
        return [list(spaces)] + _fresh_like(p, list(p.val(node))[1:], None)
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


# --- routing (mixture of experts) ------------------------------------------------------------------
ROUTER_PATH = {aten.to, aten._to_copy, aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}
"""Ops that may lie between a router's logits and its top-k: each keeps a logit at -inf the lowest (and a
softmax gives it probability 0), so -inf logits are never chosen while k or more are finite."""


@register(aten.topk)
def topk(p: Propagation, node: Node) -> list[AxisSpaces]:
    """(values, indices) of the ``k`` largest entries along ``dim``: every output entry depends on the
    whole axis (a reduction over it); the ``k`` axis is a new space, fixed by the constant ``k``. The
    indices name entries of the ``dim`` space (``Propagation.values``).

    A top-k over the logits of a weight (a mixture-of-experts router: linear -> [softmax] -> top-k) makes
    that axis an *experts* space: its mask site is the logits, where a removed expert's logit is -inf,
    and a plan keeps at least ``k`` experts."""
    src = node.args[0]
    spaces = list(p.of(src))
    dim = p.arg(2, "dim", -1) % len(spaces)
    experts, k = spaces[dim], p.arg(1, "k")
    p.reduce(experts, "topk")
    p.values[node] = [None, experts]
    router = _router_logits(p, src, experts)
    if not p.arg(3, "largest", True):
        router = f"a top-k of the smallest entries at {node.name}, which would pick a removed expert's -inf logit"
    if isinstance(router, str):
        p.freeze(experts, router)
    elif isinstance(k, int):
        root = p.spaces.find(experts)
        axis = next(i for i, s in enumerate(p.of(router)) if p.spaces.find(s) == root)
        p.records.experts.append((router.name, axis, experts))
        p.records.min_units.append((experts, k))
    spaces[dim] = p.fresh([_out_shape(p, node)[0][dim]], f"the k of top-k at {node.name}")[0]
    return [spaces, list(spaces)]


def _router_logits(p: Propagation, x: Node, space: int) -> Node | str:
    """The node that produces ``x``'s axis ``space`` from a weight through :data:`ROUTER_PATH` ops only (the
    router's logits), or why there is none."""
    node = x
    while p.origin.get(node) is not node:
        packet = getattr(node.target, "overloadpacket", None)
        if node.op != "call_function" or packet not in ROUTER_PATH:
            return f"top-k over the result of {op_name(node)} at {node.name}, not over a router's logits"
        node = node.args[0]
    if node.target is not aten.linear.default or not p.is_weight(node.args[1]):
        return f"top-k over the result of {op_name(node)} at {node.name}, not over a router's logits"
    root = p.spaces.find(space)
    if root not in [p.spaces.find(s) for s in p.of(node)]:
        return f"top-k over an axis that {node.name} does not produce"
    return node


@register(aten.sort, aten.argsort)
def sort(p: Propagation, node: Node) -> Any:
    """Sorted values (and the permutation) along ``dim``: a reduction over that axis, and the output's axis
    is a new space of the same size (entry i of the output is not entry i of the input: tokens sorted by
    expert are not in batch order)."""
    spaces = list(p.of(node.args[0]))
    dim = p.arg(1, "dim", -1)
    if not isinstance(dim, int):  # sort.stable(self, *, stable, dim=-1, descending=False)
        dim = node.kwargs.get("dim", -1)
    dim %= len(spaces)
    p.reduce(spaces[dim], "sort")
    spaces[dim] = p.fresh([p.spaces.size(spaces[dim])], f"sorted at {node.name} (positions, not units)")[0]
    if isinstance(p.val(node), (tuple, list)):
        if node.args[0] in p.values:  # sorted indices still name the same space
            p.values[node] = [p.values[node.args[0]], None]
        return [list(spaces), list(spaces)]
    return list(spaces)


def _patch_histc(node: Node, index: int, sizes: list[int | None]) -> list[Edit]:
    """The bin count (argument 1) and ``max`` (argument 3, the last bin: count - 1) of ``histc(ids, n, 0, n - 1)``."""
    n = fixed_size(node, sizes)
    args = list(node.args) + [None] * (4 - len(node.args))
    args[1], args[2], args[3] = n, 0, n - 1
    return [(node, tuple(args), {k: v for k, v in node.kwargs.items() if k not in ("bins", "min", "max")})]


@register(aten.histc, patch=_patch_histc)
def histc(p: Propagation, node: Node) -> AxisSpaces:
    """A histogram of the input's values: every input axis is summed over. With one bin per entry of a space
    the input's values name (``histc(expert_ids, n, 0, n - 1)``: tokens per expert) the bins are that space,
    which the bin count and ``max`` spell; otherwise the bins are a new space of fixed count."""
    src = node.args[0]
    for s in p.of(src):
        p.reduce(s, "histc")
    named = p.values.get(src)
    bins, low, high = p.arg(1, "bins", 100), p.arg(2, "min", 0), p.arg(3, "max", 0)
    if named is not None and not isinstance(named, list) and p.spaces.size(named) == bins and low == 0 \
            and high == bins - 1:
        p.constants([named])
        p.records.routed.append(named)
        return [named]
    if named is not None:
        p.freeze(named, f"its indices are counted by histogram {node.name} with other bins than one per entry")
    return p.fresh(_out_shape(p, node), f"bins of the histogram {node.name} (a fixed count)")


def _one_index(p: Propagation, node: Node) -> tuple[int, Node] | None:
    """The axis and the tensor of an advanced index with exactly one integer index tensor."""
    used = [(d, t) for d, t in enumerate(node.args[1]) if t is not None]
    if len(used) != 1 or not p.is_tensor(used[0][1]) or p.val(used[0][1]).dtype.is_floating_point:
        return None
    if p.val(used[0][1]).dtype == torch.bool:
        return None  # a boolean mask selects a data-dependent number of entries
    return used[0]


def _constant_tensor(p: Propagation, x: Any) -> torch.Tensor | None:
    """The value of ``x`` when it is a constant of the graph (a tensor that is no parameter or buffer of
    the model, as ``x[..., [-2]]`` lifts its list), possibly copied."""
    while isinstance(x, Node) and getattr(x.target, "overloadpacket", None) in (aten.lift_fresh_copy, aten.clone,
                                                                              aten.detach, aten.alias):
        x = x.args[0]
    if not isinstance(x, Node) or x.op != "get_attr":
        return None
    value = operator.attrgetter(x.target)(p.gm)
    return value if isinstance(value, torch.Tensor) and not p.captured.names_of(value) else None


def _index_run(p: Propagation, space: int, idx: Node) -> int | None:
    """The part of ``space`` that a constant index tensor picks when its entries are consecutive (all
    counted from the start or all from the end), else None. A constant tensor is not rewritten, so the
    picked entries and those before them (counted from the end: those from the first picked on) are frozen."""
    values = _constant_tensor(p, idx)
    size = p.spaces.size(space)
    if values is None or values.dim() != 1 or not values.numel() or not isinstance(size, int):
        return None
    entries = values.tolist()
    from_end = entries[0] < 0
    if any((v < 0) != from_end or not -size <= v < size for v in entries):
        return None
    first = entries[0] + size if from_end else entries[0]
    if entries != list(range(entries[0], entries[0] + len(entries))):
        return None
    try:
        piece = p.spaces.cut(space, first, first + len(entries))
        fixed = p.spaces.cut(space, first, size) if from_end else p.spaces.cut(space, 0, first + len(entries))
        p.freeze(fixed, f"indexed by a constant tensor at {p.where()}, whose entries pruning would move")
    except ShapeConflict:
        return None
    return piece


@register(aten.index.Tensor)
def index(p: Propagation, node: Node) -> AxisSpaces:
    """``x[..., idx, ...]`` with one integer index tensor on axis ``d``: the output has the index's
    axes in place of axis ``d``, which is frozen (its entries are picked by value); the other axes pass
    through. Gathering tokens by expert (mixture-of-experts dispatch) leaves the feature axes intact.
    A constant 1-D index of consecutive entries (``qkv[..., [-2], :]``) is a slice: axis ``d`` is cut
    there and the output's axis is that part (see :func:`_index_run`)."""
    found = _one_index(p, node)
    if found is None:
        return no_rule(p, node)
    d, idx = found
    spaces = p.of(node.args[0])
    piece = _index_run(p, spaces[d], idx)
    if piece is not None:
        return list(spaces[:d]) + [piece] + list(spaces[d + 1:])
    p.freeze(spaces[d], f"indexed by a tensor at {node.name}")
    return list(spaces[:d]) + list(p.of(idx)) + list(spaces[d + 1:])


@register(aten.gather)
def gather(p: Propagation, node: Node) -> AxisSpaces:
    """``gather(x, d, idx)``: the output has the index's shape; axis ``d`` of ``x`` is read by value (frozen)
    and the output's axis ``d`` is the index's; on every other axis where the index spans all of ``x``,
    output, index and ``x`` share the axis (DeBERTa's relative-position terms gathered per query); an axis
    the index covers only in part is frozen on ``x``."""
    x, idx = node.args[0], node.args[2]
    spaces, shape = p.of(x), p.shape(x)
    d = node.args[1] % max(len(spaces), 1)
    out = list(p.of(idx))
    reason = f"gathered by index at {node.name}"
    p.freeze(spaces[d], reason)
    for i, s in enumerate(spaces):
        if i == d:
            continue
        if same_size(p.shape(idx)[i], shape[i]):
            p.same(out[i], s)
        else:
            p.freeze(s, reason)
            p.freeze(out[i], reason)
    return out


@register(aten.index_put)
def index_put(p: Propagation, node: Node) -> AxisSpaces:
    """``x[..., idx, ...] = values`` (out of place) with one integer index tensor on axis ``d``: the
    output has ``x``'s axes; axis ``d`` and the values' axes that the index spans are frozen, and the
    values' other axes broadcast into ``x``'s."""
    found = _one_index(p, node)
    values = node.args[2]
    if found is None or not p.is_tensor(values):
        return no_rule(p, node)
    d, idx = found
    spaces, shape = p.of(node.args[0]), p.shape(node.args[0])
    reason = f"written by index at {node.name}"
    p.freeze(spaces[d], reason)
    target = list(spaces[:d]) + p.fresh(p.shape(idx), reason) + list(spaces[d + 1:])
    target_shape = list(shape[:d]) + p.shape(idx) + list(shape[d + 1:])
    vs, vshape = p.of(values), p.shape(values)
    offset = len(target) - len(vs)
    for i, s in enumerate(vs):
        j = offset + i
        if vshape[i] == 1 and target_shape[j] != 1:
            continue
        if d <= j < d + len(p.shape(idx)):
            p.freeze(s, reason)
        else:
            p.same(target[j], s)
    return list(spaces)


@register(aten._grouped_mm, "transformers::grouped_mm_fallback")
def grouped_mm(p: Propagation, node: Node) -> AxisSpaces:
    """``(S, K) x (E, K, N) -> (S, N)`` with ``offs`` (E,): row block ``e`` of the input is multiplied by
    expert ``e``'s matrix (mixture-of-experts experts stored stacked). Every row meets one expert, so the
    contraction axis K and the output axis N are the experts' common axes (pruning unit ``n`` removes
    row/column ``n`` of every expert), and the expert axis E is frozen: which rows meet which expert is
    decided by the router's values. When the offsets are the cumulative counts of a routing histogram
    (:func:`histc`) the expert axis is the router's experts space (a removed expert's rows are none),
    else it is frozen."""
    x, w, offs = node.args[0], node.args[1], p.arg(2, "offs")
    bias = p.arg(3, "bias")
    if (not p.is_weight(w) or p.val(x).dim() != 2 or p.val(w).dim() != 3 or not p.is_tensor(offs)
            or bias is not None):
        return no_rule(p, node)
    out = p.fresh(_out_shape(p, node))
    _contract(p, node, x, w, out, 1, 1, {0: 0}, {1: 2})
    experts = p.of(w)[0]
    routed = {p.spaces.find(s) for s in p.records.routed}
    counted = p.spaces.find(p.of(offs)[0]) in routed  # offsets from a histogram of the router's expert ids
    p.same(experts, p.of(offs)[0])
    if not counted:
        p.freeze(experts, f"experts are chosen per row by offsets of {node.name} that no router's histogram counts")
    return out
