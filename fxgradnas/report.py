"""Tables for people: what the analysis found, what a plan keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tabulate import tabulate

if TYPE_CHECKING:
    from .analysis import Analysis, Group


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
            "yes" if g.exact and g.exactness == "exact" else ("yes*" if g.exact else "no"),
            "prunable" if g.prunable else f"frozen: {g.reason}",
        ])
    headers = ["group", "kind", "units", "unit width", "params/unit", "parameters", "exact", "status"]
    table = tabulate(rows, headers=headers, tablefmt=tablefmt, maxcolwidths=[None] * 5 + [48, None, 56])
    notes = sorted({g.exactness for g in analysis.groups if g.exactness not in ("exact", "")})
    footer = "".join(f"\n  {n}" for n in notes if n)
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in analysis.seconds.items())
    return f"{table}\n{len(analysis.prunable)} of {len(analysis.groups)} groups prunable ({timing}){footer}"
