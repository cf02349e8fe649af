"""Shared pytest setup: every test starts from the same global RNG state; torchvision imports on CPU torch."""

import pytest
import torch

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
    from tests import zoo

    zoo.HF_ALLOWED = request.node.get_closest_marker("hf") is not None
    yield
    zoo.HF_ALLOWED = True
