"""Do gradnas scores rank pruning choices better than random? A toy decoder trained in-process.

    python benchmarks/toy_quality.py [--json runs/toy_quality.json] [--seed 0] [--steps 400]

Trains a 4-layer Llama-style GQA decoder (``tests.zoo.llama``: hidden 64, MLP 256, 4 query /
2 KV heads of 16, vocab 32) on a synthetic next-token task, a lagged modular Fibonacci:
``x[t] = (x[t-1] + x[t-1-LAG]) mod VOCAB`` after ``LAG + 1`` random tokens, so every later token is
predictable (loss -> 0, chance is ln 32 = 3.47) but only by attending to two earlier positions and
adding them in the MLP. Then prunes the same trained model to 60 % of its parameters with every
scorer through the same binary search (heads and MLP channels, multiple of 8): gradnas (granularity batch
and sample), l1, and random (seeds 0, 1, 2), and prints the held-out loss (fresh sequences, a seed
neither training nor calibration used) and next-token accuracy of the dense and each pruned model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ and examples/

import torch
from tabulate import tabulate

import fxgradnas
from fxgradnas import CalibrationOptions, SearchOptions
from fxgradnas.search import group_choices
from tests.tasks import LAG, VOCAB, accuracy, sequences, task_loss
from tests.zoo import llama

MODEL = dict(n_layer=4, n_head=4, n_kv_head=2, head_dim=16, hidden=64, intermediate=256, vocab=VOCAB)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    logits = model(x)
    return {"loss": float(task_loss(logits, x)), "accuracy": accuracy(logits, x)}


def train(seed: int, steps: int, batch: int, length: int, lr: float) -> tuple[torch.nn.Module, torch.Tensor]:
    """The zoo llama from ``seed``, trained with AdamW and a one-cycle schedule; returned in eval mode."""
    model, example = llama(**MODEL, seed=seed)
    model.train()
    gen = torch.Generator().manual_seed(1000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        x = sequences(batch, length, gen)
        loss = task_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval(), example


def same_allocation(analysis: fxgradnas.Analysis, reference: fxgradnas.PruneResult, scores: fxgradnas.Scores,
                    multiple_of: int) -> torch.nn.Module:
    """Keep as many units per group (per KV group and query for heads) as ``reference`` does, but
    the top ones by ``scores``: separates the ranking within a group from the allocation across them."""
    keep = {}
    for name, ref in reference.search.choices.items():
        group = analysis.group(name)
        choices = group_choices(group, scores[name], SearchOptions(multiple_of=multiple_of))
        choice = next(c for c in choices if c.kept == ref.kept)
        if len(choice.units) < group.size:
            keep[name] = list(choice.units)
    return fxgradnas.apply_plan(analysis, fxgradnas.Plan(keep))


SCORERS = [
    ("gradnas (batch)", CalibrationOptions(scorer="gradnas", granularity="batch")),
    ("gradnas (sample)", CalibrationOptions(scorer="gradnas", granularity="sample")),
    ("l1", CalibrationOptions(scorer="l1")),
    *[(f"random (seed {s})", CalibrationOptions(scorer="random", seed=s)) for s in range(3)],
]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    start, cpu = time.perf_counter(), time.process_time()
    model, example = train(args.seed, args.steps, args.batch, args.length, args.lr)
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    held_out = sequences(args.held_out, args.length, torch.Generator().manual_seed(2000 + args.seed))
    cal_gen = torch.Generator().manual_seed(3000 + args.seed)
    calibration = [sequences(args.batch, args.length, cal_gen) for _ in range(args.calibration_batches)]
    start = time.perf_counter()
    analysis = fxgradnas.analyze(model, example)  # analysed once, shared by every scorer
    analyze_seconds = time.perf_counter() - start
    rows = [{"scorer": "dense", "params": 1.0, "flops": 1.0, **evaluate(model, held_out)}]
    results = {}
    for name, options in SCORERS:
        result = results[name] = fxgradnas.prune(analysis, None, calibration, task_loss,
                                                 constraint={"params": args.budget}, progress=False,
                                                 search=SearchOptions(multiple_of=args.multiple_of),
                                                 calibration=options)
        rows.append({"scorer": name, **result.achieved, **evaluate(result.model, held_out),
                     "score_s": result.seconds["score"], "search_s": result.seconds["search"],
                     "rewrite_s": result.seconds["rewrite"],
                     "kept": {g: len(c.units) for g, c in result.search.choices.items()}})
    random_losses = [r["loss"] for r in rows if r["scorer"].startswith("random")]
    # Ablation: the units l1 / random pick, at the per-group sizes gradnas (batch) chose.
    reference = results["gradnas (batch)"]
    for name in ["l1", *(n for n in results if n.startswith("random"))]:
        pruned = same_allocation(analysis, reference, results[name].scores, args.multiple_of)
        rows.append({"scorer": f"{name}, gradnas sizes", **reference.achieved, **evaluate(pruned, held_out)})
    return {
        "task": {"vocab": VOCAB, "lag": LAG, "length": args.length, "chance_loss": math.log(VOCAB)},
        "model": MODEL, "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "threads": args.threads, "budget": {"params": args.budget}, "multiple_of": args.multiple_of,
        "calibration_batches": args.calibration_batches, "held_out": args.held_out,
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds, "train_cpu_seconds": train_cpu, "analyze_seconds": analyze_seconds,
        "random_mean_loss": sum(random_losses) / len(random_losses),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here (e.g. runs/toy_quality.json)")
    parser.add_argument("--seed", type=int, default=0, help="model init and data seed")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--budget", type=float, default=0.6, help="params ratio to keep")
    parser.add_argument("--multiple-of", type=int, default=8)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=512, help="held-out sequences")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: deterministic, robust to a busy CPU)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    out = run(args)
    table = [[r["scorer"], f"{r['params']:.3f}", f"{r['flops']:.3f}", f"{r['loss']:.4f}", f"{r['accuracy']:.1%}",
              f"{r['score_s']:.2f}" if "score_s" in r else "", f"{r['search_s'] * 1e3:.1f}" if "search_s" in r else ""]
             for r in out["rows"]]
    print(tabulate(table, headers=["scorer", "params", "flops", "held-out loss", "accuracy", "score s", "search ms"]))
    print(f"\n{out['params']:,} params, {out['steps']} steps x {out['batch']} x {args.length} tokens: trained in "
          f"{out['train_seconds']:.1f} s ({out['train_cpu_seconds']:.1f} s CPU, {args.threads} threads); analysis "
          f"{out['analyze_seconds']:.2f} s; chance loss {out['task']['chance_loss']:.3f}; "
          f"mean random loss {out['random_mean_loss']:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
