"""Routing (mixture of experts): top-k, sorting and counting expert ids, indexing, grouped matmuls."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from ..registry import Edit, fixed_size, register
from ..spaces import ShapeConflict, same_size
from ..state import AxisSpaces, Propagation, op_name
from .common import aten, no_rule, output_shape
from .contractions import contract

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
    spaces[dim] = p.fresh([output_shape(p, node)[0][dim]], f"the k of top-k at {node.name}")[0]
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
    return p.fresh(output_shape(p, node), f"bins of the histogram {node.name} (a fixed count)")


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
    out = p.fresh(output_shape(p, node))
    contract(p, node, x, w, out, 1, 1, {0: 0}, {1: 2})
    experts = p.of(w)[0]
    routed = {p.spaces.find(s) for s in p.records.routed}
    counted = p.spaces.find(p.of(offs)[0]) in routed  # offsets from a histogram of the router's expert ids
    p.same(experts, p.of(offs)[0])
    if not counted:
        p.freeze(experts, f"experts are chosen per row by offsets of {node.name} that no router's histogram counts")
    return out
