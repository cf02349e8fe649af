"""Shared pytest setup: every test starts from the same global RNG state; torchvision imports on CPU torch;
random plans; tests that share expensive state run on one pytest-xdist worker."""

import os
from collections.abc import Callable

import pytest
import torch

import fxgradnas
from tests import plans, zoo
from tests.families import prepare_torchvision

# transformers imports torchvision when it is installed; a torchvision wheel built for another torch
# (CUDA wheel, CPU torch) fails on import unless two of its op schemas exist first.
prepare_torchvision()

# Under pytest-xdist the workers share the cores: one intra-op thread pool per worker sized to its share.
# Several OpenMP pools on the same cores wait on each other (tests/test_quality.py measured 12 s with
# 1 thread, 192 s with 2 on a busy 2-core box).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Tests that share expensive state run on one pytest-xdist worker, so the state is made once: modules
# with expensive module-scoped fixtures or caches, and parametrised tests that share a cached model by
# some of their parameters. (By node id: pytest 9.2 ignores the id suffix that xdist's loadgroup sets.)
_ONE_WORKER_MODULES = ("test_analysis", "test_cli", "test_plot", "test_quality")


def _scope(nodeid: str) -> str:
    """The unit of work a test belongs to: its node id unless it shares state with other tests."""
    path, _, test = nodeid.partition("::")
    module = path.rpartition("/")[2].removesuffix(".py")
    if module in _ONE_WORKER_MODULES:
        return module
    function, _, params = test.partition("[")
    if function == "test_breadth":  # "name-check": tests/test_breadth.py captures each model once
        return f"{function}[{params.rpartition('-')[0]}]"
    if function == "test_hf_gqa_with_padding_mask":  # "heads-family-attn": one analysis per family and attn
        return f"{function}[{'-'.join(params.rstrip(']').split('-')[-2:])}]"
    return nodeid


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Load scheduling by :func:`_scope` (pytest-xdist sends each scope to one worker, in order)."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return Scheduling(config, log)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _hf_models_only_in_hf_tests(request: pytest.FixtureRequest):
    """``tox -e core`` deselects ``hf`` tests: a test building a Hugging Face model must carry the marker."""
    zoo.HF_ALLOWED = request.node.get_closest_marker("hf") is not None
    yield
    zoo.HF_ALLOWED = True


@pytest.fixture
def random_plan() -> Callable[..., fxgradnas.Plan]:
    """``random_plan(analysis, seed=0, ...)``: see :func:`tests.plans.random_plan`."""
    return plans.random_plan
