"""Per-layer widths against what serves everywhere: uniform widths, whole layers, both; quality and speed
of SmolLM2-135M-Instruct, all measured in one run.

    python benchmarks/portable.py [--budgets 0.9 0.75] [--layouts ...] [--heal-steps 100] [--json runs/portable.json]

Layouts (``--layouts``): ``per-layer`` (heads and MLP channels, each layer its own count: ``prune``'s
default), ``uniform`` (the same, ``uniform=True``: one count per kind), ``blocks`` (whole decoder layers
only) and ``blocks+uniform`` (layers, heads and channels, uniform). Each is searched on the same dense
scores (calibration as in benchmarks/quality.py: 16 x 8 x 128 tokens of stdlib source), rewritten,
re-fitted (``prune``'s default ls re-fit) and written back into the Hugging Face model; the quality table
gives perplexity on quality.py's three evaluation texts with the re-fit alone and after ``--heal-steps``
steps of :func:`fxgradnas.heal` (KL to the dense model on stdlib windows, the same for every layout), and
whether the checkpoint is standard (plain ``from_pretrained`` loads it).

The speed table times the dense model and each written-back model (before healing: healing changes no
shape) on this CPU: forward latency at batch 1 x 512 tokens and at batch 16 x 128, and greedy ``generate``
tokens/s with the KV cache at batch 1 and batch 8 (a 16-token prompt, ``--new-tokens`` new tokens), as
ratios to dense, beside the params and FLOPs ratios. Repetitions are interleaved over the models and the
minimum is kept (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples/, benchmarks/

import torch
from tabulate import tabulate

import fxgradnas
from benchmarks.quality import text_windows
from examples.smollm2 import evaluation_batches, load_smollm2
from fxgradnas import CalibrationOptions, CompensationOptions, SearchOptions, hf
from fxgradnas.analysis.groups import KINDS
from fxgradnas.compensate import timed_compensation
from fxgradnas.datasets import (
    CALIBRATION_SKIP,
    batched,
    causal_lm_loss,
    perplexity,
    stdlib_text,
    token_windows,
)

LAYOUTS = {"per-layer": (("heads", "channels"), False), "uniform": (("heads", "channels"), True),
           "blocks": (("blocks",), False), "blocks+uniform": (("blocks", "heads", "channels"), True)}


def forward_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        return time.perf_counter() - start


def tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=0)
        seconds = time.perf_counter() - start
    return (out.shape[1] - prompt.shape[1]) * prompt.shape[0] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.75])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--heal-steps", type=int, default=100)
    parser.add_argument("--heal-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (the minimum is kept)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--scores", type=Path, help="keep the dense scores in this file and reuse them (groups it "
                                                    "lacks are calibrated and added)")
    parser.add_argument("--json", type=Path, default=Path("runs/portable.json"))
    args = parser.parse_args()
    layouts = [name for name in args.layouts if all(k in KINDS for k in LAYOUTS[name][0])]
    if layouts != args.layouts:
        print(f"skipping {sorted(set(args.layouts) - set(layouts))}: this fxgradnas has no such kind", flush=True)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    calibration = batched(text_windows(tokenizer, "stdlib", args.seq_len, args.batches * args.batch_size),
                          args.batch_size)
    texts = evaluation_batches(tokenizer, args.eval_windows, args.seq_len)
    heal_data = batched(text_windows(tokenizer, "stdlib", args.seq_len, args.heal_steps * args.heal_batch_size),
                        args.heal_batch_size) if args.heal_steps else []

    def evaluate(module: torch.nn.Module) -> dict[str, float]:
        return {k: perplexity(module, b) for k, b in texts.items()}

    analysis = fxgradnas.analyze(model, calibration[0])
    kinds = tuple(dict.fromkeys(k for name in layouts for k in LAYOUTS[name][0]))
    searched = [g for g in analysis.prunable if g.kind in kinds]
    saved = torch.load(args.scores) if args.scores and args.scores.exists() else {}
    missing = [g for g in searched if g.name not in saved]  # a mask's gradient does not depend on the others
    if missing:
        start = time.perf_counter()
        saved.update(fxgradnas.calibrate(analysis, calibration, causal_lm_loss,
                                         CalibrationOptions(max_batches=len(calibration)), groups=missing,
                                         progress=False))
        print(f"calibrated {len(missing)} groups in {time.perf_counter() - start:.0f} s", flush=True)
        if args.scores:
            args.scores.parent.mkdir(parents=True, exist_ok=True)
            torch.save(saved, args.scores)
    scores = fxgradnas.Scores({g.name: saved[g.name] for g in searched}, scorer="gradnas")
    dense_ppl = evaluate(model)
    quality = [{"layout": "dense", "budget": 1.0, "params": 1.0, "flops": 1.0, "standard": "-", **dense_ppl}]
    print(tabulate(quality, headers="keys", floatfmt=".4g"), flush=True)
    served: dict[str, torch.nn.Module] = {"dense": model}
    achieved: dict[str, dict[str, float]] = {"dense": {"params": 1.0, "flops": 1.0}}
    for budget in args.budgets:
        for name in layouts:
            layout_kinds, uniform = LAYOUTS[name]
            start = time.perf_counter()
            found = fxgradnas.search(analysis, scores, {"params": budget},
                                     SearchOptions(kinds=layout_kinds, uniform=uniform))
            pruned = fxgradnas.apply_plan(analysis, found.plan)
            timed_compensation(analysis, found.plan, pruned, calibration,
                               CompensationOptions(method="ls", max_batches=len(calibration)), progress=False)
            written = copy.deepcopy(model)
            structure = hf.write_back(written, analysis, found.plan, weights=pruned)
            seconds = time.perf_counter() - start
            label = f"{name} {budget:g}"
            served[label], achieved[label] = written.eval(), found.achieved
            row = {"layout": name, "budget": budget, **found.achieved, "standard": structure["standard"]}
            quality.append({**row, **evaluate(written), "healed": 0, "seconds": seconds})
            print(tabulate(quality[-1:], headers="keys", floatfmt=".4g"), flush=True)
            if args.heal_steps:
                healed = copy.deepcopy(pruned)
                report = fxgradnas.heal(healed, model, heal_data, steps=args.heal_steps, progress=False)
                quality.append({**row, **evaluate(healed), "healed": report.steps, "seconds": seconds + report.seconds})
                print(tabulate(quality[-1:], headers="keys", floatfmt=".4g"), flush=True)

    long = token_windows(tokenizer, stdlib_text(skip=CALIBRATION_SKIP), 512, 1)
    wide = texts["stdlib held-out"][0].repeat(2, 1)[:16]  # 16 x 128
    prompts = {1: long[:, :16], 8: wide[:8, :16]}
    best: dict[str, dict[str, float]] = {label: {} for label in served}
    torch.manual_seed(0)
    for _ in range(args.repeats):
        for label, m in served.items():
            times = {"forward 1x512 s": forward_seconds(m, long), "forward 16x128 s": forward_seconds(m, wide)}
            rates = {f"generate b{b} tok/s": tokens_per_second(m, p, args.new_tokens) for b, p in prompts.items()}
            for key, value in times.items():
                best[label][key] = min(best[label].get(key, value), value)
            for key, value in rates.items():
                best[label][key] = max(best[label].get(key, value), value)
    dense = best["dense"]
    speed = []
    for label, measured in best.items():
        speed.append({"model": label, "params": achieved[label]["params"], "flops": achieved[label]["flops"],
                      **{f"{k} speed-up": dense[k] / v if k.endswith(" s") else v / dense[k] for k, v in measured.items()},
                      **measured})
    print("\n" + tabulate(quality, headers="keys", floatfmt=".4g"))
    print("\n" + tabulate(speed, headers="keys", floatfmt=".4g"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "quality": quality,
                                     "speed": speed}, indent=1))


if __name__ == "__main__":
    main()
