"""Least-squares compensation: layer errors never go up, nothing pruned changes nothing, the
structure is the same, and the re-fit beats plain pruning on a layer's own output."""

from __future__ import annotations

import pytest
import torch

import fxgradnas
from fxgradnas import Plan, apply_plan
from fxgradnas.compensate import collect_statistics, compensate
from fxgradnas.zoo import ZOO


@pytest.fixture(scope="module")
def setup():
    model, inputs = ZOO["llama"](intermediate=64)
    analysis = fxgradnas.analyze(model, inputs)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (4, 9), generator=gen) for _ in range(6)]
    groups = [g for g in analysis.prunable if g.kind in ("heads", "channels")]
    stats = collect_statistics(analysis, groups, batches, progress=False)
    plan = Plan({"model.layers.0.mlp": list(range(0, 64, 3)), "model.layers.1.mlp": list(range(40)),
                 "model.layers.1.self_attn": [0, 1]})
    return model, analysis, batches, stats, plan


@pytest.mark.parametrize("method", ["scale", "ls"])
def test_errors_never_go_up_and_structure_is_kept(setup, method: str) -> None:
    _, analysis, _, stats, plan = setup
    plain = apply_plan(analysis, plan)
    fitted = apply_plan(analysis, plan)
    reports = compensate(analysis, plan, fitted, stats, method=method)
    assert {r.group for r in reports} == set(plan.keep)
    for r in reports:
        assert r.error_after <= r.error_before
    gain = 0.9 if method == "ls" else 1.0  # per-unit scales can only do a little on a random model
    assert any(r.applied and r.error_after < gain * r.error_before for r in reports)
    shapes = {n: p.shape for n, p in plain.named_parameters()}
    assert shapes == {n: p.shape for n, p in fitted.named_parameters()}


def test_ls_reconstructs_a_layer_better_than_pruning(setup) -> None:
    """On the calibration inputs, the re-fitted down_proj output is closer to the dense one."""
    model, analysis, batches, stats, plan = setup
    name = "model.layers.0.mlp"  # its input is the same in the dense and the pruned model
    one = Plan({name: plan.keep[name]})
    plain = apply_plan(analysis, one)
    fitted = apply_plan(analysis, one)
    compensate(analysis, one, fitted, stats, method="ls", damping=1e-2)  # little pull towards the original
    dense_w = model.get_parameter("model.layers.0.mlp.down_proj.weight")
    kept = torch.tensor(one.keep[name])
    captured = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    x = torch.cat([c.reshape(-1, 64) for c in captured])
    target = x @ dense_w.T
    err_plain = (x[:, kept] @ plain.get_parameter("model.layers.0.mlp.down_proj.weight").T - target).pow(2).mean()
    err_fit = (x[:, kept] @ fitted.get_parameter("model.layers.0.mlp.down_proj.weight").T - target).pow(2).mean()
    assert err_fit < 0.7 * err_plain


def test_nothing_pruned_changes_nothing(setup) -> None:
    _, analysis, _, stats, _ = setup
    plan = Plan({"model.layers.0.mlp": list(range(64))})
    plain = apply_plan(analysis, plan)
    fitted = apply_plan(analysis, plan)
    reports = compensate(analysis, plan, fitted, stats, method="ls")
    assert not any(r.applied for r in reports)
    for (n, a), (_, b) in zip(plain.named_parameters(), fitted.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_prune_with_compensation_reports_each_layer(setup) -> None:
    model, _, batches, _, _ = setup

    def loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))

    result = fxgradnas.prune(model, None, batches, loss, constraint={"params": 0.7}, divisor=8, progress=False,
                             compensate="ls")
    assert result.compensation and "compensate" in result.seconds
    assert "reconstruction error" in result.table()
    with pytest.raises(ValueError):
        compensate(result.analysis, result.plan, result.model, {}, method="bogus")
