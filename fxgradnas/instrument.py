"""Mask nodes: one mask per group, multiplied into the captured graph at each of the group's sites.

A mask has the group's ``unit_shape`` (all ones = the original model). At a site the mask is spread
over the site's axis by its layout (a head's entry covers its ``head_dim`` entries) and multiplied
in (a site of one unit, a block's write into the residual stream, multiplies the whole value by its entry); a mask entry at 0 removes that unit's whole contribution, which is what pruning does. An experts
group's mask is added to the router's logits as ``log(mask)`` instead: a removed expert's logit is -inf, so
the router never picks it, which is what removing its row does (at mask 1 the gradient is the same). Each site
is a small :class:`MaskSite` module; with a :class:`GradientRecorder` attached it records
``dLoss/dMask`` during backward (per batch or per sample) without keeping extra activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.fx import GraphModule

from .analysis import Analysis, Group, NodeAxis, check_analysis, check_groups, ensure_analysis
from .capture import ExampleInputs
from .errors import ArgumentError
from .modules import copy_graph_module, device_of
from .plan import Plan, check_plan
from .units import fold_to_units, keep_grid, unit_of_entries

SITE_PREFIX = "fxgradnas_mask"


class GradientRecorder:
    """Sums ``dLoss/dMask`` of every site of a group for the current batch.

    ``per_sample``: keep one gradient per sample, shape ``(batch, *unit_shape)``, else ``unit_shape``.
    """

    def __init__(self, per_sample: bool = False) -> None:
        self.per_sample = per_sample
        self.batch_size = 0
        self.current: dict[str, torch.Tensor] = {}

    def add(self, name: str, grad: torch.Tensor) -> None:
        grad = grad.detach().float()
        self.current[name] = self.current[name] + grad if name in self.current else grad

    def take(self) -> dict[str, torch.Tensor]:
        out, self.current = self.current, {}
        return out


class _RecordMask(torch.autograd.Function):
    """``x * mask`` (``x + log(mask)`` at an additive site) whose backward hands the mask's gradient to the
    site's recorder. With an all-ones mask (``site.identity``, as in calibration) neither pass multiplies:
    ``x`` and the gradient go through unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, site: MaskSite) -> torch.Tensor:  # type: ignore[override]
        ctx.site = site
        if site.identity:
            ctx.save_for_backward(x)
            return x.view_as(x)
        spread = site.spread(x)
        ctx.save_for_backward(x, spread)
        return x + spread.log() if site.additive else x * spread

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, *spread = ctx.saved_tensors
        if ctx.site.additive:  # d(x + log m)/dm = 1/m; no gradient reaches a removed (m = 0) unit
            ctx.site.record(grad if ctx.site.identity else torch.where(spread[0] > 0, grad / spread[0], 0.0))
            return grad, None, None
        ctx.site.record(_widened(grad) * _widened(x))
        return (grad if ctx.site.identity else grad * spread[0]), None, None


def _widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least: mask gradients of a bfloat16 model are multiplied and summed in float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MaskSite(nn.Module):
    """Multiplies its group's mask into one axis of the tensor passing through (``additive``: adds its log)."""

    def __init__(self, group: str, mask: torch.Tensor, site: NodeAxis, additive: bool = False) -> None:
        super().__init__()
        self.group = group
        self.additive = additive
        self.register_buffer("mask", mask, persistent=False)
        self.axis = site.axis
        self.batch_major = site.batch_major
        self.unit = site.unit
        factors = site.layout.factors
        if any(f.size is None for f in factors):
            raise ValueError(f"mask site {site.node} has a dynamic factor")
        self.order = site.layout.unit_axes
        self.view = tuple(f.size if f.unit_axis is not None else 1 for f in factors)
        self.full = tuple(f.size for f in factors)
        # a concatenated axis (the input of a layer after a ``cat``): the unit of each entry, -1 for other parts
        entries = unit_of_entries(site.layout, tuple(mask.shape)).to(mask.device) if site.layout.concatenated else None
        self.register_buffer("entries", entries, persistent=False)
        self.layout = site.layout
        self.recorder: GradientRecorder | None = None
        self.identity = False  # the mask is all ones (set when a recorder is attached)
        self.observer: Callable[[MaskSite, torch.Tensor], None] | None = None  # sees the unmasked input

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """The mask laid out along ``axis``, shaped to broadcast against ``x``."""
        mask = self.mask
        if self.unit is not None:
            return mask.reshape(-1)[self.unit].to(x.dtype)
        shape = [1] * x.dim()
        shape[self.axis] = -1
        if self.entries is not None:
            ones = torch.ones((), dtype=mask.dtype, device=mask.device)
            return torch.where(self.entries >= 0, mask.reshape(-1)[self.entries.clamp_min(0)], ones).reshape(shape).to(x.dtype)
        if self.order != tuple(range(len(self.order))):
            mask = mask.permute(self.order)
        return mask.reshape(self.view).expand(self.full).reshape(shape).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self, x)
        if self.recorder is not None and torch.is_grad_enabled():
            return _RecordMask.apply(x, self.mask, self)
        return x + self.spread(x).log() if self.additive else x * self.spread(x)

    def record(self, grad_times_x: torch.Tensor) -> None:
        """Reduce ``grad * x`` to the unit grid (per sample if asked) and hand it to the recorder."""
        recorder = self.recorder
        g = _widened(grad_times_x)
        g = g.movedim(self.axis, -1) if self.unit is None else g.reshape(*g.shape[:1], -1)  # a unit site: all its own
        length = g.shape[-1]
        if recorder.per_sample and recorder.batch_size > 1:
            if not self.batch_major:
                raise ValueError(
                    f"per-sample scores need the batch as the leading axis at mask site of group "
                    f"{self.group!r}; use granularity='batch'"
                )
            g = g.reshape(recorder.batch_size, -1, length).sum(1)
        else:
            g = g.reshape(-1, length).sum(0, keepdim=True)
        if self.unit is None:
            g = fold_to_units(g, self.layout)
        else:  # the whole value is the one unit's
            units = g.new_zeros(g.shape[0], self.mask.numel())
            units[:, self.unit] = g.sum(-1)
            g = units
        recorder.add(self.group, g if recorder.per_sample else g[0])


@dataclass
class Instrumented:
    """A copy of the captured graph with mask sites; ``masks`` maps group name -> mask tensor."""

    module: GraphModule
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    sites: dict[str, list[MaskSite]] = field(default_factory=dict)

    def set_plan(self, groups: list[Group], plan: Plan) -> None:
        """Each of ``groups``' masks to the units ``plan`` keeps (all ones where it keeps the group whole)."""
        for group in groups:
            self.masks[group.name].copy_(keep_grid(group, plan.kept(group.name)).to(torch.float32))

    def attach(self, recorder: GradientRecorder | None) -> None:
        """Record mask gradients into ``recorder`` (None: stop); masks must not change while attached."""
        for name, sites in self.sites.items():
            identity = recorder is not None and bool((self.masks[name] == 1).all())
            for site in sites:
                site.recorder = recorder
                site.identity = identity


def instrument(analysis: Analysis, groups: list[Group] | None = None, *, share_weights: bool = False,
               read_only: bool = False) -> Instrumented:
    """Insert an all-ones mask for each group (default: every prunable group) at its sites, in a copy of
    the captured graph; with all masks at one its output equals the original's.

    The copy has its own parameters and buffers; with ``share_weights=True`` it holds the model's own
    (no memory, but training the copy trains the model). It starts in the model's mode when captured.
    With ``read_only=True`` it holds read-only views of the model's tensors (no memory; parameters that
    require no grad, so nothing done with it reaches the model's) and stays in eval mode: what
    calibration and compensation read the model with.

    Args:
        analysis: The analysed model (:func:`fxgradnas.analyze`).
        groups: The groups to mask (default: ``analysis.prunable``).
        share_weights: Hold the model's own parameters and buffers instead of copies.
        read_only: Hold read-only views of the model's tensors, in eval mode.

    Returns:
        The instrumented copy: its module, and per group its mask and mask sites.

    Raises:
        ArgumentTypeError: ``analysis`` is not an Analysis, or ``groups`` not a list.
        ArgumentError: ``groups`` holds a group of another analysis, or both ``share_weights`` and
            ``read_only`` are set.
    """
    check_analysis(analysis, "instrument")
    inst = _instrument(analysis, groups, _tensors(share_weights, read_only))
    if not read_only:
        inst.module.train(analysis.captured.training)
    return inst


def _tensors(share_weights: bool, read_only: bool) -> Literal["copy", "share", "view"]:
    """How the copy holds the model's tensors, as :func:`~fxgradnas.modules.copy_graph_module` takes it."""
    if share_weights and read_only:
        raise ArgumentError("share_weights=True and read_only=True exclude each other: a read-only copy holds "
                            "views of the model's tensors")
    return "view" if read_only else "share" if share_weights else "copy"


def _instrument(analysis: Analysis, groups: list[Group] | None, tensors: Literal["copy", "share", "view"]
                ) -> Instrumented:
    check_groups(analysis, groups)
    gm = copy_graph_module(analysis.captured.module, tensors)
    nodes = {n.name: n for n in gm.graph.nodes}
    result = Instrumented(gm)
    for index, group in enumerate(groups if groups is not None else analysis.prunable):
        mask = torch.ones(group.unit_shape, device=device_of(gm))
        result.masks[group.name] = mask
        result.sites[group.name] = []
        for k, site in enumerate(group.sites):
            module = MaskSite(group.name, mask, site, additive=group.kind == "experts")
            name = f"{SITE_PREFIX}_{index}_{k}"
            gm.add_submodule(name, module)
            target = nodes[site.node]
            with gm.graph.inserting_after(target):
                masked_node = gm.graph.call_module(name, (target,))
            masked_node.meta["val"] = target.meta.get("val")
            target.replace_all_uses_with(masked_node, delete_user_cb=lambda user, m=masked_node: user is not m)
            result.sites[group.name].append(module)
    gm.recompile()
    return result


def masked(model: torch.nn.Module | Analysis, plan: Plan, example_inputs: ExampleInputs | None = None, *,
           share_weights: bool = False, read_only: bool = False) -> GraphModule:
    """The reference for a plan: the captured graph with the plan's pruned units masked to zero.

    With an empty plan its output equals the model's exactly. The module has its own copies of the
    parameters and buffers; ``share_weights=True`` makes it hold the model's own instead (no memory, but
    an optimizer step on it changes the model). Like the model it follows ``.train()``/``.eval()``
    (dropout, BatchNorm) and starts in the mode the model was in when captured. ``read_only=True`` gives
    it read-only views of the model's tensors (no memory) in eval mode: a reference to compare with, not
    to train.

    Args:
        model: The model, or its analysis (:func:`fxgradnas.analyze`).
        plan: The units each group keeps.
        example_inputs: The model's inputs, to capture it (not needed with an Analysis).
        share_weights: Hold the model's own parameters and buffers instead of copies.
        read_only: Hold read-only views of the model's tensors, in eval mode.

    Returns:
        The masked graph module.

    Raises:
        ArgumentTypeError: ``plan`` is not a Plan, ``model`` not a Module or Analysis, or a Module comes
            without ``example_inputs``.
        ArgumentError: Both ``share_weights`` and ``read_only`` are set.
        PlanError: The plan does not fit the model (:meth:`fxgradnas.Plan.validate`).
        CaptureError: As :func:`fxgradnas.capture` raises it.
    """
    check_plan(plan)
    tensors = _tensors(share_weights, read_only)
    analysis = ensure_analysis(model, example_inputs)
    plan.validate(analysis)
    groups = [analysis.group(name) for name in plan.keep]
    inst = _instrument(analysis, groups, tensors)
    inst.set_plan(groups, plan)
    if not read_only:
        inst.module.train(analysis.captured.training)
    return inst.module
