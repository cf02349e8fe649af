"""Physical pruning: slice weights, patch shape constants, and check against the masked graph."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from .analysis import Analysis, Group, Layout, ensure_analysis
from .analysis.registry import apply_edits, entry_for
from .capture import ExampleInputs
from .errors import RewriteError
from .instrument import copy_graph_module, masked
from .plan import Plan
from .selection import keep_grid, kept_per_unit_axis, tensor_selections

aten = torch.ops.aten


@dataclass
class Selection:
    """A validated plan, per group: its kept-unit grid and kept count along each unit axis."""

    groups: list[Group]
    grids: dict[str, torch.Tensor]
    kept: dict[str, tuple[int, ...]]


def select(analysis: Analysis, plan: Plan, model: torch.nn.Module | None = None) -> Selection:
    """Validate ``plan`` against the analysis (and the fingerprint of ``model``, default the analysed
    model's as captured) and lay out what it keeps; raises PlanError."""
    plan.validate(analysis, model)
    groups = [analysis.group(name) for name in plan.keep if analysis.group(name).prunable]
    grids = {g.name: keep_grid(g, plan.kept(g.name)) for g in groups}
    return Selection(groups, grids, {g.name: kept_per_unit_axis(g, grids[g.name]) for g in groups})


def apply_plan(
    model: torch.nn.Module | Analysis,
    plan: Plan,
    example_inputs: ExampleInputs | None = None,
    *,
    check: bool = True,
    tolerance: float = 1e-5,
) -> GraphModule:
    """A physically smaller module that keeps only the plan's units.

    Weights, biases, norm parameters and buffers are sliced; shape constants in view/reshape/
    expand/unflatten/norm nodes are patched; batch and sequence stay dynamic. The user's model is not
    modified. With ``check`` the pruned output is compared with the masked reference on the example
    inputs when every pruned group is exact (relative max difference at most ``tolerance``).
    """
    analysis = ensure_analysis(model, example_inputs)
    selection = select(analysis, plan)
    for g in selection.groups:
        if not g.exact:
            warnings.warn(f"pruning group {g.name!r} is approximate ({g.exact_reason}): the pruned module "
                          "differs from the masked one", stacklevel=2)
    pruned = copy_graph_module(analysis.captured.module, share_tensors=False)
    slice_tensors(pruned, selection)
    _patch_shape_constants(pruned, selection.groups, selection.kept)
    _correct_rms_norms(pruned, selection.groups, selection.kept)
    pruned.graph.lint()
    pruned.recompile()
    for p in pruned.parameters():
        p.requires_grad_(True)
    if check and all(g.exact for g in selection.groups):
        difference = relative_difference(masked(analysis, plan), pruned, analysis)
        if difference > tolerance:
            raise RewriteError(
                f"the pruned module differs from the masked one by {difference:.3g} (relative max) on the "
                f"example inputs; this is a bug in fxgradnas, please report it with the model"
            )
    return pruned


def outputs_on_example(module: torch.nn.Module, analysis: Analysis) -> list[torch.Tensor]:
    """The tensors ``module`` returns on the captured example inputs, flattened."""
    with torch.no_grad():
        out = module(*analysis.captured.args, **analysis.captured.kwargs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def output_difference(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Largest |a - b| over all output tensors, relative to the largest |a|; inf for another structure."""
    if len(reference) != len(outputs):
        return math.inf
    worst = 0.0
    for a, b in zip(reference, outputs, strict=True):
        if a.shape != b.shape:
            return math.inf
        if a.is_floating_point():
            scale = a.abs().max().clamp_min(1e-12)
            worst = max(worst, float((a - b).abs().max() / scale))
        elif not torch.equal(a, b):
            return math.inf
    return worst


def relative_difference(reference: torch.nn.Module, other: torch.nn.Module, analysis: Analysis) -> float:
    """:func:`output_difference` of two modules on the captured example inputs."""
    return output_difference(outputs_on_example(reference, analysis), outputs_on_example(other, analysis))


# --- tensors -----------------------------------------------------------------------------------
def tensor_owner(gm: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str] | None:
    """The module holding parameter/buffer ``name`` and the attribute name, if it exists."""
    prefix, _, attr = name.rpartition(".")
    try:
        module = gm.get_submodule(prefix)
    except AttributeError:
        return None
    if attr in module._parameters or attr in module._buffers:
        return module, attr
    return None


def slice_tensors(module: torch.nn.Module, selection: Selection) -> None:
    """Index-select every parameter/buffer axis the selection touches, in ``module`` (the captured graph
    module or the user's own model: the names are the same); tied names get the one new tensor."""
    for names, axes in tensor_selections(selection.groups, selection.grids).items():
        owners = [o for o in (tensor_owner(module, n) for n in names) if o is not None]
        if not owners:
            raise RewriteError(f"cannot find {names[0]!r} in {type(module).__name__}")
        owner, attr = owners[0]
        old = getattr(owner, attr)
        new = old.detach()
        for axis, mask in axes.items():
            new = new.index_select(axis, mask.nonzero().flatten().to(new.device))
        value = torch.nn.Parameter(new, requires_grad=old.requires_grad) if attr in owner._parameters else new
        for owner, attr in owners:
            (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = value


# --- shape constants ------------------------------------------------------------------------------
def _new_factor_sizes(layouts: list[tuple[Layout, tuple[int, ...]]]) -> list[int | None]:
    """Sizes of an axis's factors after pruning, combining every group that owns one of them."""
    sizes: list[int | None] = [f.size for f in layouts[0][0].factors]
    for layout, per_axis in layouts:
        for i, f in enumerate(layout.factors):
            if f.unit_axis is not None:
                sizes[i] = per_axis[f.unit_axis]
    return sizes


def _patch_shape_constants(gm: GraphModule, groups: list[Group], per_axis: dict[str, tuple[int, ...]]) -> None:
    """Write the new sizes into every size constant the groups touch, with each op's patcher."""
    touched: dict[tuple[str, int], list[tuple[Layout, tuple[int, ...]]]] = defaultdict(list)
    for g in groups:
        for c in g.shape_constants:
            touched[(c.node, c.axis)].append((c.layout, per_axis[g.name]))
    nodes = {n.name: n for n in gm.graph.nodes}
    for (name, index), layouts in touched.items():
        sizes = _new_factor_sizes(layouts)
        if sizes == [f.size for f in layouts[0][0].factors]:
            continue
        node = nodes[name]
        entry = entry_for(node.target)
        if entry is None or entry.patch is None:
            raise RewriteError(f"no patcher for the size constants of {node.name}")
        apply_edits(entry.patch(node, index, sizes))


# --- RMSNorm over a pruned residual width ---------------------------------------------------------
def _correct_rms_norms(gm: GraphModule, groups: list[Group], per_axis: dict[str, tuple[int, ...]]) -> None:
    """With C' of C channels left, mean(x^2) over C' is C/C' times the masked model's mean over C
    (whose pruned channels are 0). Scaling it by C'/C makes the pruned model equal the masked one;
    for ``aten.rms_norm`` the same is eps x C/C' and weight x sqrt(C/C')."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for g in groups:
        if g.kind != "hidden" or not g.exact:
            continue
        ratio = per_axis[g.name][0] / g.size
        if ratio == 1:
            continue
        for name, kind in dict.fromkeys(g.reductions):
            node = nodes[name]
            if kind == "mean of squares":
                with gm.graph.inserting_after(node):
                    scaled = gm.graph.call_function(aten.mul.Tensor, (node, ratio))
                scaled.meta["val"] = node.meta.get("val")
                node.replace_all_uses_with(scaled, delete_user_cb=lambda u, s=scaled: u is not s)
            elif kind == "rms_norm":
                _rescale_rms_norm_op(gm, node, ratio)


def _rescale_rms_norm_op(gm: GraphModule, node: Node, ratio: float) -> None:
    args = list(node.args) + [None] * (4 - len(node.args))
    x, weight, eps = args[0], args[2], args[3]
    if eps is None:
        eps = torch.finfo(x.meta["val"].dtype).eps
    args[3] = eps / ratio
    if isinstance(weight, Node) and weight.op == "get_attr":
        with torch.no_grad():
            gm.get_parameter(weight.target).mul_(1 / math.sqrt(ratio))
    else:
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(aten.mul.Tensor, (node, 1 / math.sqrt(ratio)))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    node.args = tuple(args)
