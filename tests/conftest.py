"""Shared pytest setup: every test starts from the same global RNG state; torchvision imports on CPU torch."""

import importlib.util

import pytest
import torch

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


@pytest.fixture(autouse=True)
def _hf_models_only_in_hf_tests(request: pytest.FixtureRequest):
    """``tox -e core`` deselects ``hf`` tests: a test building a Hugging Face model must carry the marker."""
    from tests import zoo

    zoo.HF_ALLOWED = request.node.get_closest_marker("hf") is not None
    yield
    zoo.HF_ALLOWED = True
