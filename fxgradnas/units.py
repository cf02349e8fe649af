"""From a group's kept units (a boolean grid of its ``unit_shape``) to kept indices along an axis.

An axis the group touches has a :class:`~fxgradnas.analysis.Layout`: row-major factors, some of
which are the group's unit axes. Kept units spread over the factors they own; factors the group
does not own (the head dim, the q/k/v piece of a fused projection) are kept whole. An axis that
carries only some unit axes (a KV projection carries the KV axis of a grouped-query heads grid)
keeps an entry when any unit it serves is kept. A factor that is a concatenation of parts (a fused
q/k/v projection sliced into its pieces) lays out each part by its own layout, one after the other.
"""

from __future__ import annotations

import functools
from math import prod

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


def coordinates(layout: Layout, axes: int) -> torch.Tensor:
    """``(length of the axis, axes)``: the unit index of each entry of the axis along each of ``axes``
    unit axes, -1 where the entry does not carry that unit axis (a head-dim factor carries none; the k part
    of a fused q/k/v projection carries the KV axis of a grouped-query grid but not the queries)."""
    coords = torch.full((1, axes), -1, dtype=torch.long)
    for f in layout.factors:
        if f.size is None:
            raise ValueError("an axis with a dynamic factor has no fixed index set")
        if f.parts:
            inner = torch.cat([coordinates(part, axes) for part in f.parts])
        else:
            inner = torch.full((f.size, axes), -1, dtype=torch.long)
            if f.unit_axis is not None:
                inner[:, f.unit_axis] = torch.arange(f.size)
        coords = torch.maximum(coords.repeat_interleave(len(inner), 0), inner.repeat(len(coords), 1))
    return coords


def _by_carried_axes(coords: torch.Tensor) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """The entries (a boolean row mask) that carry each set of unit axes, with that set."""
    carried = coords >= 0
    found = []
    for pattern in torch.unique(carried, dim=0):
        rows = (carried == pattern).all(dim=1)
        found.append((rows, tuple(int(a) for a in pattern.nonzero().flatten())))
    return found


def spread(grid: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A 1-D tensor over the whole axis: the grid entry of the unit each index belongs to (for an entry
    that carries only some unit axes, any() over the others)."""
    coords = coordinates(layout, grid.dim())
    out = torch.empty(len(coords), dtype=grid.dtype)
    for rows, axes in _by_carried_axes(coords):
        out[rows] = project(grid, axes)[tuple(coords[rows, a] for a in axes)]
    return out


def fold_to_units(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The reverse of :func:`spread`: per-index values along an axis (the last dim of ``values``)
    summed onto the unit axes the layout carries, in unit-axis order; leading dims are kept. An entry that
    carries only some of them counts for every unit along the others."""
    shape, pieces = _fold_indices(layout)
    lead = values.shape[:-1]
    out = values.new_zeros(*lead, *shape)
    for rows, flat, size, view in pieces:
        rows, flat = rows.to(values.device), flat.to(values.device)
        part = values.new_zeros(*lead, size).index_add_(-1, flat, values[..., rows])
        out = out + part.reshape(*lead, *view)
    return out


@functools.lru_cache(maxsize=4096)
def unit_of_entries(layout: Layout, shape: tuple[int, ...]) -> torch.Tensor:
    """The flat unit index (in a grid of ``shape``) of each entry along an axis whose entries carry every unit
    axis or none (-1: a concatenated part of other units, as another branch of a ``cat``)."""
    grid, pieces = _fold_indices(layout)
    if tuple(grid) != shape or any(size != prod(shape) for _, _, size, _ in pieces):
        raise ValueError("entries that carry only some of the unit axes")
    entries = torch.full((len(pieces[0][0]),), -1, dtype=torch.long)
    for rows, flat, _, _ in pieces:
        entries[rows] = flat
    return entries


@functools.lru_cache(maxsize=4096)
def _fold_indices(layout: Layout) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor, int, list[int]]]]:
    """What :func:`fold_to_units` needs of ``layout``, once per layout (it runs at every mask site in every
    backward): the unit grid's shape and, per set of carried unit axes, the entries that carry it, their
    flat index in that set's grid, its size and its view onto the whole grid."""
    axes = sorted(layout.unit_axes)
    coords = coordinates(layout, axes[-1] + 1 if axes else 0)
    shape = [int(coords[:, a].max()) + 1 for a in axes]
    pieces = []
    for rows, carried in _by_carried_axes(coords):
        if not carried:
            continue  # a part of other units (another branch of a concatenation)
        sizes = [shape[axes.index(a)] for a in carried]
        flat = torch.zeros(len(coords), dtype=torch.long)
        for a, n in zip(carried, sizes, strict=True):
            flat = flat * n + coords[:, a].clamp_min(0)
        pieces.append((rows, flat[rows], prod(sizes), [shape[axes.index(a)] if a in carried else 1 for a in axes]))
    return shape, pieces


def kept_per_unit_axis(group: Group, grid: torch.Tensor) -> tuple[int, ...]:
    """Kept count along each unit axis when the kept set is a product after re-indexing (every
    kept KV head keeps the same number of queries); raises PlanError otherwise. A blocks group, whose
    units differ in size, has one entry per block instead: 1 kept, 0 removed."""
    if group.kind == "blocks":
        return tuple(int(k) for k in grid.tolist())
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


def kept_masks(groups: list[Group], grids: dict[str, torch.Tensor]) -> dict[tuple[str, ...], dict[int, torch.Tensor]]:
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


def removed_blocks(groups: list[Group], grids: dict[str, torch.Tensor]) -> list[str]:
    """The module paths of the blocks that the kept-unit grids of blocks groups remove."""
    return [b.path for g in groups if g.kind == "blocks" and g.name in grids
            for b, kept in zip(g.blocks, grids[g.name].tolist(), strict=True) if not kept]
