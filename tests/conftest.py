"""Shared pytest setup: every test starts from the same global RNG state; torchvision imports on CPU torch;
random plans."""

from collections.abc import Callable

import pytest
import torch

import fxgradnas
from tests import zoo
from tests.families import prepare_torchvision

# transformers imports torchvision when it is installed; a torchvision wheel built for another torch
# (CUDA wheel, CPU torch) fails on import unless two of its op schemas exist first.
prepare_torchvision()


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _hf_models_only_in_hf_tests(request: pytest.FixtureRequest):
    """``tox -e core`` deselects ``hf`` tests: a test building a Hugging Face model must carry the marker."""
    zoo.HF_ALLOWED = request.node.get_closest_marker("hf") is not None
    yield
    zoo.HF_ALLOWED = True


def _random_plan(analysis: fxgradnas.Analysis, seed: int = 0) -> fxgradnas.Plan:
    """A random keep set for every prunable exact group: a random subset of its units, at least its
    ``min_units`` (a router's top-k);
    grouped-query heads keep the same number of queries in every kept KV head."""
    gen = torch.Generator().manual_seed(seed)

    def subset(n: int, fewest: int = 1) -> list[int]:
        k = int(torch.randint(fewest, n + 1, (1,), generator=gen))
        return sorted(torch.randperm(n, generator=gen)[:k].tolist())

    keep = {}
    for g in analysis.prunable:
        if not g.exact:
            continue
        if g.kind == "heads" and len(g.unit_shape) == 2:
            kv, rep = g.unit_shape
            count = len(subset(rep))
            keep[g.name] = sorted(k * rep + r for k in subset(kv) for r in torch.randperm(rep, generator=gen)[:count].tolist())
        else:
            keep[g.name] = subset(g.size, g.min_units)
    return fxgradnas.Plan(keep)


@pytest.fixture
def random_plan() -> Callable[..., fxgradnas.Plan]:
    """``random_plan(analysis, seed=0)``: see :func:`_random_plan`."""
    return _random_plan
