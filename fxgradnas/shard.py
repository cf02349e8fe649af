"""Weights sharded over torch.distributed ranks: a graph module split into one submodule per block, each
holding its own parameters and wrapped by FSDP2 (``torch.distributed.fsdp.fully_shard``).

A captured graph is flat: its parameters are read by ``get_attr`` nodes and no block's ``forward`` runs,
so FSDP2 could not gather a block's weights when they are needed. :func:`split_blocks` gives each block
(the outermost numbered module a node comes from, ``model.layers.3``; the nodes before, between and after
blocks form their own parts) a submodule that owns the parameters only it reads; :func:`shard_blocks` then
shards each one, and the root (with any parameter read by several parts, such as tied embeddings), so a
rank keeps 1/N of the weights of every block at rest and gathers one block at a time, in forward and again
in backward.
"""

from __future__ import annotations

import copy
import re

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module

_BLOCK = re.compile(r"^(.*?\.\d+)(\.|$)")  # the outermost numbered module: model.layers.3


def _block_of(node: Node) -> str | None:
    """The block a node was traced in ("" outside every block), or None when it carries no module stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    match = _BLOCK.match(list(stack.values())[-1][0])
    return match.group(1) if match else ""


def split_blocks(gm: GraphModule) -> GraphModule:
    """``gm`` as a root graph calling one submodule per run of nodes of the same block, in graph order;
    each submodule holds the parameters only it reads (the others stay on the root). Computes what ``gm``
    computes, with its inputs and outputs."""
    part: dict[Node, int] = {}
    key: object = object()
    current, previous = -1, ""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        block = _block_of(node)
        block = previous if block is None else block  # inserted nodes (mask sites) stay with their input
        if block != key:
            current, key = current + 1, block
        part[node] = current
        previous = block
    split = split_module(gm, gm, lambda node: part[node])
    for call in list(split.graph.find_nodes(op="call_module")):
        sub = split.get_submodule(call.target)
        if not isinstance(sub, GraphModule):
            continue
        args = []
        for placeholder, arg in zip(sub.graph.find_nodes(op="placeholder"), call.args, strict=True):
            owner = _parameter_owner(split, arg)
            if owner is None or len(arg.users) != 1:
                args.append(arg)
                continue
            module, attr = owner
            name = arg.target.replace(".", "_")
            sub.register_parameter(name, module._parameters.pop(attr))
            with sub.graph.inserting_before(placeholder):
                placeholder.replace_all_uses_with(sub.graph.get_attr(name))
            sub.graph.erase_node(placeholder)
        moved = [a for a in call.args if a not in args]
        call.args = tuple(args)
        for node in moved:
            split.graph.erase_node(node)
        sub.recompile()
    split.graph._codegen = copy.deepcopy(gm.graph._codegen)  # the inputs' and outputs' structure
    split.recompile()
    return split


def _parameter_owner(module: torch.nn.Module, arg: object) -> tuple[torch.nn.Module, str] | None:
    """The module and attribute holding the parameter a ``get_attr`` node reads, else None."""
    if not isinstance(arg, Node) or arg.op != "get_attr":
        return None
    prefix, _, attr = arg.target.rpartition(".")
    owner = module.get_submodule(prefix)
    return (owner, attr) if attr in owner._parameters else None


def shard_blocks(gm: GraphModule) -> GraphModule:
    """:func:`split_blocks` of ``gm`` with every block's parameters and the root's sharded over the ranks
    of the initialised default process group (FSDP2 ``fully_shard`` on a one-dimensional device mesh)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    split = split_blocks(gm)
    device = next(iter(split.parameters()), torch.empty(0)).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for sub in split.children():
        if next(sub.parameters(recurse=False), None) is not None:
            fully_shard(sub, mesh=mesh)
    fully_shard(split, mesh=mesh)
    return split
