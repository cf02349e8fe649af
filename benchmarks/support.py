"""Which Hugging Face families prune, per transformers version: the support tables of README.md and
benchmarks/RESULTS.md, from ``benchmarks/breadth.py --hf --json FILE`` runs made with each version.

    python benchmarks/support.py [--write] [--pending NAME@VERSION=NOTE ...] VERSION=FILE [VERSION=FILE ...]

Each FILE is the JSON a breadth run wrote with that transformers VERSION installed; several files for
one version are read in order, a later one replacing the families it holds (a run ``--only NAME``
re-measures one family). ``--pending NAME@VERSION=NOTE`` marks the failing cells of a family in one version as
awaiting NOTE (a fix made elsewhere). ``--write`` replaces the text between the ``<!-- support:... -->`` markers of
README.md (families grouped by their results) and RESULTS.md (one row per family); without it the
tables are printed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
# the checks in a cell, in order, with their short names
CHECKS = {"analyze": "analysis", "heads": "heads", "plan_hc": "=masked", "plan_hidden": "=masked hidden",
          "plan_all": "=masked all", "prune": "prune 60 %", "write_back": "write-back", "generate": "generate",
          "save_load": "save/load"}


def load(pairs: list[str]) -> dict[str, dict[str, dict]]:
    """version -> family -> report (as breadth.py's JSON holds it), families in the order first seen."""
    runs: dict[str, dict[str, dict]] = {}
    for pair in pairs:
        version, _, file = pair.partition("=")
        if not file:
            raise SystemExit(f"expected VERSION=FILE, got {pair!r}")
        for report in json.loads(Path(file).read_text()):
            if report["source"] == "hf":
                runs.setdefault(version, {})[report["name"]] = report
    return runs


def heads_cell(report: dict | None) -> str:
    """Whether every attention has a prunable heads group."""
    check = (report or {}).get("checks", {}).get("heads")
    if check is None:
        return "not run"
    if check["ok"] is None:
        return "–"
    return "found" if check["ok"] else "frozen: " + re.sub(r"^\d+ of \d+ heads groups frozen: ", "", check["detail"])


def prune_cell(report: dict | None) -> str:
    """``prunes`` when every other check passed (a 60 % budget met, pruned = masked, Hugging Face write-back,
    generation, save/load), else what failed."""
    if report is None:
        return "not run"
    parts = []
    for name, check in report["checks"].items():
        if check["ok"] is not False or name not in CHECKS or name == "heads":
            continue
        detail = check["detail"]
        if detail.startswith("write_back failed"):
            continue  # generate and save/load of a failed write-back: the write-back says it
        match = re.match(r"ConstraintError: the smallest model keeps ([0-9.]+%)", detail)
        if name == "prune" and match:
            parts.append(f"60 % not met (the smallest model keeps {match.group(1)})")
        else:
            parts.append(f"{CHECKS[name]} fails ({detail.split(' [')[0][:50]}...)")
    return "; ".join(parts) or "prunes"


def cells(runs: dict[str, dict[str, dict]], name: str, pending: dict[tuple[str, str], str]) -> list[str]:
    out = []
    for version, run in runs.items():
        note = pending.get((name, version))
        for cell in (heads_cell, prune_cell):
            text = cell(run.get(name))
            out.append(text if note is None or text == "prunes" or text == "found" else f"pending: {note} (measured: {text})")
    return out


def _header(first: str, versions: list[str]) -> list[str]:
    return ["| " + first + " | " + " | ".join(f"{v}: heads | {v}: pruning" for v in versions) + " |",
            "|---|" + "---|---|" * len(versions)]


def per_family(runs: dict[str, dict[str, dict]], pending: dict[tuple[str, str], str]) -> str:
    families = list(dict.fromkeys(name for run in runs.values() for name in run))
    lines = _header("family", list(runs))
    for name in families:
        lines.append(f"| {name} | " + " | ".join(cells(runs, name, pending)) + " |")
    return "\n".join(lines)


def grouped(runs: dict[str, dict[str, dict]], pending: dict[tuple[str, str], str]) -> str:
    """Families with the same cells in every version share a row; the row where all prune comes first."""
    families = list(dict.fromkeys(name for run in runs.values() for name in run))
    rows: dict[tuple[str, ...], list[str]] = {}
    for name in families:
        rows.setdefault(tuple(cells(runs, name, pending)), []).append(name)
    order = sorted(rows, key=lambda row: (any(c not in ("prunes", "found") for c in row), families.index(rows[row][0])))
    lines = _header("families", list(runs))
    for row in order:
        names = rows[row]
        label = ", ".join(names) if len(names) < 6 else f"{len(names)} families: " + ", ".join(names)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def replace(path: Path, marker: str, text: str) -> None:
    content = path.read_text()
    start, end = f"<!-- support:{marker} -->", f"<!-- /support:{marker} -->"
    if start not in content or end not in content:
        raise SystemExit(f"{path.name} has no {start} ... {end} markers")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="VERSION=FILE", help="a breadth run's JSON and its transformers version")
    parser.add_argument("--pending", nargs="+", default=[], metavar="NAME@VERSION=NOTE",
                        help="a family's failing cells of one version await NOTE (a fix not yet in this branch)")
    parser.add_argument("--write", action="store_true", help="replace the support tables of README.md and RESULTS.md")
    args = parser.parse_args(argv)
    runs = load(args.runs)
    pending = {}
    for item in args.pending:
        key, _, note = item.partition("=")
        name, _, version = key.partition("@")
        if not note or version not in runs:
            parser.error(f"--pending {item!r}: expected NAME@VERSION=NOTE with VERSION one of {', '.join(runs)}")
        pending[(name, version)] = note
    if args.write:
        replace(README, "families", grouped(runs, pending))
        replace(RESULTS, "families", per_family(runs, pending))
        print(f"wrote the support tables of {README.name} and {RESULTS.relative_to(ROOT)}")
    else:
        print(grouped(runs, pending), per_family(runs, pending), sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
