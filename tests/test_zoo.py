"""The example models build, run, stay in eval mode and are deterministic per seed."""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from fxgradnas.capture import split_inputs
from tests.zoo import HF_ZOO, ZOO, Example

CASES = [pytest.param(name, id=name) for name in ZOO] + [
    pytest.param(name, id=name, marks=pytest.mark.hf) for name in HF_ZOO
]


@pytest.fixture(params=CASES)
def factory(request: pytest.FixtureRequest) -> Callable[..., Example]:
    if request.param in HF_ZOO:
        pytest.importorskip("transformers")
        return HF_ZOO[request.param]
    return ZOO[request.param]


def _run(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    args, kwargs = split_inputs(inputs)
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_runs_in_eval_mode(factory: Callable[..., Example]) -> None:
    model, inputs = factory()
    assert not any(m.training for m in model.modules())
    out = _run(model, inputs)
    assert out.shape[0] == 3
    assert torch.isfinite(out).all()


def test_deterministic_per_seed(factory: Callable[..., Example]) -> None:
    (m1, x1), (m2, x2), (m3, _) = factory(seed=0), factory(seed=0), factory(seed=1)
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert sd1.keys() == sd2.keys() == sd3.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not all(torch.equal(sd1[k], sd3[k]) for k in sd1)
    assert torch.equal(_run(m1, x1), _run(m2, x2))


def test_leaves_global_rng_alone(factory: Callable[..., Example]) -> None:
    state = torch.get_rng_state()
    factory()
    assert torch.equal(state, torch.get_rng_state())


def test_nanogpt_ties_lm_head() -> None:
    model, _ = ZOO["nanogpt"]()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_bert_attention_mask_is_used() -> None:
    model, inputs = ZOO["bert"]()
    assert inputs["attention_mask"].min() == 0
    unmasked = dict(inputs, attention_mask=torch.ones_like(inputs["attention_mask"]))
    out, ref = _run(model, inputs), _run(model, unmasked)
    assert not torch.allclose(out[1], ref[1])
    assert torch.allclose(out[0], ref[0]) and torch.allclose(out[2], ref[2])
