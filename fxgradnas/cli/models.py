"""The models the command line runs: device, checkpoint loading, generation, perplexity and sizes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .parser import UsageError

if TYPE_CHECKING:
    import torch


def device_of_choice(name: str | None) -> torch.device:
    """``--device`` (default cuda when present)."""
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return device


def load_checkpoint(directory: Path, dtype: str = "float32", device: torch.device | None = None) -> tuple[Any, Any]:
    """A causal LM checkpoint (pruned by fxgradnas or not) and its tokenizer, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from ..hf import STRUCTURE_FILE, load_pruned

    logging.set_verbosity_error()  # load reports and long-text warnings are not for a command line
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if (directory / STRUCTURE_FILE).is_file():
            model = load_pruned(directory).to(getattr(torch, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load {directory} as a causal language model with its tokenizer: {first}") from exc
    return model.to(device or "cpu").eval(), tokenizer


def generate(model: Any, tokenizer: Any, prompt: str, tokens: int) -> str:
    """Greedy continuation of ``prompt``."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model: Any, sets: dict[str, list[torch.Tensor]], when: str) -> dict[str, float]:
    """Perplexity on each text, with a progress bar."""
    from tqdm.auto import tqdm

    from ..datasets import perplexity

    return {name: perplexity(model, tqdm(batches, desc=f"perplexity {when}: {name}", unit="batch", leave=False))
            for name, batches in sets.items()}


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of ``model``, tied ones once."""
    return sum(p.numel() for p in model.parameters())


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of the safetensors files of a checkpoint directory."""
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))
