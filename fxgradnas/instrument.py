"""Mask nodes: one mask per group, multiplied into the captured graph at each of the group's sites.

A mask has the group's ``unit_shape`` (all ones = the original model). At a site the mask is spread
over the site's axis by its layout (a head's entry covers its ``head_dim`` entries) and multiplied
in; a mask entry at 0 removes that unit's whole contribution, which is what pruning does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from .analysis import Analysis, Group, Layout, ensure_analysis
from .capture import ExampleInputs
from .plan import Plan
from .selection import keep_grid

MASK_PREFIX = "fxgradnas_mask"


def spread_mask(mask: torch.Tensor, order: tuple[int, ...], view: tuple[int, ...], full: tuple[int, ...]) -> torch.Tensor:
    """The mask (unit grid) laid out along one axis: permute to the layout's unit order, broadcast
    over the factors the group does not own, flatten."""
    if order != tuple(range(len(order))):
        mask = mask.permute(order)
    return mask.reshape(view).expand(full).reshape(-1)


def apply_mask(x: torch.Tensor, mask: torch.Tensor, axis: int, order: tuple[int, ...], view: tuple[int, ...],
               full: tuple[int, ...]) -> torch.Tensor:
    """``x`` times the group mask along ``axis``; the function a mask node calls."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return x * spread_mask(mask, order, view, full).to(x.dtype).reshape(shape)


def layout_args(layout: Layout) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(unit axis order, view shape, full shape) for :func:`spread_mask`."""
    if any(f.size is None for f in layout.factors):
        raise ValueError("a mask site needs fixed factor sizes")
    order = layout.unit_axes
    view = tuple(f.size if f.unit_axis is not None else 1 for f in layout.factors)
    full = tuple(f.size for f in layout.factors)
    return order, view, full


def copy_graph_module(gm: GraphModule, share_tensors: bool) -> GraphModule:
    """A copy of ``gm`` with its own graph; parameters and buffers are shared or copied."""
    memo: dict[int, object] = {}
    if share_tensors:
        for t in [*gm.parameters(), *gm.buffers()]:
            memo[id(t)] = t
    return copy.deepcopy(gm, memo)


@dataclass
class Instrumented:
    """A copy of the captured graph with mask nodes; ``masks`` maps group name -> mask buffer."""

    module: GraphModule
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_nodes: dict[str, list[str]] = field(default_factory=dict)


def instrument(analysis: Analysis, groups: list[Group] | None = None) -> Instrumented:
    """Insert an all-ones mask for each group (default: every prunable group) at its sites.

    The copy shares the model's parameters; with all masks at one its output equals the original's.
    """
    gm = copy_graph_module(analysis.captured.module, share_tensors=True)
    nodes = {n.name: n for n in gm.graph.nodes}
    result = Instrumented(gm)
    for index, group in enumerate(groups if groups is not None else analysis.prunable):
        attr = f"{MASK_PREFIX}_{index}"
        mask = torch.ones(group.unit_shape)
        gm.register_buffer(attr, mask)
        result.masks[group.name] = mask
        result.mask_nodes[group.name] = []
        for site in group.sites:
            target = nodes[site.node]
            with gm.graph.inserting_after(target):
                mask_node = gm.graph.get_attr(attr)
            with gm.graph.inserting_after(mask_node):
                masked = gm.graph.call_function(
                    apply_mask, (target, mask_node, site.axis, *layout_args(site.layout))
                )
            masked.meta["val"] = target.meta.get("val")
            target.replace_all_uses_with(masked, delete_user_cb=lambda user, m=masked: user is not m)
            result.mask_nodes[group.name].append(masked.name)
    gm.recompile()
    return result


def masked(model: torch.nn.Module | Analysis, plan: Plan, example_inputs: ExampleInputs | None = None) -> GraphModule:
    """The reference for a plan: the captured graph with the plan's pruned units masked to zero.

    With an empty plan its output equals the model's exactly.
    """
    analysis = ensure_analysis(model, example_inputs)
    plan.validate(analysis, analysis.captured.model)
    groups = [analysis.group(name) for name in plan.keep]
    inst = instrument(analysis, groups)
    for group in groups:
        inst.masks[group.name].copy_(keep_grid(group, plan.kept(group.name)).to(torch.float32))
    return inst.module


