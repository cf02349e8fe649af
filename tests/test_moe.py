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
from fxgradnas import Analysis, Group, Plan, PlanError
from fxgradnas.analysis import REGISTRY, register
from fxgradnas.analysis.rules import grouped_mm
from tests import families

E, K, H, W = 4, 2, 6, 10  # experts, top-k, width, expert width


@torch.library.custom_op("fxgradnas_moe_test::grouped_mm", mutates_args=())
def looped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of ``input`` times ``weight[e]``: transformers' grouped-mm fallback, which
    is what a float32 CPU export of its experts holds (``aten._grouped_mm`` exports for bfloat16 only)."""
    out, start = input.new_zeros(input.shape[0], weight.shape[2]), 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = input[start:end] @ weight[e]
        start = end
    return out


@looped_mm.register_fake
def _(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return input.new_empty(input.shape[0], weight.shape[2])


def _setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0], inputs[1])
    ctx.offs = inputs[2]


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    input, weight = ctx.saved_tensors
    grad_input, grad_weight, start = torch.zeros_like(input), torch.zeros_like(weight), 0
    for e, end in enumerate(ctx.offs.tolist()):
        grad_input[start:end] = grad[start:end] @ weight[e].T
        grad_weight[e] = input[start:end].T @ grad[start:end]
        start = end
    return grad_input, grad_weight, None


looped_mm.register_autograd(_backward, setup_context=_setup)


@pytest.fixture(autouse=True)
def _grouped_mm_rule() -> Any:
    """The test's grouped matmul gets the rule of ``aten._grouped_mm`` for the duration of each test."""
    register("fxgradnas_moe_test::grouped_mm")(grouped_mm)
    yield
    del REGISTRY["fxgradnas_moe_test::grouped_mm"]


class MoE(nn.Module):
    """A mixture-of-experts layer written as transformers 5 runs it (grouped_mm experts), between two linears.

    ``router``: "softmax" (linear -> softmax -> top-k) or "sigmoid" (a score top-k cannot mask with -inf).
    """

    def __init__(self, router: str = "softmax") -> None:
        super().__init__()
        self.router_kind = router
        self.embed, self.head = nn.Linear(H, H), nn.Linear(H, H)
        self.router = nn.Linear(H, E, bias=False)
        self.gate_up = nn.Parameter(torch.randn(E, 2 * W, H) * 0.3)
        self.down = nn.Parameter(torch.randn(E, H, W) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.embed(x).reshape(-1, H)
        logits = self.router(flat)
        scores = logits.softmax(-1) if self.router_kind == "softmax" else logits.sigmoid()
        weights, ids = scores.topk(K, dim=-1)
        ids, weights = ids.reshape(-1), weights.reshape(-1)
        sorted_ids, perm = torch.sort(ids)
        rows = flat[perm // K]
        offsets = torch.cumsum(torch.histc(sorted_ids.float(), bins=E, min=0, max=E - 1), 0, dtype=torch.int32)
        gate, up = looped_mm(rows, self.gate_up.transpose(-2, -1), offsets).chunk(2, dim=-1)
        out = looped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offsets)
        out = out * weights[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        return self.head(out[inverse].view(-1, K, H).sum(1).reshape(x.shape))


def tokens() -> torch.Tensor:
    return torch.randn(3, 5, H)


def only(a: Analysis, kind: str, param: str, axis: int) -> Group:
    (g,) = [g for g in a.groups if g.kind == kind and any(t.name.endswith(param) and t.axis == axis for t in g.params)]
    return g


def axes(g: Group) -> set[tuple[str, int]]:
    return {(t.name, t.axis) for t in g.params}


def test_experts_and_their_channels_are_groups() -> None:
    """rules.topk, rules.histc, rules.grouped_mm: the router's rows and the experts' axis 0 are one experts
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
    found = fxgradnas.search(a, scores, {"params": 0.7}, divisor=4)
    assert K <= len(found.plan.kept(experts.name)) < E
    fxgradnas.apply_plan(a, found.plan)  # self-checked against the masked model


def test_a_router_top_k_cannot_mask_freezes_the_experts() -> None:
    """rules.topk: top-k over sigmoid scores (a -inf logit would score 0, which top-k may still pick) is
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
    """rules._read_values: removing a router row renumbers the experts; ids that index the stacked weights
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
