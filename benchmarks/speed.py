"""Where the time goes when pruning SmolLM2-135M-Instruct, all measured in one run.

    python benchmarks/speed.py [--repeats 3] [--json runs/speed.json]

Rows: capture + analysis; time per calibration batch (8 x 128 tokens) next to a plain
forward+backward with weights requiring grad on the same batch and next to the floor (the gradient of
the token embeddings alone, no weight gradient: the activation gradients any residual-width mask score needs);
search; rewrite; compensation; and the forward latency of the pruned module next to the dense one
(batch 1 x 512 tokens) beside the FLOPs ratio.
Repetitions are interleaved and the minimum is kept (the machine is shared and noisy).
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
from fxgradnas import CompensationOptions
from fxgradnas.compensate import timed_compensation
from fxgradnas.datasets import batched, causal_lm_loss, stdlib_text, token_windows


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", type=float, default=0.8)
    parser.add_argument("--json", type=Path, default=Path("runs/speed.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    windows = token_windows(tokenizer, stdlib_text(), 128, 8 * 4)
    batches = batched(windows, 8)
    long = token_windows(tokenizer, stdlib_text(skip=1_000_000), 512, 1)

    analysis = fxgradnas.analyze(model, batches[0])
    rows = [{"step": "capture (torch.export)", "seconds": analysis.seconds["capture"]},
            {"step": "analysis", "seconds": analysis.seconds["analysis"]}]

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model(batches[0]), batches[0]).backward()

    def floor() -> None:  # the gradient of the input embeddings only: no parameter gradient is computed
        embeds = model.get_input_embeddings()(batches[0]).detach().requires_grad_()
        torch.autograd.grad(causal_lm_loss(model(inputs_embeds=embeds), batches[0]), embeds)

    calibration: list[float] = []  # Scores.seconds: the batches only, after instrumenting

    def calibrate() -> None:
        calibration.append(fxgradnas.calibrate(analysis, batches, causal_lm_loss, progress=False).seconds)

    plain_t, floor_t, whole = [], [], []
    calibrate()  # first-call costs out of every column
    for _ in range(args.repeats):  # interleaved
        plain_t.append(timed(plain))
        floor_t.append(timed(floor))
        whole.append(timed(calibrate))
    model.zero_grad(set_to_none=True)
    per_batch = min(calibration) / len(batches)
    rows += [{"step": "plain forward+backward, per batch", "seconds": min(plain_t)},
             {"step": "floor: activation gradients only, per batch", "seconds": min(floor_t),
              "ratio": min(floor_t) / min(plain_t)},
             {"step": "calibration, per batch", "seconds": per_batch,
              "ratio": per_batch / min(plain_t), "target": "<= 0.7"},
             {"step": "calibration / floor", "ratio": per_batch / min(floor_t)},
             {"step": "calibration, fixed cost (instrumenting)", "seconds": min(whole) - min(calibration)}]

    scores = fxgradnas.calibrate(analysis, batches, causal_lm_loss, progress=False)
    rows.append({"step": f"calibration, {len(batches)} batches", "seconds": min(whole)})
    found = fxgradnas.search(analysis, scores, {"params": args.params})
    rows.append({"step": f"search ({args.params:.0%} params)", "seconds": found.seconds})
    rewrite = timed(lambda: fxgradnas.apply_plan(analysis, found.plan, check=False))
    checked = timed(lambda: fxgradnas.apply_plan(analysis, found.plan, check=True))
    pruned = fxgradnas.apply_plan(analysis, found.plan, check=False)
    rows += [{"step": "rewrite", "seconds": rewrite}, {"step": "rewrite + self-check", "seconds": checked}]
    for label, sequential in (("layer after layer", True), ("one dense pass", False)):
        _, seconds = timed_compensation(analysis, found.plan,
                                        fxgradnas.apply_plan(analysis, found.plan, check=False), batches,
                                        CompensationOptions(sequential=sequential), progress=False)
        rows.append({"step": f"compensation ls, {label}, {len(batches)} batches", "seconds": seconds,
                     "ratio": seconds / min(whole), "target": "< calibration"})

    dense_t, pruned_t = [], []
    with torch.no_grad():
        analysis.captured.module(long)
        pruned(long)
        for _ in range(args.repeats):
            dense_t.append(timed(lambda: analysis.captured.module(long)))
            pruned_t.append(timed(lambda: pruned(long)))
    rows += [{"step": "dense forward, 1 x 512 tokens", "seconds": min(dense_t)},
             {"step": "pruned forward, 1 x 512 tokens", "seconds": min(pruned_t),
              "ratio": min(pruned_t) / min(dense_t), "target": f"FLOPs ratio {found.achieved['flops']:.3f}"}]
    print(tabulate(rows, headers="keys", floatfmt=".3f", missingval=""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
