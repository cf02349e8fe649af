"""Graph passes on a freshly exported module: :func:`follow_training_mode` (dropout and batch/instance norm
follow the graph module's ``.train()``/``.eval()``), :func:`drop_whole_slices` (slices that keep a whole axis)
and :func:`functionalize` (in-place ops made out-of-place where nothing else sees the write)."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

aten = torch.ops.aten
TRAINING_FLAG = "fxgradnas_training"
# ops captured in eval mode with a ``train`` argument False that the model's mode would switch on: index of it
MODE_ARGUMENT = {
    aten.dropout.default: 2, aten.feature_dropout.default: 2, aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2, aten.batch_norm.default: 5, aten.instance_norm.default: 5,
}


_INT64_MAX = 2**63 - 1  # export's "to the end" for a slice


class TrainingFlag(nn.Module):
    """Returns its training flag, which ``.train()``/``.eval()`` of the graph module holding it set."""

    def forward(self) -> bool:
        return self.training


def follow_training_mode(gm: torch.fx.GraphModule) -> int:
    """Make the dropout and batch/instance-norm nodes that the eval-mode capture fixed to eval behaviour
    read the graph module's training flag instead, so ``.train()`` switches dropout on and BatchNorm to
    batch statistics (updating its running statistics in place), as in the model; returns how many.
    What the model decided in Python from ``self.training`` (a dropout probability of 0 in eval mode, the
    running-average momentum of a BatchNorm with ``momentum=None``) stays as captured in eval mode."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in MODE_ARGUMENT
             and len(n.args) > MODE_ARGUMENT[n.target] and n.args[MODE_ARGUMENT[n.target]] is False]
    if not nodes:
        return 0
    gm.add_submodule(TRAINING_FLAG, TrainingFlag())
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        flag = gm.graph.call_module(TRAINING_FLAG)
    for n in nodes:
        index = MODE_ARGUMENT[n.target]
        n.args = (*n.args[:index], flag, *n.args[index + 1:])
    gm.recompile()
    return len(nodes)


def drop_whole_slices(gm: torch.fx.GraphModule) -> int:
    """Remove ``slice`` nodes that keep a whole axis (start 0, step 1, end past the size); returns how
    many. Export writes one for every ``x[:, ...]``; each would cost a zero-filled full-size gradient
    in backward and would otherwise count as slicing the axis."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.slice.Tensor:
            continue
        source, dim, start, end, step = (*node.args, *[None] * (5 - len(node.args)))[:5]
        dim = 0 if dim is None else dim
        val = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or start not in (None, 0) or step not in (None, 1):
            continue
        size = val.shape[dim]
        if end is None or (isinstance(end, int) and end >= _INT64_MAX) or (
            isinstance(end, int) and isinstance(size, int) and end >= size
        ):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        gm.recompile()
    return dropped


def mutated_argument(target: Any) -> int | None:
    """Index of the argument an op writes into (``relu_``, ``add_``, ``copy_``, ``out=``), else None."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return i
    return None


def _returns_alias(target: Any) -> bool:
    """Whether an op's result may share memory with an argument (a view, or an in-place op's self)."""
    schema = getattr(target, "_schema", None)
    return schema is None or any(r.alias_info is not None for r in schema.returns)


def _out_of_place(target: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.relu.default`` for ``aten.relu_.default``, ``aten.__and__.Tensor`` for ``__iand__``:
    the same op and overload without the write, when torch has it with the same arguments."""
    name = target.overloadpacket.__name__
    if name.startswith("__i"):
        name = "__" + name[3:]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    else:
        return None
    packet = getattr(torch.ops.aten, name, None)
    functional = getattr(packet, target._overloadname, None) if packet is not None else None
    if functional is None or mutated_argument(functional) is not None:
        return None
    return functional if _signature(functional) == _signature(target) else None


def _signature(op: torch._ops.OpOverload) -> list[tuple[str, bool]]:
    """Argument types and keyword-only flags (names differ: ``dropout_(self)`` vs ``dropout(input)``)."""
    return [(str(a.type), a.kwarg_only) for a in op._schema.arguments]


def _owned(node: Any) -> bool:
    """Whether only ``node`` and its own users can reach its value: a fresh tensor (made by an op that
    returns no alias: not a view, an input, a parameter or a buffer), or a view of an owned tensor that
    no other node reads (``flatten`` before an in-place dropout)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:
        producer = node.args[0]
        return isinstance(producer, torch.fx.Node) and producer.op == "call_function" and not _returns_alias(producer.target)
    if not _returns_alias(node.target):
        return True
    base = node.args[0] if node.args else None
    return mutated_argument(node.target) is None and isinstance(base, torch.fx.Node) and len(base.users) == 1 and _owned(base)


def functionalize(gm: torch.fx.GraphModule) -> int:
    """Replace in-place ops (``relu_``, ``add_``, ``hardswish_``, ``dropout_``, ...) by their
    out-of-place forms where nothing else can see the write, and let the nodes after one read its
    result instead of the tensor it wrote into; returns how many. That holds when the written tensor is
    owned (see :func:`_owned`) and no view of it is taken before the write. Any other write stays, and
    the analysis freezes what it touches. The module computes the same values with plain data flow."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if mutated_argument(node.target) != 0 or (functional := _out_of_place(node.target)) is None:
            continue
        written = node.args[0]
        if not _owned(written):
            continue
        earlier = [u for u in written.users if u is not node and order[u] < order[node]]
        if any(u.op != "call_function" or _returns_alias(u.target) for u in earlier):
            continue
        node.target = functional
        for user in [u for u in written.users if order[u] > order[node]]:
            user.replace_input_with(written, node)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced
