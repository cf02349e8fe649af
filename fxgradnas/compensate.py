"""Compensation without retraining: re-fit what consumes the pruned units so the layer output
reconstructs the unpruned one (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
Transformers", mask tuning by linear least squares).

For a group whose units feed a Linear ``y = W x + b`` (o_proj for heads, down_proj for MLP
channels), calibration batches give the float64 second moment ``S = E[x x^T]`` and mean of the
Linear's input. Keeping columns ``K``, the target is the layer's own output ``W x``:

The options (:class:`fxgradnas.CompensationOptions`):

- ``"ls"``: the re-fit ``W'_K = (W S[:, K] + lambda W_K) (S[K, K] + lambda I)^-1``, least squares with
  a ridge that pulls towards the original kept columns (``damping`` scales ``lambda`` by the mean
  diagonal of ``S[K, K]``), which keeps the fit from over-adapting to the calibration text;
- ``"scale"``: per kept unit one scale ``s`` minimising ``E|W x - W_K diag(s) x_K|^2`` (a units x units
  system, Kwon's mask tuning);
- with a bias, ``bias=True`` also adds the mean of what is left unexplained, so the output's mean is
  kept (the fit then uses the covariance instead of ``S``).

Where the statistics come from:

- ``sequential=True`` (default): the calibration batches run through the pruned model node by node,
  all batches together, and each consumer is fitted when the walk reaches it; its inputs ``x`` are
  those of the pruned model whose earlier layers are already compensated (as layer-wise solvers
  do). This holds the live activations of all calibration batches at once.
- ``sequential=False``: one streaming pass over the dense model (memory independent of the number of
  batches); ``x`` is the dense input.

The residual width (a ``hidden`` group) is read by many Linears (q/k/v, gate/up, through the norms). With
``"ls"`` and ``hidden=True`` (not the default: measured worse on SmolLM2) each of them is then re-fitted to
its dense output from its pruned input, ``W'_K = (W C + lambda W_K) (G + lambda I)^-1`` with ``C = E[x x'^T]``
between the dense input ``x`` and the pruned model's kept input ``x'`` and ``G = E[x' x'^T]``, from one pass
of the dense model and the (already re-fitted) pruned module side by side (:func:`width_readers`).

The new weights are folded into the pruned module, which keeps its structure. A layer whose
reconstruction error on the calibration statistics did not go down is left unchanged.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.node import map_arg
from tqdm.auto import tqdm

from .analysis import Analysis, Group, check_analysis
from .batches import Reader, batch_size_of, call_with, check_callable, check_data, default_collect, to_device
from .errors import ArgumentTypeError
from .instrument import MaskSite, instrument
from .modules import device_of
from .options import CompensationOptions, check_instance
from .plan import Plan, check_plan
from .units import keep_grid, kept_masks, removed_blocks, spread

aten = torch.ops.aten


@dataclass
class InputStatistics:
    """Float64 sums over calibration rows of a consumer's input: ``x^T x``, ``x`` and the row count
    (products per batch in float32)."""

    gram: torch.Tensor
    total: torch.Tensor
    rows: int = 0

    @classmethod
    def empty(cls, width: int, device: torch.device) -> InputStatistics:
        return cls(torch.zeros(width, width, dtype=torch.float64, device=device),
                   torch.zeros(width, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram += (rows.T @ rows).double()
        self.total += rows.sum(0).double()
        self.rows += rows.shape[0]


@dataclass
class LayerReport:
    """One re-fitted consumer: its group, its weight, the reconstruction error before and after, and whether the
    new weights were kept (the error went down)."""

    group: str
    consumer: str
    error_before: float
    error_after: float
    applied: bool


@dataclass
class Consumer:
    """A pruned group's consuming Linear: its graph nodes and which input columns are kept.

    ``transposed``: the weight is stored ``(in, out)`` and applied by ``addmm(bias, x, W)`` (GPT-2's
    Conv1D); otherwise ``(out, in)`` by ``linear(x, W, bias)``.
    """

    group: Group
    linear: str
    weight: str
    bias: str | None
    transposed: bool
    kept: torch.Tensor  # indices of kept input columns
    unit_of: torch.Tensor  # unit (0..) of each kept column

    def matrix(self, module: torch.nn.Module) -> torch.Tensor:
        """The weight as ``(out, in)``."""
        weight = module.get_parameter(self.weight).detach()
        return weight.T if self.transposed else weight

    @property
    def input_arg(self) -> int:
        return 1 if self.transposed else 0


def _get_attr(value: Any) -> Node | None:
    return value if isinstance(value, Node) and value.op == "get_attr" else None


def _linear_reading(node: Node) -> tuple[Node, Node, Node | None, bool] | None:
    """The Linear that alone reads ``node``: (its node, weight get_attr, bias get_attr or None, transposed)."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.target is aten.linear.default and user.args[0] is node:
        bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
        weight, transposed = _get_attr(user.args[1]), False
    elif user.target is aten.addmm.default and user.args[1] is node and not user.kwargs:
        bias, weight, transposed = user.args[0], _get_attr(user.args[2]), True
    else:
        return None
    return (user, weight, _get_attr(bias), transposed) if weight is not None else None


def consumers(analysis: Analysis, plan: Plan) -> list[Consumer]:
    """The compensable groups of ``plan``: heads/channels whose single site feeds one Linear's input (not in a
    block the plan removes)."""
    nodes = {n.name: n for n in analysis.captured.module.graph.nodes}
    masked_at: dict[str, list[str]] = {}  # node -> the groups the plan prunes with a site there
    for name in plan.keep:
        group = analysis.group(name)
        if not bool(keep_grid(group, plan.kept(name)).all()):
            for site in group.sites:
                masked_at.setdefault(site.node, []).append(name)
    groups = [analysis.group(name) for name in plan.keep]
    removed = tuple(path + "." for path in removed_blocks(groups, {g.name: keep_grid(g, plan.kept(g.name)) for g in groups}))
    found = []
    for name in plan.keep:
        group = analysis.group(name)
        if group.kind in ("hidden", "experts", "blocks") or len(group.sites) != 1:  # experts: the site is the router's logits
            continue
        site = group.sites[0]
        if site.layout.concatenated or len(masked_at.get(site.node, [])) > 1:
            continue  # the layer also reads other groups' units (a branch of a concatenation, a product)
        reading = _linear_reading(nodes[site.node])
        if reading is None:
            continue
        linear, weight, bias, transposed = reading
        if weight.target.startswith(removed):
            continue  # in a removed block: gone
        rank = nodes[site.node].meta["val"].dim()
        if site.axis % rank != rank - 1:
            continue  # the group is not the Linear's contracted axis
        keep_axis = spread(keep_grid(group, plan.kept(name)), site.layout)
        kept = keep_axis.nonzero().flatten()
        unit_of = spread(torch.arange(group.size).reshape(group.unit_shape), site.layout)[kept]
        unit_of = torch.unique(unit_of, return_inverse=True)[1]
        found.append(Consumer(group, linear.name, weight.target, bias.target if bias is not None else None,
                               transposed, kept, unit_of))
    return found



def _batches(analysis: Analysis, data: Iterable, collect_fn: Callable[[Any], Any] | None, max_batches: int | None,
             device: torch.device, desc: str, progress: bool) -> Iterator[Any]:
    """The model inputs of each batch, checked against the example inputs, at most ``max_batches``."""
    collect = collect_fn or default_collect
    reader = Reader(data, max_batches, "compensation")
    for index, batch in enumerate(tqdm(reader, desc=desc, unit="batch", disable=not progress, leave=False)):
        inputs = to_device(collect(batch), device)
        analysis.captured.check_inputs(inputs, f"batch {index}")
        batch_size_of(inputs)
        yield inputs


def _observe_into(stats: dict[str, InputStatistics]) -> Callable[[MaskSite, torch.Tensor], None]:
    """A mask-site observer adding the unmasked input to its group's statistics."""

    def observe(site: MaskSite, x: torch.Tensor) -> None:
        entry = stats.get(site.group)
        if entry is None:
            entry = stats[site.group] = InputStatistics.empty(x.shape[-1], x.device)
        entry.add(x)

    return observe


def _streaming_statistics(analysis: Analysis, found: list[Consumer], data: Iterable, *,
                          collect_fn: Callable[[Any], Any] | None, max_batches: int | None,
                          progress: bool) -> dict[str, InputStatistics]:
    """One forward pass of the dense model accumulating each consumer's input statistics."""
    inst = instrument(analysis, [c.group for c in found], read_only=True)
    stats: dict[str, InputStatistics] = {}
    for sites in inst.sites.values():
        for site in sites:
            site.observer = _observe_into(stats)
    device = device_of(inst.module)
    with torch.no_grad():
        for inputs in _batches(analysis, data, collect_fn, max_batches, device, "statistics", progress):
            call_with(inst.module, inputs)
    return stats


def _solve(weight: torch.Tensor, stats: InputStatistics, c: Consumer, method: str, damping: float,
           use_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None, float, float, bool]:
    """New kept columns, bias shift (or None), the error ``E|W x - W~ x_K|^2`` before and after, and
    whether it went down by more than float64 rounding of the output energy (not so when nothing is pruned)."""
    n = max(stats.rows, 1)
    moment, mean = stats.gram.cpu() / n, stats.total.cpu() / n
    if use_bias:  # centred: the bias shift takes the means
        moment = moment - torch.outer(mean, mean)
    kept = c.kept
    gram, cross = moment[kept][:, kept], moment[:, kept]
    energy = float(((weight @ moment) * weight).sum())
    wc = weight @ cross  # out x |K|
    w_k = weight[:, kept]
    if method == "ls":
        new = _ridge_columns(wc, gram, w_k, damping)
    else:  # per-unit scales: W_K diag(s) with s shared by a unit's columns
        onehot = torch.nn.functional.one_hot(c.unit_of, int(c.unit_of.max()) + 1).to(gram.dtype)  # |K| x units
        a = onehot.T @ ((w_k.T @ w_k) * gram) @ onehot
        b = onehot.T @ (w_k * wc).sum(0)
        pull = damping * float(a.diagonal().mean().clamp_min(1e-12))  # towards scale 1: the unchanged weights
        scales = torch.linalg.solve(a + pull * torch.eye(len(a), dtype=a.dtype), b + pull)
        new = w_k * (onehot @ scales)
    shift = weight @ mean - new @ mean[kept] if use_bias else None
    before, after = _output_error(energy, wc, gram, w_k), _output_error(energy, wc, gram, new)
    return new, shift, before, after, after < before - 1e-9 * abs(energy)


def _ridge_columns(wc: torch.Tensor, gram: torch.Tensor, w_k: torch.Tensor, damping: float) -> torch.Tensor:
    """The ``"ls"`` columns ``(W C + lambda W_K) (G + lambda I)^-1``: least squares with a ridge towards the
    original kept columns ``W_K`` (not towards zero), ``lambda`` = ``damping`` x the mean diagonal of ``G``."""
    ridge = damping * float(gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), (wc + ridge * w_k).T).T


def _output_error(energy: float, wc: torch.Tensor, gram: torch.Tensor, w_k: torch.Tensor) -> float:
    """``E|W x - W~ x_K|^2`` from the output energy ``E|W x|^2``, ``W C`` and ``G`` (``W~`` = ``w_k``)."""
    return energy - 2 * float((wc * w_k).sum()) + float(((w_k @ gram) * w_k).sum())


class _Fitter:
    """Solves one consumer and remembers the result for folding into the pruned module."""

    def __init__(self, method: str, bias: bool, damping: float) -> None:
        self.method, self.bias, self.damping = method, bias, damping
        self.reports: list[LayerReport] = []
        self.updates: dict[str, tuple[Consumer, torch.Tensor, torch.Tensor | None]] = {}

    def fit(self, c: Consumer, weight: torch.Tensor,
            stats: InputStatistics) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """New kept columns (of ``weight`` as ``(out, in)``) and bias shift (float64, CPU), or None where
        the error did not go down by more than float64 rounding."""
        new, shift, before, after, applied = _solve(weight.detach().double().cpu(), stats, c, self.method,
                                                    self.damping, self.bias and c.bias is not None)
        self.reports.append(LayerReport(c.group.name, c.weight, before, after, applied))
        if not applied:
            return None
        self.updates[c.group.name] = (c, new, shift)
        return new, shift

    def fold(self, pruned: GraphModule, analysis: Analysis, plan: Plan) -> None:
        """Write the re-fitted weights into ``pruned``; where the plan also prunes a consumer's outputs
        (a chained channel group, the residual width), only the kept rows."""
        groups = [analysis.group(name) for name in plan.keep if analysis.group(name).prunable]
        sliced = {name: axes for names, axes in kept_masks(
            groups, {g.name: keep_grid(g, plan.kept(g.name)) for g in groups}).items() for name in names}
        with torch.no_grad():
            for c, new, shift in self.updates.values():
                rows = sliced.get(c.weight, {}).get(1 if c.transposed else 0)
                if rows is not None:
                    rows = rows.nonzero().flatten()
                    new, shift = new[rows], shift[rows] if shift is not None else None
                target = pruned.get_parameter(c.weight)
                target.copy_((new.T if c.transposed else new).to(target.dtype))
                if shift is not None:
                    bias = pruned.get_parameter(c.bias)
                    bias.add_(shift.to(bias.dtype))


def input_flattener(gm: GraphModule) -> Callable[[Any], list]:
    """A function from ``gm``'s inputs (a tensor, a tuple of args or a dict of kwargs, as
    :func:`fxgradnas.calibrate` takes them) to its flat placeholder values, in graph order."""
    signature = inspect.signature(gm.forward)

    def flatten(inputs: Any) -> list:
        if isinstance(inputs, dict):
            bound = signature.bind(**inputs)
        else:
            bound = signature.bind(*(inputs if isinstance(inputs, (tuple, list)) else (inputs,)))
        return list(gm.graph.process_inputs(*bound.arguments.values()))

    return flatten


class _WalkDone(Exception):
    """Raised after the last consumer: the rest of the graph is not needed."""


class _LockstepInterpreter(Interpreter):
    """Runs the masked graph on all calibration batches together, node by node (each value in ``env`` is the
    list of per-batch values; values are freed after their last use). A consumer's input statistics are
    gathered at its mask site (the unmasked input); when the walk reaches the consumer it is fitted, and the
    rest of the walk runs with its new weights."""

    def __init__(self, gm: GraphModule, fitter: _Fitter, consumers: dict[str, Consumer], progress: bool) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.fitter, self.consumers = fitter, consumers
        fitted = {c.group.name for c in consumers.values()}  # each has one site: one mask node
        sites = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        self.observed = {name: site.group for name, site in sites.items()
                         if isinstance(site, MaskSite) and site.group in fitted}
        self.stats: dict[str, InputStatistics] = {}
        self.last = max((i for i, n in enumerate(gm.graph.nodes) if n.name in consumers), default=-1)
        self.bar = tqdm(total=self.last + 1, desc="compensating", unit="node", disable=not progress, leave=False)
        self.count = self.reached = 0

    def run_node(self, n: Node) -> Any:
        self.bar.update(1)
        self.reached += 1
        if n.op == "placeholder":
            return super().run_node(n)
        group = self.observed.get(n.name)
        if group is not None:  # the consumer's mask site (another group's may follow it)
            for x in self.env[n.args[0]]:
                self.stats.setdefault(group, InputStatistics.empty(x.shape[-1], x.device)).add(x)
        c = self.consumers.get(n.name)
        update = self.fitter.fit(c, c.matrix(self.module), self.stats.pop(c.group.name)) if c else None
        if update is not None:
            weight, bias = _refitted(self.module, c, update)
            values = [torch.nn.functional.linear(x, weight, bias) for x in self.env[n.args[c.input_arg]]]
        else:
            values = []
            for b in range(self.count):
                args = map_arg(n.args, lambda x, b=b: self.env[x][b])
                kwargs = map_arg(n.kwargs, lambda x, b=b: self.env[x][b])
                values.append(getattr(self, n.op)(n.target, args, kwargs))
        if self.reached > self.last:
            raise _WalkDone
        return values

    def walk(self, batches: list[list]) -> None:
        """``batches``: the flat placeholder values of each batch."""
        self.count = len(batches)
        try:
            self.run(*[list(column) for column in zip(*batches, strict=True)], enable_io_processing=False)
        except _WalkDone:
            pass
        finally:
            self.bar.close()


def _sequential(analysis: Analysis, plan: Plan, found: list[Consumer], fitter: _Fitter, data: Iterable, *,
                collect_fn: Callable[[Any], Any] | None, max_batches: int | None, progress: bool) -> None:
    """Walk the pruned model (every group of the plan masked) over all batches together, fitting each consumer
    when it is reached and running the rest of the walk with its new weights (see the module docstring)."""
    groups = [analysis.group(name) for name in plan.keep if analysis.group(name).prunable]
    inst = instrument(analysis, groups, read_only=True)
    inst.set_plan(groups, plan)
    flatten = input_flattener(inst.module)
    batches = [flatten(inputs) for inputs in _batches(analysis, data, collect_fn, max_batches,
                                                        device_of(inst.module), "statistics", False)]
    with torch.no_grad():
        _LockstepInterpreter(inst.module, fitter, {c.linear: c for c in found}, progress).walk(batches)


def _refitted(gm: GraphModule, c: Consumer,
              update: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The consumer's ``(out, in)`` weight and bias with the re-fit folded in (pruned columns zero:
    their inputs are masked to zero)."""
    weight = c.matrix(gm)
    new_kept, shift = update
    new = torch.zeros_like(weight)
    new[:, c.kept.to(weight.device)] = new_kept.to(weight)
    bias = gm.get_parameter(c.bias) if c.bias is not None else None
    if shift is not None:
        bias = bias + shift.to(bias)
    return new, bias


@dataclass
class WidthReader:
    """A Linear reading input columns that a ``hidden`` group prunes: its weight, the dense graph's Linear node
    and the pruned module's, the kept input columns and (None: all) kept output rows."""

    group: str
    weight: str
    bias: str | None
    dense: str
    pruned: str
    kept: torch.Tensor
    rows: torch.Tensor | None


class _CrossStatistics:
    """Float64 sums over rows of a Linear's dense input ``x`` and pruned input ``x'``: ``x^T x``, ``x^T x'``,
    ``x'^T x'`` and the means."""

    def __init__(self) -> None:
        self.dense = self.cross = self.pruned = self.dense_total = self.pruned_total = None
        self.rows = 0

    def add(self, x: torch.Tensor, x_pruned: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        y = x_pruned.detach().reshape(-1, x_pruned.shape[-1]).float()
        sums = ((x.T @ x).double(), (x.T @ y).double(), (y.T @ y).double(), x.sum(0).double(), y.sum(0).double())
        if self.dense is None:
            self.dense, self.cross, self.pruned, self.dense_total, self.pruned_total = sums
        else:
            for name, value in zip(("dense", "cross", "pruned", "dense_total", "pruned_total"), sums, strict=True):
                getattr(self, name).add_(value)
        self.rows += x.shape[0]


def width_readers(analysis: Analysis, plan: Plan, pruned: GraphModule) -> list[WidthReader]:
    """The Linears whose input columns a pruned ``hidden`` group of ``plan`` cuts, each with its nodes in the dense
    graph and in ``pruned``: what :func:`compensate` re-fits for a pruned residual width. A weight tied to
    another tensor (an embedding shared with the LM head) or read by anything but one ``linear`` is left out.

    Args:
        analysis: The analysis ``plan`` was made for.
        plan: The plan.
        pruned: The module :func:`fxgradnas.apply_plan` made for ``plan``.
    """
    groups = [analysis.group(name) for name in plan.keep if analysis.group(name).prunable]
    grids = {g.name: keep_grid(g, plan.kept(g.name)) for g in groups}
    masks = kept_masks(groups, grids)
    dense_nodes, pruned_nodes = _linears_by_weight(analysis.captured.module), _linears_by_weight(pruned)
    readers_of: dict[str, int] = {}  # weight -> how many nodes read it
    for n in analysis.captured.module.graph.nodes:
        if n.op == "get_attr":
            readers_of[n.target] = readers_of.get(n.target, 0) + len(n.users)
    found = []
    for g in groups:
        if g.kind != "hidden" or bool(grids[g.name].all()):
            continue
        for t in g.params:
            if (len(t.names) != 1 or t.axis != 1 or readers_of.get(t.name) != 1
                    or len(dense_nodes.get(t.name, ())) != 1 or len(pruned_nodes.get(t.name, ())) != 1):
                continue
            dense = dense_nodes[t.name][0]
            bias = dense.args[2] if len(dense.args) > 2 else dense.kwargs.get("bias")
            axes = masks[t.names]
            rows = axes[0].nonzero().flatten() if 0 in axes else None
            found.append(WidthReader(g.name, t.name, _get_attr(bias).target if _get_attr(bias) is not None else None,
                                     dense.name, pruned_nodes[t.name][0].name, axes[1].nonzero().flatten(), rows))
    return found


def _linears_by_weight(gm: GraphModule) -> dict[str, list[Node]]:
    """The ``linear`` nodes of ``gm`` by the target of their weight's ``get_attr``."""
    found: dict[str, list[Node]] = {}
    for n in gm.graph.nodes:
        if n.target is aten.linear.default and _get_attr(n.args[1]) is not None:
            found.setdefault(n.args[1].target, []).append(n)
    return found


class _InputRecorder(Interpreter):
    """Runs a graph and keeps the first argument of the named nodes."""

    def __init__(self, gm: GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.names, self.inputs = names, {}

    def run_node(self, n: Node) -> Any:
        if n.name in self.names:
            self.inputs[n.name] = self.env[n.args[0]]
        return super().run_node(n)


def _refit_width_readers(analysis: Analysis, pruned: GraphModule, readers: list[WidthReader], data: Iterable,
                         damping: float, *, bias: bool, collect_fn: Callable[[Any], Any] | None,
                         max_batches: int | None, progress: bool) -> list[LayerReport]:
    """Re-fit, in ``pruned``, the Linears reading a pruned residual width (:func:`width_readers`) to the dense
    model's outputs, from one pass over ``data`` of the dense graph and ``pruned`` side by side (the ``"ls"``
    solve of the module docstring; ``damping`` scales the ridge by the mean diagonal of ``x'^T x'``)."""
    dense_gm = analysis.captured.module
    dense_names, pruned_names = {r.dense for r in readers}, {r.pruned for r in readers}
    dense_nodes = {n.name: n for n in dense_gm.graph.nodes}
    input_of = {r.weight: dense_nodes[r.dense].args[0].name for r in readers}  # q, k and v share theirs
    shared = {input_of[r.weight]: r for r in readers}  # one reader of each input
    stats = {key: _CrossStatistics() for key in shared}
    flatten_dense, flatten_pruned = input_flattener(dense_gm), input_flattener(pruned)
    with torch.no_grad():
        for inputs in _batches(analysis, data, collect_fn, max_batches, device_of(dense_gm), "width statistics",
                               progress):
            dense_run, pruned_run = _InputRecorder(dense_gm, dense_names), _InputRecorder(pruned, pruned_names)
            dense_run.run(*flatten_dense(inputs), enable_io_processing=False)
            pruned_run.run(*flatten_pruned(inputs), enable_io_processing=False)
            for key, r in shared.items():
                stats[key].add(dense_run.inputs[r.dense], pruned_run.inputs[r.pruned])
    reports = []
    for r in readers:
        weight = dense_gm.get_parameter(r.weight).detach().double().cpu()
        new, shift, before, after, applied = _solve_cross(weight, stats[input_of[r.weight]], r.kept, damping,
                                                          bias and r.bias is not None)
        reports.append(LayerReport(r.group, r.weight, before, after, applied))
        if not applied:
            continue
        if r.rows is not None:
            new, shift = new[r.rows], shift[r.rows] if shift is not None else None
        with torch.no_grad():
            target = pruned.get_parameter(r.weight)
            target.copy_(new.to(target.dtype))
            if shift is not None:
                pruned.get_parameter(r.bias).add_(shift.to(pruned.get_parameter(r.bias)))
    return reports


def _solve_cross(weight: torch.Tensor, stats: _CrossStatistics, kept: torch.Tensor, damping: float,
                 use_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None, float, float, bool]:
    """:func:`_solve`'s ``"ls"`` for a dense input ``x`` and a pruned input ``x'``: new columns for ``x'``, the bias
    shift (or None), the error ``E|W x - W~ x'|^2`` before (``W~ = W_K``) and after, and whether it went down."""
    n = max(stats.rows, 1)
    dense, cross, gram = stats.dense.cpu() / n, stats.cross.cpu() / n, stats.pruned.cpu() / n
    mean, mean_pruned = stats.dense_total.cpu() / n, stats.pruned_total.cpu() / n
    if use_bias:
        dense = dense - torch.outer(mean, mean)
        cross = cross - torch.outer(mean, mean_pruned)
        gram = gram - torch.outer(mean_pruned, mean_pruned)
    energy = float(((weight @ dense) * weight).sum())
    wc = weight @ cross
    w_k = weight[:, kept.cpu()]
    new = _ridge_columns(wc, gram, w_k, damping)
    shift = weight @ mean - new @ mean_pruned if use_bias else None
    before, after = _output_error(energy, wc, gram, w_k), _output_error(energy, wc, gram, new)
    return new, shift, before, after, after < before - 1e-9 * abs(energy)


def compensate(
    analysis: Analysis,
    plan: Plan,
    pruned: GraphModule,
    data: Iterable,
    options: CompensationOptions = CompensationOptions(),
    *,
    collect_fn: Callable[[Any], Any] | None = None,
    progress: bool = True,
) -> list[LayerReport]:
    """Re-fit the Linear layers consuming ``plan``'s pruned units on ``data`` and fold the new weights into
    ``pruned``, changed in place (see the module docstring). ``data`` is read once per call, in eval mode, on
    read-only views of the model's tensors.

    Args:
        analysis: The analysis ``plan`` was made for.
        plan: The plan ``pruned`` was made with.
        pruned: The module :func:`fxgradnas.apply_plan` made for ``plan``.
        data: An iterable of calibration batches (at most ``options.max_batches`` are read).
        options: Method, ridge, bias, sequential fitting and limits (:class:`fxgradnas.CompensationOptions`).
        collect_fn: ``collect_fn(batch)`` gives the model inputs (default
            :func:`fxgradnas.batches.default_collect`).
        progress: Show a progress bar.

    Returns:
        One report per re-fitted layer: its error before and after, and whether the fit was kept.

    Raises:
        ArgumentTypeError: ``analysis``, ``plan``, ``pruned``, ``options`` or ``collect_fn`` has the wrong type.
        DataError: ``data`` is empty or a batch does not match the example inputs.
    """
    check_analysis(analysis, "compensate")
    check_instance(options, CompensationOptions, "options")
    check_callable(collect_fn, "collect_fn", "batch")
    check_plan(plan)
    check_data(data)
    if not isinstance(pruned, GraphModule):
        raise ArgumentTypeError(f"pruned must be the GraphModule apply_plan made for the plan, not "
                                f"{type(pruned).__name__}")
    method, bias, damping, max_batches = options.method, options.bias, options.damping, options.max_batches
    sequential, max_width = options.sequential, options.max_width
    fitter = _Fitter(method, bias, damping)
    found = consumers(analysis, plan)
    readers = width_readers(analysis, plan, pruned) if method == "ls" and options.hidden else []
    if max_width is not None:
        gm = analysis.captured.module
        wide = [c.weight for c in found if c.matrix(gm).shape[1] > max_width]
        wide += [r.weight for r in readers if gm.get_parameter(r.weight).shape[1] > max_width]
        if wide:
            warnings.warn(f"compensation leaves {', '.join(wide)} as pruned: each reads more than max_width="
                          f"{max_width} columns (a float64 Gram matrix of width^2 numbers); pass a larger "
                          f"max_width to re-fit them", stacklevel=2)
            found = [c for c in found if c.weight not in wide]
            readers = [r for r in readers if r.weight not in wide]
    if not found and not readers:  # nothing to re-fit (e.g. convolutions consume every pruned unit): no pass
        return []
    if readers:  # two passes: the batches are read once
        data = list(Reader(data, max_batches, "compensation"))
    if sequential and found:
        _sequential(analysis, plan, found, fitter, data, collect_fn=collect_fn, max_batches=max_batches,
                    progress=progress)
    elif found:
        stats = _streaming_statistics(analysis, found, data, collect_fn=collect_fn, max_batches=max_batches,
                                      progress=progress)
        gm = analysis.captured.module
        for c in found:
            if c.group.name in stats:
                fitter.fit(c, c.matrix(gm), stats[c.group.name])
    fitter.fold(pruned, analysis, plan)
    reports = fitter.reports
    if readers:  # after the others: their inputs come from the pruned module with those already re-fitted
        reports += _refit_width_readers(analysis, pruned, readers, data, damping, bias=bias, collect_fn=collect_fn,
                                        max_batches=max_batches, progress=progress)
    return reports


def timed_compensation(analysis: Analysis, plan: Plan, pruned: GraphModule, data: Iterable,
                       options: CompensationOptions = CompensationOptions(),
                       **keywords: Any) -> tuple[list[LayerReport], float]:
    """:func:`compensate` and the seconds it took."""
    start = time.perf_counter()
    reports = compensate(analysis, plan, pruned, data, options, **keywords)
    return reports, time.perf_counter() - start
