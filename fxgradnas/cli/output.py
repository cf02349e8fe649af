"""What the command line writes: step lines on stderr, tables on stdout, and prune's output directory
(plan, report, picture)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .inputs import Source
from .models import checkpoint_bytes
from .parser import NO_COMPENSATION, SAMPLED, PruneSettings, UsageError

if TYPE_CHECKING:
    import torch

    from ..prune import PruneResult

PLOT_FILE, PLAN_FILE, REPORT_FILE = "pruned.png", "plan.json", "report"
FACTORY_WEIGHTS = "pruned_state_dict.pt"
STANDARD = "standard: transformers' AutoModelForCausalLM.from_pretrained loads it"
NOT_UNIFORM = "; --uniform prunes every layer alike, for a standard checkpoint that plain transformers loads"


class Steps:
    """Says on stderr which step runs and how long it took; keeps the times for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str, what: str) -> Iterator[None]:
        print(f"-- {what}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        print(f"   {what}: {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def show(title: str, body: str) -> None:
    """A table on stdout as soon as its step is done."""
    print(f"\n== {title}\n{body}\n", flush=True)


def output_directory(out: Path, source: Source) -> Path:
    """``--out``: new, empty, or the output of an earlier run (overwritten); never the model itself."""
    if source.directory is not None and out.resolve() == source.directory.resolve():
        raise UsageError("--out is the model's own directory; choose another")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / f"{REPORT_FILE}.json").is_file():
        raise UsageError(f"--out {out} is not empty and not the output of fxgradnas prune; choose another")
    return out


def detailed_seconds(steps: dict[str, float], pruning: dict[str, float]) -> dict[str, float]:
    """The command's step times with the pruning step split into its parts (the analysis ran before)."""
    parts = {k: v for k, v in pruning.items() if k != "analyze"}
    return {k: v for step, seconds in steps.items() for k, v in (parts if step == "prune" else {step: seconds}).items()}


def merged_structure(source: Path, structure: dict) -> dict:
    """The structure to save: a checkpoint pruned before keeps the attribute patches of that pruning."""
    from ..hf import STRUCTURE_FILE

    earlier = source / STRUCTURE_FILE
    if earlier.is_file():
        attributes = json.loads(earlier.read_text())["attributes"]
        for path, values in structure["attributes"].items():
            attributes[path] = {**attributes.get(path, {}), **values}
        structure = {**structure, "attributes": attributes}
    return structure


def draw(result: PruneResult, path: Path, title: str) -> bool:
    """The picture, if matplotlib is there (else a note); whether it was drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"   note: no {path.name}: matplotlib is not installed (pip install 'fxgradnas[plot]')", file=sys.stderr)
        return False
    result.plot(path, scores=True, title=title)
    return True


def settings_record(settings: PruneSettings, result: PruneResult, device: torch.device,
                    sampled: int = 0) -> dict[str, Any]:
    """The report's settings: what was asked for and what was achieved (``sampled``: windows the model sampled
    for the texts named :data:`SAMPLED`)."""
    search, calibration, compensation = settings.search, settings.calibration, settings.compensation
    metric, budget = result.search.budget
    texts = settings.texts
    windows = f"{settings.batch_size} x {settings.seq_len} tokens"
    return {
        "constraint": f"{metric} <= {budget:,} ({budget / result.search.base[metric]:.1%})",
        "achieved": ", ".join(f"{k} {v:.2%}" for k, v in result.achieved.items()),
        "scorer": calibration.scorer, "granularity": calibration.granularity, "recompute": calibration.recompute,
        "kinds": ", ".join(search.kinds), "multiple of": search.multiple_of, "uniform": search.uniform,
        "searcher": search.searcher if result.search.evolve is None else f"{search.searcher} ({result.search.evolve})",
        "rounds": calibration.rounds,
        "compensate": compensation.method if compensation is not None else NO_COMPENSATION,
        "damping": compensation.damping if compensation is not None else "-", "heal steps": settings.heal,
        "calibration": ", ".join(texts["--calibration"]) or settings.data or "-",
        "refit on": (", ".join(texts["--refit"] or texts["--calibration"]) or settings.data or "-")
        if compensation is not None else "-",
        "calibration windows": f"{result.scores.batches} batches of {windows}" if result.scores.batches else "-",
        SAMPLED: (f"{sampled} windows of {settings.seq_len} tokens the model sampled from its start token "
                  f"(seed {settings.calibration.seed})") if sampled else "-",
        "eval": ", ".join(texts["--eval"]) or "-",
        "eval windows": f"up to {settings.eval_batches} batches of {windows}",
        "device": str(device), "dtype": settings.dtype, "seed": calibration.seed,
    }


def outcome_record(result: PruneResult, before: dict, after: dict, source: Source, out: Path,
                   prompt: str) -> dict[str, Any]:
    """The report's sizes, perplexity and generation before/after, plan and groups."""
    from ..report import group_rows, plan_rows

    search = result.search
    sizes = {"params": {"before": before["params"], "after": after["params"]},
             "flops per example input": {"before": search.base["flops"], "after": search.costs["flops"]}}
    if source.directory is not None and checkpoint_bytes(source.directory):
        sizes["checkpoint bytes"] = {"before": checkpoint_bytes(source.directory), "after": checkpoint_bytes(out)}
    perplexity = {name: {"before": before["perplexity"][name], "after": after["perplexity"][name]}
                  for name in before.get("perplexity", {})}
    generation = ({"prompt": prompt, "before": before["generation"], "after": after["generation"]}
                  if "generation" in before else None)
    return {"sizes": sizes, "perplexity": perplexity, "generation": generation, "plan": plan_rows(result),
            "groups": group_rows(result.analysis)}


def write_report(report: dict, out: Path) -> None:
    """``report.json`` and ``report.md``."""
    from ..report import markdown_report

    (out / f"{REPORT_FILE}.json").write_text(json.dumps(report, indent=1))
    (out / f"{REPORT_FILE}.md").write_text(markdown_report(report))


def show_outcome(report: dict) -> None:
    """The before/after tables and the generations on stdout."""
    from tabulate import tabulate

    rows = [[name, f"{v['before']:,}", f"{v['after']:,}", f"{v['after'] / v['before']:.1%}"]
            for name, v in report["sizes"].items()]
    rows += [[f"perplexity {name}", f"{v['before']:.3f}", f"{v['after']:.3f}", f"{v['after'] / v['before']:.2f}x"]
             for name, v in report["perplexity"].items()]
    show("Before / after", tabulate(rows, headers=["", "before", "after", "after/before"], disable_numparse=True))
    if report.get("checkpoint"):
        show("Checkpoint", report["checkpoint"])
    if report["generation"]:
        g = report["generation"]
        show("Greedy generation", f"prompt  {g['prompt']!r}\nbefore  {g['before']!r}\nafter   {g['after']!r}")
