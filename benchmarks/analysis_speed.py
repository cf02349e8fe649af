"""Capture + analysis time on full-size transformer configs (random weights, no download).

    python benchmarks/analysis_speed.py [--json runs/analysis_speed.json]

Prints one row per model: parameters, capture (torch.export) seconds, analysis seconds, groups
found. The configs are GPT-2 124M and a SmolLM2-135M-shaped Llama (30 layers, GQA 9/3).
"""

from __future__ import annotations

import argparse
import json
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
    return {
        "model": name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "capture_s": min(captures),
        "analysis_s": min(analyses),
        "total_s": min(c + a for c, a in zip(captures, analyses, strict=True)),
        "prunable": len(analysis.prunable),
        "groups": len(analysis.groups),
        **kinds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("runs/analysis_speed.json"))
    args = parser.parse_args()
    rows = [measure("gpt2-124M", gpt2_124m, args.repeats), measure("smollm2-135M-shaped", smollm2_shaped, args.repeats)]
    print(tabulate(rows, headers="keys", floatfmt=".2f"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
