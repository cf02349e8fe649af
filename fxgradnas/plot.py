"""The picture of a pruning: per layer, the units kept against the original, one panel per kind of
group (attention heads, MLP channels, ...), a bar for a model-wide group (the residual width), and
optionally every unit's score.

Needs the ``plot`` extra (matplotlib); draws on a bare Agg figure, so no pyplot window and no change to
the caller's matplotlib backend. Reads the result it is given and imports nothing of fxgradnas.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .analysis import Group
    from .prune import PruneResult

KIND_ORDER = ("heads", "channels", "experts", "hidden", "blocks")
KIND_LABELS = {"heads": "attention heads", "channels": "MLP / conv channels", "experts": "experts (mixture of experts)",
               "hidden": "residual width", "blocks": "layers (residual blocks)"}
KEPT, ORIGINAL, PRUNED = "#1f77b4", "#d9d9d9", "#d62728"


def _layer_of(name: str) -> int | None:
    """The layer number in a group name (``model.layers.3.mlp`` -> 3), if it has exactly one."""
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", name)
    return int(numbers[0]) if len(numbers) == 1 else None


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def layer_positions(groups: list[Group]) -> tuple[list[Group], list[str], str]:
    """The groups in layer order with their tick labels and the axis label: layer numbers when every
    group has a distinct one, else the group names."""
    layers = [_layer_of(g.name) for g in groups]
    if None not in layers and len(set(layers)) == len(layers):
        ordered = sorted(zip(layers, groups, strict=True), key=lambda pair: pair[0])
        return [g for _, g in ordered], [str(n) for n, _ in ordered], "layer"
    ordered = sorted(groups, key=lambda g: _natural(g.name))
    return ordered, [g.name for g in ordered], "group"


def _kept(result: PruneResult, g: Group) -> list[int]:
    """The units the plan keeps (none in a removed block)."""
    removed = [b.path + "." for blocks in result.analysis.by_kind("blocks") if blocks.name in result.plan.keep
               for i, b in enumerate(blocks.blocks) if i not in result.plan.keep[blocks.name]]
    if (g.name + ".").startswith(tuple(removed)):
        return []
    return result.plan.keep.get(g.name, list(range(g.size)))


def _label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind)


def plot_result(result: PruneResult, path: str | Path, *, scores: bool = False, title: str | None = None,
                dpi: int = 120) -> Path:
    """Draw ``result`` to ``path`` (PNG, SVG, PDF by the suffix) and return the path.

    One panel per kind of searched group, layers in order along x: grey bars the original unit counts,
    blue the kept ones with the count on top ("KVxQ" for grouped-query heads: KV heads x queries per KV
    head). A kind with one model-wide group (the residual width) is one horizontal bar. The title gives
    the params and FLOPs ratios. With ``scores`` each per-layer panel gets one below with every unit's
    score (relative to the best unit of its group, log scale): kept units blue, pruned ones red.

    Args:
        result: What :func:`fxgradnas.prune` made.
        path: The image file to write (its suffix picks the format).
        scores: Also draw every unit's score.
        title: The title's lead, before the params and FLOPs ratios (default: "pruned model").
        dpi: Resolution of a raster image.
    """
    from matplotlib.figure import Figure

    searched = [result.analysis.group(name) for name in result.search.choices]
    kinds = sorted(dict.fromkeys(g.kind for g in searched),
                   key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))
    by_kind = {kind: layer_positions([g for g in searched if g.kind == kind]) for kind in kinds}
    panels: list[tuple[str, str]] = []
    for kind in kinds:
        if len(by_kind[kind][0]) == 1 and by_kind[kind][2] == "group":
            panels.append((kind, "whole"))
        else:
            panels += [(kind, "kept"), *([(kind, "scores")] if scores else [])]
    heights = [0.9 if panel == "whole" else 2.4 for _, panel in panels]
    widest = max(len(groups) for groups, _, _ in by_kind.values())
    fig = Figure(figsize=(max(7.0, 2.5 + 0.32 * widest), 0.7 + sum(heights)), layout="constrained", dpi=dpi)
    axes = fig.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (kind, panel) in zip(axes, panels, strict=True):
        groups, ticks, axis_label = by_kind[kind]
        if panel == "whole":
            _whole_panel(ax, result, groups[0], kind)
            continue
        x = list(range(len(groups)))
        (_kept_panel if panel == "kept" else _score_panel)(ax, result, groups, x, kind)
        ax.set_xticks(x, ticks, rotation=0 if axis_label == "layer" else 60,
                      ha="center" if axis_label == "layer" else "right", fontsize=8)
        ax.set_xlim(-0.7, len(groups) - 0.3)
        ax.set_xlabel(axis_label)
    achieved = result.achieved
    fig.suptitle(f"{title or 'pruned model'}: params {achieved['params']:.1%}, FLOPs {achieved['flops']:.1%} "
                 "of the original", fontsize=11)
    path = Path(path)
    fig.savefig(path)
    return path


def _kept_panel(ax: Any, result: PruneResult, groups: list[Group], x: list[int], kind: str) -> None:
    original = [g.size for g in groups]
    kept = [len(_kept(result, g)) for g in groups]
    per_axis = [result.search.choices[g.name].kept for g in groups]
    grouped_query = kind == "heads" and any(len(k) == 2 for k in per_axis)
    ax.bar(x, original, color=ORIGINAL, width=0.8, label="original")
    bars = ax.bar(x, kept, color=KEPT, width=0.8, label="kept\n(KV heads x queries)" if grouped_query else "kept")
    if len(groups) <= 48:
        labels = ["x".join(map(str, k)) if grouped_query and n else str(n) for k, n in zip(per_axis, kept, strict=True)]
        ax.bar_label(bars, labels, fontsize=7 if len(groups) > 16 else 8, padding=1)
    ax.set_ylim(0, max(original) * 1.15)
    same = len(set(original)) == 1
    ax.set_ylabel(f"{_label(kind)}\nkept of {original[0]}" if same else f"{_label(kind)}\nkept")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _whole_panel(ax: Any, result: PruneResult, g: Group, kind: str) -> None:
    """A model-wide group as one horizontal bar: kept of the original."""
    kept = len(_kept(result, g))
    ax.barh([0], [g.size], color=ORIGINAL, height=0.6)
    ax.barh([0], [kept], color=KEPT, height=0.6)
    ax.text(kept, 0, f" {kept} of {g.size} kept ({kept / g.size:.0%})", va="center", fontsize=9)
    ax.set_yticks([0], [_label(kind)])
    ax.set_xlim(0, g.size * 1.02)
    ax.set_xlabel(f"{g.name}: units (the same in every layer)" if kind == "hidden" else f"{g.name}: units")


def _score_panel(ax: Any, result: PruneResult, groups: list[Group], x: list[int], kind: str) -> None:
    import numpy as np
    from matplotlib.lines import Line2D

    rng = np.random.default_rng(0)
    for position, g in zip(x, groups, strict=True):
        values = result.scores[g.name].double().numpy()
        top = values.max()
        relative = values / top if top > 0 else np.ones_like(values)
        floor = relative[relative > 0].min() if (relative > 0).any() else 1.0
        relative = np.maximum(relative, floor)  # zeros would have no place on a log axis
        kept = np.zeros(len(values), dtype=bool)
        kept[_kept(result, g)] = True
        jitter = position + rng.uniform(-0.3, 0.3, len(values))
        ax.scatter(jitter[kept], relative[kept], s=6, color=KEPT, linewidths=0)
        ax.scatter(jitter[~kept], relative[~kept], s=6, color=PRUNED, linewidths=0)
    ax.set_yscale("log")
    ax.set_ylabel(f"{_label(kind)}\nscore / best in layer")
    ax.legend(handles=[Line2D([], [], marker="o", ls="", color=color, label=label)
                       for color, label in ((KEPT, "kept"), (PRUNED, "pruned"))],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
