"""Layout ops: views, reshapes, permutes, expands, repeats, splits, concatenations, slices, selects, pads."""

from __future__ import annotations

import torch
from torch.fx import Node

from ...errors import RewriteError
from ..registry import Edit, fixed_size, int_arg, register, size_list, with_arg
from ..spaces import ShapeConflict, as_size
from ..state import AxisSpaces, Propagation, node_arg
from .common import aten, no_rule, output_shape


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
    out = p.regroup(p.of(src), output_shape(p, node))
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
    out_shape = output_shape(p, node)
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
    out_shape = output_shape(p, node)
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
    out_shape = output_shape(p, node)
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
    out_shape = output_shape(p, node)
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
    out_shape = output_shape(p, node)
    out = []
    for i, s in enumerate(spaces):
        if shape[i] == out_shape[i]:
            out.append(s)
        else:
            p.freeze(s, f"padded at {node.name}")
            out.append(p.fresh([out_shape[i]], f"padded at {node.name}")[0])
    return out
