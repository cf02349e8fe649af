"""Calibration scores: hand-computed references, autograd agreement, modes, side effects, DDP, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from fxgradnas import Analysis, CalibrationOptions, Plan, analyze, instrument
from fxgradnas.batches import call_with
from fxgradnas.calibrate import calibrate
from fxgradnas.errors import CalibrationError
from fxgradnas.instrument import SITE_PREFIX, GradientRecorder
from fxgradnas.scores import Scores, l1_scores, random_scores
from fxgradnas.units import keep_grid
from tests.ranks import run_gloo_ranks
from tests.seeding import seeded
from tests.zoo import HF_ZOO, ZOO, analysis_of, example_of

Batch = tuple[torch.Tensor, torch.Tensor]

# --------------------------------------------------------------------------- helpers


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    """Linear(6->10)-ReLU-Linear(10->3): one prunable group of 10 hidden channels."""
    with seeded(seed):
        return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).eval()


def tiny_batches(n: int, size: int = 4, seed: int = 1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def ce_loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(out, batch[1])


def logits_loss(out: Any, batch: Any) -> torch.Tensor:
    """Any model output (a tensor or an HF output with ``logits``): mean NLL of class 0."""
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return -logits.float().log_softmax(-1)[..., 0].mean()


def shared(name: str) -> tuple[Analysis, Any]:
    """The session's analysis of zoo model ``name`` and its example inputs (tests that use it change nothing)."""
    if name in HF_ZOO:
        pytest.importorskip("transformers")
    analysis = analysis_of(name)
    return analysis, example_of(analysis)


def mask_gradients(module: nn.Module, masks: dict[str, torch.Tensor], inputs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The module's output and d logits_loss / d mask for each mask, by plain autograd (no gradient reaches a
    parameter's ``.grad``: the model may be shared)."""
    out = call_with(module, inputs)
    return out, dict(zip(masks, torch.autograd.grad(logits_loss(out, inputs), list(masks.values())), strict=True))


def rows(inputs: Any, index: slice) -> Any:
    """The samples ``index`` of every batched tensor of ``inputs`` (other leaves unchanged)."""
    return pytree.tree_map(lambda t: t[index] if isinstance(t, torch.Tensor) and t.dim() else t, inputs)


def assert_scores_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale + 1e-12, msg=name)


def run(target: nn.Module | Analysis, data: Any, loss: Callable = ce_loss, **options: Any) -> Scores:
    """Calibrate without progress bars; ``options``: :class:`CalibrationOptions` fields and calibrate's keywords."""
    keywords = {k: options.pop(k) for k in ("groups", "plan", "example_inputs") if k in options}
    return calibrate(target, data, loss, CalibrationOptions(**options), progress=False, **keywords)


# --------------------------------------------------------------------------- hand-computed reference


def reference_scores(model: nn.Sequential, batches: list[Batch], mode: str) -> torch.Tensor:
    """Sum of squared dLoss/dMask with an explicit mask on the hidden channels, plain autograd."""
    fc1, _, fc2 = model
    total = torch.zeros(10)
    for x, y in batches:
        m = torch.ones(10, requires_grad=True)
        out = fc2(torch.relu(fc1(x)) * m)
        if mode == "batch":
            (g,) = torch.autograd.grad(F.cross_entropy(out, y), m)
            total += g**2
        else:
            per_sample = F.cross_entropy(out, y, reduction="none") / len(x)  # the batch loss is their sum
            for loss_i in per_sample:
                (g,) = torch.autograd.grad(loss_i, m, retain_graph=True)
                total += g**2
    return total


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_matches_hand_computed_reference(mode: str) -> None:
    model, batches = tiny_mlp(), tiny_batches(3)
    scores = run(model, batches, granularity=mode)
    assert list(scores) == ["0"] and scores.granularity == mode and scores.batches == 3
    assert len(scores.history) == 3 and scores.seconds > 0
    want = reference_scores(model, batches, mode)
    assert want.abs().max() > 0
    assert_scores_close(scores, {"0": want})


def test_generator_of_dict_batches_with_collect_fn() -> None:
    model, batches = tiny_mlp(), tiny_batches(3)
    data = ({"x": x, "y": y} for x, y in batches)  # one pass only
    scores = calibrate(model, data, lambda out, b: F.cross_entropy(out, b["y"]), collect_fn=lambda b: b["x"],
                       progress=False)
    assert scores.batches == 3
    assert_scores_close(scores, run(model, batches), rtol=1e-6)


def test_autocast_bfloat16_is_close() -> None:
    analysis, ids = shared("llama")
    full = run(analysis, [ids], logits_loss)
    half = run(analysis, [ids], logits_loss, autocast_dtype=torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in half.values())
    for k in full:
        assert float((half[k] - full[k]).abs().sum() / full[k].abs().sum()) < 0.05, k



def test_bfloat16_weights_score_in_float32() -> None:
    """A bfloat16 model's mask gradients are multiplied and summed in float32: close to the float32 model's."""
    analysis, ids = shared("llama")
    full = run(analysis, [ids], logits_loss)
    model = ZOO["llama"]()[0].to(torch.bfloat16)
    half = run(analyze(model, ids), [ids], logits_loss)
    assert all(v.dtype == torch.float32 for v in half.values())
    for k in full:
        assert float((half[k] - full[k]).abs().sum() / full[k].abs().sum()) < 0.05, k



def test_recompute_says_when_there_is_no_block() -> None:
    """A model without numbered submodules (decoder layers) has nothing to recompute: a warning, the same scores."""
    model, data = tiny_mlp(), tiny_batches(2)
    with pytest.warns(UserWarning, match="no block to recompute in Sequential"):
        recomputed = run(model, data, recompute=True)
    assert_scores_close(recomputed, run(model, data), rtol=0)


# --------------------------------------------------------------------------- recorder == autograd

ZOO_CASES = ["llama", "nanogpt", "resnet", "squeezenet", "bert", "multihead", pytest.param("hf_llama", marks=pytest.mark.hf)]


@pytest.mark.parametrize("name", ZOO_CASES)
def test_batch_mode_equals_autograd_mask_grad(name: str) -> None:
    analysis, inputs = shared(name)
    inst = instrument(analysis)  # no recorder: masks are plain tensors that autograd differentiates
    for mask in inst.masks.values():
        mask.requires_grad_(True)
    want = {k: (g**2).reshape(-1) for k, g in mask_gradients(inst.module, inst.masks, inputs)[1].items()}
    scores = run(analysis, [inputs], logits_loss)
    assert set(scores) == {g.name for g in analysis.prunable}
    assert all(v.abs().max() > 0 for v in want.values())
    assert_scores_close(scores, want)


def test_recorder_with_masks_not_all_ones_equals_autograd() -> None:
    """A recorder attached to masks with zeros and fractions multiplies them in (no identity shortcut)
    and records what autograd gives for the mask; the output is the masked model's."""
    model, inputs = ZOO["llama"]()
    for p in model.parameters():
        p.requires_grad_(False)  # the recorder's backward reaches no parameter
    analysis = analyze(model, inputs)
    gen = torch.Generator().manual_seed(3)
    values = {g.name: torch.rand(g.unit_shape, generator=gen).round(decimals=1) for g in analysis.prunable}
    plain = instrument(analysis)
    for name, mask in plain.masks.items():
        mask.copy_(values[name]).requires_grad_(True)
    want_out, want = mask_gradients(plain.module, plain.masks, inputs)
    recorded = instrument(analysis)
    for name, mask in recorded.masks.items():
        mask.copy_(values[name]).requires_grad_(True)
    recorder = GradientRecorder()
    recorded.attach(recorder)
    assert not any(site.identity for sites in recorded.sites.values() for site in sites)
    out = call_with(recorded.module, inputs)
    logits_loss(out, inputs).backward()
    torch.testing.assert_close(out.logits if hasattr(out, "logits") else out,
                               want_out.logits if hasattr(want_out, "logits") else want_out)
    got = recorder.take()
    for name in plain.masks:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_scores_under_a_plan_are_the_masked_models_mask_gradients() -> None:
    """calibrate(plan=...) masks the plan's pruned units and scores every unit of the chosen groups there,
    a pruned unit by its gradient at zero; groups the plan names but that are not scored stay masked."""
    analysis, inputs = shared("llama")
    attn, mlp = [g for g in analysis.prunable if g.kind in ("heads", "channels")][:2]
    plan = Plan({attn.name: [0, 1], mlp.name: list(range(0, mlp.size, 3))})
    reference = instrument(analysis, [attn, mlp])
    for g in (attn, mlp):
        reference.masks[g.name].copy_(keep_grid(g, plan.kept(g.name)).float()).requires_grad_(True)
    got = run(analysis, [inputs], logits_loss, groups=[mlp], plan=plan)
    assert list(got) == [mlp.name]
    want = mask_gradients(reference.module, reference.masks, inputs)[1][mlp.name].reshape(-1) ** 2
    pruned = torch.ones(mlp.size, dtype=torch.bool)
    pruned[plan.kept(mlp.name)] = False
    assert want[pruned].abs().max() > 0  # pruned units have a score: what restoring them would change
    assert_scores_close(got, {mlp.name: want})
    dense = run(analysis, [inputs], logits_loss, groups=[mlp])
    assert not torch.allclose(dense[mlp.name], got[mlp.name])


# --------------------------------------------------------------------------- batch vs sample mode


@pytest.mark.parametrize("name", ["mlp", "llama", "resnet"])
def test_sample_mode_vs_batch_mode(name: str) -> None:
    analysis, inputs = shared(name)  # batch of 3, independent samples (eval mode)
    singles = [rows(inputs, slice(i, i + 1)) for i in range(3)]
    for single in singles:  # batch of 1: one sample is the batch
        assert_scores_close(run(analysis, [single], logits_loss, granularity="sample"),
                            run(analysis, [single], logits_loss, granularity="batch"), rtol=1e-6)
    batch = run(analysis, [inputs], logits_loss, granularity="batch")
    sample = run(analysis, [inputs], logits_loss, granularity="sample")
    assert any(not torch.allclose(batch[k], sample[k], rtol=1e-2) for k in batch)
    # a mean loss over B samples: each sample contributes grad(loss_i) / B to the batch gradient
    on_singles = run(analysis, singles, logits_loss, granularity="batch")
    assert_scores_close(sample, {k: v / 9 for k, v in on_singles.items()})


def test_sample_mode_leaves_out_groups_with_a_site_shared_by_all_samples() -> None:
    """nanoGPT's hidden group is also masked at the position-embedding output (T, C), which every
    sample shares: per-sample gradients cannot be read there. The other groups are scored."""
    analysis, ids = shared("nanogpt")
    with pytest.warns(UserWarning, match="leaves out group"):
        sample = run(analysis, [ids], logits_loss, granularity="sample")
    assert "hidden" not in sample and sample
    singles = run(analysis, [ids[i : i + 1] for i in range(3)], logits_loss)
    assert_scores_close(sample, {k: v / 9 for k, v in singles.items() if k in sample})
    with pytest.raises(CalibrationError, match="shared by all samples"):
        run(analysis, [ids], logits_loss, granularity="sample", groups=[analysis.group("hidden")])


# --------------------------------------------------------------------------- no side effects


def model_state(model: nn.Module) -> dict[str, Any]:
    def clone(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().clone()

    return {
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "grad": {n: clone(p.grad) for n, p in model.named_parameters()},
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    for key in ("values", "grad"):
        assert before[key].keys() == after[key].keys()
        for name, value in before[key].items():
            if value is None:
                assert after[key][name] is None, f"{key} of {name}"
            else:
                assert torch.equal(value, after[key][name]), f"{key} of {name}"


def test_leaves_model_as_it_was() -> None:
    model, x = ZOO["resnet"]()
    model.layer1[0].train()
    model.fc.requires_grad_(False)
    model.layer1[1].conv1.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.full_like(model.conv1.weight, 0.5)
    before = model_state(model)
    for mode in ("batch", "sample"):
        run(model, [x, 2 * x], logits_loss, granularity=mode)
        assert_same_state(before, model_state(model))


def test_failed_calibration_restores_requires_grad() -> None:
    model, batches = tiny_mlp(), tiny_batches(3)
    model[2].weight.requires_grad_(False)
    before = model_state(model)
    batches[1][0][0, 0] = math.nan
    with pytest.raises(CalibrationError):
        run(model, batches)
    assert_same_state(before, model_state(model))


# --------------------------------------------------------------------------- torch.distributed


def _dist_worker(rank: int, world: int) -> dict:
    batches = tiny_batches(4)[rank::world]
    result = {mode: run(tiny_mlp(), batches, granularity=mode) for mode in ("batch", "sample")}
    return {mode: (dict(s), s.batches) for mode, s in result.items()}


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    results = run_gloo_ranks(_dist_worker, tmp_path, timeout=120)
    for mode in ("batch", "sample"):
        single = run(tiny_mlp(), tiny_batches(4), granularity=mode)
        for rank in range(2):
            scores, batches = results[rank][mode]
            assert batches == 4
            assert_scores_close(scores, single, rtol=1e-5)


# --------------------------------------------------------------------------- errors


def test_errors() -> None:
    model, batches = tiny_mlp(), tiny_batches(3)
    with pytest.raises(CalibrationError, match="empty"):
        run(model, [])
    with pytest.raises(CalibrationError, match="scalar"):
        run(model, batches, lambda out, b: F.cross_entropy(out, b[1], reduction="none"))
    with pytest.raises(CalibrationError, match="scalar"):
        run(model, batches, lambda out, b: 1.0)
    nan = [(x.clone(), y) for x, y in batches]
    nan[2][0][1, 3] = math.nan
    with pytest.raises(CalibrationError, match=r"batch 2\b"):
        run(model, nan)
    with pytest.raises(CalibrationError, match="gradient|depend"):
        run(model, batches, lambda out, b: torch.tensor(1.0, requires_grad=True))
    with pytest.raises(CalibrationError, match="gradient|depend"):
        run(model, batches, lambda out, b: torch.tensor(1.0))
    with pytest.raises(CalibrationError, match="prunable"):
        run(nn.Linear(6, 3), batches)
    with pytest.raises(ValueError, match="granularity"):
        run(model, batches, granularity="bogus")


# --------------------------------------------------------------------------- early stop, max_batches


def test_early_stop_and_max_batches() -> None:
    analysis = analyze(tiny_mlp(), tiny_batches(1)[0][0])
    same = tiny_batches(1) * 20
    stopped = run(analysis, same, converged_below=1.0, patience=2)
    assert stopped.batches < 20 and len(stopped.history) == stopped.batches
    assert run(analysis, same).batches == 20
    assert run(analysis, same, max_batches=None).batches == 20
    assert run(analysis, same, max_batches=5).batches == 5
    assert run(analysis, same, converged_below=0.0, patience=2).batches == 20
    assert_scores_close(stopped, {k: v * stopped.batches / 20 for k, v in run(analysis, same).items()})


# --------------------------------------------------------------------------- determinism and baselines


def test_deterministic_and_graph_untouched() -> None:
    analysis, ids = shared("llama")
    data = [ids, ids.flip(0)]
    first, second = run(analysis, data, logits_loss), run(analysis, data, logits_loss)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not any(n.startswith(SITE_PREFIX) for n, _ in analysis.captured.module.named_modules())
    group = analysis.prunable[1]
    subset = run(analysis, data, logits_loss, groups=[group])
    assert list(subset) == [group.name] and torch.equal(subset[group.name], first[group.name])


def test_random_scores() -> None:
    analysis = analyze(*ZOO["mlp"]())
    a, b, c = random_scores(analysis, seed=0), random_scores(analysis, seed=0), random_scores(analysis, seed=1)
    assert list(a) == [g.name for g in analysis.prunable]
    assert all(a[g.name].shape == (g.size,) for g in analysis.prunable)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_l1_scores_by_hand() -> None:
    model, x = ZOO["mlp"]()
    scores = l1_scores(analyze(model, x))
    layers = model.layers
    assert list(scores) == ["layers.0", "layers.1"]
    for i in range(2):
        into, out_of = layers[i], layers[i + 1]
        want = into.weight.abs().sum(1) + into.bias.abs() + out_of.weight.abs().sum(0)
        torch.testing.assert_close(scores[f"layers.{i}"], want.detach())


# --------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    batches = tiny_batches(3)
    cpu = run(tiny_mlp(), batches)

    def loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
        assert out.is_cuda
        return F.cross_entropy(out, batch[1].to(out.device))  # loss_fn gets the batch as given

    gpu = run(tiny_mlp().cuda(), batches, loss, example_inputs=batches[0][0].cuda())
    assert all(v.device.type == "cpu" for v in gpu.values())
    assert_scores_close(gpu, cpu, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_captured_from_cpu_batch() -> None:
    """Without example_inputs the first (CPU) batch is moved to the model's device to capture it."""
    batches = tiny_batches(3)
    gpu = run(tiny_mlp().cuda(), batches, lambda out, b: F.cross_entropy(out, b[1].to(out.device)))
    assert_scores_close(gpu, run(tiny_mlp(), batches), rtol=1e-3)
