"""Seeded weights and inputs for the test models (tests/zoo.py, tests/families.py): weights drawn from the
global RNG in a forked state, inputs from a generator of their own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["BATCH", "SEQ", "seeded", "token_ids"]

BATCH = 3
SEQ = 7


@contextmanager
def seeded(seed: int) -> Iterator[torch.Generator]:
    """Seed the global RNG inside a forked state (for the weights) and yield a generator for inputs
    (seeded ``seed + 1``): a factory leaves the caller's RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed + 1)


def token_ids(gen: torch.Generator, vocab: int, low: int = 0) -> torch.Tensor:
    """A ``(BATCH, SEQ)`` batch of token ids in ``[low, vocab)`` drawn from ``gen``."""
    return torch.randint(low, vocab, (BATCH, SEQ), generator=gen)
