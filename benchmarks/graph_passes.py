"""Time of the graph passes on full-size transformer configs (random weights, no download).

    python benchmarks/graph_passes.py [--json runs/graph_passes.json]

Prints one row per model: parameters, capture (torch.export) seconds, analysis seconds, groups
found, and the rewrite (apply_plan) of a plan keeping half of every head and MLP group, with and
without the self-check against the masked graph. The configs are GPT-2 124M and a
SmolLM2-135M-shaped Llama (30 layers, GQA 9/3).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

import fxgradnas


def gpt2_124m() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config())


def smollm2_shaped() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def measure(name: str, build, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 65))
    captures, analyses = [], []
    for _ in range(repeats):
        analysis = fxgradnas.analyze(model, {"input_ids": ids})
        captures.append(analysis.seconds["capture"])
        analyses.append(analysis.seconds["analysis"])
    kinds = {k: len(analysis.by_kind(k)) for k in ("heads", "channels", "hidden")}
    plan = fxgradnas.Plan({
        g.name: list(range(g.size // 2 if g.kind == "channels" else g.size - g.size // g.kv_heads))
        for g in analysis.prunable if g.kind in ("heads", "channels")
    })
    start = time.perf_counter()
    pruned = fxgradnas.apply_plan(analysis, plan, check=False)
    rewrite = time.perf_counter() - start
    start = time.perf_counter()
    fxgradnas.apply_plan(analysis, plan, check=True)
    rewrite_checked = time.perf_counter() - start
    return {
        "model": name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "capture_s": min(captures),
        "analysis_s": min(analyses),
        "total_s": min(c + a for c, a in zip(captures, analyses, strict=True)),
        "rewrite_s": rewrite,
        "rewrite_checked_s": rewrite_checked,
        "pruned_params_M": sum(p.numel() for p in pruned.parameters()) / 1e6,
        "prunable": len(analysis.prunable),
        "groups": len(analysis.groups),
        **kinds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("runs/graph_passes.json"))
    args = parser.parse_args()
    rows = [measure("gpt2-124M", gpt2_124m, args.repeats), measure("smollm2-135M-shaped", smollm2_shaped, args.repeats)]
    print(tabulate(rows, headers="keys", floatfmt=".2f"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
