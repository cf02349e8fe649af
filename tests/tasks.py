"""A synthetic next-token task a small decoder learns in seconds, for judging pruning quality on a
model that knows something (the quality test and ``benchmarks/toy_quality.py``).

Sequences start with ``START`` random tokens; every later token is
``x[t] = (x[t-1] + x[t-1-LAG]) mod VOCAB``, so it is predictable from the two it depends on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB = 32
LAG = 2
START = LAG + 1  # the first predictable position


def sequences(n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` task sequences of ``length`` token ids, drawn from ``gen``."""
    x = torch.empty(n, length, dtype=torch.long)
    x[:, :START] = torch.randint(0, VOCAB, (n, START), generator=gen)
    for t in range(START, length):
        x[:, t] = (x[:, t - 1] + x[:, t - 1 - LAG]) % VOCAB
    return x


def task_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the predictable positions (usable as a calibration loss)."""
    return F.cross_entropy(logits[:, START - 1:-1].reshape(-1, VOCAB).float(), x[:, START:].reshape(-1))


def accuracy(logits: torch.Tensor, x: torch.Tensor) -> float:
    """Fraction of predictable positions whose most likely next token is right."""
    return float((logits[:, START - 1:-1].argmax(-1) == x[:, START:]).float().mean())
