"""Pruning the residual width of SmolLM2-135M-Instruct at a params budget, with and without re-fitting the
Linears that read it (``CompensationOptions(hidden=...)``), against the plan that keeps the width whole.

    python benchmarks/hidden.py [--budget 0.75] [--hidden-weights 0.1 0.02] [--json runs/hidden.json]

Scores: gradnas on ``--batches`` x 8 x 128 tokens of CPython stdlib source, every group (the residual width
included). The reference search keeps the whole width at 75 % (benchmarks/RESULTS.md), so the width is made
cheaper to cut: its scores are multiplied by each ``--hidden-weights`` factor before the binary search over
heads, MLP channels and the width, which then cuts the width and keeps more heads and channels for the
same budget. Every plan is re-fitted on the calibration batches (``ls``, the library's damping), with the
width's readers re-fitted or not. Evaluation: ``--eval-windows`` x 128-token windows of Shakespeare (from
the start), the Python language reference and stdlib source past the calibration text, as
benchmarks/quality.py reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples/

import torch
from tabulate import tabulate

import fxgradnas
from examples.smollm2 import evaluation_batches, load_smollm2
from fxgradnas import CompensationOptions, SearchOptions, apply_plan
from fxgradnas.compensate import compensate
from fxgradnas.datasets import (
    batched,
    causal_lm_loss,
    perplexity,
    stdlib_text,
    token_windows,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.75)
    parser.add_argument("--hidden-weights", type=float, nargs="+", default=[0.1, 0.02])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("runs/hidden.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    calibration = batched(token_windows(tokenizer, stdlib_text(), 128, args.batches * 8), 8)
    texts = evaluation_batches(tokenizer, args.eval_windows)
    dense = {k: perplexity(model, b) for k, b in texts.items()}
    start = time.perf_counter()
    analysis = fxgradnas.analyze(model, calibration[0])
    scores = fxgradnas.calibrate(analysis, calibration, causal_lm_loss, progress=False)
    print(f"scores: {time.perf_counter() - start:.0f} s", flush=True)
    (hidden,) = [g.name for g in analysis.prunable if g.kind == "hidden"]
    plans = {"heads + channels (width whole)": fxgradnas.search(analysis, scores, {"params": args.budget}).plan}
    for weight in args.hidden_weights:
        weighted = {**scores, hidden: scores[hidden] * weight}
        found = fxgradnas.search(analysis, weighted, {"params": args.budget},
                                 SearchOptions(kinds=("heads", "channels", "hidden")))
        plans[f"width scores x {weight}"] = found.plan
    rows, records = [], []
    for label, plan in plans.items():
        width = len(plan.kept(hidden)) if hidden in plan.keep else analysis.group(hidden).size
        readers = (False, True) if width < analysis.group(hidden).size else (False,)
        for refit_width in readers:
            start = time.perf_counter()
            pruned = apply_plan(analysis, plan, check=False)
            reports = compensate(analysis, plan, pruned, calibration, CompensationOptions(hidden=refit_width),
                                 progress=False)
            seconds = time.perf_counter() - start
            ppl = {k: perplexity(pruned, b) for k, b in texts.items()}
            params = sum(p.numel() for p in pruned.parameters()) / sum(p.numel() for p in model.parameters())
            record = {"plan": label, "width kept": width, "width readers re-fitted": refit_width,
                      "params": params, "perplexity": ppl, "refit s": seconds,
                      "layers re-fitted": sum(r.applied for r in reports)}
            records.append(record)
            rows.append([label, width, "yes" if refit_width else "no", f"{params:.2%}",
                         *(f"{ppl[k]:.1f} ({ppl[k] / dense[k]:.2f}x)" for k in texts), f"{seconds:.0f}"])
            print(tabulate(rows[-1:], tablefmt="plain"), flush=True)
    print(tabulate(rows, headers=["plan", "width", "readers re-fitted", "params", *texts, "re-fit s"],
                   tablefmt="github"))
    print("dense:", ", ".join(f"{k} {v:.2f}" for k, v in dense.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"dense": dense, "rows": records}, indent=1))


if __name__ == "__main__":
    main()
