"""apply_plan builds a physically smaller module equal to the masked reference; plans round-trip."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxgradnas
from fxgradnas import Plan, PlanError, apply_plan, masked
from fxgradnas.modules import fingerprint
from fxgradnas.rewrite import FLOAT64_TOLERANCE, relative_difference
from tests import zoo
from tests.plans import random_plan
from tests.zoo import HF_ZOO, ZOO, analysis_of

CASES = [pytest.param(name, id=name) for name in ZOO] + [
    pytest.param(name, id=name, marks=pytest.mark.hf) for name in HF_ZOO
]


def expected_params(analysis: fxgradnas.Analysis, plan: Plan) -> int:
    """Parameter count the plan implies: each touched axis shrinks to its kept index count; the parameters
    of a removed block are gone."""
    from fxgradnas.units import keep_grid, spread

    kept_axes: dict[tuple[str, ...], dict[int, torch.Tensor]] = {}
    removed: list[str] = []
    for name in plan.keep:
        g = analysis.group(name)
        grid = keep_grid(g, plan.kept(name))
        if g.kind == "blocks":
            removed += [b.path + "." for b, kept in zip(g.blocks, grid.tolist(), strict=True) if not kept]
        for t in g.params:
            axes = kept_axes.setdefault(t.names, {})
            mask = spread(grid, t.layout)
            axes[t.axis] = mask if t.axis not in axes else axes[t.axis] & mask
    total = 0
    seen = set()
    for name, p in analysis.captured.model.named_parameters():
        if id(p) in seen or name.startswith(tuple(removed)):
            continue
        seen.add(id(p))
        names = next((k for k in kept_axes if name in k), None)
        sizes = list(p.shape)
        for axis, mask in (kept_axes[names].items() if names else []):
            sizes[axis] = int(mask.sum())
        total += math.prod(sizes)
    return total


@pytest.mark.parametrize("name", CASES)
def test_pruned_equals_masked_for_random_plans(name: str) -> None:
    analysis = analysis_of(name)
    compared: list[Plan] = []

    @settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(plan=st.integers(0, 2**32 - 1).map(functools.partial(random_plan, analysis, exact_only=False, skip=0.5,
                                                                  allow_empty=True)))
    def check(plan: Plan) -> None:
        pruned = apply_plan(analysis, plan, check=False)
        exact = all(analysis.group(n).exact for n in plan.keep)
        if exact:
            assert relative_difference(masked(analysis, plan), pruned, analysis) <= 1e-5
            compared.append(plan)
        unique = {id(p): p for p in pruned.parameters()}
        assert sum(p.numel() for p in unique.values()) == expected_params(analysis, plan)

    check()
    assert any(p.keep for p in compared), f"{name}: no random plan of exact groups only was compared with masked"


@pytest.mark.parametrize("name", CASES)
def test_keeping_one_unit_everywhere(name: str) -> None:
    analysis = analysis_of(name)
    plan = Plan({g.name: [g.size - 1] for g in analysis.prunable if g.exact})
    assert plan.keep, f"{name}: no prunable exact group"
    pruned = apply_plan(analysis, plan)  # self-check raises if pruned != masked
    assert sum(p.numel() for p in {id(p): p for p in pruned.parameters()}.values()) == expected_params(analysis, plan)


def test_empty_plan_masked_equals_model_and_pruned_equals_model() -> None:
    model, inputs = ZOO["llama"]()
    reference = model(inputs)
    torch.testing.assert_close(masked(model, Plan(), inputs)(inputs), reference, rtol=0, atol=0)
    torch.testing.assert_close(apply_plan(model, Plan(), inputs)(inputs), reference, rtol=0, atol=0)


def test_pruned_module_is_smaller_runs_at_other_sizes_and_leaves_the_model_alone() -> None:
    model, inputs = ZOO["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analysis = fxgradnas.analyze(model, inputs)
    plan = Plan({"model.layers.0.mlp": list(range(0, 48, 3)), "model.layers.1.self_attn": [0, 1],
                 "hidden": list(range(20))})
    pruned = apply_plan(analysis, plan)
    assert pruned.get_parameter("model.layers.0.mlp.down_proj.weight").shape == (20, 16)
    assert pruned.get_parameter("model.layers.1.self_attn.k_proj.weight").shape == (8, 20)  # one KV head
    ids = torch.randint(0, 64, (5, 11))
    torch.testing.assert_close(pruned(ids), masked(analysis, plan)(ids), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in pruned.parameters())
    pruned(ids).sum().backward()
    assert pruned.get_parameter("model.layers.0.mlp.up_proj.weight").grad is not None


def test_pruned_module_exports_again() -> None:
    model, inputs = ZOO["nanogpt"]()
    pruned = apply_plan(model, Plan({"transformer.h.0.attn": [1, 3], "transformer.h.1.mlp": [0, 5, 9]}), inputs)
    again = fxgradnas.analyze(pruned, inputs)
    assert again.group("transformer.h.0.attn").size == 2
    assert again.group("transformer.h.1.mlp").size == 3


def test_save_and_restore_without_pickle(tmp_path) -> None:
    analysis = analysis_of("llama")
    inputs = analysis.captured.args[0]
    plan = Plan({"model.layers.0.self_attn": [2, 3], "model.layers.1.mlp": [1, 2, 40]},
                fingerprint(analysis.captured.model))
    pruned = apply_plan(analysis, plan)
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(0.01)  # fine-tuned after pruning
    (tmp_path / "plan.json").write_text(plan.to_json())
    torch.save(pruned.state_dict(), tmp_path / "weights.pt")

    fresh, _ = ZOO["llama"]()
    restored = apply_plan(fresh, Plan.from_json((tmp_path / "plan.json").read_text()), inputs)
    restored.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    torch.testing.assert_close(restored(inputs), pruned(inputs), rtol=0, atol=0)


@pytest.mark.parametrize("keep", [[0, 2], [2, 3], "random"], ids=["one-query-per-kv", "one-kv", "random"])
def test_gqa_with_repeat_interleave_prunes_end_to_end(monkeypatch: pytest.MonkeyPatch, keep, random_plan) -> None:
    """KV heads repeated by ``repeat_interleave``: the heads grid is [kv, queries per kv] and the
    repeat count is a size constant that the rewrite patches; pruned == masked."""
    monkeypatch.setattr(zoo, "repeat_kv", lambda x, n_rep: x.repeat_interleave(n_rep, dim=1))
    analysis = fxgradnas.analyze(*zoo.llama())
    heads = analysis.by_kind("heads")
    assert [(g.unit_shape, g.prunable) for g in heads] == [((2, 2), True)] * 2
    nodes = {n.name: n for n in analysis.captured.module.graph.nodes}
    assert all(any(nodes[c.node].target is torch.ops.aten.repeat_interleave.self_int for c in g.shape_constants)
               for g in heads)
    plan = random_plan(analysis) if keep == "random" else Plan({g.name: keep for g in heads})
    pruned = apply_plan(analysis, plan, check=False)
    assert relative_difference(masked(analysis, plan), pruned, analysis) <= 1e-5


def test_uneven_queries_per_kv_head_are_refused_but_masked_works() -> None:
    analysis = analysis_of("llama")
    plan = Plan({"model.layers.0.self_attn": [0, 1, 2]})  # KV head 0 keeps 2 queries, KV head 1 keeps 1
    masked(analysis, plan)
    with pytest.raises(PlanError, match="same count in every kept KV head"):
        apply_plan(analysis, plan)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ({"nope": [0]}, "unknown group 'nope'"),
        ({"model.layers.0.mlp": [48]}, "out of range"),
        ({"model.layers.0.mlp": [1, 1]}, "repeats indices"),
        ({"model.layers.0.mlp": []}, "keeps no unit"),
        ({"lm_head": [0]}, "frozen"),
    ],
)
def test_bad_plans_raise(keep: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        apply_plan(analysis_of("llama"), Plan(keep))


def test_plan_for_another_model_is_refused() -> None:
    other, _ = ZOO["llama"](intermediate=64)
    plan = Plan({"model.layers.0.mlp": [0]}, fingerprint(other))
    with pytest.raises(PlanError, match="different model"):
        apply_plan(analysis_of("llama"), plan)


def test_plan_json_round_trip_and_garbage() -> None:
    plan = Plan({"a": [3, 1]}, "abc")
    again = Plan.from_json(plan.to_json())
    assert again == plan
    with pytest.raises(PlanError):
        Plan.from_json("{}")
    with pytest.raises(PlanError):
        Plan.from_json("not json")


@functools.cache
def _padded_analysis(family: str, attn: str) -> fxgradnas.Analysis:
    """The analysis of a Hugging Face zoo decoder on its example with the first sequence left-padded,
    made once per session for every plan below (``apply_plan`` leaves it as it was)."""
    model, inputs = HF_ZOO[family](attn_implementation=attn)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, :3] = 0
    return fxgradnas.analyze(model, {**inputs, "attention_mask": mask})


@pytest.mark.hf
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["hf_llama", "hf_qwen2"])
@pytest.mark.parametrize(
    "heads", [[0, 1], [2, 3], [1, 3], [0]], ids=["kv0", "kv1", "one-query-per-kv", "one-head"]
)
def test_hf_gqa_with_padding_mask(family: str, attn: str, heads: list[int]) -> None:
    """sdpa without a mask hides a wrong KV repeat; eager attention and a padding mask expose it."""
    pytest.importorskip("transformers")
    plan = Plan({"model.layers.0.self_attn": heads, "model.layers.1.mlp": list(range(0, 48, 5))})
    pruned = apply_plan(_padded_analysis(family, attn), plan)  # self-checked on the padded example
    assert pruned.get_parameter("model.layers.0.self_attn.q_proj.weight").shape[0] == 8 * len(heads)


def test_pruned_module_owns_every_tensor() -> None:
    """The pruned module is built from views of the model (the model is never copied whole) and then holds
    its own tensors: changing them in place leaves the model as it was."""
    model, inputs = ZOO["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = Plan({"model.layers.0.mlp": list(range(0, 48, 3)), "model.layers.1.self_attn": [0, 1]})
    pruned = apply_plan(model, plan, inputs)
    storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not storages & {t.untyped_storage().data_ptr() for t in pruned.state_dict().values()}
    with torch.no_grad():
        for t in pruned.state_dict().values():
            t.add_(1) if t.is_floating_point() else None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_self_check_catches_a_wrong_pruned_module() -> None:
    """A module pruned to other units, or with one weight off by 1 %, is far outside the check's tolerance."""
    from fxgradnas.rewrite import default_tolerance, self_check

    analysis = analysis_of("llama")
    plan = Plan({"model.layers.0.mlp": list(range(0, 48, 3)), "model.layers.1.self_attn": [0, 1]})
    other = Plan({"model.layers.0.mlp": list(range(1, 48, 3)), "model.layers.1.self_attn": [0, 1]})
    pruned = apply_plan(analysis, plan)
    tolerance = default_tolerance(pruned)
    assert max(pruned.meta["self_check"].example, pruned.meta["self_check"].fresh) <= tolerance
    assert self_check(analysis, other, pruned, tolerance).example > 100 * tolerance
    with torch.no_grad():
        pruned.get_parameter("model.layers.1.mlp.up_proj.weight").mul_(1.01)
    result = self_check(analysis, plan, pruned, tolerance)
    assert result.example > 10 * tolerance and result.fresh > 10 * tolerance
    assert result.float64 > 1e3 * FLOAT64_TOLERANCE and not result.passed  # float64 does not excuse a bug


def test_rounding_beyond_the_tolerance_is_decided_in_float64() -> None:
    """Where the model's dtype rounds beyond the tolerance (here a tolerance no float32 run meets), both modules
    run again in float64, casts of the graph included: an exact rewrite passes, and nothing of the model
    changes dtype."""
    analysis = analysis_of("llama")
    before = {k: v.clone() for k, v in analysis.captured.model.state_dict().items()}
    plan = Plan({"model.layers.0.mlp": list(range(0, 48, 3)), "model.layers.1.self_attn": [0, 1]})
    pruned = apply_plan(analysis, plan, tolerance=1e-12)
    check = pruned.meta["self_check"]
    assert max(check.example, check.fresh) > 1e-12  # float32 rounding
    assert check.float64 is not None and check.float64 <= FLOAT64_TOLERANCE and check.passed
    assert "in float64" in str(check)
    assert {p.dtype for p in pruned.parameters()} == {torch.float32}
    for k, v in analysis.captured.model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k


def test_output_difference_compares_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float64 comparison of large outputs runs a million entries at a time, with the same result."""
    import fxgradnas.rewrite as rewrite

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(3, 50, generator=generator)
    a[0, 3], a[1, 7], a[2, 9] = math.inf, math.nan, -math.inf
    b = a + 1e-3 * torch.randn(3, 50, generator=generator)
    b[0, 40] += 0.5
    whole = rewrite.output_difference([a, torch.arange(4)], [b, torch.arange(4)])
    assert whole == pytest.approx(0.5 / float(a[torch.isfinite(a)].abs().max()), rel=1e-2)
    monkeypatch.setattr(rewrite, "COMPARED_AT_ONCE", 7)
    assert rewrite.output_difference([a, torch.arange(4)], [b, torch.arange(4)]) == whole
    b[2, 20] = math.nan
    assert rewrite.output_difference([a], [b]) == math.inf


def test_pruned_module_shares_the_tensors_left_whole_when_asked() -> None:
    """``share_weights=True``: the tensors the plan does not slice are the model's memory, the sliced (and
    rescaled) ones new; the model keeps its values and flags, and the module computes what the one with
    copies computes."""
    model, inputs = ZOO["llama"]()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    plan = Plan({"model.layers.0.mlp": list(range(0, 48, 3)), "model.layers.1.self_attn": [0, 1]})
    analysis = fxgradnas.analyze(model, inputs)
    for keep in (plan.keep, {**plan.keep, "hidden": list(range(20))}):
        shared = apply_plan(analysis, Plan(keep), share_weights=True)
        held = {n: t.untyped_storage().data_ptr() in storages for n, t in shared.state_dict().items()}
        if "hidden" in keep:
            assert not any(n.endswith("norm.weight") and held[n] for n in held)  # sliced, then rescaled
        else:
            assert held["model.layers.1.mlp.up_proj.weight"] and held["model.embed_tokens.weight"]
            assert not held["model.layers.0.mlp.down_proj.weight"] and not held["model.layers.1.self_attn.q_proj.weight"]
        torch.testing.assert_close(shared(inputs), apply_plan(analysis, Plan(keep))(inputs), rtol=0, atol=0)
    assert model.model.embed_tokens.weight.requires_grad is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
