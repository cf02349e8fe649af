"""Cost model, constraints and the searchers: exact counts, budgets met and used, scale invariance."""

from __future__ import annotations

import pytest
import torch

import fxgradnas
from fxgradnas import CalibrationOptions, ConstraintError, CostModel, SearchOptions, apply_plan
from fxgradnas.search import group_choices, parse_constraint, search
from fxgradnas.units import keep_grid, kept_per_unit_axis
from tests.flops import flops_of
from tests.plans import random_plan
from tests.zoo import ZOO, analysis_of

# torch's FlopCounterMode does not count the CPU scaled_dot_product_attention kernel, so FLOPs are
# compared on models whose attention is written as matmuls (or that have none).
FLOP_CASES = ["llama", "mlp", "resnet", "squeezenet", pytest.param("hf_llama", marks=pytest.mark.hf)]


@pytest.mark.parametrize("name", FLOP_CASES)
def test_cost_model_matches_rewritten_module_and_flop_counter(name: str) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
        analysis = analysis_of(name, attn_implementation="eager")
    else:
        analysis = analysis_of(name)
    model = CostModel(analysis)
    unique = {id(p): p for p in analysis.captured.model.parameters()}
    assert model.base["params"] == sum(p.numel() for p in unique.values())
    assert model.base["flops"] == flops_of(analysis.captured.module, analysis)
    for seed in range(3):
        plan = random_plan(analysis, seed, exact_only=False)
        kept = {n: kept_per_unit_axis(analysis.group(n), keep_grid(analysis.group(n), plan.kept(n))) for n in plan.keep}
        pruned = apply_plan(analysis, plan, check=False)
        costs = model.evaluate(kept)
        assert costs["params"] == sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values())
        assert costs["flops"] == flops_of(pruned, analysis)


def test_cost_model_counts_params_of_sdpa_models_exactly() -> None:
    analysis = analysis_of("nanogpt")
    model = CostModel(analysis)
    plan = random_plan(analysis, 0, exact_only=False)
    kept = {n: kept_per_unit_axis(analysis.group(n), keep_grid(analysis.group(n), plan.kept(n))) for n in plan.keep}
    pruned = apply_plan(analysis, plan, check=False)
    assert model.evaluate(kept)["params"] == sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values())


def test_interactions_are_products() -> None:
    """down_proj reads the MLP channels and writes the hidden width: its cost is hidden' x mlp'."""
    analysis = analysis_of("llama")
    model = CostModel(analysis)
    both = model.evaluate({"hidden": (16,), "model.layers.0.mlp": (24,)})["params"]
    only_hidden = model.evaluate({"hidden": (16,)})["params"]
    only_mlp = model.evaluate({"model.layers.0.mlp": (24,)})["params"]
    base = model.base["params"]
    # three Linear weights of layer 0's MLP couple the two: (32-16)*(48-24)*3 counted once more
    assert both - (only_hidden + only_mlp - base) == 3 * 16 * 24


@pytest.mark.parametrize(
    ("constraint", "metric", "budget"),
    [({"params": 0.75}, "params", 750), ({"params": "75%"}, "params", 750), ({"flops": 600}, "flops", 600),
     ({"flops": 1.0}, "flops", 1000), ({"params": "100%"}, "params", 1000), ({"params": 1000}, "params", 1000)],
)
def test_parse_constraint(constraint: dict, metric: str, budget: int) -> None:
    assert parse_constraint(constraint, {"params": 1000, "flops": 1000}) == (metric, budget)


@pytest.mark.parametrize(
    "constraint",
    [{"params": 0}, {"params": -1}, {"memory": 0.5}, {"params": 0.5, "flops": 0.5}, {"params": "lots"},
     {"params": float("nan")}, [0.5], {"params": True}, {"params": 1}, {"params": 1.5}, {"flops": 1e3},
     {"params": "150%"}, {"params": "0%"}, {"params": 1001}],
)
def test_malformed_constraints_raise(constraint) -> None:
    with pytest.raises(ConstraintError):
        parse_constraint(constraint, {"params": 1000, "flops": 1000})


def test_infeasible_constraint_names_the_smallest_achievable() -> None:
    analysis = analysis_of("llama")
    scores = fxgradnas.random_scores(analysis)
    with pytest.raises(ConstraintError, match=r"smallest model .* keeps [\d,]+ params"):
        search(analysis, scores, {"params": 0.05}, SearchOptions(multiple_of=1))


def _assert_tight(analysis, result, scores, metric, budget, kinds, multiple_of) -> None:
    """No searched group can grow one choice (losing less score) without breaking the budget."""
    model = CostModel(analysis)
    kept = {g: c.kept for g, c in result.choices.items()}
    for g, choice in result.choices.items():
        options = group_choices(analysis.group(g), scores[g], SearchOptions(multiple_of=multiple_of))
        i = options.index(choice)
        if i + 1 < len(options) and options[i + 1].degradation <= choice.degradation:
            extra = model.delta(metric, g, kept, options[i + 1].kept)
            assert result.costs[metric] + extra > budget, f"{g} could still grow"


CASES = ["llama", "nanogpt", "resnet", "bert", "mlp", pytest.param("hf_qwen2", marks=pytest.mark.hf)]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("searcher", ["binary", "greedy"])
@pytest.mark.parametrize("constraint", [{"params": 0.7}, {"flops": "55%"}, {"params": "absolute"}])
def test_budget_is_met_and_used(name: str, searcher: str, constraint: dict) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    analysis = analysis_of(name)
    model = CostModel(analysis)
    if constraint == {"params": "absolute"}:
        constraint = {"params": int(model.base["params"] * 0.8)}
    kinds = ("heads", "channels", "hidden")
    scores = fxgradnas.random_scores(analysis, seed=3)
    result = search(analysis, scores, constraint,
                    SearchOptions(searcher=searcher, kinds=kinds, multiple_of=4))
    metric, budget = result.budget
    assert result.costs[metric] <= budget
    assert result.costs == model.evaluate({g: c.kept for g, c in result.choices.items()})
    _assert_tight(analysis, result, scores, metric, budget, kinds, 4)
    pruned = apply_plan(analysis, result.plan, check=False)
    assert sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values()) == result.costs["params"]


@pytest.mark.parametrize("factor", [0.01, 100.0, 2.0**-20])
def test_search_is_scale_invariant(factor: float) -> None:
    analysis = analysis_of("llama")
    scores = fxgradnas.random_scores(analysis, seed=5)
    reference = search(analysis, scores, {"params": 0.6},
                       SearchOptions(multiple_of=4, kinds=("heads", "channels", "hidden")))
    scaled = search(analysis, scores.scaled(factor), {"params": 0.6},
                    SearchOptions(multiple_of=4, kinds=("heads", "channels", "hidden")))
    assert scaled.plan.keep == reference.plan.keep


def test_prune_plan_does_not_depend_on_loss_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (4, 9), generator=gen) for _ in range(4)]

    def loss(scale: float):
        def fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
            return scale * torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))
        return fn

    analysis = analysis_of("llama")  # dynamic batch and sequence: the (4, 9) batches fit
    plans = [
        fxgradnas.prune(analysis, None, batches, loss(s), constraint={"params": 0.6}, progress=False,
                        check=False, search=SearchOptions(multiple_of=4)).plan.keep
        for s in (1.0, 0.01, 100.0)
    ]
    assert plans[0] == plans[1] == plans[2]


def test_gqa_choices_keep_equal_queries_per_kv_head() -> None:
    analysis = analysis_of("llama")
    g = analysis.group("model.layers.0.self_attn")
    scores = torch.tensor([4.0, 3.0, 1.0, 0.5])
    choices = group_choices(g, scores)
    assert {c.kept for c in choices} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    by_kept = {c.kept: c for c in choices}
    assert by_kept[(1, 2)].units == (0, 1)  # the better KV group, both queries
    assert by_kept[(2, 1)].units == (0, 2)  # the best query of each KV group
    assert by_kept[(2, 1)].degradation == pytest.approx(3.5)
    only_kv = group_choices(g, scores, SearchOptions(gqa="kv"))
    assert {c.kept for c in only_kv} == {(1, 2), (2, 2)}


def test_channel_choices_round_to_the_multiple_of() -> None:
    analysis = analysis_of("llama", intermediate=96)
    g = analysis.group("model.layers.0.mlp")
    counts = [c.kept[0] for c in group_choices(g, torch.rand(96), SearchOptions(multiple_of=32))]
    assert counts == [32, 64, 96]
    counts = [c.kept[0] for c in group_choices(analysis.group("hidden"), torch.rand(32),
                                               SearchOptions(multiple_of=64))]
    assert counts[0] == 2 and counts[-1] == 32  # narrower than multiple_of: any count


def test_prune_result_reports() -> None:
    model, inputs = ZOO["llama"]()
    result = fxgradnas.prune(model, inputs, None, None, constraint={"params": 0.7},
                             search=SearchOptions(multiple_of=4), calibration=CalibrationOptions(scorer="l1"),
                             compensation=None)
    assert result.achieved["params"] <= 0.7
    assert "params" in result.summary() and "model.layers.0.mlp" in result.table()
    assert result.plan.fingerprint is not None
    # the pruned module is the masked reference, and has the parameters the search counted
    torch.testing.assert_close(result.model(inputs), fxgradnas.masked(result.analysis, result.plan)(inputs))
    assert sum(p.numel() for p in result.model.parameters()) == result.search.costs["params"]


class _FlagFirst(torch.nn.Module):
    """A model whose first input is not a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(5, 16), torch.nn.Linear(16, 3)

    def forward(self, scale: float, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * scale


def test_cost_model_when_the_first_input_is_not_a_tensor() -> None:
    """The symbolic batch size is read from the first tensor input, wherever it is."""
    analysis = fxgradnas.analyze(_FlagFirst(), (2.0, torch.randn(7, 5)))
    model = CostModel(analysis)
    assert model.base["params"] == 5 * 16 + 16 + 16 * 3 + 3
    assert model.base["flops"] == 2 * 7 * (5 * 16 + 16 * 3)
    assert model.evaluate({"fc1": (4,)})["flops"] == 2 * 7 * (5 * 4 + 4 * 3)


def test_pruning_in_rounds_meets_the_budget_and_keeps_what_it_pruned() -> None:
    """rounds=3: the last round's plan meets the budget, every round re-calibrates under the plan so far
    (the scores of units pruned earlier are zero, so they go first), and a one-shot iterator is read once per round."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (4, 9), generator=gen) for _ in range(3)]

    def loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))

    analysis = analysis_of("llama")  # dynamic batch and sequence: the (4, 9) batches fit
    once = fxgradnas.prune(analysis, None, batches, loss, constraint={"params": 0.6}, progress=False,
                           search=SearchOptions(multiple_of=4), compensation=None)
    thrice = fxgradnas.prune(analysis, None, iter(batches), loss, constraint={"params": 0.6}, progress=False,
                             search=SearchOptions(multiple_of=4), calibration=CalibrationOptions(rounds=3),
                             compensation=None)
    assert thrice.achieved["params"] <= 0.6 and thrice.search.budget == once.search.budget
    assert thrice.scores.batches == 3
    earlier = {name: set(torch.nonzero(s == 0).flatten().tolist()) for name, s in thrice.scores.items()}
    assert any(earlier.values())  # units pruned in earlier rounds have zero scores in the last
    assert thrice.plan.keep != once.plan.keep
    torch.testing.assert_close(thrice.model(batches[1]), fxgradnas.masked(analysis, thrice.plan)(batches[1]))
    with pytest.raises(fxgradnas.errors.ArgumentError, match="rounds"):
        fxgradnas.prune(analysis, None, batches, loss, constraint={"params": 0.6}, progress=False,
                        calibration=CalibrationOptions(rounds=0))
    with pytest.raises(fxgradnas.errors.ArgumentError, match="does not calibrate"):
        fxgradnas.prune(analysis, None, None, None, constraint={"params": 0.6},
                        calibration=CalibrationOptions(scorer="l1", rounds=2), compensation=None)
