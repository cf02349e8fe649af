"""Shared pytest setup: every test starts from the same global RNG state; torchvision imports on CPU torch;
random plans."""

import importlib.util
from collections.abc import Callable

import pytest
import torch

import fxgradnas

# torchvision's PyPI wheel is a CUDA build: beside CPU torch its compiled ops do not load, and its import
# (also done by transformers when torchvision is installed) fails registering fakes for two ops that then
# do not exist. Defining their schemas first lets it import; classification models use no custom op.
_TORCHVISION_OPS = torch.library.Library("torchvision", "FRAGMENT")
if importlib.util.find_spec("torchvision") is not None:
    for _schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            _TORCHVISION_OPS.define(_schema)
        except RuntimeError:  # a working torchvision build defines them itself
            pass


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


def _random_plan(analysis: fxgradnas.Analysis, seed: int = 0) -> fxgradnas.Plan:
    """A random keep set for every prunable exact group: a random non-empty subset of its units;
    grouped-query heads keep the same number of queries in every kept KV head."""
    gen = torch.Generator().manual_seed(seed)

    def subset(n: int) -> list[int]:
        k = int(torch.randint(1, n + 1, (1,), generator=gen))
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
            keep[g.name] = subset(g.size)
    return fxgradnas.Plan(keep)


@pytest.fixture
def random_plan() -> Callable[..., fxgradnas.Plan]:
    """``random_plan(analysis, seed=0)``: see :func:`_random_plan`."""
    return _random_plan
