"""Weights sharded over torch.distributed ranks: a graph module split into one submodule per block, each
holding its own parameters and wrapped by FSDP2 (``torch.distributed.fsdp.fully_shard``).

A captured graph is flat: its parameters are read by ``get_attr`` nodes and no block's ``forward`` runs,
so FSDP2 could not gather a block's weights when they are needed. :func:`split_blocks` gives each block
(the outermost numbered module a node comes from, ``model.layers.3``; the nodes before, between and after
blocks form their own parts) a submodule that owns the parameters only it reads; :func:`shard_blocks` then
shards each one, and the root (with any parameter read by several parts, such as tied embeddings), so a
rank keeps 1/N of the weights of every block at rest and gathers one block at a time, in forward and again
in backward. :func:`recompute_blocks` makes each block of such a split recompute its activations in backward
(``torch.utils.checkpoint``) instead of keeping them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint as run_recomputed

from .errors import ArgumentError
from .modules import device_of, quiet_deepcopy
from .tensorfiles import read_tensor, tensor_files

NAMES = "fxgradnas_parameter_names"  # split.meta[NAMES]: {parameter moved into a block: its name in gm}
BLOCKS = "fxgradnas_blocks"  # split.meta[BLOCKS]: the submodules that are blocks, in graph order
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
    computes, with its inputs and outputs; ``split.meta[NAMES]`` maps each moved parameter to its name in
    ``gm``.

    Args:
        gm: The graph module to split (a captured or masked model's).
    """
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
    split.meta[BLOCKS] = sorted({f"submod_{i}" for node, i in part.items() if _block_of(node)},
                                key=lambda name: int(name.rpartition("_")[2]))
    names = split.meta.setdefault(NAMES, {})
    readers: dict[int, set[Node]] = {}  # parts reading each parameter, by the parameter's id
    first: dict[int, Node] = {}
    for node in list(split.graph.find_nodes(op="get_attr")):
        if (owner := _parameter_owner(split, node)) is None:
            continue
        key = id(getattr(*owner))
        readers.setdefault(key, set()).update(node.users)
        if key in first:  # a tied parameter read under a second name: read it under the first (FSDP2 gathers that)
            node.replace_all_uses_with(first[key])
            split.graph.erase_node(node)
        else:
            first[key] = node
    for call in list(split.graph.find_nodes(op="call_module")):
        sub = split.get_submodule(call.target)
        if not isinstance(sub, GraphModule):
            continue
        args = []
        for placeholder, arg in zip(sub.graph.find_nodes(op="placeholder"), call.args, strict=True):
            owner = _parameter_owner(split, arg)
            if owner is None or len(readers[id(getattr(*owner))]) != 1:
                args.append(arg)
                continue
            module, attr = owner
            name = arg.target.replace(".", "_")
            sub.register_parameter(name, module._parameters.pop(attr))
            names[f"{call.target}.{name}"] = arg.target
            with sub.graph.inserting_before(placeholder):
                placeholder.replace_all_uses_with(sub.graph.get_attr(name))
            sub.graph.erase_node(placeholder)
        moved = [a for a in call.args if a not in args]
        call.args = tuple(args)
        for node in moved:
            split.graph.erase_node(node)
        sub.recompile()
    split.graph._codegen = quiet_deepcopy(gm.graph._codegen)  # the inputs' and outputs' structure
    split.recompile()
    return split


class Recomputed(torch.nn.Module):
    """``block`` with its activations recomputed (``torch.utils.checkpoint``, non-reentrant): backward keeps
    its inputs only and runs its forward again for the activations it needs."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: object) -> object:
        return run_recomputed(self.block, *args, use_reentrant=False)


def recompute_blocks(split: GraphModule) -> GraphModule:
    """Wrap every block of ``split`` (made by :func:`split_blocks`) in :class:`Recomputed`, in place, so that
    a backward holds one block's activations at a time instead of every block's; returns ``split``."""
    for name in split.meta[BLOCKS]:
        setattr(split, name, Recomputed(split.get_submodule(name)))
    return split


def _parameter_owner(module: torch.nn.Module, arg: object) -> tuple[torch.nn.Module, str] | None:
    """The module and attribute holding the parameter a ``get_attr`` node reads, else None."""
    if not isinstance(arg, Node) or arg.op != "get_attr":
        return None
    prefix, _, attr = arg.target.rpartition(".")
    owner = module.get_submodule(prefix)
    return (owner, attr) if attr in owner._parameters else None


def shard_blocks(gm: GraphModule, checkpoint_dir: str | Path | None = None,
                 aliases: dict[str, list[str]] | None = None) -> GraphModule:
    """:func:`split_blocks` of ``gm`` with every block's parameters and the root's sharded over the ranks
    of the initialised default process group (FSDP2 ``fully_shard`` on a one-dimensional device mesh).

    With ``checkpoint_dir`` (a safetensors checkpoint directory, sharded or not) ``gm`` may hold its parameters
    on the meta device (its buffers must have values): each rank reads one part's parameters at a time from
    the checkpoint and keeps its shard of them, so it never holds more than one part in full; ``aliases``
    lists the other names of tied parameters (one of them is in the checkpoint)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = device_of(gm)
    device = torch.device("cpu") if device.type == "meta" else device
    if checkpoint_dir is not None:
        _off_meta(gm, device)
    split = split_blocks(gm)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    files = tensor_files(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    names = {name: split.meta[NAMES].get(name, name) for name, _ in split.named_parameters(remove_duplicate=False)}
    parts = [(prefix, sub) for prefix, sub in split.named_children() if next(sub.parameters(recurse=False), None)
             is not None]
    for prefix, sub in [*parts, ("", split)]:  # the root last: what no single block reads, tied parameters
        if files is not None:  # this part's parameters in full, for as long as fully_shard copies its shard
            _load(sub, prefix, names, files, aliases or {}, device)
        fully_shard(sub, mesh=mesh)
    return split


def _off_meta(gm: GraphModule, device: torch.device) -> None:
    """Make the nodes that name the meta device (export of a model with parameters on meta writes it into
    device checks and tensor factories) name ``device``."""
    meta = torch.device("meta")

    def retarget(value: object) -> object:
        return device if isinstance(value, torch.device) and value == meta else value

    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, retarget)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, retarget)
    gm.recompile()


def _load(module: torch.nn.Module, prefix: str, names: dict[str, str], files: dict[str, Path],
          aliases: dict[str, list[str]], device: torch.device) -> None:
    """Give ``module``'s own parameters that are on the meta device (not those of a sharded child; tied ones
    once) their values from the checkpoint ``files``."""
    done: dict[int, torch.nn.Parameter] = {}
    for holder in module.modules():
        if holder is not module and hasattr(holder, "reshard"):  # already sharded by FSDP2
            continue
        for attr, param in list(holder._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in done:
                path = next(n for n, p in module.named_parameters(remove_duplicate=False) if p is param)
                original = names[f"{prefix}.{path}" if prefix else path]
                stored = next((n for n in [original, *aliases.get(original, [])] if n in files), None)
                if stored is None:
                    raise ArgumentError(f"parameter {original!r} is not in the checkpoint (if it is tied to another, "
                                        "tie them in the model: model.tie_weights())")
                value = read_tensor(files[stored], stored, device)
                if value.shape != param.shape:
                    raise ArgumentError(f"{stored!r} has shape {tuple(value.shape)} in the checkpoint, the model "
                                        f"{tuple(param.shape)}")
                done[id(param)] = torch.nn.Parameter(value.to(param.dtype), requires_grad=param.requires_grad)
            holder._parameters[attr] = done[id(param)]
