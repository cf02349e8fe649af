"""Mixtures of experts: the router (logits -> softmax -> top-k), the dispatch (sort, histogram, gather) and
the stacked experts (grouped matmul). Each expert's MLP channels are one channels group across the stacked
experts, whole experts are one experts group (router rows + each expert's slice); pruned == masked."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxgradnas
from fxgradnas import Analysis, Group, Plan, PlanError, SearchOptions
from tests import families
from tests.zoo import MOE_EXPERT_WIDTH as W
from tests.zoo import MOE_EXPERTS as E
from tests.zoo import MOE_TOP_K as K
from tests.zoo import MOE_WIDTH as H
from tests.zoo import MoE


class Lambda(nn.Module):
    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


def tokens() -> torch.Tensor:
    return torch.randn(3, 5, H)


def only(a: Analysis, kind: str, param: str, axis: int) -> Group:
    (g,) = [g for g in a.groups if g.kind == kind and any(t.name.endswith(param) and t.axis == axis for t in g.params)]
    return g


def axes(g: Group) -> set[tuple[str, int]]:
    return {(t.name, t.axis) for t in g.params}


def test_experts_and_their_channels_are_groups() -> None:
    """rules.routing.topk, histc, grouped_mm: the router's rows and the experts' axis 0 are one experts
    group (at least top-k kept); the expert width is one channels group over gate/up rows and down columns."""
    a = fxgradnas.analyze(MoE().eval(), tokens())
    experts = only(a, "experts", "router.weight", 0)
    assert experts.prunable and experts.exact, experts.reason
    assert axes(experts) == {("router.weight", 0), ("gate_up", 0), ("down", 0)}
    assert (experts.size, experts.min_units) == (E, K)
    (site,) = experts.sites
    assert a.captured.module.graph.find_nodes(op="get_attr", target="router.weight")[0] in \
        next(n for n in a.captured.module.graph.nodes if n.name == site.node).args  # the router's logits
    channels = only(a, "channels", "gate_up", 1)
    assert channels.prunable and channels.exact, channels.reason
    assert axes(channels) == {("gate_up", 1), ("down", 2)}
    assert channels.size == W
    (gate_up,) = [t for t in channels.params if t.name == "gate_up"]
    assert [f.size for f in gate_up.layout.factors] == [2, W]  # gate and up rows of one channel go together
    # rules.routing.sort: the rows at the channels' site are sorted by expert, not in batch order (no per-sample scores)
    assert [s.batch_major for s in channels.sites] == [False]


def test_pruned_experts_and_channels_equal_the_masked_model() -> None:
    """A removed expert's logit is -inf in the masked model and its row is gone in the pruned one: the
    router picks the same experts, the histogram has fewer bins, and the outputs agree."""
    model, x = MoE().eval(), tokens()
    a = fxgradnas.analyze(model, x)
    experts, channels = only(a, "experts", "router.weight", 0), only(a, "channels", "gate_up", 1)
    plan = Plan({experts.name: [1, 3], channels.name: [0, 2, 5, 7]})  # 4 of W channels
    pruned = fxgradnas.apply_plan(a, plan)
    masked = fxgradnas.masked(a, plan)
    with torch.no_grad():
        for inputs in (x, torch.randn(2, 9, H)):
            want, got = masked(inputs), pruned(inputs)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
            assert (want - model(inputs)).abs().max() > 1e-3  # the plan changes the model
    shapes = {n: tuple(p.shape) for n, p in pruned.named_parameters()}
    assert shapes["router.weight"] == (2, H)
    assert shapes["gate_up"] == (2, 2 * 4, H) and shapes["down"] == (2, H, 4)
    (histc,) = [n for n in pruned.graph.nodes if n.target is torch.ops.aten.histc.default]
    assert histc.args[1:4] == (2, 0, 1)


def test_masked_experts_are_never_routed_to() -> None:
    """The masked model's removed expert gets no token: its weights do not matter."""
    model, x = MoE().eval(), tokens()
    a = fxgradnas.analyze(model, x)
    experts = only(a, "experts", "router.weight", 0)
    plan = Plan({experts.name: [0, 1, 2]})
    masked = fxgradnas.masked(a, plan)
    with torch.no_grad():
        before = masked(x)
        masked.gate_up[3].normal_()
        masked.down[3].normal_()
        assert torch.equal(masked(x), before)


def test_a_plan_keeps_at_least_top_k_experts() -> None:
    a = fxgradnas.analyze(MoE().eval(), tokens())
    experts = only(a, "experts", "router.weight", 0)
    with pytest.raises(PlanError, match="keep at least 2"):
        fxgradnas.apply_plan(a, Plan({experts.name: [1]}))


def test_experts_get_gradnas_scores_and_the_search_removes_them() -> None:
    """The log-mask on the logits has the logit's gradient: experts get non-zero scores, and a tight budget
    is met by removing experts (never below top-k)."""
    model, x = MoE().eval(), tokens()
    a = fxgradnas.analyze(model, x)
    experts = only(a, "experts", "router.weight", 0)
    scores = fxgradnas.calibrate(a, [x, torch.randn(3, 5, H)], lambda out, batch: out.pow(2).mean())
    assert scores[experts.name].shape == (E,) and bool((scores[experts.name] > 0).all())
    found = fxgradnas.search(a, scores, {"params": 0.7}, SearchOptions(multiple_of=4))
    assert K <= len(found.plan.kept(experts.name)) < E
    fxgradnas.apply_plan(a, found.plan)  # self-checked against the masked model


def test_top_k_of_a_linear_is_a_router_unless_it_takes_the_smallest() -> None:
    """rules.routing.topk: a top-k straight over a linear's outputs keeps the same values when an output row is
    removed or its logit is -inf (experts, at least k kept); a top-k of the smallest entries would pick -inf."""
    for largest in (True, False):
        model = nn.Sequential(nn.Linear(H, 7), Lambda(lambda h, lg=largest: h.topk(3, dim=-1, largest=lg).values),
                              nn.Linear(3, H))
        a = fxgradnas.analyze(model.eval(), tokens())
        (g,) = [g for g in a.groups if ("0.weight", 0) in axes(g)]
        if largest:
            assert g.kind == "experts" and g.prunable and g.min_units == 3
            plan = Plan({g.name: [0, 2, 3, 6]})
            fxgradnas.apply_plan(a, plan)  # self-checked: pruned == masked
        else:
            assert not g.prunable and "smallest" in g.reason


def test_a_router_top_k_cannot_mask_freezes_the_experts() -> None:
    """rules.routing.topk: top-k over sigmoid scores (a -inf logit would score 0, which top-k may still pick) is
    not a router fxgradnas understands: the experts are frozen with the reason; the channels stay."""
    a = fxgradnas.analyze(MoE("sigmoid").eval(), tokens())
    (frozen,) = [g for g in a.groups if ("router.weight", 0) in axes(g)]
    assert not frozen.prunable and "top-k over the result of aten.sigmoid" in frozen.reason
    assert only(a, "channels", "gate_up", 1).prunable


class GatheredExperts(nn.Module):
    """transformers' batched_mm dispatch: every (token, choice) gathers its expert's matrices by id."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.up = nn.Parameter(torch.randn(E, W, H) * 0.3)
        self.down = nn.Parameter(torch.randn(E, H, W) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, H)
        weights, ids = self.router(flat).softmax(-1).topk(K, dim=-1)
        rows, ids = flat.repeat_interleave(K, dim=0), ids.reshape(-1)
        up = torch.bmm(self.up[ids], rows.unsqueeze(-1)).squeeze(-1)
        out = torch.bmm(self.down[ids], F.silu(up).unsqueeze(-1)).squeeze(-1)
        return (out * weights.reshape(-1, 1)).view(-1, K, H).sum(1).reshape(x.shape)


def test_expert_ids_read_by_another_op_freeze_the_router() -> None:
    """propagate._read_values: removing a router row renumbers the experts; ids that index the stacked weights
    directly (not through a routing histogram) would then pick the wrong expert, so the router is frozen."""
    a = fxgradnas.analyze(GatheredExperts().eval(), tokens())
    (router,) = [g for g in a.groups if ("router.weight", 0) in axes(g)]
    assert not router.prunable and "indices are read by aten.index" in router.reason
    assert not a.by_kind("experts") or not any(g.prunable for g in a.by_kind("experts"))


# --------------------------------------------------------------------------- Hugging Face
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


@pytest.mark.hf
@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_hugging_face_experts_prune_exactly(name: str) -> None:
    """Per layer: an experts group (router rows + stacked experts) and the experts' channels group, both
    exact; a plan removing experts and channels in every layer is pruned == masked."""
    if not families.has_transformers():
        pytest.skip("needs transformers")
    model, inputs = families.HF_FAMILIES[name]()
    a = fxgradnas.analyze(model, inputs)
    layers = families.LAYERS
    experts, channels = a.by_kind("experts"), [g for g in a.by_kind("channels") if g.name.endswith("mlp.experts")]
    assert len(experts) == layers and len(channels) == layers, a.table()
    keep: dict[str, Any] = {}
    for g in experts:
        assert g.prunable and g.exact and g.min_units == 2, g.reason
        assert any(t.name.endswith("mlp.gate.weight") and t.axis == 0 for t in g.params)
        assert any(t.name.endswith("experts.gate_up_proj") and t.axis == 0 for t in g.params)
        keep[g.name] = [0, 3]
    for g in channels:
        assert g.prunable and g.exact, g.reason
        assert {(t.name.rsplit(".", 1)[-1], t.axis) for t in g.params} == {("gate_up_proj", 1), ("down_proj", 2)}
        keep[g.name] = list(range(0, g.size, 2))
    plan = Plan(keep)
    pruned = fxgradnas.apply_plan(a, plan)
    masked = fxgradnas.masked(a, plan)
    with torch.no_grad():
        want, got = masked(**inputs), pruned(**inputs)
        want, got = (want.logits, got.logits) if hasattr(want, "logits") else (want[0], got[0])
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        original = model(**inputs, use_cache=False).logits
        assert (want - original).abs().max() > 1e-4
    gate_up = next(p for n, p in pruned.named_parameters() if n.endswith("layers.0.mlp.experts.gate_up_proj"))
    assert gate_up.shape[:2] == (2, channels[0].size)  # 2 experts, half the channels (gate and up)


@pytest.mark.hf
def test_bfloat16_experts_export_aten_grouped_mm_and_prune_exactly() -> None:
    """rules.routing.grouped_mm on ``aten._grouped_mm``: transformers runs bfloat16 experts through torch's grouped
    matmul (float32 exports its fallback op); the same groups, pruned == masked."""
    if not families.has_transformers():
        pytest.skip("needs transformers")
    model, inputs = families.hf_mixtral()
    a = fxgradnas.analyze(model.to(torch.bfloat16), inputs)
    assert any(n.target is torch.ops.aten._grouped_mm.default for n in a.captured.module.graph.nodes)
    experts = a.by_kind("experts")
    channels = [g for g in a.by_kind("channels") if g.name.endswith("mlp.experts")]
    assert len(experts) == len(channels) == families.LAYERS
    assert all(g.prunable and g.exact for g in experts + channels)
    plan = Plan({**{g.name: [1, 2] for g in experts}, **{g.name: list(range(0, g.size, 2)) for g in channels}})
    pruned = fxgradnas.apply_plan(a, plan)  # widths stay multiples of 8: the kernel wants 16-byte strides
    assert pruned.meta["self_check"].example <= 1e-2
