"""From a group's kept units (a boolean grid of its ``unit_shape``) to kept indices along an axis.

An axis the group touches has a :class:`~fxgradnas.analysis.Layout`: row-major factors, some of
which are the group's unit axes. Kept units spread over the factors they own; factors the group
does not own (the head dim, the q/k/v piece of a fused projection) are kept whole. An axis that
carries only some unit axes (a KV projection carries the KV axis of a grouped-query heads grid)
keeps an entry when any unit it serves is kept.
"""

from __future__ import annotations

import torch

from .analysis import Group, Layout
from .errors import PlanError


def keep_grid(group: Group, keep: list[int] | None) -> torch.Tensor:
    """Boolean grid of ``group.unit_shape``; ``keep`` holds flat unit indices (None keeps all)."""
    grid = torch.zeros(group.size, dtype=torch.bool)
    if keep is None:
        grid[:] = True
    else:
        grid[torch.as_tensor(keep, dtype=torch.long)] = True
    return grid.reshape(group.unit_shape)


def project(grid: torch.Tensor, unit_axes: tuple[int, ...]) -> torch.Tensor:
    """The grid seen by an axis carrying ``unit_axes`` (in that order): any() over the others."""
    others = tuple(a for a in range(grid.dim()) if a not in unit_axes)
    if others and grid.dtype != torch.bool:
        raise ValueError("only a boolean grid can be projected onto fewer unit axes")
    seen = grid.any(dim=others) if others else grid
    order = sorted(unit_axes)
    return seen.permute([order.index(a) for a in unit_axes]) if len(unit_axes) > 1 else seen


def spread(grid: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A 1-D tensor over the whole axis: the grid entry of the unit each index belongs to."""
    seen = project(grid, layout.unit_axes)
    view = [f.size if f.unit_axis is not None else 1 for f in layout.factors]
    full = [f.size for f in layout.factors]
    if any(s is None for s in full):
        raise ValueError("an axis with a dynamic factor has no fixed index set")
    return seen.reshape(view).expand(full).reshape(-1)


def fold_to_units(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The reverse of :func:`spread`: per-index values along an axis (the last dim of ``values``)
    summed onto the unit axes the layout carries, in unit-axis order; leading dims are kept."""
    lead = values.dim() - 1
    folded = values.reshape(*values.shape[:-1], *[f.size for f in layout.factors])
    other = [lead + i for i, f in enumerate(layout.factors) if f.unit_axis is None]
    if other:
        folded = folded.sum(dim=other)
    order = layout.unit_axes
    if len(order) > 1:
        folded = folded.permute(*range(lead), *[lead + order.index(a) for a in sorted(order)])
    return folded


def kept_per_unit_axis(group: Group, grid: torch.Tensor) -> tuple[int, ...]:
    """Kept count along each unit axis when the kept set is a product after re-indexing (every
    kept KV head keeps the same number of queries); raises PlanError otherwise."""
    if grid.dim() == 1:
        return (int(grid.sum()),)
    rows = grid.reshape(grid.shape[0], -1)
    kept_rows = rows.any(dim=1)
    counts = rows[kept_rows].sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise PlanError(
            f"group {group.name!r} keeps {counts.tolist()} queries in its KV heads; a physically "
            f"pruned grouped-query attention needs the same count in every kept KV head"
        )
    return (int(kept_rows.sum()), int(counts[0]) if counts.numel() else 0)


def tensor_selections(groups: list[Group], grids: dict[str, torch.Tensor]) -> dict[tuple[str, ...], dict[int, torch.Tensor]]:
    """Kept-index masks of every parameter/buffer axis the groups touch, keyed by the tensor's names
    (tied names together); an axis touched by several groups keeps what all of them keep."""
    keep: dict[tuple[str, ...], dict[int, torch.Tensor]] = {}
    for g in groups:
        if g.name not in grids:
            continue
        for t in g.params + g.buffers:
            mask = spread(grids[g.name], t.layout)
            axes = keep.setdefault(t.names, {})
            axes[t.axis] = mask if t.axis not in axes else axes[t.axis] & mask
    return keep
