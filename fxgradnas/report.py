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
    """Touched parameter names (a blocks group's: its blocks), relative to the group's module where they live
    under it."""
    prefix = g.name + "."
    touched = [b.path for b in g.blocks] if g.blocks else [t.name for t in g.params]
    names = [n[len(prefix):] if n.startswith(prefix) else n for n in dict.fromkeys(touched)]
    shown = ", ".join(names[:limit])
    return f"{shown} +{len(names) - limit}" if len(names) > limit else shown


def group_rows(analysis: Analysis) -> list[dict]:
    """One record per group (plain values): what it is, what it touches, whether it can be pruned and
    exactly ("yes*": exact with a rescale the rewrite adds)."""
    return [{
        "group": g.name, "kind": g.kind, "units": g.size, "unit_shape": list(g.unit_shape),
        "unit_width": g.unit_width, "params_per_unit": g.params_per_unit,
        "parameters": list(dict.fromkeys(t.name for t in g.params)),
        "exact": "yes" if g.exact and g.exact_reason == "exact" else ("yes*" if g.exact else "no"),
        "status": "prunable" if g.prunable else f"frozen: {g.reason}",
    } for g in analysis.groups]


def analysis_table(analysis: Analysis, tablefmt: str = "simple") -> str:
    """One row per group: what it is, what it touches, whether it can be pruned and exactly.

    Args:
        analysis: The analysed model.
        tablefmt: A tabulate table format.
    """
    rows = [[r["group"], r["kind"], _units(g), r["unit_width"], f"{r['params_per_unit']:,.0f}", _params(g), r["exact"],
             r["status"]] for g, r in zip(analysis.groups, group_rows(analysis), strict=True)]
    headers = ["group", "kind", "units", "unit width", "params/unit", "parameters", "exact", "status"]
    table = tabulate(rows, headers=headers, tablefmt=tablefmt, maxcolwidths=[None] * 5 + [48, None, 56])
    notes = sorted({g.exact_reason for g in analysis.groups if g.exact_reason not in ("exact", "")})
    footer = "".join(f"\n  {n}" for n in notes if n)
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in analysis.seconds.items())
    return f"{table}\n{len(analysis.prunable)} of {len(analysis.groups)} groups prunable ({timing}){footer}"


def plan_rows(result: PruneResult) -> list[dict]:
    """One record per searched group (plain values): units kept, its own parameter saving, the share of
    its score given up and, where a layer consuming it was re-fitted, the reconstruction error."""
    errors = {r.group: r for r in result.compensation}
    rows = []
    for name, choice in result.search.choices.items():
        g = result.analysis.group(name)
        total = float(result.scores[name].double().sum())
        fit = errors.get(name)
        rows.append({
            "group": name, "kind": g.kind, "kept": len(choice.units), "of": g.size,
            "per_axis": _kept_shape(g, choice.kept), "params_removed": result.search.params_removed[name],
            "score_lost": choice.degradation / total if total > 0 else None,
            "compensation": None if fit is None else {"consumer": fit.consumer, "error_before": fit.error_before,
                                                      "error_after": fit.error_after, "applied": fit.applied},
        })
    return rows


def prune_table(result: PruneResult, tablefmt: str = "simple") -> str:
    """One row per searched group: units kept, its own parameter saving, the score it gave up.

    Args:
        result: What :func:`fxgradnas.prune` made.
        tablefmt: A tabulate table format.
    """
    records = plan_rows(result)
    rows = [[r["group"], r["kind"], f"{r['kept']}/{r['of']}", r["per_axis"], f"{r['params_removed']:,}",
             "-" if r["score_lost"] is None else f"{r['score_lost']:.1%}"] for r in records]
    headers = ["group", "kind", "kept", "per axis", "params removed", "score lost"]
    if result.compensation:
        headers.append("reconstruction error (before -> after)")
        for row, r in zip(rows, records, strict=True):
            fit = r["compensation"]
            row.append("" if fit is None else f"{fit['error_before']:.3g} -> {fit['error_after']:.3g}"
                       + ("" if fit["applied"] else " (kept)"))
    return tabulate(rows, headers=headers, tablefmt=tablefmt)


def _kept_shape(g: Group, kept: tuple[int, ...]) -> str:
    if g.kind == "heads" and len(kept) == 2:
        return f"{kept[0]} kv x {kept[1]}"
    return ""


def prune_summary(result: PruneResult) -> str:
    """The constraint, what was achieved, the scores, the self-check and the times, one line each.

    Args:
        result: What :func:`fxgradnas.prune` made.
    """
    s = result.search
    metric, budget = s.budget
    lines = [
        f"constraint  {metric} <= {budget:,} ({budget / s.base[metric]:.1%} of {s.base[metric]:,})",
        f"params      {s.base['params']:,} -> {s.costs['params']:,} ({s.achieved['params']:.1%})",
        f"flops       {s.base['flops']:,} -> {s.costs['flops']:,} ({s.achieved['flops']:.1%}, per example input)",
        f"scores      {result.scores.scorer}" + (f", granularity {result.scores.granularity}, {result.scores.batches} "
                                                  "batches" if result.scores.granularity else "")
        + (" (max_batches reached: later batches were not read)" if result.scores.truncated else ""),
    ]
    if s.evolve is not None:
        lines.append(f"evolve      {s.evolve}")
    if result.self_check is not None:
        lines.append(f"self-check  {result.self_check}")
    lines.append("time        " + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items()))
    return "\n".join(lines)


def markdown_report(data: dict) -> str:
    """The report of a ``fxgradnas prune`` run as markdown, from the plain record the command writes as
    JSON: sizes, perplexity and a generation before/after, the plan per group, the analysis, settings and
    times.

    Args:
        data: The record the command writes as JSON.
    """
    md = "github"
    lines = [f"# fxgradnas prune: {data['model']}", "", f"`{data['command']}`", ""]
    sizes = [[name, f"{v['before']:,}", f"{v['after']:,}", f"{v['after'] / v['before']:.1%}"]
             for name, v in data["sizes"].items()]
    lines += ["## Sizes", "", tabulate(sizes, headers=["", "before", "after", "after/before"], tablefmt=md,
                                       disable_numparse=True), ""]
    if data.get("checkpoint"):
        lines += ["## Checkpoint", "", f"The pruned model is {data['checkpoint']}.", ""]
    if data.get("perplexity"):
        rows = [[text, f"{v['before']:.3f}", f"{v['after']:.3f}", f"{v['after'] / v['before']:.2f}x"]
                for text, v in data["perplexity"].items()]
        lines += ["## Perplexity", "", data["settings"].get("eval windows", ""), "",
                  tabulate(rows, headers=["text", "before", "after", "after/before"], tablefmt=md), ""]
    if data.get("generation"):
        g = data["generation"]
        lines += ["## Greedy generation", "", f"- prompt: {g['prompt']!r}", f"- before: {g['before']!r}",
                  f"- after: {g['after']!r}", ""]
    plan = [[r["group"], r["kind"], f"{r['kept']}/{r['of']}", r["per_axis"], f"{r['params_removed']:,}",
             "-" if r["score_lost"] is None else f"{r['score_lost']:.1%}",
             "" if r["compensation"] is None else f"{r['compensation']['error_before']:.3g} -> "
             f"{r['compensation']['error_after']:.3g}" + ("" if r["compensation"]["applied"] else " (kept)")]
            for r in data["plan"]]
    lines += ["## Plan", "", tabulate(plan, headers=["group", "kind", "kept", "per axis", "params removed",
                                                      "score lost", "reconstruction error"], tablefmt=md), ""]
    groups = [[r["group"], r["kind"], r["units"], r["unit_width"], f"{r['params_per_unit']:,.0f}", r["exact"],
               r["status"]] for r in data["groups"]]
    lines += ["## Groups", "", tabulate(groups, headers=["group", "kind", "units", "unit width", "params/unit",
                                                          "exact", "status"], tablefmt=md), ""]
    lines += ["## Settings", "", *(f"- {k}: {v}" for k, v in data["settings"].items()), ""]
    times = [[step, f"{seconds:.1f}"] for step, seconds in data["seconds"].items()]
    lines += ["## Times", "", tabulate(times, headers=["step", "seconds"], tablefmt=md), ""]
    if data.get("files"):
        lines += ["## Files", "", *(f"- `{name}`: {what}" for name, what in data["files"].items()), ""]
    return "\n".join(lines)
