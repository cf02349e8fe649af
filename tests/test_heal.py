"""Healing: distillation moves the pruned module towards the dense one, trains nothing but the student,
restores every flag and mode, is deterministic for a seed, and rejects bad options before training."""

from __future__ import annotations

import copy

import pytest
import torch

import fxgradnas
from fxgradnas import Plan, SearchOptions, apply_plan
from fxgradnas.errors import ArgumentError, ArgumentTypeError, DataError
from fxgradnas.heal import distillation_loss, heal
from tests.zoo import ZOO


def _batches(vocab: int, count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (4, 9), generator=gen) for _ in range(count)]


@pytest.fixture(scope="module")
def setup():
    model, inputs = ZOO["llama"](intermediate=64)
    analysis = fxgradnas.analyze(model, inputs)
    plan = Plan({"model.layers.0.mlp": list(range(0, 64, 4)), "model.layers.1.mlp": list(range(20)),
                 "model.layers.1.self_attn": [0, 1]})
    return model, analysis, plan, _batches(int(inputs.max()) + 1)


def _gap(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(distillation_loss(student(b), teacher(b))) for b in batches) / len(batches)


def test_healing_brings_the_pruned_module_towards_the_dense_model(setup) -> None:
    model, analysis, plan, batches = setup
    teacher_state = {k: v.clone() for k, v in model.state_dict().items()}
    teacher_flags = [p.requires_grad for p in model.parameters()]
    student = apply_plan(analysis, plan)
    before = _gap(student, model, batches)
    report = heal(student, model, batches, steps=30, lr=3e-3, progress=False)
    after = _gap(student, model, batches)
    assert report.steps == 30 and len(report.losses) == 30
    assert after < 0.7 * before, (before, after)
    assert report.mean_loss(first=False) < report.mean_loss(first=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in teacher_state.items())  # teacher untouched
    assert [p.requires_grad for p in model.parameters()] == teacher_flags
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in student.parameters())
    assert not student.training and not model.training


def test_healing_a_prune_result_is_deterministic_and_drops_the_stale_self_check(setup) -> None:
    model, analysis, plan, batches = setup
    results = []
    for _ in range(2):
        result = fxgradnas.prune(analysis, None, batches, lambda out, b: out.float().logsumexp(-1).mean(),
                                 constraint={"params": 0.8}, progress=False,
                                 search=SearchOptions(multiple_of=8))
        assert result.self_check is not None
        heal(result, model, batches, steps=6, lr=1e-3, seed=3, progress=False)
        assert result.self_check is None
        results.append(result.model)
    first, second = (dict(m.named_parameters()) for m in results)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_data_starts_over_and_a_one_shot_iterator_stops_early(setup) -> None:
    model, analysis, plan, batches = setup
    student = apply_plan(analysis, plan)
    assert heal(student, model, batches[:2], steps=5, progress=False).steps == 5
    with pytest.warns(UserWarning, match="one-shot iterator"):
        report = heal(student, model, iter(batches[:3]), steps=5, progress=False)
    assert report.steps == 3
    with pytest.raises(DataError, match="empty"):
        heal(student, model, [], steps=2, progress=False)


def test_a_custom_loss_and_a_train_mode_teacher_keep_their_modes(setup) -> None:
    model, analysis, plan, batches = setup
    teacher = copy.deepcopy(model).train()
    student = apply_plan(analysis, plan)
    seen = []

    def loss_fn(out, target, batch):
        seen.append(teacher.training)
        return (out - target).pow(2).mean()

    heal(student, teacher, batches, steps=2, loss_fn=loss_fn, progress=False)
    assert seen == [False, False] and teacher.training


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"steps": 0}, ArgumentError, "steps"),
    ({"lr": -1.0}, ArgumentError, "lr"),
    ({"temperature": 0}, ArgumentError, "temperature"),
    ({"warmup": 1.0}, ArgumentError, "warmup"),
    ({"max_grad_norm": 0}, ArgumentError, "max_grad_norm"),
    ({"autocast_dtype": "bf16"}, ArgumentTypeError, "autocast_dtype"),
    ({"loss_fn": lambda out: out}, ArgumentTypeError, "loss_fn"),
])
def test_bad_options_fail_before_training(setup, options, error, match) -> None:
    model, analysis, plan, batches = setup
    student = apply_plan(analysis, plan)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(error, match=match):
        heal(student, model, batches, progress=False, **options)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in state.items())


def test_the_student_and_teacher_must_be_modules(setup) -> None:
    model, analysis, plan, batches = setup
    with pytest.raises(ArgumentTypeError, match="student"):
        heal("model", model, batches, progress=False)
    with pytest.raises(ArgumentError, match="same module"):
        heal(model, model, batches, progress=False)
    with pytest.raises(ArgumentTypeError, match="data"):
        heal(apply_plan(analysis, plan), model, batches[0], progress=False)
