"""Physical pruning: slice weights, patch shape constants, and check against the masked graph."""

from __future__ import annotations

import math
import operator
import warnings
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree

from .analysis import Analysis, Group, Layout, ensure_analysis, factor_sizes
from .analysis.blocks import needs
from .analysis.registry import apply_edits, entry_for
from .capture import ExampleInputs
from .errors import ArgumentError, RewriteError
from .instrument import masked
from .modules import check_weights, copy_graph_module, eval_mode
from .plan import Plan, check_plan
from .units import keep_grid, kept_masks, kept_per_unit_axis, removed_blocks

aten = torch.ops.aten
COMPARED_AT_ONCE = 2**20  # entries of an output compared at a time: float64 temporaries of 8 MB
# What a rewrite that is exact up to rounding stays under when both modules run in float64; a wrong slice or
# constant gives 1e-6 and more.
FLOAT64_TOLERANCE = 1e-9


@dataclass
class ResolvedPlan:
    """A validated plan, per group: its kept-unit grid and kept count along each unit axis."""

    groups: list[Group]
    grids: dict[str, torch.Tensor]
    kept: dict[str, tuple[int, ...]]


def resolve_plan(analysis: Analysis, plan: Plan, model: torch.nn.Module | None = None) -> ResolvedPlan:
    """Validate ``plan`` against the analysis (and the fingerprint of ``model``, default the analysed
    model's as captured) and lay out what it keeps; raises PlanError."""
    plan.validate(analysis, model)
    groups = [analysis.group(name) for name in plan.keep if analysis.group(name).prunable]
    grids = {g.name: keep_grid(g, plan.kept(g.name)) for g in groups}
    return ResolvedPlan(groups, grids, {g.name: kept_per_unit_axis(g, grids[g.name]) for g in groups})


@dataclass
class SelfCheck:
    """How far the pruned module's outputs are from the masked reference's (relative max difference): on
    the example inputs, and on fresh random inputs of their shapes (None where the model did not run on
    them); ``tolerance`` is what :func:`apply_plan` allowed. Rounding grows with depth and with the large
    activations of real language models, so when the model's dtype exceeds the tolerance, both modules run again
    in float64 on the same inputs (``float64``; None when not needed or not possible): the check passes when
    that difference is within :data:`FLOAT64_TOLERANCE`."""

    example: float
    fresh: float | None
    tolerance: float
    float64: float | None = None

    @property
    def passed(self) -> bool:
        """Whether the pruned module equals the masked one: within ``tolerance``, or within
        :data:`FLOAT64_TOLERANCE` in float64."""
        if max(self.example, self.fresh or 0.0) <= self.tolerance:
            return True
        return self.float64 is not None and self.float64 <= FLOAT64_TOLERANCE

    def __str__(self) -> str:
        fresh = f"{self.fresh:.2g} on fresh random inputs" if self.fresh is not None else "fresh inputs not run"
        text = f"pruned vs masked {self.example:.2g} on the example inputs, {fresh} (tolerance {self.tolerance:.2g})"
        if self.float64 is not None:
            text += f"; {self.float64:.2g} in float64 (tolerance {FLOAT64_TOLERANCE:.0e})"
        return text


def default_tolerance(module: torch.nn.Module) -> float:
    """The self-check's relative tolerance for ``module``'s least precise floating parameter: 1e-5 in float32,
    8 units in the last place beyond (0.0625 for bfloat16, 0.0078 for float16): the pruned module sums
    fewer terms, in another order, than the masked one."""
    eps = max((torch.finfo(p.dtype).eps for p in module.parameters() if p.is_floating_point()),
              default=torch.finfo(torch.float32).eps)
    return max(1e-5, 8 * eps)


def apply_plan(
    model: torch.nn.Module | Analysis,
    plan: Plan,
    example_inputs: ExampleInputs | None = None,
    *,
    check: bool = True,
    tolerance: float | None = None,
    share_weights: bool = False,
) -> GraphModule:
    """A physically smaller module that keeps only the plan's units.

    Weights, biases, norm parameters and buffers are sliced; shape constants in view/reshape/
    expand/unflatten/norm nodes are patched; a removed block's residual adds pass the stream on, and its
    nodes, parameters and module are gone; batch and sequence stay dynamic. The user's model is not
    modified; memory is the model plus the pruned module (the sliced tensors are taken from the model's, the
    others copied, never the whole model); with ``share_weights=True`` the tensors the plan leaves whole (an
    embedding, the norms of an unpruned width) are the model's own memory instead of copies (less memory, but
    changing them in place, as training does, changes the model). The module follows ``.train()``/``.eval()`` like the model
    (dropout, BatchNorm statistics), so it can be fine-tuned, and starts in the mode the model was in when
    captured.

    With ``check`` (when every pruned group is exact) the pruned outputs are compared with the masked
    reference's in eval mode, on the example inputs and on fresh random inputs of their shapes; a relative
    max difference above ``tolerance`` (default :func:`default_tolerance`, by dtype) raises RewriteError.
    The figures are in ``module.meta["self_check"]`` (:class:`SelfCheck`).

    Args:
        model: The model, or its analysis (:func:`fxgradnas.analyze`).
        plan: The units each group keeps.
        example_inputs: The model's inputs, to capture it (not needed with an Analysis).
        check: Compare the pruned outputs with the masked reference's.
        tolerance: The largest relative difference the check accepts (default: by dtype).
        share_weights: Hold the model's own memory for the tensors the plan leaves whole.

    Returns:
        The pruned graph module.

    Raises:
        ArgumentTypeError: ``plan`` is not a Plan, ``model`` not a Module or Analysis, or a Module comes
            without ``example_inputs``.
        ArgumentError: ``tolerance`` is not a non-negative number, or the weights are on the meta device.
        PlanError: The plan does not fit the model (:meth:`fxgradnas.Plan.validate`).
        CaptureError: As :func:`fxgradnas.capture` raises it.
        RewriteError: The self-check finds the pruned module differs from the masked one.
    """
    check_plan(plan)
    if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                  or not tolerance >= 0):
        raise ArgumentError(f"tolerance must be a non-negative number (or None for the dtype's default), "
                            f"not {tolerance!r}")
    if isinstance(model, (torch.nn.Module, Analysis)):
        check_weights(model.captured.model if isinstance(model, Analysis) else model,
                      "apply_plan (the rewrite slices the weights)")
    analysis = ensure_analysis(model, example_inputs)
    resolved = resolve_plan(analysis, plan)
    for g in resolved.groups:
        if not g.exact:
            warnings.warn(f"pruning group {g.name!r} is approximate ({g.exact_reason}): the pruned module "
                          "differs from the masked one", stacklevel=2)
    pruned = copy_graph_module(analysis.captured.module, "view")  # no copy of the whole model
    slice_tensors(pruned, resolved)
    _patch_shape_constants(pruned, resolved.groups, resolved.kept)
    _correct_rms_norms(pruned, resolved.groups, resolved.kept)
    remove_blocks(pruned, resolved)
    if not share_weights:
        own_tensors(pruned, analysis.captured.module)
    pruned.graph.lint()
    pruned.recompile()
    for p in pruned.parameters():
        p.requires_grad_(True)
    if check and all(g.exact for g in resolved.groups):
        result = self_check(analysis, plan, pruned, tolerance if tolerance is not None else default_tolerance(pruned))
        pruned.meta["self_check"] = result
        if not result.passed:
            raise RewriteError(
                f"the pruned module differs from the masked one: {result}; this is a bug in fxgradnas, please "
                "report it with the model"
            )
    pruned.train(analysis.captured.training)
    return pruned


def self_check(analysis: Analysis, plan: Plan, pruned: GraphModule, tolerance: float) -> SelfCheck:
    """:class:`SelfCheck` of ``pruned`` against the masked reference of ``plan``, in eval mode."""
    reference = masked(analysis, plan, read_only=True)
    inputs = [(analysis.captured.args, analysis.captured.kwargs)]
    example = output_difference(outputs_on(reference, *inputs[0]), outputs_on(pruned, *inputs[0]))
    fresh = None
    args, kwargs = fresh_inputs(*inputs[0])
    try:
        expected = outputs_on(reference, args, kwargs)
    except Exception as exc:  # the model may not accept random values (e.g. a data-dependent check)
        warnings.warn(f"self-check on fresh random inputs skipped: the masked model fails on them "
                      f"({type(exc).__name__}: {exc})", stacklevel=3)
    else:
        fresh = output_difference(expected, outputs_on(pruned, args, kwargs))
        inputs.append((args, kwargs))
    result = SelfCheck(example, fresh, tolerance)
    if not result.passed:  # decided in float64
        result = replace(result, float64=float64_difference(reference, pruned, inputs))
    return result


def float64_difference(reference: GraphModule, other: GraphModule, inputs: list[tuple[tuple, dict[str, Any]]]
                       ) -> float | None:
    """The largest :func:`output_difference` of two graph modules run in float64 (:func:`in_float64`) on each
    ``(args, kwargs)`` of ``inputs``, their floating tensors in float64; None when the modules are in float64
    already or cannot run in it (an op without a float64 kernel, or no memory for the copies)."""
    floating = [t.dtype for m in (reference, other) for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    if all(dtype == torch.float64 for dtype in floating):
        return None
    try:
        reference64, other64 = in_float64(reference), in_float64(other)
        worst = 0.0
        for args, kwargs in inputs:
            args, kwargs = pytree.tree_map(_float64_tensor, (args, kwargs))
            worst = max(worst, output_difference(outputs_on(reference64, args, kwargs), outputs_on(other64, args, kwargs)))
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        warnings.warn(f"self-check in float64 skipped: {type(exc).__name__}: {exc}", stacklevel=3)
        return None
    return worst


def in_float64(module: GraphModule) -> GraphModule:
    """A copy of ``module`` that computes in float64: its floating parameters and buffers, and every floating
    dtype its graph names (the casts of a norm to float32, the dtype of a factory), in float64. ``module``'s
    tensors are not changed."""
    copy = copy_graph_module(module, "view")
    copy.double()  # rebinds the copy's parameters and buffers; the views leave the originals alone
    for node in copy.graph.find_nodes(op="get_attr"):  # constants that are neither parameters nor buffers
        owner, _, name = node.target.rpartition(".")
        holder = copy.get_submodule(owner)
        value = getattr(holder, name)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.is_floating_point() \
                and name not in holder._buffers:
            setattr(holder, name, value.double())
    for node in copy.graph.nodes:
        node.args = map_aggregate(node.args, _float64_dtype)
        node.kwargs = map_aggregate(node.kwargs, _float64_dtype)
    copy.recompile()
    return copy


def _float64_dtype(value: Any) -> Any:
    return torch.float64 if isinstance(value, torch.dtype) and value.is_floating_point else value


def _float64_tensor(value: Any) -> Any:
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def fresh_inputs(args: tuple, kwargs: dict[str, Any], seed: int = 0) -> tuple[tuple, dict[str, Any]]:
    """Random inputs of the shapes, dtypes and devices of ``args``/``kwargs``, drawn from ``seed`` (the global
    RNG is not used): a float tensor is drawn around its mean with its spread; any other tensor (token ids,
    masks) keeps each row's values in a random order, so valid ids and masks stay valid."""
    generator = torch.Generator().manual_seed(seed)

    def shuffled(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            return t
        order = torch.rand(t.shape, generator=generator).argsort(dim=-1).to(t.device)
        return t.gather(-1, order)

    def draw(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.numel() < 2:
            return t
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            return shuffled(t)
        values = t.detach().float()
        noise = torch.randn(t.shape, generator=generator).to(t.device)
        return (values.mean() + values.std() * noise).to(t.dtype)

    return pytree.tree_map(draw, (args, kwargs))


def outputs_on(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors ``module`` returns on ``args``/``kwargs`` in eval mode (its flags restored), flattened."""
    with torch.no_grad(), eval_mode(module):
        out = module(*args, **kwargs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def outputs_on_example(module: torch.nn.Module, analysis: Analysis) -> list[torch.Tensor]:
    """The tensors ``module`` returns on the captured example inputs in eval mode, flattened."""
    return outputs_on(module, analysis.captured.args, analysis.captured.kwargs)


def output_difference(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Largest |a - b| over all output tensors, relative to the largest finite |a|; entries equal in both
    (infinities included) count as 0; inf for another structure or a NaN in only one of them. Compared in
    float64, :data:`COMPARED_AT_ONCE` entries at a time (a language model's logits are large)."""
    if len(reference) != len(outputs):
        return math.inf
    worst = 0.0
    for a, b in zip(reference, outputs, strict=True):
        if a.shape != b.shape:
            return math.inf
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return math.inf
            continue
        difference, scale = 0.0, None
        for x, y in zip(a.reshape(-1).split(COMPARED_AT_ONCE), b.reshape(-1).split(COMPARED_AT_ONCE), strict=True):
            x, y = x.double(), y.double()
            same = (x == y) | (x.isnan() & y.isnan())
            apart = torch.where(same, 0.0, (x - y).abs())
            if bool(apart.isnan().any()):
                return math.inf
            difference = max(difference, float(apart.max()))
            finite = x[torch.isfinite(x)]
            if finite.numel():
                scale = max(scale or 0.0, float(finite.abs().max()))
        worst = max(worst, difference / (max(scale, 1e-12) if scale is not None else 1.0))
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


def slice_tensors(module: torch.nn.Module, resolved: ResolvedPlan, skip: Collection[str] = ()) -> None:
    """Index-select every parameter/buffer axis the resolved plan touches, in ``module`` (the captured graph
    module or the user's own model: the names are the same), except the tensors named in ``skip``; tied
    names get the one new tensor."""
    for names, axes in kept_masks(resolved.groups, resolved.grids).items():
        if any(n in skip for n in names):
            continue
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


def own_tensors(module: torch.nn.Module, source: torch.nn.Module) -> None:
    """Give ``module`` its own copy of every parameter and buffer that shares memory with one of ``source``'s
    (tied ones stay tied), so that training ``module`` leaves ``source`` as it is."""
    shared = {t.untyped_storage().data_ptr() for t in [*source.parameters(), *source.buffers()]}
    copies: dict[int, torch.Tensor] = {}
    for holder in module.modules():
        for table in (holder._parameters, holder._buffers):
            for attr, tensor in table.items():
                if tensor is None or tensor.untyped_storage().data_ptr() not in shared:
                    continue
                if id(tensor) not in copies:
                    value = tensor.detach().clone()
                    copies[id(tensor)] = (torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
                                          if isinstance(tensor, torch.nn.Parameter) else value)
                table[attr] = copies[id(tensor)]


# --- shape constants ------------------------------------------------------------------------------
def _patch_shape_constants(gm: GraphModule, groups: list[Group], per_axis: dict[str, tuple[int, ...]]) -> None:
    """Write the new sizes into every size constant the groups touch, with each op's patcher."""
    touched: dict[tuple[str, int], list[tuple[Layout, tuple[int, ...]]]] = defaultdict(list)
    for g in groups:
        for c in g.shape_constants:
            touched[(c.node, c.axis)].append((c.layout, per_axis[g.name]))
    nodes = {n.name: n for n in gm.graph.nodes}
    for (name, index), layouts in touched.items():
        sizes = factor_sizes(layouts)
        if sizes == [f.size for f in layouts[0][0].factors]:
            continue
        node = nodes[name]
        _own_size_products(node)
        entry = entry_for(node.target)
        if entry is None or entry.patch is None:
            raise RewriteError(f"no patcher for the size constants of {node.name}")
        apply_edits(entry.patch(node, index, sizes))


def _own_size_products(node: Node) -> None:
    """Give ``node`` its own copy of each symbolic size product in its size lists (``B * H`` of a folded
    batch-heads axis) that other nodes read too: export computes such a product once for every layer, and
    layers that keep different head counts need different literals in it."""
    def own(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(own(v) for v in value)
        if isinstance(value, Node) and value.target is operator.mul and len(value.users) > 1:
            with node.graph.inserting_before(node):
                return node.graph.node_copy(value)
        return value

    node.args = own(node.args)
    node.kwargs = {k: own(v) for k, v in node.kwargs.items()}


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
    if isinstance(weight, Node) and weight.op == "get_attr":  # a new tensor: the old may be the model's memory
        owner, attr = tensor_owner(gm, weight.target)
        old = owner._parameters[attr]
        owner._parameters[attr] = torch.nn.Parameter(old.detach() / math.sqrt(ratio), requires_grad=old.requires_grad)
    else:
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(aten.mul.Tensor, (node, 1 / math.sqrt(ratio)))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda u: u is not scaled)
    node.args = tuple(args)


# --- removed blocks -------------------------------------------------------------------------------
def remove_blocks(gm: GraphModule, resolved: ResolvedPlan) -> None:
    """Make each removed block's residual adds pass their stream operand on, then delete what only removed
    blocks need (the nodes that nothing else reads any more, the tensors they read, the blocks' modules)."""
    paths = removed_blocks(resolved.groups, resolved.grids)
    if not paths:
        return
    units = {b.path: (g.name, i) for g in resolved.groups if g.kind == "blocks" for i, b in enumerate(g.blocks)}
    blocks = [b for g in resolved.groups if g.kind == "blocks" for b in g.blocks]
    need = needs(gm.graph, {add: (branch, units[b.path]) for b in blocks for add, _, branch in b.adds})
    gone = frozenset(units[path] for path in paths)
    nodes = {n.name: n for n in gm.graph.nodes}
    doomed: set[Node] = set()
    for b in reversed(blocks):  # the last add first: its stream operand may be an add before that goes too
        if b.path in paths:
            for add, stream, _ in reversed(b.adds):
                nodes[add].replace_all_uses_with(nodes[stream])
                doomed.add(nodes[add])
    for node in gm.graph.nodes:  # also what nothing needed before (assertions) about a value that goes
        if node.op == "placeholder":
            continue
        if (need[node] and need[node] <= gone) or (need[node] == frozenset() and doomed.intersection(node.all_input_nodes)) \
                or (node.op == "get_attr" and any(node.target.startswith(path + ".") for path in paths)):
            doomed.add(node)
    targets = {n.target for n in doomed if n.op == "get_attr"}
    for node in reversed(gm.graph.nodes):
        if node in doomed:
            gm.graph.erase_node(node)
    targets -= {n.target for n in gm.graph.find_nodes(op="get_attr")}
    for target in sorted(targets):
        prefix, _, attr = target.rpartition(".")
        owner = gm.get_submodule(prefix)
        for table in (owner._parameters, owner._buffers, owner.__dict__):
            table.pop(attr, None)
    for path in paths:
        parent, _, name = path.rpartition(".")
        gm.get_submodule(parent)._modules.pop(name, None)
