"""The op rules on tiny hand-written modules: each test names the rule it checks and asserts only
what the rule guarantees (kinds, unit counts, prunable flags, key words of reasons, parameter axes)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxgradnas
from fxgradnas import Analysis, Group
from fxgradnas.analysis import REGISTRY

B, T, D, H = 3, 7, 5, 11  # batch, sequence, model width, hidden width: odd and all different
aten = torch.ops.aten


def analyze(model: nn.Module, inputs: Any, **kwargs: Any) -> Analysis:
    """Weights and inputs are drawn after conftest's torch.manual_seed(0), so every run is the same."""
    return fxgradnas.analyze(model.eval(), inputs, **kwargs)


def tokens() -> torch.Tensor:
    return torch.randn(B, T, D)


def axes(g: Group) -> set[tuple[str, int]]:
    """Every (parameter name, axis) the group touches, tied names included."""
    return {(name, t.axis) for t in g.params for name in t.names}


def buffer_axes(g: Group) -> set[tuple[str, int]]:
    return {(name, t.axis) for t in g.buffers for name in t.names}


def group_at(a: Analysis, name: str, axis: int) -> Group:
    """The one group that touches axis ``axis`` of parameter ``name``."""
    found = [g for g in a.groups if (name, axis) in axes(g)]
    assert len(found) == 1, f"{name}[{axis}] is in {len(found)} groups:\n{a.table()}"
    return found[0]


def in_no_group(a: Analysis, name: str, axis: int) -> bool:
    return all((name, axis) not in axes(g) for g in a.groups)


# --- models ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    """fc1 -> f -> fc2, with f a pluggable activation (default ReLU)."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor] = torch.relu, fc2_in: int = H) -> None:
        super().__init__()
        self.fc1, self.fc2, self.f = nn.Linear(D, H), nn.Linear(fc2_in, D), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.f(self.fc1(x)))


class Head(nn.Module):
    """fc1 -> f, with f's result as the model output."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fc1, self.f = nn.Linear(D, H), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.fc1(x))


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, H, bias=False)
        self.up = nn.Linear(D, H, bias=False)
        self.down = nn.Linear(H, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class FusedSwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(D, 2 * H)
        self.down = nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ConvNet(nn.Module):
    """conv1 -> BatchNorm -> ReLU -> conv2 -> global average pool -> head."""

    def __init__(self, mid: int = 5, groups: int = 1) -> None:
        super().__init__()
        out = mid if groups > 1 else 7
        self.conv1 = nn.Conv2d(3, mid, 3, padding=1)
        self.bn = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out, 3, groups=groups)
        self.head = nn.Linear(out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.head(h.mean((2, 3)))


def images() -> torch.Tensor:
    return torch.randn(B, 3, 11, 11)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, square: Callable = lambda x: x.pow(2)) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(dim))
        self.eps, self.square = eps, square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(self.square(x).mean(-1, keepdim=True) + self.eps) * self.w


class Residual(nn.Module):
    """inp -> x + fc2(relu(fc1(norm(x)))) -> head: the residual stream is ``inp``'s output."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.inp, self.norm, self.head = nn.Linear(D, D), norm, nn.Linear(D, 2)
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.fc2(torch.relu(self.fc1(self.norm(x))))
        return self.head(x)


class Attention(nn.Module):
    """Multi-head attention written out as matmul -> softmax -> matmul (no SDPA)."""

    def __init__(self, heads: int = 3, head_dim: int = 5) -> None:
        super().__init__()
        width = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.o = nn.Linear(width, width)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        y = att.softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class NormedQK(Attention):
    """OLMo2: q and k each pass an RMSNorm over all heads at once, before the per-head view."""

    def __init__(self, heads: int = 3, head_dim: int = 5) -> None:
        super().__init__(heads, head_dim)
        self.q_norm, self.k_norm = RMSNorm(heads * head_dim), RMSNorm(heads * head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.split(self.q_norm(self.q(x))), self.split(self.k_norm(self.k(x))), self.split(self.v(x))
        y = ((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class GQA(nn.Module):
    """Grouped-query attention through SDPA's enable_gqa: 4 query heads read 2 KV heads."""

    def __init__(self, q_heads: int = 4, kv_heads: int = 2, head_dim: int = 3, width: int = 9) -> None:
        super().__init__()
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.q = nn.Linear(width, q_heads * head_dim)
        self.k = nn.Linear(width, kv_heads * head_dim)
        self.v = nn.Linear(width, kv_heads * head_dim)
        self.o = nn.Linear(q_heads * head_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.q_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, s, self.q_heads * self.head_dim))


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 13) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.fc = nn.Linear(D, D)
        self.out = nn.Linear(D, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(idx))))


# --- contractions against weights ------------------------------------------------------------------
def test_linear_relu_linear_hidden_width_is_one_exact_prunable_group() -> None:
    """linear: the output features of fc1, its bias and the input features of fc2 are one space;
    elementwise ops keep it; its mask site is the activation fc2 consumes."""
    a = analyze(MLP(), tokens())
    (g,) = a.prunable
    assert (g.kind, g.size, g.unit_shape, g.unit_width) == ("channels", H, (H,), 1)
    assert axes(g) == {("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}
    assert g.exact
    (site,) = g.sites
    nodes = {n.name: n for n in a.captured.module.graph.nodes}
    consumers = [u for u in nodes[site.node].users if u.target is aten.linear.default]
    assert [(u.args[0].name, u.args[1].target) for u in consumers] == [(site.node, "fc2.weight")]
    assert site.axis == 2


def test_channels_that_reach_the_model_output_are_frozen() -> None:
    """output: every space of a model output is frozen (its consumer is outside the model)."""
    a = analyze(MLP(), tokens())
    g = group_at(a, "fc2.weight", 0)
    assert not g.prunable and "output" in g.reason
    a = analyze(Head(torch.relu), tokens())
    g = group_at(a, "fc1.weight", 0)
    assert not g.prunable and "output" in g.reason
    assert a.prunable == []


def test_model_input_channels_are_frozen() -> None:
    """placeholder: the feature axis of a model input is frozen (it is given by the caller)."""
    a = analyze(MLP(), tokens())
    g = group_at(a, "fc1.weight", 1)
    assert not g.prunable and "input" in g.reason


@pytest.mark.parametrize(
    ("op", "f"),
    [
        (aten.roll, lambda h: torch.roll(h, 1, dims=-1)),
        (aten.flip, lambda h: torch.flip(h, dims=[-1])),
    ],
    ids=["roll", "flip"],
)
def test_op_without_a_rule_freezes_the_channels_it_touches(op: Any, f: Callable) -> None:
    """unknown: an op with no rule freezes every space it reads and writes, and says which op."""
    assert op not in REGISTRY and op.default not in REGISTRY
    a = analyze(MLP(f), tokens())
    g = group_at(a, "fc1.weight", 0)
    assert not g.prunable
    assert "no rule" in g.reason and op.__name__ in g.reason
    assert a.prunable == []


@pytest.mark.parametrize(
    ("f", "fc2_in", "word"),
    [
        (lambda h: h[..., ::2], (H + 1) // 2, "sliced"),
        (lambda h: h.softmax(-1), H, "reduced"),
        (lambda h: torch.sort(h, dim=-1).values, H, "reduced"),
        (lambda h: torch.relu(h).topk(3, dim=-1).values, 3, "top-k over the result of aten.relu"),
    ],
    ids=["slice", "softmax", "sort", "topk"],
)
def test_strided_slice_and_softmax_over_channels_freeze_them(f: Callable, fc2_in: int, word: str) -> None:
    """slice / softmax / sort / topk: a strided slice, a softmax, a sort or a top-k along the channel axis
    ties the channels to their positions (or to each other), so the group is frozen."""
    a = analyze(MLP(f, fc2_in), tokens())
    g = group_at(a, "fc1.weight", 0)
    assert not g.prunable
    assert word in g.reason
    assert a.prunable == []


@pytest.mark.parametrize(
    "f",
    [lambda h: h[:, 1:], lambda h: torch.cat([h, h], dim=1), lambda h: h[..., :]],
    ids=["slice-seq", "cat-seq", "full-slice"],
)
def test_slice_and_cat_on_other_axes_keep_channels_prunable(f: Callable) -> None:
    """slice / cat: only the sliced or concatenated axis is affected; channels stay one group."""
    a = analyze(MLP(f), tokens())
    g = group_at(a, "fc1.weight", 0)
    assert g.prunable and g.size == H
    assert ("fc2.weight", 1) in axes(g)


class Gathered(nn.Module):
    """``gather`` along the sequence with an index of the hidden's own shape (per channel), and along the
    channels (the index picks channels by value)."""

    def __init__(self, along: int) -> None:
        super().__init__()
        self.along = along
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H if along == 1 else 3, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if self.along == 1:
            idx = (h > 0.1).long().cumsum(1).clamp(max=x.shape[1] - 1)
        else:
            idx = (h[..., :3] > 0.1).long()
        return self.fc2(torch.gather(h, self.along, idx))


@pytest.mark.parametrize("along", [1, -1], ids=["sequence", "channels"])
def test_gather_freezes_the_axis_it_reads_by_value(along: int, random_plan: Callable) -> None:
    """gather: the axis the index reads by value is frozen; an axis the index spans whole is shared by the
    input, the index and the output, so channels gathered along the sequence stay one prunable group."""
    a = analyze(Gathered(along), tokens())
    g = group_at(a, "fc1.weight", 0)
    if along == 1:
        assert g.prunable and ("fc2.weight", 1) in axes(g)
        fxgradnas.apply_plan(a, random_plan(a))  # self-checked: pruned == masked
    else:
        assert not g.prunable and "gathered" in g.reason


class Branches(nn.Module):
    """Two branches concatenated along the channels, read by one layer (SqueezeNet's fire module, an
    Inception block); the second branch's channels are also concatenated with themselves."""

    def __init__(self, a: int = 4, b: int = 6) -> None:
        super().__init__()
        self.left, self.right, self.out = nn.Linear(D, a), nn.Linear(D, b), nn.Linear(a + 2 * b, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        right = torch.relu(self.right(x))
        return self.out(torch.cat([torch.relu(self.left(x)), right, 2 * right], dim=-1))


def test_concatenated_branches_keep_their_own_channels(random_plan: Callable) -> None:
    """cat along a constant axis: the output axis is the concatenation of the inputs' axes, so each branch
    is its own group over its slice of the reader's columns (the same slice twice for a repeated input); the
    mask at the reader covers only its group's entries; the pruned module equals the masked one."""
    a = analyze(Branches(), tokens())
    left, right = group_at(a, "left.weight", 0), group_at(a, "right.weight", 0)
    assert left is not right and left.prunable and right.prunable and (left.size, right.size) == (4, 6)
    assert ("out.weight", 1) in axes(left) and ("out.weight", 1) in axes(right)
    plan = fxgradnas.Plan({"left": [0, 3], "right": [1, 2, 5]})
    pruned = fxgradnas.apply_plan(a, plan)  # self-checked: pruned == masked
    assert pruned.get_parameter("out.weight").shape == (D, 2 + 2 * 3)
    x = tokens()
    masked = fxgradnas.masked(a, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x))
    fxgradnas.apply_plan(a, random_plan(a))


def test_concatenated_branches_score_per_channel() -> None:
    """Scores fold a concatenated site back onto each branch's channels (a channel read twice counts
    twice); calibration's recorder gives what autograd gives for the masks."""
    from fxgradnas.instrument import instrument
    from fxgradnas.scores import l1_scores

    a = analyze(Branches(), tokens())
    l1 = l1_scores(a)
    assert (l1["left"].shape, l1["right"].shape) == ((4,), (6,))
    x = tokens()
    plain = instrument(a)
    for mask in plain.masks.values():
        mask.requires_grad_(True)
    plain.module(x).square().sum().backward()
    scores = fxgradnas.calibrate(a, [x], lambda out, batch: out.square().sum(), progress=False)
    for name, mask in plain.masks.items():
        torch.testing.assert_close(scores[name], mask.grad.reshape(-1) ** 2)


def test_mask_site_of_a_concatenation_lives_on_the_masks_device() -> None:
    from fxgradnas.instrument import MaskSite

    a = analyze(Branches(), tokens())
    g = a.group("left")
    (site,) = [s for s in g.sites if s.layout.concatenated]
    assert MaskSite(g.name, torch.ones(g.unit_shape, device="meta"), site).entries.device.type == "meta"


class TwoAttentions(nn.Module):
    """Two ``nn.MultiheadAttention`` layers: export computes the ``batch * heads`` size of their views once."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.MultiheadAttention(16, 4), nn.MultiheadAttention(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.a(x, x, x, need_weights=False)[0]
        return x + self.b(x, x, x, need_weights=False)[0]


def test_a_size_product_shared_by_layers_is_patched_per_layer() -> None:
    """The rewrite gives each layer its own copy of a shared ``B * H`` product before patching H."""
    a = analyze(TwoAttentions(), torch.randn(5, B, 16))
    shared = [n for n in a.captured.module.graph.nodes if n.target is operator.mul and len(n.users) > 2]
    assert shared, "the example must share the product"
    pruned = fxgradnas.apply_plan(a, fxgradnas.Plan({"a": [0], "b": [0, 1, 3]}))  # self-checked
    assert pruned.get_parameter("b.in_proj_weight").shape == (3 * 12, 16)


def test_channel_dim_that_only_reaches_a_sum_is_not_prunable() -> None:
    """reduction: a sum over the channel axis is recorded; a channels group reduced over is frozen."""
    a = analyze(Head(lambda h: h.sum(-1)), tokens())
    g = group_at(a, "fc1.weight", 0)
    assert not g.prunable and not g.exact
    assert "sum" in {kind for _, kind in g.reductions}


# --- coupling --------------------------------------------------------------------------------------
def test_swiglu_couples_gate_and_up_into_one_group() -> None:
    """elementwise mul: gate(x) * up(x) makes the two output axes one space, consumed by down."""
    a = analyze(SwiGLU(), tokens())
    (g,) = a.prunable
    assert (g.kind, g.size) == ("channels", H)
    assert axes(g) == {("gate.weight", 0), ("up.weight", 0), ("down.weight", 1)}
    assert g.exact


def test_fused_gate_up_chunk_makes_the_half_width_the_unit() -> None:
    """split/chunk into equal pieces: the axis becomes [pieces, piece]; the piece is the unit and
    the piece index is frozen."""
    a = analyze(FusedSwiGLU(), tokens())
    g = group_at(a, "down.weight", 1)
    assert g.prunable and g.size == H
    assert {("gate_up.weight", 0), ("gate_up.bias", 0)} <= axes(g)
    (w,) = [t for t in g.params if t.name == "gate_up.weight" and t.axis == 0]
    assert [(f.size, f.unit_axis) for f in w.layout.factors] == [(2, None), (H, 0)]
    assert all(other is g or not other.prunable for other in a.groups)


def test_conv_batchnorm_conv_channels_are_one_group() -> None:
    """conv (groups=1) and batch_norm: out channels of conv1, its bias, the BatchNorm affine and
    running statistics and the in channels of conv2 are one space; kernel axes are never units."""
    a = analyze(ConvNet(mid=5), images())
    g = group_at(a, "conv1.weight", 0)
    assert g.prunable and g.exact and (g.kind, g.size) == ("channels", 5)
    assert axes(g) == {
        ("conv1.weight", 0),
        ("conv1.bias", 0),
        ("bn.weight", 0),
        ("bn.bias", 0),
        ("conv2.weight", 1),
    }
    assert {("bn.running_mean", 0), ("bn.running_var", 0)} <= buffer_axes(g)
    for conv in ("conv1.weight", "conv2.weight"):
        assert in_no_group(a, conv, 2) and in_no_group(a, conv, 3)
    assert group_at(a, "conv2.weight", 0).prunable  # pooled then consumed by the head: fine


def test_conv_flatten_linear_keeps_channels_as_the_major_factor() -> None:
    """reshape (flatten): the linear's input axis is [channels, h, w]; the channel is the unit and
    one unit is h * w entries wide."""

    class ConvFlat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3, stride=2)
            self.fc = nn.Linear(5 * 5 * 5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    a = analyze(ConvFlat(), images())
    g = group_at(a, "conv.weight", 0)
    assert g.prunable and g.size == 5 and g.unit_width == 25
    (w,) = [t for t in g.params if t.name == "fc.weight"]
    assert w.axis == 1 and [f.unit_axis for f in w.layout.factors] == [0, None, None]


def test_grouped_convolution_units_are_whole_conv_groups_and_channels_within_every_group() -> None:
    """conv with 1 < groups < channels: channels are [conv group, channel within the group]. A conv
    group couples its input and output channels (and ``groups`` spells how many); a channel within
    the groups is that channel of every conv group. All three are exact prunable groups."""
    a = analyze(ConvNet(mid=6, groups=2), images())
    (whole,) = [g for g in a.groups if ("conv1.weight", 0) in axes(g) and ("conv2.weight", 0) in axes(g)]
    assert whole.prunable and whole.exact and whole.size == 2
    assert {("bn.weight", 0), ("conv2.bias", 0), ("head.weight", 1)} <= axes(whole)
    assert [c.node for c in whole.shape_constants] == [n.name for n in a.captured.module.graph.nodes
                                                       if n.target is aten.conv2d.default][1:]
    inputs = group_at(a, "conv2.weight", 1)
    assert inputs.prunable and inputs.exact and inputs.size == 3
    (w,) = [t for t in inputs.params if t.name == "conv1.weight"]
    assert [(f.size, f.unit_axis) for f in w.layout.factors] == [(2, None), (3, 0)]
    (outputs,) = [g for g in a.groups if ("conv2.weight", 0) in axes(g) and g is not whole]
    assert outputs.prunable and outputs.exact and outputs.size == 3
    assert ("head.weight", 1) in axes(outputs) and ("conv1.weight", 0) not in axes(outputs)


def test_grouped_convolution_keeps_weight_and_bias_out_channels_together() -> None:
    """conv: the out-channel axis of the weight and the bias are one space, grouped or not."""
    a = analyze(ConvNet(mid=6, groups=2), images())
    weight = [g.name for g in a.groups if ("conv2.weight", 0) in axes(g)]
    assert len(weight) == 2 and weight == [g.name for g in a.groups if ("conv2.bias", 0) in axes(g)]


def test_depthwise_convolution_couples_input_and_output_channels() -> None:
    """conv with groups == in == out channels: channel c in is channel c out, one group."""
    a = analyze(ConvNet(mid=5, groups=5), images())
    g = group_at(a, "conv1.weight", 0)
    assert g.prunable and g.size == 5
    assert {("bn.weight", 0), ("conv2.weight", 0), ("conv2.bias", 0), ("head.weight", 1)} <= axes(g)
    assert in_no_group(a, "conv2.weight", 1)  # the per-group input axis has size 1


# --- rules that used to crash ---------------------------------------------------------------------
class BinaryMinMax(nn.Module):
    """T5's relative-position buckets: ``torch.min``/``torch.max`` of two tensors (elementwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(torch.min(h, torch.full_like(h, 0.5)) + torch.max(h, -h))


class SymbolicRepeat(nn.Module):
    """DeBERTa-v2's relative embeddings: a table repeated by the (dynamic) batch and sequence sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.table = nn.Parameter(torch.randn(1, 1, H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return self.fc2(torch.relu(self.fc1(x)) + self.table.repeat(b, t, 1))


@pytest.mark.parametrize("model", [BinaryMinMax, SymbolicRepeat], ids=["min-max-other", "symbolic-repeat"])
def test_patterns_that_crashed_the_analysis_are_understood(model: type[nn.Module], random_plan: Callable) -> None:
    """elementwise ``min.other``/``max.other`` (not reductions); ``repeat`` by a SymInt count (a
    data-sized tile): the hidden channels are one exact prunable group."""
    a = analyze(model(), tokens())
    g = group_at(a, "fc1.weight", 0)
    assert g.prunable and g.exact and ("fc2.weight", 1) in axes(g)
    fxgradnas.apply_plan(a, random_plan(a))  # self-checked: pruned == masked


# --- residual streams ------------------------------------------------------------------------------
def test_residual_stream_with_layernorm_is_hidden_and_approximate() -> None:
    """add of two writers: the residual stream is a "hidden" group; LayerNorm statistics over it
    change when a channel goes, so pruning it is approximate."""
    a = analyze(Residual(nn.LayerNorm(D)), tokens())
    (g,) = a.by_kind("hidden")
    assert g.prunable and g.size == D and not g.exact
    assert {
        ("inp.weight", 0),
        ("norm.weight", 0),
        ("norm.bias", 0),
        ("fc1.weight", 1),
        ("fc2.weight", 0),
        ("head.weight", 1),
    } <= axes(g)
    assert group_at(a, "fc1.weight", 0).kind == "channels"


@pytest.mark.parametrize(
    "square",
    [
        lambda x: x.pow(2),
        lambda x: x * x,
        torch.square,
    ],
    ids=["pow", "mul", "torch.square"],
)
def test_residual_stream_with_rmsnorm_is_exact(square: Callable) -> None:
    """mean of squares: an RMSNorm over the hidden axis is exact up to a rescale."""
    a = analyze(Residual(RMSNorm(D, square=square)), tokens())
    (g,) = a.by_kind("hidden")
    assert g.prunable and g.size == D and g.exact
    assert "RMSNorm" in g.exact_reason
    assert ("norm.w", 0) in axes(g)


class SandwichNorm(nn.Module):
    """Post-sublayer RMSNorms (Gemma2, OLMo2): ``x + norm(fc2(relu(fc1(x))))`` and ``x + (1 + w) * norm(fc(x))``,
    the norm reducing over the projection's output before the value joins the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(D, D), nn.Linear(D, 2)
        self.fc1, self.fc2, self.fc3 = nn.Linear(D, H), nn.Linear(H, D), nn.Linear(D, D)
        self.post1, self.post2 = RMSNorm(D), RMSNorm(D)
        with torch.no_grad():
            self.post1.w.normal_()
            self.post2.w.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.post1(self.fc2(torch.relu(self.fc1(x))))
        y = self.fc3(x)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        x = x + (1.0 + self.post2.w) * y.to(torch.float32)
        return self.head(x)


def test_post_sublayer_norms_see_the_masked_value_and_stay_exact() -> None:
    """The hidden mask goes where the value is produced (fc2, fc3), not where it joins the stream, so the
    norm in between reduces over zeros at pruned channels and the rescale makes pruning exact."""
    model = SandwichNorm().eval()
    a = analyze(model, tokens())
    (g,) = a.by_kind("hidden")
    assert g.prunable and g.exact and "RMSNorm" in g.exact_reason
    producers = {n.name for n in a.captured.module.graph.nodes if n.target is torch.ops.aten.linear.default}
    assert {site.node for site in g.sites} <= producers
    plan = fxgradnas.Plan({g.name: list(range(0, D, 3))})
    fxgradnas.apply_plan(a, plan)  # the self-check raises unless pruned == masked


class ShiftedResidualRead(nn.Module):
    """MobileNetV3's block without expansion: the residual width itself goes through a depthwise conv,
    a BatchNorm (a shift: zero becomes its bias) and an activation before the projection reads it."""

    def __init__(self, shift: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, D, 1), nn.Conv2d(D, 2, 1)
        self.dw, self.proj = nn.Conv2d(D, D, 3, padding=1, groups=D, bias=False), nn.Conv2d(D, D, 1)
        self.bn = nn.BatchNorm2d(D)
        self.shift = shift or (lambda y: torch.relu(self.bn(y)))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.proj(self.shift(self.dw(h)))
        return self.head(h)


@pytest.mark.parametrize("shift", ["batch_norm", "sigmoid", "relu"])
def test_residual_reads_behind_a_shift_are_masked_where_they_are_read(shift: str) -> None:
    """The hidden mask zeroes pruned channels where they are written; an op that maps zero to non-zero
    (a BatchNorm, a sigmoid) before a weight reads them needs a mask at that read, and only then."""
    model = ShiftedResidualRead({"sigmoid": torch.sigmoid, "relu": torch.relu}.get(shift)).eval()
    a = analyze(model, images())
    g = group_at(a, "proj.weight", 1)
    assert g.kind == "hidden" and g.prunable and g.exact
    nodes = {n.name: n for n in a.captured.module.graph.nodes}
    read_by_proj = {site.node for site in g.sites if any("proj" in str(u.meta.get("nn_module_stack", ""))
                                                            for u in nodes[site.node].users)}
    assert bool(read_by_proj) == (shift != "relu")
    plan = fxgradnas.Plan({g.name: [0, 2, 3]})
    pruned, x = fxgradnas.apply_plan(a, plan, check=False), images()
    torch.testing.assert_close(pruned(x), fxgradnas.masked(a, plan)(x))  # the self-check, spelled out


class SumOfShifted(nn.Module):
    """A sum over the residual width of the stream plus a bias: zero-blind only where the stream is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 2)
        self.shift = nn.Parameter(torch.randn(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h + self.fc2(h)
        return self.head(h) + (h + self.shift).sum(-1, keepdim=True)


def test_a_sum_over_a_shifted_residual_width_is_approximate() -> None:
    a = analyze(SumOfShifted(), tokens())
    g = group_at(a, "head.weight", 1)
    assert g.kind == "hidden" and not g.exact and "non-zero" in g.exact_reason
    plan, x = fxgradnas.Plan({g.name: [0, 2, 3]}), tokens()
    with pytest.warns(UserWarning, match="approximate"):
        pruned = fxgradnas.apply_plan(a, plan, check=False)
    assert not torch.allclose(pruned(x), fxgradnas.masked(a, plan)(x), atol=1e-4)  # why it is not exact


class AddToInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(D, D), nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc(x))


class CenterInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x - x.mean(-1, keepdim=True))


@pytest.mark.parametrize("model", [AddToInput, CenterInput], ids=["x+fc(x)", "x-mean(x)"])
def test_add_or_sub_on_a_model_input(model: type[nn.Module]) -> None:
    """add/sub: a model input used directly as an operand is analysed; its channels stay frozen."""
    a = analyze(model(), tokens())
    g = group_at(a, "fc.weight", 1)
    assert not g.prunable and "input" in g.reason


# --- attention -------------------------------------------------------------------------------------
def test_attention_heads_from_matmul_softmax_matmul() -> None:
    """matmul between two activations: axes on both sides are heads, the contracted head dim is
    frozen; the heads group owns q/k/v output rows and o input columns, head_dim entries per unit."""
    heads, head_dim = 3, 5
    a = analyze(Attention(heads, head_dim), torch.randn(B, T, heads * head_dim))
    (g,) = a.by_kind("heads")
    assert g.prunable and g.exact
    assert (g.size, g.unit_shape, g.unit_width) == (heads, (heads,), head_dim)
    assert {("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)} <= axes(g)
    assert all(other.unit_shape != (head_dim,) for other in a.groups)  # head dim is not a group
    assert a.prunable == [g]


class ZeroBias(Attention):
    """T5's cross-attention without a relative bias: a zero bias of shape (1, heads, L, S) made from the head
    count, added to the scores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        bias = torch.zeros((1, self.heads, s, s), dtype=x.dtype)
        y = ((q @ k.transpose(-2, -1)) + bias).softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


def test_a_filled_tensor_of_the_head_count_is_a_size_constant(random_plan: Callable) -> None:
    """zeros/ones/full/empty: every entry is the same, so their sizes are size constants the rewrite patches
    (the heads stay prunable); arange's entries depend on their position, so its axis is frozen."""
    a = analyze(ZeroBias(3, 5), torch.randn(B, T, 15))
    (g,) = a.by_kind("heads")
    assert g.prunable and any(c.node.startswith("zeros") for c in g.shape_constants)
    fxgradnas.apply_plan(a, random_plan(a))  # self-checked: pruned == masked


def test_gqa_through_sdpa_enable_gqa() -> None:
    """sdpa with Hq = Hkv * n_rep: the query-head space is [kv_heads, queries_per_kv]."""
    a = analyze(GQA(q_heads=4, kv_heads=2, head_dim=3), torch.randn(B, T, 9))
    (g,) = a.by_kind("heads")
    assert g.prunable
    assert g.unit_shape == (2, 2) and g.size == 4
    assert (g.kv_heads, g.queries_per_kv, g.unit_width) == (2, 2, 3)
    assert {("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1)} <= axes(g)
    (k,) = [t for t in g.params if t.name == "k.weight"]
    assert k.layout.unit_axes == (0,)  # k rows are indexed by the KV head only


class EinsumWindows(nn.Module):
    """MaxViT's attention: q/k/v of every window as (batch, windows, heads, positions, head_dim) and two
    einsums; a per-head relative bias table indexed by position pairs; an einsum projection by a weight."""

    def __init__(self, heads: int = 3, head_dim: int = 4, positions: int = 3) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.qkv = nn.Linear(width, 3 * width)
        self.bias = nn.Parameter(torch.randn(2 * positions - 1, heads))
        self.register_buffer("pairs", torch.arange(positions)[:, None] - torch.arange(positions)[None, :]
                             + positions - 1)
        self.out = nn.Parameter(torch.randn(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, windows, positions, width)
        b, g, n, width = x.shape
        q, k, v = (t.reshape(b, g, n, self.heads, self.head_dim).permute(0, 1, 3, 2, 4)
                   for t in self.qkv(x).chunk(3, dim=-1))
        att = torch.einsum("bghid,bghjd->bghij", q, k) + self.bias[self.pairs].permute(2, 0, 1)
        y = torch.einsum("bghij,bghjd->bghid", att.softmax(-1), v).permute(0, 1, 3, 2, 4).reshape(b, g, n, width)
        return torch.einsum("...i,oi->...o", y, self.out)


def test_einsum_attention_over_windows_finds_the_heads(random_plan: Callable) -> None:
    """einsum between two activations: the shared letters with a fixed size are heads candidates, and only
    the one that parameters carry (the heads, not the windows) becomes the heads group; an einsum by a
    weight is a consumer like ``linear`` (its ellipsis spelled out); the pruned module equals the masked one."""
    heads, head_dim = 3, 4
    a = analyze(EinsumWindows(heads, head_dim), torch.randn(B, 2, 3, heads * head_dim))
    (g,) = a.by_kind("heads")
    assert g.prunable and g.exact and (g.unit_shape, g.unit_width) == ((heads,), head_dim)
    assert {("qkv.weight", 0), ("bias", 1), ("out", 1)} <= axes(g)
    fxgradnas.apply_plan(a, random_plan(a))  # self-checked: pruned == masked


class EinsumOfAWeight(nn.Module):
    """A weight permuted by a one-operand einsum, then contracted with the hidden by another einsum."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Parameter(torch.randn(H, D) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bth,dh->btd", torch.relu(self.fc1(x)), torch.einsum("hd->dh", self.fc2))


def test_einsum_of_a_weight_is_a_weight(random_plan: Callable) -> None:
    a = analyze(EinsumOfAWeight(), tokens())
    g = group_at(a, "fc1.weight", 0)
    assert g.prunable and ("fc2", 0) in axes(g)
    fxgradnas.apply_plan(a, random_plan(a))  # self-checked: pruned == masked


class EinsumForms(nn.Module):
    """einsum forms without a rule: a letter summed within one operand, and a diagonal."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(D, H), nn.Linear(D, H), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summed = torch.einsum("bth,btk->bt", self.fc1(x), self.fc2(x))
        diagonal = torch.einsum("bii->bi", self.fc3(x)[:, :D, :])
        return summed[..., None] + diagonal[:, None, :]


def test_einsum_forms_without_a_rule_freeze_with_the_op_name() -> None:
    a = analyze(EinsumForms(), tokens())
    for name in ("fc1.weight", "fc2.weight"):
        g = group_at(a, name, 0)
        assert not g.prunable and "einsum" in g.reason


def test_multi_query_attention_reports_one_kv_head() -> None:
    """sdpa with Hkv = 1: every query head reads the one KV head."""
    a = analyze(GQA(q_heads=4, kv_heads=1, head_dim=3), torch.randn(B, T, 9))
    (g,) = a.by_kind("heads")
    assert g.prunable and g.size == 4
    assert (g.kv_heads, g.queries_per_kv) == (1, 4)


# --- capture ---------------------------------------------------------------------------------------
def test_tied_weights_list_every_name_and_freeze_the_vocab() -> None:
    """get_attr of one tensor under two names: one set of spaces, both names on every axis; the vocab
    axis is looked up by index (embedding) and reaches the output, so it is frozen."""
    a = analyze(TiedLM(vocab=13), torch.randint(0, 13, (B, T)))
    vocab = group_at(a, "emb.weight", 0)
    assert vocab is group_at(a, "out.weight", 0)
    assert vocab.size == 13 and not vocab.prunable
    (t,) = vocab.params
    assert set(t.names) == {"emb.weight", "out.weight"}
    width = group_at(a, "emb.weight", 1)
    assert width is group_at(a, "out.weight", 1) and width.size == D


def test_static_export_finds_the_same_groups() -> None:
    """dynamic_shapes=None: batch and sequence are plain ints, yet the groups are the same."""

    def signature(a: Analysis) -> list:
        return sorted((g.kind, g.unit_shape, g.prunable, g.unit_width, sorted(axes(g))) for g in a.groups)

    model, x = Attention(), torch.randn(B, T, 15)
    dynamic, static = analyze(model, x), analyze(model, x, dynamic_shapes=None)
    assert dynamic.captured.dynamic_dims and not static.captured.dynamic_dims
    assert signature(dynamic) == signature(static)


def test_inputs_that_are_not_tensors_raise_type_error() -> None:
    with pytest.raises(TypeError):
        fxgradnas.analyze(MLP(), "not a tensor")  # type: ignore[arg-type]


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_data_dependent_control_flow_raises_capture_error_with_a_hint() -> None:
    with pytest.raises(fxgradnas.CaptureError) as info:
        analyze(Branchy(), tokens())
    message = str(info.value)
    assert "Try" in message
    assert Path(__file__).name in message or "x.sum() > 0" in message


def test_heads_under_a_norm_over_all_heads_are_approximate() -> None:
    """Pruning a head changes the statistics of a q/k RMSNorm over all heads: prunable, marked approximate,
    and the rewrite still builds (the self-check is skipped with a warning)."""
    a = analyze(NormedQK(heads=4, head_dim=3), torch.randn(B, T, 12))
    (g,) = a.by_kind("heads")
    assert g.prunable and not g.exact and g.exact_reason.startswith("approximate")
    plan = fxgradnas.Plan({g.name: [0, 2, 3]})
    with pytest.warns(UserWarning, match="approximate"):
        pruned = fxgradnas.apply_plan(a, plan)
    x = torch.randn(B, T, 12)
    reference = fxgradnas.masked(a, plan)(x)
    assert pruned.get_parameter("q_norm.w").shape == (9,)
    assert 0 < float((pruned(x) - reference).abs().max()) < float(reference.abs().max())
