"""Binary search against ``searcher="evolve"`` on SmolLM2-135M-Instruct: perplexity on text unlike the
calibration text, wall time and forward passes.

    python benchmarks/evolve.py [--budgets 0.75] [--batches 8] [--held-out 2] [--forwards 64] [--json runs/evolve.json]

Both plans come from the same gradnas scores on ``--batches`` x ``--batch-size`` x ``--seq-len`` tokens of
CPython stdlib source; evolve then trades levels, measuring each candidate on ``--held-out`` more batches of
stdlib source (the next windows, not scored), within ``--forwards`` forward passes. Neither is re-fitted
(the comparison is of the searches); ``--refit`` adds each plan re-fitted on the scored batches at the default
ridge, as ``fxgradnas.prune`` returns it. Evaluation: ``--eval-windows`` x ``--seq-len``-token windows of
Shakespeare (from the start) and of the Python language reference, as benchmarks/quality.py reads them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples/

import torch
from tabulate import tabulate

import fxgradnas
from examples.smollm2 import EVALUATION_TEXTS, evaluation_batches, load_smollm2
from fxgradnas import CalibrationOptions, CompensationOptions, SearchOptions, apply_plan
from fxgradnas.compensate import compensate
from fxgradnas.datasets import (
    batched,
    causal_lm_loss,
    perplexity,
    stdlib_text,
    token_windows,
)
from fxgradnas.evolve import evolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--forwards", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--refit", action="store_true",
                        help="also rows with each plan re-fitted on the scored batches (CompensationOptions())")
    parser.add_argument("--json", type=Path, default=Path("runs/evolve.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    windows = token_windows(tokenizer, stdlib_text(), args.seq_len, (args.batches + args.held_out) * args.batch_size)
    data = batched(windows, args.batch_size)
    scored, held = data[:args.batches], data[args.batches:]
    texts = evaluation_batches(tokenizer, args.eval_windows, args.seq_len, EVALUATION_TEXTS[:2])
    start = time.perf_counter()
    analysis = fxgradnas.analyze(model, scored[0])
    scores = fxgradnas.calibrate(analysis, scored, causal_lm_loss, CalibrationOptions(max_batches=len(scored)),
                                 progress=False)
    score_s = time.perf_counter() - start
    rows = []
    for budget in args.budgets:
        start = time.perf_counter()
        found = fxgradnas.search(analysis, scores, {"params": budget})
        search_s = time.perf_counter() - start
        start = time.perf_counter()
        evolved = evolve(analysis, found, scores, held, causal_lm_loss,
                         SearchOptions(searcher="evolve", evolve_forwards=args.forwards,
                                       evolve_batches=args.held_out), seed=args.seed, progress=True)
        evolve_s = time.perf_counter() - start
        report = evolved.evolve
        for method, result, seconds, forwards in (("binary", found, score_s + search_s, 0),
                                                  ("evolve", evolved, score_s + search_s + evolve_s, report.forwards)):
            pruned = apply_plan(analysis, result.plan, check=False)
            ppl = {k: perplexity(pruned, b) for k, b in texts.items()}
            loss = report.loss_before if method == "binary" else report.loss_after
            rows.append({"method": method, "budget": budget, "params": result.achieved["params"],
                         "held-out stdlib loss": loss, **ppl, "seconds": seconds, "forwards": forwards})
            print(tabulate(rows[-1:], headers="keys", floatfmt=".4g"), flush=True)
            if args.refit:
                start = time.perf_counter()
                compensate(analysis, result.plan, pruned, scored, CompensationOptions(), progress=False)
                refit_s = time.perf_counter() - start
                ppl = {k: perplexity(pruned, b) for k, b in texts.items()}
                rows.append({"method": f"{method} + ls", "budget": budget, "params": result.achieved["params"],
                             "held-out stdlib loss": math.log(perplexity(pruned, held)), **ppl,
                             "seconds": seconds + refit_s, "forwards": forwards})
                print(tabulate(rows[-1:], headers="keys", floatfmt=".4g"), flush=True)
        rows[-1]["evolve"] = str(report)
    print(tabulate(rows, headers="keys", floatfmt=".4g"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
