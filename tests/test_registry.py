"""The op registry: one entry per op with its rule and the patcher of the size constants the rule
records; ops without an entry, rules that fail and constants that cannot be patched freeze, naming the
op and the node; the elementwise ops come from torch's own pointwise tags."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxgradnas
from fxgradnas import Plan, apply_plan
from fxgradnas.analysis import REGISTRY, OpEntry, register
from fxgradnas.analysis.registry import entry_for
from fxgradnas.analysis.rules.elementwise import POINTWISE, UNTAGGED_POINTWISE
from fxgradnas.errors import RewriteError
from tests import zoo

aten = torch.ops.aten
B, T, D, H = 3, 7, 5, 6  # batch, sequence, model width, hidden width (even: it is split in two)

_LIB = torch.library.Library("fxgradnas_test", "FRAGMENT")
_LIB.define("scale(Tensor x) -> Tensor")
_LIB.impl("scale", lambda x: x * 2, "CompositeExplicitAutograd")
torch.library.register_fake("fxgradnas_test::scale", lambda x: torch.empty_like(x), lib=_LIB)
scale = torch.ops.fxgradnas_test.scale.default


@contextmanager
def registered(op: Any, rule: Callable, patch: Callable | None = None) -> Iterator[None]:
    """Register ``rule`` for ``op`` for the duration of a test."""
    register(op, patch=patch)(rule)
    try:
        yield
    finally:
        del REGISTRY[op]


def hidden_channels(a: fxgradnas.Analysis) -> fxgradnas.Group:
    """The group of fc1's output channels."""
    (g,) = [g for g in a.groups if any(t.name == "fc1.weight" and t.axis == 0 for t in g.params)]
    return g


def tokens() -> torch.Tensor:
    return torch.randn(B, T, D)


class Between(nn.Module):
    """fc1 -> f -> fc2: ``f`` is what a test exercises on the hidden channels."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], fc2_in: int = H) -> None:
        super().__init__()
        self.fc1, self.fc2, self.f = nn.Linear(D, H), nn.Linear(fc2_in, D), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.f(torch.relu(self.fc1(x))))


class Heads(nn.Module):
    """Attention whose heads are split by ``split`` and whose KV heads are repeated by ``repeat``."""

    def __init__(self, split: str, repeat: str, q_heads: int = 4, kv_heads: int = 2, head_dim: int = 3) -> None:
        super().__init__()
        self.split, self.repeat = split, repeat
        self.hq, self.hkv, self.hd = q_heads, kv_heads, head_dim
        self.q = nn.Linear(D, q_heads * head_dim)
        self.kv = nn.Linear(D, 2 * kv_heads * head_dim)
        self.o = nn.Linear(q_heads * head_dim, D)

    def heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        b, s, _ = t.shape
        if self.split == "view":
            t = t.view(b, s, n, self.hd)
        elif self.split == "reshape":
            t = t.reshape(b, s, n, self.hd)
        else:
            t = t.unflatten(-1, (n, self.hd))
        return t.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        k, v = self.kv(x).split(self.hkv * self.hd, dim=-1)
        q, k, v = self.heads(self.q(x), self.hq), self.heads(k, self.hkv), self.heads(v, self.hkv)
        rep = self.hq // self.hkv
        if self.repeat == "expand":
            k, v = (t[:, :, None].expand(b, self.hkv, rep, s, self.hd).reshape(b, self.hq, s, self.hd) for t in (k, v))
        else:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, self.hq * self.hd))


class NormedResidual(nn.Module):
    """x + fc2(relu(fc1(norm(x)))) with an RMSNorm (exact) or a LayerNorm (approximate) over the stream."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(D, D), nn.Linear(D, 2)
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)
        self.w = nn.Parameter(torch.rand(D) + 0.5)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        if self.norm == "rms_norm":
            n = F.rms_norm(x, (D,), self.w)
        else:
            n = F.layer_norm(x, (D,), self.w)
        return self.head(x + self.fc2(torch.relu(self.fc1(n))))


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 4, 3, groups=2), nn.Conv2d(4, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))).mean((2, 3))


# every op whose rule records a size constant, with a small model that exercises it
CONSTANT_OPS: dict[Any, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    aten.view: (lambda: Heads("view", "expand"), tokens),
    aten.reshape: (lambda: Heads("reshape", "expand"), tokens),
    aten.unflatten: (lambda: Heads("unflatten", "expand"), tokens),
    aten.expand: (lambda: Heads("view", "expand"), tokens),
    aten.broadcast_to: (lambda: zoo.fused("grouped")[0], lambda: zoo.fused("grouped")[1]),
    aten.slice: (lambda: zoo.fused("slice")[0], lambda: zoo.fused("slice")[1]),
    aten.select: (lambda: zoo.fused("selected")[0], lambda: zoo.fused("selected")[1]),
    aten.repeat_interleave.self_int: (lambda: Heads("view", "repeat_interleave"), tokens),
    aten.split: (lambda: Heads("view", "expand"), tokens),
    aten.split_with_sizes: (lambda: Between(lambda h: torch.mul(*h.split([H // 2, H // 2], -1)), H // 2), tokens),
    aten.unsafe_split: (lambda: Between(lambda h: torch.mul(*torch.unsafe_split(h, H // 2, -1)), H // 2), tokens),
    aten.repeat: (lambda: Between(lambda h: h.repeat(1, 1, 2), 2 * H), tokens),
    aten.layer_norm: (lambda: NormedResidual("layer_norm"), tokens),
    aten.rms_norm: (lambda: NormedResidual("rms_norm"), tokens),
    aten.conv2d: (GroupedConv, lambda: torch.randn(B, 3, 9, 9)),
    aten.histc: (zoo.MoE, lambda: torch.randn(B, T, zoo.MOE_WIDTH)),
    aten.zeros: (lambda: Between(lambda h: h + torch.zeros(h.shape[-1]), H), tokens),
    aten.ones: (lambda: Between(lambda h: h * torch.ones(h.shape[-1]), H), tokens),
    aten.full: (lambda: Between(lambda h: h * torch.full((h.shape[-1],), 0.5), H), tokens),
    aten.empty: (lambda: Between(lambda h: h * torch.empty(h.shape[-1]).fill_(2.0), H), tokens),
    aten.new_zeros: (lambda: Between(lambda h: h + h.new_zeros(h.shape[-1]), H), tokens),
    aten.new_ones: (lambda: Between(lambda h: h * h.new_ones(h.shape[-1]), H), tokens),
    aten.new_full: (lambda: Between(lambda h: h * h.new_full((h.shape[-1],), 0.5), H), tokens),
    aten.new_empty: (lambda: Between(lambda h: h * h.new_empty(h.shape[-1]).fill_(2.0), H), tokens),
}


def recording_nodes(a: fxgradnas.Analysis) -> dict[str, Any]:
    """Node name -> target of every node whose rule recorded size constants."""
    nodes = {n.name: n for n in a.captured.module.graph.nodes}
    return {name: nodes[name].target for name, _ in a.walk.records.shape_ops}


@pytest.mark.parametrize("op", list(CONSTANT_OPS), ids=lambda op: str(op))
def test_every_op_that_records_size_constants_has_a_patcher_that_shrinks_them(op: Any, random_plan: Callable) -> None:
    """The op's constants are touched by a prunable group; a random plan patches them and the pruned
    module runs (and equals the masked one when every pruned group is exact)."""
    build, inputs = CONSTANT_OPS[op]
    a = fxgradnas.analyze(build().eval(), inputs())
    targets = recording_nodes(a)
    mine = [name for name, target in targets.items() if target == op or getattr(target, "overloadpacket", None) == op]
    assert mine, f"{op} recorded no size constant"
    assert all(entry_for(t).patch is not None for t in targets.values())
    touched = [g for g in a.prunable if any(c.node in mine for c in g.shape_constants)]
    assert touched, a.table()
    keep = {g.name: list(range(0, g.size, 2)) if g.kind != "heads" or len(g.unit_shape) == 1
            else [u for u in range(g.size) if u % g.unit_shape[1] == 0] for g in touched}
    plan = Plan(random_plan(a).keep | keep)
    if all(a.group(n).exact for n in plan.keep):
        pruned = apply_plan(a, plan)  # self-checked: pruned == masked
    else:
        with pytest.warns(UserWarning, match="approximate"):
            pruned = apply_plan(a, plan)
    pruned(*a.captured.args)


def test_the_models_above_cover_every_entry_with_a_patcher() -> None:
    with_patch = {op for op, entry in REGISTRY.items() if entry.patch is not None}
    conv_forms = {aten.conv1d, aten.conv3d, aten.convolution, aten.conv_transpose1d, aten.conv_transpose2d,
                  aten.conv_transpose3d}  # one rule and patcher for every convolution; conv2d is exercised
    assert with_patch - conv_forms == set(CONSTANT_OPS)


def test_registering_an_op_twice_raises() -> None:
    with registered(scale, lambda p, node: None), pytest.raises(ValueError, match="registered twice"):
        register(scale)(lambda p, node: None)
    assert scale not in REGISTRY
    with pytest.raises(ValueError, match="registered twice"):
        register(aten.view)(lambda p, node: None)
    assert isinstance(REGISTRY[aten.view], OpEntry)


def test_an_unregistered_op_freezes_what_it_touches_naming_the_op() -> None:
    a = fxgradnas.analyze(Between(scale).eval(), tokens())
    g = hidden_channels(a)
    assert not g.prunable
    assert "no rule for fxgradnas_test.scale.default" in g.reason
    assert a.prunable == []


def test_a_rule_that_fails_freezes_naming_the_op_the_node_and_the_first_line() -> None:
    def broken(p: Any, node: Any) -> Any:
        raise ValueError("cannot read this\nsecond line")

    with registered(scale, broken):
        a = fxgradnas.analyze(Between(scale).eval(), tokens())
    g = hidden_channels(a)
    assert not g.prunable
    node = next(n.name for n in a.captured.module.graph.nodes if n.target is scale)
    assert f"fxgradnas_test.scale.default failed at {node}: ValueError: cannot read this" in g.reason
    assert "second line" not in g.reason


def test_a_rule_that_returns_wrong_axes_is_a_failing_rule() -> None:
    with registered(scale, lambda p, node: [0]):
        a = fxgradnas.analyze(Between(scale).eval(), tokens())
    g = hidden_channels(a)
    assert not g.prunable and "failed at" in g.reason


def _same_axes_with_constants(p: Any, node: Any) -> Any:
    """The input's axes; the last one is recorded as spelled by a size constant."""
    spaces = list(p.of(node.args[0]))
    p.constants(spaces[-1:])
    return spaces


def test_size_constants_without_a_patcher_freeze() -> None:
    with registered(scale, _same_axes_with_constants):
        a = fxgradnas.analyze(Between(scale).eval(), tokens())
    g = hidden_channels(a)
    assert not g.prunable and "no patcher" in g.reason


def test_size_constants_the_patcher_cannot_change_freeze_the_group() -> None:
    def refuse(node: Any, index: int, sizes: list) -> list:
        raise RewriteError(f"{node.name}: spelled by something else")

    with registered(scale, _same_axes_with_constants, patch=refuse):
        a = fxgradnas.analyze(Between(scale).eval(), tokens())
    g = hidden_channels(a)
    assert not g.prunable
    assert "cannot patch a size constant of fxgradnas_test.scale.default" in g.reason
    assert "spelled by something else" in g.reason


# --- elementwise ops from torch's tags ------------------------------------------------------------
OLD_HAND_LIST = [
    "add", "sub", "rsub", "mul", "div", "pow", "neg", "abs", "exp", "exp2", "log", "log1p", "log2",
    "expm1", "sqrt", "rsqrt", "sin", "cos", "tan", "tanh", "sigmoid", "relu", "relu6", "gelu",
    "silu", "mish", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu", "celu",
    "softplus", "erf", "clamp", "clamp_min", "clamp_max", "clip", "where", "masked_fill",
    "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor",
    "__and__", "__or__", "__xor__", "__invert__", "floor", "ceil", "round", "sign", "reciprocal",
    "square", "fmod", "remainder", "floor_divide", "isnan", "isinf", "nan_to_num", "lerp",
    "addcmul", "addcdiv", "atan", "trunc", "frac", "logit",
]  # the elementwise packets before the tags
DROPPED = {
    aten.where.default: "torch.where(condition) returns the indices of the true entries, not an elementwise result",
}  # overloads of the old packets that are deliberately no longer elementwise


def _tensor_overloads(name: str) -> list[torch._ops.OpOverload]:
    """The overloads of a packet that take and return tensors (not the Python-number ones such as
    ``add.int``, which never label an axis), without ``out=`` variants."""
    packet = getattr(aten, name)
    found = []
    for overload in packet.overloads():
        op = getattr(packet, overload)
        schema = op._schema
        takes = any("Tensor" in str(a.type) for a in schema.arguments)
        gives = any("Tensor" in str(r.type) for r in schema.returns)
        if takes and gives and torch.Tag.out not in op.tags:
            found.append(op)
    return found


def test_pointwise_tags_cover_the_old_hand_list() -> None:
    elementwise = set(POINTWISE) | set(UNTAGGED_POINTWISE)
    missing = [str(op) for name in OLD_HAND_LIST if hasattr(aten, name)
               for op in _tensor_overloads(name) if op not in elementwise and op not in DROPPED]
    assert missing == []
    assert all(entry_for(op).rule.__name__ == "elementwise" for op in elementwise)
    assert all(entry_for(op) is None for op in DROPPED)  # no rule: it freezes what it touches


def test_explicit_elementwise_entries_are_exactly_the_untagged_ones() -> None:
    """An explicit entry is kept only while torch's tag is missing."""
    assert all(torch.Tag.pointwise not in op.tags for op in UNTAGGED_POINTWISE)
    assert not set(POINTWISE) & set(UNTAGGED_POINTWISE)
    assert all(torch.Tag.inplace not in op.tags for op in POINTWISE)  # in-place ops are functionalized


def test_binary_min_and_max_are_elementwise_while_their_reductions_stay_reductions() -> None:
    assert entry_for(aten.max.other).rule.__name__ == "elementwise"
    assert entry_for(aten.min.other).rule.__name__ == "elementwise"
    assert entry_for(aten.max.dim).rule.__name__ == "reduction"
    assert entry_for(aten.amax.default).rule.__name__ == "reduction"
