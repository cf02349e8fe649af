"""Compensation without retraining: re-fit what consumes the pruned units so the layer output
reconstructs the dense one (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for
Transformers", mask tuning by linear least squares).

For a group whose units feed a Linear ``y = W x + b`` (o_proj for heads, down_proj for MLP
channels), one streaming pass over calibration batches accumulates the float64 Gram matrix
``S = E[x x^T]`` and mean ``mu = E[x]`` of the Linear's dense input. Keeping columns ``K`` and
pruning ``P``:

- ``"scale"``: per kept unit one scale ``s`` minimising ``E|W x - W_K diag(s) x_K|^2`` (a units x units
  system, Kwon's mask tuning);
- ``"ls"``: the re-fit ``W'_K = (W S[:, K] + lambda W_K) (S[K, K] + lambda I)^-1``, least squares with
  a ridge that pulls towards the original kept columns (``damping`` scales ``lambda`` by the mean
  diagonal of ``S[K, K]``), which keeps the fit from over-adapting to the calibration text;
- with a bias, ``bias=True`` also adds the mean contribution of what is left unexplained, so the
  output's mean is kept (for ``"ls"`` the re-fit then uses the covariance instead of ``S``).

The new weights are folded into the pruned module, which keeps its structure. A layer whose
reconstruction error on the calibration statistics did not go down is left unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from .analysis import Analysis, Group
from .calibrate import batch_size_of, call_with, default_collect, to_device
from .instrument import MaskSite, device_of, instrument
from .plan import Plan
from .selection import keep_grid, spread

METHODS = ("scale", "ls")
aten = torch.ops.aten


@dataclass
class InputStatistics:
    """Streaming float64 sums of a consumer's input: ``x^T x``, ``x`` and the row count."""

    gram: torch.Tensor
    total: torch.Tensor
    rows: int = 0

    @property
    def second_moment(self) -> torch.Tensor:
        return self.gram / max(self.rows, 1)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.rows, 1)


@dataclass
class LayerReport:
    group: str
    consumer: str
    error_before: float
    error_after: float
    applied: bool


def _consumer(gm: GraphModule, site_node: str) -> tuple[Node, Node, Node | None] | None:
    """The Linear reading a site: (linear node, weight get_attr, bias get_attr or None)."""
    node = next(n for n in gm.graph.nodes if n.name == site_node)
    users = [u for u in node.users if u.target is aten.linear.default and u.args[0] is node]
    if len(users) != 1 or len(node.users) != 1:
        return None
    linear = users[0]
    weight = linear.args[1]
    bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    if not (isinstance(weight, Node) and weight.op == "get_attr"):
        return None
    return linear, weight, bias if isinstance(bias, Node) and bias.op == "get_attr" else None


def collect_statistics(
    analysis: Analysis,
    groups: list[Group],
    data: Iterable,
    *,
    collect_fn: Callable[[Any], Any] | None = None,
    max_batches: int | None = 128,
    progress: bool = True,
) -> dict[str, InputStatistics]:
    """One forward pass over ``data`` accumulating each group's consumer-input statistics."""
    supported = [g for g in groups if len(g.sites) == 1 and _consumer(analysis.captured.module, g.sites[0].node)]
    inst = instrument(analysis, supported)
    stats: dict[str, InputStatistics] = {}

    def observe(site: MaskSite, x: torch.Tensor) -> None:
        rows = x.detach().movedim(site.axis, -1).reshape(-1, x.shape[site.axis]).float()
        entry = stats.get(site.group)
        if entry is None:
            width = rows.shape[1]
            entry = stats[site.group] = InputStatistics(
                torch.zeros(width, width, dtype=torch.float64, device=rows.device),
                torch.zeros(width, dtype=torch.float64, device=rows.device),
            )
        entry.gram += (rows.T @ rows).double()
        entry.total += rows.sum(0).double()
        entry.rows += rows.shape[0]

    for sites in inst.sites.values():
        for site in sites:
            site.observer = observe
    device = device_of(inst.module)
    collect = collect_fn or default_collect
    with torch.no_grad():
        for index, batch in enumerate(tqdm(data, desc="statistics", unit="batch", disable=not progress, leave=False)):
            if max_batches is not None and index >= max_batches:
                break
            inputs = to_device(collect(batch), device)
            batch_size_of(inputs)
            call_with(inst.module, inputs)
    return stats


def _error(weight: torch.Tensor, approx: torch.Tensor, moment: torch.Tensor) -> float:
    """E|W x - W~ x|^2 from the second moment of x."""
    diff = weight - approx
    return float(torch.einsum("oi,ij,oj->", diff, moment, diff))


def _refit(weight: torch.Tensor, moment: torch.Tensor, kept: torch.Tensor, unit_of: torch.Tensor, method: str,
           damping: float) -> torch.Tensor:
    """New kept columns (out x |K|) for ``method``; ``unit_of[i]`` is the unit of kept column i."""
    s_kk = moment[kept][:, kept]
    ridge = damping * float(s_kk.diagonal().mean().clamp_min(1e-12))
    if method == "ls":  # ridge towards the original kept columns, not towards zero
        system = s_kk + ridge * torch.eye(len(kept), dtype=moment.dtype)
        return torch.linalg.solve(system, (weight @ moment[:, kept] + ridge * weight[:, kept]).T).T
    # per-unit scales: W_K diag(s) with s shared by a unit's columns
    units = int(unit_of.max()) + 1
    onehot = torch.nn.functional.one_hot(unit_of, units).to(moment.dtype)  # |K| x units
    w_k = weight[:, kept]
    gram_w = w_k.T @ w_k  # |K| x |K|
    a = onehot.T @ (gram_w * s_kk) @ onehot
    b = onehot.T @ ((w_k.T @ weight) * moment[kept]).sum(1)
    pull = damping * float(a.diagonal().mean().clamp_min(1e-12))  # towards scale 1: the unchanged weights
    scales = torch.linalg.solve(a + pull * torch.eye(units, dtype=a.dtype), b + pull)
    return w_k * (onehot @ scales)


def compensate(
    analysis: Analysis,
    plan: Plan,
    pruned: GraphModule,
    statistics: dict[str, InputStatistics],
    *,
    method: str = "ls",
    bias: bool = True,
    damping: float = 1.0,
) -> list[LayerReport]:
    """Fold the re-fitted consumer weights into ``pruned`` (in place); one report row per layer."""
    if method not in METHODS:
        raise ValueError(f"compensate must be one of {METHODS}, not {method!r}")
    dense_gm = analysis.captured.module
    reports = []
    for name in plan.keep:
        group = analysis.group(name)
        if name not in statistics or group.kind == "hidden":
            continue
        site = group.sites[0]
        _, weight_node, bias_node = _consumer(dense_gm, site.node)
        weight = dense_gm.get_parameter(weight_node.target).detach().double().cpu()
        stats = statistics[name]
        keep_axis = spread(keep_grid(group, plan.kept(name)), site.layout)
        kept = keep_axis.nonzero().flatten()
        unit_index = torch.arange(group.size).reshape(group.unit_shape)
        unit_of = spread(unit_index, site.layout)[kept]
        unit_of = torch.unique(unit_of, return_inverse=True)[1]
        mean = stats.mean.cpu()
        moment = stats.second_moment.cpu()
        use_bias = bias and bias_node is not None
        fit_moment = moment - torch.outer(mean, mean) if use_bias else moment
        before = _error(weight, weight * keep_axis, fit_moment)
        new_kept = _refit(weight, fit_moment, kept, unit_of, method, damping)
        approx = torch.zeros_like(weight)
        approx[:, kept] = new_kept
        after = _error(weight, approx, fit_moment)
        applied = after < before
        if applied:
            target = pruned.get_parameter(weight_node.target)
            with torch.no_grad():
                target.copy_(new_kept.to(target.dtype))
                if use_bias:
                    shift = (weight - approx) @ mean
                    pruned.get_parameter(bias_node.target).add_(shift.to(target.dtype))
        reports.append(LayerReport(name, weight_node.target, before, after, applied))
    return reports


def timed_compensation(analysis: Analysis, plan: Plan, pruned: GraphModule, data: Iterable, *, method: str,
                       bias: bool = True, damping: float = 1.0, collect_fn=None, max_batches: int | None = 128,
                       progress: bool = True) -> tuple[list[LayerReport], float]:
    """Statistics pass plus re-fit for the groups the plan prunes; returns the reports and seconds."""
    start = time.perf_counter()
    groups = [analysis.group(n) for n in plan.keep if analysis.group(n).kind in ("heads", "channels")]
    stats = collect_statistics(analysis, groups, data, collect_fn=collect_fn, max_batches=max_batches,
                               progress=progress)
    reports = compensate(analysis, plan, pruned, stats, method=method, bias=bias, damping=damping)
    return reports, time.perf_counter() - start
