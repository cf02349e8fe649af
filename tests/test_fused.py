"""Fused projections read as pieces: a q/k/v projection sliced (Phi-3), split into unequal pieces
(GPT-BigCode), indexed by constant lists (Falcon) or by integers (Falcon in transformers 5.25), and a gate/up projection chunked in two. Each
piece's heads or channels are units; the rewrite slices the fused rows piece by piece and patches the
slice bounds and split sizes; what pruning would move but cannot be patched stays frozen, with the op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxgradnas
from fxgradnas import Plan, apply_plan
from fxgradnas.cost import CostModel
from fxgradnas.instrument import masked
from fxgradnas.rewrite import relative_difference, resolve_plan
from tests import zoo

aten = torch.ops.aten
HD = 4  # head dim of zoo.fused
KEEP = {  # the heads each form keeps, and the q/k/v rows that leaves in the fused weight
    "slice": ([2, 3], [*range(8, 16), *range(20, 24), *range(28, 32)]),  # KV head 1 with its two queries
    "split": ([2, 3], [*range(8, 16), *range(20, 24), *range(28, 32)]),
    "index": ([1, 3], [*range(4, 8), *range(12, 16), *range(16, 24)]),  # queries 1 and 3, the one k and v
    "grouped": ([0, 2], [*range(0, 4), *range(8, 16), *range(16, 20), *range(24, 32)]),  # one query per KV head
    "selected": ([0, 2], [*range(0, 4), *range(8, 16), *range(16, 20), *range(24, 32)]),
}


def constants(pruned: torch.fx.GraphModule, op: object) -> list[tuple]:
    """The arguments after the input of every ``op`` node, in graph order."""
    return [tuple(n.args[1:]) for n in pruned.graph.nodes if n.target == op]


@pytest.mark.parametrize("split", zoo.FUSED_SPLITS)
def test_each_piece_of_a_fused_projection_has_its_heads_and_prunes_exactly(split: str) -> None:
    model, x = zoo.fused(split)
    a = fxgradnas.analyze(model, x)
    heads, mlp = a.group("qkv"), a.group("gate_up")
    assert heads.kind == "heads" and heads.prunable, a.table()
    assert heads.unit_shape == ((4,) if split == "index" else (2, 2))
    assert mlp.kind == "channels" and mlp.prunable and mlp.size == 12

    keep, rows = KEEP[split]
    plan = Plan({"qkv": keep, "gate_up": [0, 3, 4, 7, 11]})
    pruned = apply_plan(a, plan)
    assert relative_difference(masked(a, plan, read_only=True), pruned, a) <= 1e-5
    assert torch.equal(pruned.qkv.weight, model.qkv.weight[rows])
    assert torch.equal(pruned.qkv.bias, model.qkv.bias[rows])
    assert pruned.gate_up.weight.shape[0] == 10 and pruned.down.weight.shape[1] == 5
    assert CostModel(a).evaluate(resolve_plan(a, plan).kept)["params"] == sum(p.numel() for p in pruned.parameters())


def test_the_patched_bounds_and_sizes_spell_the_kept_pieces() -> None:
    sliced = apply_plan(fxgradnas.analyze(*zoo.fused("slice")), Plan({"qkv": KEEP["slice"][0]}))
    big = 9223372036854775807
    assert [c[1:3] for c in constants(sliced, aten.slice.Tensor)][:3] == [(0, 8), (8, 12), (12, big)]
    split = apply_plan(fxgradnas.analyze(*zoo.fused("split")), Plan({"qkv": KEEP["split"][0]}))
    assert constants(split, aten.split_with_sizes.default)[0][0] == [8, 4, 4]
    grouped = apply_plan(fxgradnas.analyze(*zoo.fused("grouped")), Plan({"qkv": KEEP["grouped"][0]}))
    assert constants(grouped, aten.view.default)[0][0][-2:] == [3, HD]  # one query, k and v per KV head
    assert constants(grouped, aten.slice.Tensor)[0][1:3] == (0, -2)  # counted from the end: unchanged
    assert all(c[0][3] == 1 for c in constants(grouped, aten.broadcast_to.default))
    selected = apply_plan(fxgradnas.analyze(*zoo.fused("selected")), Plan({"qkv": KEEP["selected"][0]}))
    assert [c[1] for c in constants(selected, aten.select.int)] == [1, -1]  # after the one query; from the end


class IndexedFromStart(nn.Module):
    """Falcon-7B's fused heads read with k and v at indices counted from the start."""

    def __init__(self, heads: int = 4, head_dim: int = HD, width: int = 16) -> None:
        super().__init__()
        self.h, self.hd = heads, head_dim
        self.qkv, self.o = nn.Linear(width, (heads + 2) * head_dim), nn.Linear(heads * head_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.h + 2, self.hd)
        q, k, v = (t.transpose(1, 2) for t in (qkv[..., :self.h, :], qkv[..., [self.h], :], qkv[..., [self.h + 1], :]))
        y = nn.functional.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q))
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def test_a_constant_index_that_pruning_would_move_freezes_the_heads_naming_the_op() -> None:
    a = fxgradnas.analyze(IndexedFromStart().eval(), torch.randn(3, 7, 16))
    heads = a.by_kind("heads")[0]
    assert not heads.prunable
    assert "indexed by a constant tensor at index (aten.index)" in heads.reason


class SelectedFromStart(IndexedFromStart):
    """:class:`IndexedFromStart` with k and v read by integer ``select``, which the rewrite patches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.h + 2, self.hd)
        q, k, v = qkv[..., :self.h, :], qkv[..., self.h, :], qkv[..., self.h + 1, :]
        k, v = (t[:, :, None].expand_as(q) for t in (k, v))
        y = nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def test_an_integer_index_counted_from_the_start_is_patched_to_the_kept_heads() -> None:
    model = SelectedFromStart().eval()
    a = fxgradnas.analyze(model, torch.randn(3, 7, 16))
    heads = a.by_kind("heads")[0]
    assert heads.prunable, a.table()
    plan = Plan({heads.name: [1, 3]})
    pruned = apply_plan(a, plan)
    assert relative_difference(masked(a, plan, read_only=True), pruned, a) <= 1e-5
    assert [c[1] for c in constants(pruned, aten.select.int)] == [2, 3]  # after the two kept queries
    assert torch.equal(pruned.qkv.weight, model.qkv.weight[[*range(4, 8), *range(12, 24)]])


def test_an_integer_index_of_a_token_position_freezes_nothing_else() -> None:
    a = fxgradnas.analyze(Sliced(lambda h: h[:, -1, :].unsqueeze(1), 8).eval(), torch.randn(3, 7, 5))
    g, = [g for g in a.groups if any(t.name == "fc1.weight" and t.axis == 0 for t in g.params)]
    assert g.prunable, a.table()


class Sliced(nn.Module):
    """fc1 -> ``f`` -> fc2."""

    def __init__(self, f: object, fc2_in: int) -> None:
        super().__init__()
        self.fc1, self.fc2, self.f = nn.Linear(5, 8), nn.Linear(fc2_in, 5), f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.f(torch.relu(self.fc1(x))))


def test_a_slice_that_leaves_entries_unused_prunes_the_used_piece_and_freezes_the_rest() -> None:
    a = fxgradnas.analyze(Sliced(lambda h: h[..., 1:6], 5).eval(), torch.randn(3, 7, 5))
    used, = [g for g in a.groups if any(t.name == "fc2.weight" and t.axis == 1 for t in g.params)]
    assert used.prunable and used.size == 5
    rest = [g for g in a.groups if g.kind == "channels" and g is not used and g.size == 2]  # entries 6 and 7
    assert rest and not rest[0].prunable and "no place to put its mask" in rest[0].reason
    pruned = apply_plan(a, Plan({used.name: [0, 2, 4]}))  # self-checked against the masked model
    assert pruned.fc1.weight.shape[0] == 6 and constants(pruned, aten.slice.Tensor)[0][1:3] == (1, 4)


def test_a_strided_slice_freezes_the_channels_naming_the_node() -> None:
    a = fxgradnas.analyze(Sliced(lambda h: h[..., ::2], 4).eval(), torch.randn(3, 7, 5))
    g, = [g for g in a.groups if any(t.name == "fc1.weight" and t.axis == 0 for t in g.params)]
    assert not g.prunable and "sliced at slice" in g.reason
    assert a.prunable == []


class FoldedHeads(nn.Module):
    """BLOOM's attention without ALiBi: q/k/v fused as (heads, 3, head_dim), scores by ``bmm`` over an axis
    that folds the batch with the heads."""

    def __init__(self, heads: int = 4, head_dim: int = HD, width: int = 16) -> None:
        super().__init__()
        self.h, self.hd = heads, head_dim
        self.qkv, self.o = nn.Linear(width, 3 * heads * head_dim), nn.Linear(heads * head_dim, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.h, 3, self.hd)
        q, k, v = (qkv[..., i, :].transpose(1, 2).reshape(b * self.h, s, self.hd) for i in range(3))
        weights = torch.bmm(q, k.transpose(1, 2)).softmax(-1)
        y = torch.bmm(weights, v).view(b, self.h, s, self.hd)
        return self.o(y.permute(0, 2, 1, 3).reshape(b, s, self.h * self.hd))


def test_heads_folded_with_the_batch_are_found_and_prune_exactly() -> None:
    a = fxgradnas.analyze(FoldedHeads().eval(), torch.randn(3, 7, 16))
    heads, = a.by_kind("heads")
    assert heads.prunable and heads.unit_shape == (4,), a.table()
    pruned = apply_plan(a, Plan({heads.name: [0, 3]}))  # self-checked against the masked model
    assert pruned.qkv.weight.shape[0] == 3 * 2 * HD and pruned.o.weight.shape[1] == 2 * HD


class RuntimeFused(nn.Module):
    """q, k and v weights concatenated at run time into one fused weight, then split unequally
    (multi-query: q has 3 heads of 4, k and v one)."""

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(n, 12) * 0.3) for n in (12, 4, 4))
        self.o = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = F.linear(x, torch.cat([self.wq, self.wk, self.wv])).split([12, 4, 4], -1)
        q = q.view(b, s, 3, 4).transpose(1, 2)
        k, v = (t.view(b, s, 1, 4).transpose(1, 2) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).reshape(b, s, 12)
        return self.o(y)


def test_a_weight_concatenated_at_run_time_is_a_fused_weight() -> None:
    """cat of weights is a weight whose rows are the parts' rows: the heads own wq's rows and the split
    sizes are patched (self-checked: pruned == masked)."""
    a = fxgradnas.analyze(RuntimeFused().eval(), torch.randn(3, 5, 12))
    (g,) = a.by_kind("heads")
    assert g.prunable and g.size == 3
    pruned = fxgradnas.apply_plan(a, fxgradnas.Plan({g.name: [0, 2]}))
    assert pruned.get_parameter("wq").shape == (8, 12) and pruned.get_parameter("o.weight").shape == (12, 8)
