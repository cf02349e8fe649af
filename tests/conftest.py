"""Shared pytest setup: every test starts from the same global RNG state."""

import families
import pytest
import torch

# transformers imports torchvision when it is installed; a torchvision wheel built for another torch
# (CUDA wheel, CPU torch) fails on import unless two of its op schemas exist first.
families.prepare_torchvision()


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    torch.manual_seed(0)
