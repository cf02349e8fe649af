"""Pruning quality: on a toy decoder trained here, gradnas scores pick far better units than random.

A 4-layer Llama-style GQA decoder (``zoo.llama``: hidden 64, MLP 256, 4 query / 2 KV heads of 16,
vocab 32) learns a lagged modular Fibonacci, ``x[t] = (x[t-1] + x[t-3]) mod 32`` after 3 random
tokens, then is pruned to 60 % of its parameters through the same binary search with gradnas and
random scores. ``benchmarks/toy_quality.py`` is the longer version (more tokens, l1, an ablation).
"""

from __future__ import annotations

import math

import pytest
import torch

import fxgradnas
from fxgradnas import CalibrationOptions, SearchOptions
from tests.tasks import VOCAB, sequences, task_loss
from tests.zoo import llama

LENGTH = 16
BUDGET = 0.6
RANDOM_SEEDS = (0, 1, 2)

# Measured (torch 2.13 CPU, 1 thread; the numbers repeat exactly run to run), held-out loss:
#   dense 0.0075 (chance ln 32 = 3.466)
#   gradnas batch 0.0995, gradnas sample 0.0459
#   random seeds 0/1/2: 2.518 / 2.900 / 2.975, mean 2.798  -> gaps 2.70 (batch), 2.75 (sample)
# With training seeds 1-3 instead of 0 the batch-mode gap was 2.33 to 3.03 (seed 1 trains
# less far: dense 0.82). Random pruning through this search takes every layer to one query head,
# which alone costs the model most of what it learned.
MARGIN = 1.0


@pytest.fixture(scope="module")
def outcome() -> dict:
    """Train (400 steps x 32 sequences), then prune the trained model with every scorer once (without the
    re-fit: the tests compare rankings)."""
    threads = torch.get_num_threads()
    # Not for determinism (2 threads gave the same numbers), for time: on a busy 2-core box the
    # fixture took 12 s with 1 thread and 192 s with 2 (OpenMP threads waiting on each other).
    torch.set_num_threads(1)
    try:
        model, example = llama(n_layer=4, n_head=4, n_kv_head=2, head_dim=16, hidden=64, intermediate=256,
                               vocab=VOCAB, seed=0)
        model.train()
        gen = torch.Generator().manual_seed(1000)
        steps = 400
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        for _ in range(steps):
            x = sequences(32, LENGTH, gen)
            loss = task_loss(model(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        model.eval()
        held_out = sequences(256, LENGTH, torch.Generator().manual_seed(2000))
        cal_gen = torch.Generator().manual_seed(3000)
        calibration = [sequences(32, LENGTH, cal_gen) for _ in range(8)]

        def held_out_loss(m: torch.nn.Module) -> float:
            with torch.no_grad():
                return float(task_loss(m(held_out), held_out))

        analysis = fxgradnas.analyze(model, example)
        runs = {"gradnas batch": CalibrationOptions(scorer="gradnas", granularity="batch"),
                "gradnas sample": CalibrationOptions(scorer="gradnas", granularity="sample"),
                **{f"random {s}": CalibrationOptions(scorer="random", seed=s) for s in RANDOM_SEEDS}}
        out = {"dense": held_out_loss(model)}
        for name, options in runs.items():
            result = fxgradnas.prune(analysis, None, calibration, task_loss, constraint={"params": BUDGET},
                                     search=SearchOptions(multiple_of=8), calibration=options, compensation=None,
                                     progress=False)
            out[name] = {"loss": held_out_loss(result.model), **result.achieved}
        return out
    finally:
        torch.set_num_threads(threads)


def test_toy_model_learns_the_task(outcome: dict) -> None:
    assert outcome["dense"] < 0.5 < math.log(VOCAB)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_gradnas_beats_random(outcome: dict, mode: str) -> None:
    random_mean = sum(outcome[f"random {s}"]["loss"] for s in RANDOM_SEEDS) / len(RANDOM_SEEDS)
    gradnas = outcome[f"gradnas {mode}"]["loss"]
    assert gradnas + MARGIN < random_mean, (gradnas, random_mean)


@pytest.mark.parametrize("run", ["gradnas batch", "gradnas sample", *(f"random {s}" for s in RANDOM_SEEDS)])
def test_budget_is_met_and_used(outcome: dict, run: str) -> None:
    assert 0.5 <= outcome[run]["params"] <= BUDGET
