"""Residual blocks: whole layers as pruning units (a decoder or encoder layer, a ResNet block whose input and
output widths match).

A block is the outermost module on a residual add's ``nn_module_stack`` that is an entry of an
``nn.ModuleList`` or ``nn.Sequential`` and not such a container itself (``model.layers.3``, ``layer2.1``; not
ConvNeXt's stage ``features.1``, whose entries are the blocks). Its nodes are those traced inside it. Its
*stream path* runs back from the one value it hands on to the value it reads from the residual stream: through
its residual adds (``stream + branch``, the branch computed from the stream inside the block) and through ops
on the stream that read nothing else and hold no parameter (a cast; ResNet's ReLU after the add, which stays
when the block goes). A unit's mask multiplies the branch of each of its adds, so at 0 every add passes its
stream operand on: the block removed, and what only it computes is dead.

What cannot be removed that way is frozen with the reason: a stream that passes through an op with parameters
(a post-norm layer, BERT's ``LayerNorm(x + f(x))``), a shortcut that is not the identity (a downsampling
projection), a value of the block read after it (T5's first layer hands its position bias on), a parameter of
it that is also read elsewhere.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.fx import Graph, Node

from ..export_passes import mutated_argument
from .state import Propagation, op_name

aten = torch.ops.aten
CONTAINERS = (nn.ModuleList, nn.Sequential)
IDENTITY = {aten._to_copy, aten.to, aten.clone, aten.alias, aten.contiguous, aten.detach, aten.dropout}
"""Ops that hand a value on unchanged when its dtype and shape stay (dropout: in eval mode)."""
RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze}
"""Row-major reshapes: on a stream path that ends in the shape it started with, together the identity."""

Need = frozenset | None
"""What keeps a node's value needed: None, whatever is kept; else the units of which any one kept keeps it (an
empty set: nothing reads it)."""


@dataclass(frozen=True)
class Block:
    """A residual block: its module ``path``, its residual adds as (add, stream operand, branch operand) in
    graph order, the ops on its stream path that stay when it is removed and are not together the identity
    (``stays``: ResNet's ReLU; not casts or reshapes that undo each other), the parameters under its module
    (``numel``), and why it cannot be removed (``reason``; '' when it can)."""

    path: str
    adds: tuple[tuple[str, str, str], ...] = ()
    stays: tuple[str, ...] = ()
    numel: int = 0
    reason: str = ""


def needs(graph: Graph, branches: dict[str, tuple[str, Hashable]]) -> dict[Node, Need]:
    """The :data:`Need` of every node of ``graph``. The output and ops that write into a tensor are needed
    whatever is kept; assertions and other nodes nothing reads keep nothing. ``branches``: residual add ->
    (its branch operand, the unit whose removal drops that operand: the add then passes its stream on)."""
    need: dict[Node, Need] = {}
    for node in reversed(graph.nodes):
        if node.op == "output" or (node.op == "call_function" and mutated_argument(node.target) is not None):
            need[node] = None
            continue
        found: set | None = set()
        for user in node.users:
            edge = need[user]
            branch = branches.get(user.name)
            if branch is not None and branch[0] == node.name and (edge is None or branch[1] in edge):
                edge = frozenset([branch[1]])  # needed while the add is and its unit is kept
            if edge is None:
                found = None
                break
            found |= edge
        need[node] = None if found is None else frozenset(found)
    return need


def find_blocks(p: Propagation) -> list[Block]:
    """Every block that writes into a residual stream, in graph order; those that cannot be removed have a
    ``reason``."""
    nodes = list(p.gm.graph.nodes)
    residual = {name for _, name in p.records.residual}
    candidates: dict[str, None] = {}
    for n in nodes:
        if n.name in residual and (path := _block_path(p.captured.model, n)) is not None:
            candidates[path] = None
    stacks = {n: {path for path, _ in (n.meta.get("nn_module_stack") or {}).values()} for n in nodes}
    blocks = []
    for path in candidates:
        inside = {n for n in nodes if path in stacks[n]}
        numel = sum(t.numel() for t in p.captured.model.get_submodule(path).parameters())
        block = _stream_path(p, path, inside, residual)
        blocks.append(replace(block, numel=numel))
    while True:  # freezing a block changes what the others' nodes are needed for
        removable = [b for b in blocks if not b.reason]
        need = needs(p.gm.graph, {add: (branch, b.path) for b in removable for add, _, branch in b.adds})
        frozen = {b.path: why for b in removable if (why := _kept_alive(p, b, need))}
        if not frozen:
            return blocks
        blocks = [replace(b, reason=frozen[b.path]) if b.path in frozen else b for b in blocks]


def _block_path(model: nn.Module, node: Node) -> str | None:
    """The outermost module on the node's stack that is an entry of a ModuleList or Sequential and not one
    itself, or None."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        try:
            module, holder = model.get_submodule(path), model.get_submodule(path.rpartition(".")[0])
        except AttributeError:
            continue
        if path and isinstance(holder, CONTAINERS) and not isinstance(module, CONTAINERS):
            return path
    return None


def _carries_stream(p: Propagation, x: Node, inside: set[Node], residual: set[str]) -> bool:
    """Whether ``x`` is the residual stream the block reads, possibly after some of its residual adds: from
    ``x`` back to a value from before the block, through residual adds and ops that read one value and no
    parameter (a branch ends in a weight)."""
    while x in inside:
        operands = [a for a in p.tensor_inputs(x) if not p.is_weight(a)]
        if x.name in residual:
            return any(_carries_stream(p, a, inside, residual) for a in operands)
        if len(operands) != 1 or len(operands) != len(p.tensor_inputs(x)):
            return False
        x = operands[0]
    return True


def _stream_path(p: Propagation, path: str, inside: set[Node], residual: set[str]) -> Block:
    """The block's adds and stream ops, walked back from its exit (or why it cannot be removed)."""
    exits = [n for n in inside if p.is_tensor(n)
             and any(u not in inside and (u.users or p.val(u) is not None) for u in n.users)]  # not assertions
    if len(exits) != 1:
        read = ", ".join(sorted(n.name for n in exits)[:3])
        return Block(path, reason=f"values it computes besides the residual stream are read after it ({read})"
                     if exits else "nothing it computes is read after it")
    node, adds, stays, reshapes = exits[0], [], [], []
    while node in inside:
        operands = [x for x in p.tensor_inputs(node) if not p.is_weight(x)]
        if node.name in residual:
            if node.target is not aten.add.Tensor or node.kwargs.get("alpha", 1) != 1 or len(operands) != 2:
                return Block(path, reason=f"its residual {op_name(node)} at {node.name} is not a plain sum")
            streams = [x for x in operands if _carries_stream(p, x, inside, residual)]
            if not streams:
                return Block(path, reason=f"its shortcut is not the identity (a weight lies on both operands of its "
                                          f"residual add {node.name})")
            if len(streams) > 1:
                return Block(path, reason=f"both operands of its residual add {node.name} carry the residual stream")
            stream, branch = streams[0], next(x for x in operands if x is not streams[0])
            if branch not in inside:
                return Block(path, reason=f"the branch {branch.name} of its residual add {node.name} is computed outside it")
            if p.shape(stream) != p.shape(node) or p.val(stream).dtype != p.val(node).dtype:
                return Block(path, reason=f"its residual add {node.name} broadcasts or casts the stream")
            adds.append((node.name, stream.name, branch.name))
            node = stream
            continue
        if len(operands) != len(p.tensor_inputs(node)):
            return Block(path, reason=f"the residual stream passes through {op_name(node)} at {node.name}, which reads "
                                      "parameters (a norm after the residual add, as in a post-norm layer): it would "
                                      "go with the block")
        if len(operands) != 1:
            return Block(path, reason=f"the residual stream passes through {op_name(node)} at {node.name}, which also "
                                      "reads other values")
        source = operands[0]
        packet, cast = getattr(node.target, "overloadpacket", None), p.val(node).dtype != p.val(source).dtype
        if packet in RESHAPES and not cast:
            reshapes.append(node.name)
        elif packet not in IDENTITY or cast or p.shape(node) != p.shape(source):
            stays.append(node.name)
        node = source
    if not adds:
        return Block(path, reason="no residual add on the stream it hands on")
    if p.shape(node) != p.shape(exits[0]):  # the reshapes do not bring the stream back to its shape
        stays += reshapes
    return Block(path, tuple(reversed(adds)), tuple(reversed(stays)))


def _kept_alive(p: Propagation, block: Block, need: dict[Node, Need]) -> str:
    """Why removing ``block`` would not remove its branches and parameters ('' when it does)."""
    nodes = {n.name: n for n in need}
    unit = frozenset([block.path])
    for add, _, branch in block.adds:
        if need[nodes[add]] is not None:
            return f"its residual add {add} lies in a branch of another block"
        if need[nodes[branch]] != unit:
            return f"the branch {branch} of its residual add {add} is also read elsewhere"
    for node in p.gm.graph.find_nodes(op="get_attr"):
        mine = node.target.startswith(block.path + ".")
        if mine and need[node] not in (unit, frozenset()):
            return f"its tensor {node.target} is also read outside it"
        if not mine and need[node] == unit and isinstance(operator.attrgetter(node.target)(p.gm), nn.Parameter):
            return f"the parameter {node.target}, held outside it, is read only by it"
    return ""
