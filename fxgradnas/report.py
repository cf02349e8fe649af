"""Tables for people: what the analysis found, what a plan keeps.

A leaf of the package: it reads the objects it is given and imports nothing of fxgradnas at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tabulate import tabulate

if TYPE_CHECKING:
    from .analysis import Analysis, Group
    from .prune import PruneResult


def _units(g: Group) -> str:
    if g.kind == "heads" and len(g.unit_shape) == 2:
        return f"{g.size} ({g.unit_shape[0]} kv x {g.unit_shape[1]})"
    return str(g.size)


def _params(g: Group, limit: int = 3) -> str:
    """Touched parameter names, relative to the group's module where they live under it."""
    prefix = g.name + "."
    names = [n[len(prefix):] if n.startswith(prefix) else n for n in dict.fromkeys(t.name for t in g.params)]
    shown = ", ".join(names[:limit])
    return f"{shown} +{len(names) - limit}" if len(names) > limit else shown


def analysis_table(analysis: Analysis, tablefmt: str = "simple") -> str:
    """One row per group: what it is, what it touches, whether it can be pruned and exactly."""
    rows = []
    for g in analysis.groups:
        rows.append([
            g.name,
            g.kind,
            _units(g),
            g.unit_width,
            f"{g.params_per_unit:,.0f}",
            _params(g),
            "yes" if g.exact and g.exact_reason == "exact" else ("yes*" if g.exact else "no"),
            "prunable" if g.prunable else f"frozen: {g.reason}",
        ])
    headers = ["group", "kind", "units", "unit width", "params/unit", "parameters", "exact", "status"]
    table = tabulate(rows, headers=headers, tablefmt=tablefmt, maxcolwidths=[None] * 5 + [48, None, 56])
    notes = sorted({g.exact_reason for g in analysis.groups if g.exact_reason not in ("exact", "")})
    footer = "".join(f"\n  {n}" for n in notes if n)
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in analysis.seconds.items())
    return f"{table}\n{len(analysis.prunable)} of {len(analysis.groups)} groups prunable ({timing}){footer}"


def prune_table(result: PruneResult, tablefmt: str = "simple") -> str:
    """One row per searched group: units kept, its own parameter saving, the score it gave up."""
    rows = []
    for name, choice in result.search.choices.items():
        g = result.analysis.group(name)
        total = float(result.scores[name].double().sum())
        saved = result.search.params_removed[name]
        rows.append([
            name, g.kind, f"{len(choice.units)}/{g.size}", _kept_shape(g, choice.kept), f"{saved:,}",
            f"{choice.degradation / total:.1%}" if total > 0 else "-",
        ])
    headers = ["group", "kind", "kept", "per axis", "params removed", "score lost"]
    errors = {r.group: r for r in result.compensation}
    if errors:
        headers.append("reconstruction error (before -> after)")
        for row in rows:
            r = errors.get(row[0])
            row.append(f"{r.error_before:.3g} -> {r.error_after:.3g}" + ("" if r.applied else " (kept)") if r else "")
    return tabulate(rows, headers=headers, tablefmt=tablefmt)


def _kept_shape(g: Group, kept: tuple[int, ...]) -> str:
    if g.kind == "heads" and len(kept) == 2:
        return f"{kept[0]} kv x {kept[1]}"
    return ""


def prune_summary(result: PruneResult) -> str:
    s = result.search
    metric, budget = s.budget
    lines = [
        f"constraint  {metric} <= {budget:,} ({budget / s.base[metric]:.1%} of {s.base[metric]:,})",
        f"params      {s.base['params']:,} -> {s.costs['params']:,} ({s.achieved['params']:.1%})",
        f"flops       {s.base['flops']:,} -> {s.costs['flops']:,} ({s.achieved['flops']:.1%}, per example input)",
        f"scores      {result.scores.scorer}" + (f", mode {result.scores.mode}, {result.scores.batches} batches"
                                                  if result.scores.mode else "")
        + (" (max_batches reached: later batches were not read)" if result.scores.truncated else ""),
    ]
    if result.self_check is not None:
        lines.append(f"self-check  {result.self_check}")
    lines.append("time        " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))
    return "\n".join(lines)
