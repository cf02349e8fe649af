"""The analysis finds, for every zoo model, one heads group per attention layer, one channels group
per MLP and one hidden group, with the right sizes; what it cannot prune is frozen with a reason."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fxgradnas
from tests.zoo import HF_ZOO, ZOO, analysis_of


@dataclass(frozen=True)
class Expect:
    heads: dict[str, tuple[int, ...]]  # group name -> unit_shape
    head_dim: int
    mlps: dict[str, int]  # group name -> channels
    hidden: int | None  # hidden width, None when the model has no residual stream
    hidden_exact: bool = False
    hidden_prunable: bool = True


def layers(template: str, n: int, value):
    return {template.format(i): value for i in range(n)}


EXPECT = {
    "nanogpt": Expect(layers("transformer.h.{}.attn", 2, (4,)), 8, layers("transformer.h.{}.mlp", 2, 128), 32),
    "llama": Expect(layers("model.layers.{}.self_attn", 2, (2, 2)), 8, layers("model.layers.{}.mlp", 2, 48), 32,
                    hidden_exact=True),
    "bert": Expect(layers("encoder.layer.{}.attention", 2, (4,)), 8,
                   {**layers("encoder.layer.{}", 2, 64), "pooler.dense": 32}, 32),
    "resnet": Expect({}, 1, layers("layer1.{}", 2, 16), 16, hidden_exact=True),
    "squeezenet": Expect({}, 1, {"stem.0": 12, **{f"fire{i}": 6 for i in (1, 2)},
                                 **{f"fire1.expand{k}.0": 8 for k in ("1x1", "3x3")},
                                 **{f"fire2.expand{k}.0": 10 for k in ("1x1", "3x3")}}, None),
    "mlp": Expect({}, 1, {"layers.0": 64, "layers.1": 32}, None),
    "multihead": Expect({"attn": (4,)}, 8, {"attn.out_proj": 32}, None),
    "hf_gpt2": Expect(layers("transformer.h.{}.attn", 2, (4,)), 8, layers("transformer.h.{}.mlp", 2, 128), 32),
    "hf_bert": Expect(layers("bert.encoder.layer.{}.attention", 2, (4,)), 8, layers("bert.encoder.layer.{}", 2, 64),
                      32),
    "hf_llama": Expect(layers("model.layers.{}.self_attn", 2, (2, 2)), 8, layers("model.layers.{}.mlp", 2, 48), 32,
                       hidden_exact=True),
    "hf_qwen2": Expect(layers("model.layers.{}.self_attn", 2, (2, 2)), 8, layers("model.layers.{}.mlp", 2, 48), 32,
                       hidden_exact=True),
}

CASES = [pytest.param(name, id=name) for name in ZOO] + [
    pytest.param(name, id=name, marks=pytest.mark.hf) for name in HF_ZOO
]


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest) -> tuple[str, fxgradnas.Analysis]:
    return request.param, analysis_of(request.param)


def test_heads_groups(case) -> None:
    name, analysis = case
    expect = EXPECT[name]
    heads = {g.name: g for g in analysis.by_kind("heads")}
    assert {n: g.unit_shape for n, g in heads.items()} == expect.heads
    for g in heads.values():
        assert g.prunable and g.exact, g.reason
        assert g.unit_width == expect.head_dim
        assert g.kv_heads == g.unit_shape[0]
        assert g.size == g.kv_heads * g.queries_per_kv
        assert len(g.sites) == 1


def test_channel_groups(case) -> None:
    name, analysis = case
    prunable = {g.name: g.size for g in analysis.by_kind("channels") if g.prunable}
    assert prunable == EXPECT[name].mlps
    for g in analysis.by_kind("channels"):
        if g.prunable:
            assert g.exact and g.sites and g.unit_width == 1


def test_hidden_group(case) -> None:
    name, analysis = case
    expect = EXPECT[name]
    hidden = analysis.by_kind("hidden")
    if expect.hidden is None:
        assert hidden == []
        return
    assert [g.name for g in hidden] == ["hidden"]
    (g,) = hidden
    assert g.size == expect.hidden
    assert g.prunable == expect.hidden_prunable, g.reason
    assert g.exact == expect.hidden_exact, g.exact_reason
    assert g.sites, "a hidden group is masked where the residual stream is written"


def test_frozen_groups_say_why(case) -> None:
    _, analysis = case
    frozen = [g for g in analysis.groups if not g.prunable]
    assert frozen, "every zoo model has dims that reach its inputs or outputs"
    for g in frozen:
        assert g.reason


RECAPTURED = ("llama", "resnet", "squeezenet", "hf_llama", "hf_bert")  # decoders, CNNs, Hugging Face


def test_names_are_unique_and_stable(case) -> None:
    name, analysis = case
    names = [g.name for g in analysis.groups]
    assert len(set(names)) == len(names)
    if name not in RECAPTURED:
        return
    again = fxgradnas.analyze(*{**ZOO, **HF_ZOO}[name]())  # a fresh capture of a fresh model
    assert again is not analysis
    assert [g.name for g in again.groups] == names


def test_parameters_touched_exist_with_the_right_axis_sizes(case) -> None:
    _, analysis = case
    params = dict(analysis.captured.module.named_parameters(remove_duplicate=False))
    for g in analysis.groups:
        for t in g.params:
            size = 1
            for f in t.layout.factors:
                size *= f.size
            assert any(params[n].shape[t.axis] == size for n in t.names if n in params), (g.name, t)


def test_table_lists_every_group(case) -> None:
    _, analysis = case
    table = analysis.table()
    for g in analysis.groups:
        assert g.name in table
    assert f"{len(analysis.prunable)} of {len(analysis.groups)} groups prunable" in table


def test_coupling_graph_links_groups_to_parameters(case) -> None:
    _, analysis = case
    graph = analysis.graph
    for g in analysis.groups:
        linked = {n for n in graph.neighbors(f"group:{g.name}") if n.startswith("tensor:")}
        assert linked == {f"tensor:{t.name}" for t in g.params + g.buffers}


@pytest.mark.hf
def test_gpt2_fused_qkv_is_sliced_per_head() -> None:
    """c_attn's output axis is [q/k/v piece, head, head_dim]: a head owns one block in each piece."""
    pytest.importorskip("transformers")
    analysis = analysis_of("hf_gpt2")
    g = analysis.group("transformer.h.0.attn")
    c_attn = next(t for t in g.params if t.name == "transformer.h.0.attn.c_attn.weight")
    assert c_attn.axis == 1  # Conv1D stores (in, out)
    assert [(f.size, f.unit_axis) for f in c_attn.layout.factors] == [(3, None), (4, 0), (8, None)]


def test_gqa_kv_projections_carry_only_the_kv_axis() -> None:
    analysis = analysis_of("llama")
    g = analysis.group("model.layers.0.self_attn")
    axes = {t.name.split(".")[-2]: t.layout.unit_axes for t in g.params}
    assert axes == {"q_proj": (0, 1), "k_proj": (0,), "v_proj": (0,), "o_proj": (0, 1)}
    patched = {c.node for c in g.shape_constants}
    assert len(patched) >= 3, "q/k/v head views and the KV repeat must be patchable"


def test_user_model_is_not_mutated() -> None:
    model, inputs = ZOO["llama"]()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxgradnas.analyze(model, inputs)
    assert model.training
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_dynamic_batch_and_sequence() -> None:
    analysis = analysis_of("llama")
    assert len(analysis.captured.dynamic_dims) == 2
    module = analysis.captured.module
    ids = torch.randint(0, 64, (5, 11))
    model, _ = ZOO["llama"]()
    torch.testing.assert_close(module(ids), model(ids))


def test_capture_drops_slices_that_keep_the_whole_axis() -> None:
    """``x[:, :]`` exports as a slice that keeps everything: capture removes it (its backward would
    zero-fill a full-size gradient); a real slice stays, and the output is unchanged."""
    from fxgradnas.capture import capture

    class Slicing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.proj(x)[:, :, None, :][:, :, 0]
            return y[..., :4] + y[..., 2:]

    model = Slicing().eval()
    x = torch.randn(3, 5, 6)
    captured = capture(model, x)
    slices = [n for n in captured.module.graph.nodes if n.target is torch.ops.aten.slice.Tensor]
    assert len(slices) == 2 and all(n.args[2:] in ((0, 4), (2, 9223372036854775807)) for n in slices)
    torch.testing.assert_close(captured.module(x), model(x), rtol=0, atol=0)


class InPlace(torch.nn.Module):
    """In-place ops as torchvision writes them (ReLU(inplace=True), ``out += identity``, in-place
    Hardswish and Dropout, a Dropout after ``flatten``), and a tensor read again after it was written
    in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(6, 10), torch.nn.Linear(10, 6), torch.nn.Linear(6, 3)
        self.act = torch.nn.Hardswish(inplace=True)
        self.drop = torch.nn.Dropout(0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        before = h * 2
        h.relu_()  # the result is not used: ``h`` below must read the written value
        out = self.fc2(self.drop(self.act(h + before)))
        out += x
        return self.fc3(self.drop(torch.relu_(out).flatten(0, 1)))  # written through a view nothing else reads


def test_capture_replaces_in_place_ops_by_their_out_of_place_forms() -> None:
    """functionalize: every in-place op on a fresh tensor becomes its out-of-place form and the nodes
    after it read its result; the captured module computes what the model does."""
    from fxgradnas.capture import capture

    model = InPlace().eval()
    x = torch.randn(3, 5, 6)
    captured = capture(model, x)
    targets = [n.target for n in captured.module.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if isinstance(t, torch._ops.OpOverload) and torch.Tag.inplace in t.tags]
    assert {torch.ops.aten.relu.default, torch.ops.aten.hardswish.default, torch.ops.aten.dropout.default} <= set(targets)
    torch.testing.assert_close(captured.module(x), model(x), rtol=0, atol=0)
    x = torch.randn(4, 2, 6)  # other batch and sequence sizes
    torch.testing.assert_close(captured.module(x), model(x), rtol=0, atol=0)


def test_in_place_ops_keep_their_channels_prunable(random_plan) -> None:
    """After functionalisation the hidden channels are one exact group, the in-place residual add is a
    residual add, and a random plan prunes to the masked output."""
    analysis = fxgradnas.analyze(InPlace(), torch.randn(3, 5, 6))
    channels = [g for g in analysis.prunable if g.kind == "channels"]
    assert [g.size for g in channels] == [10]
    assert [g.size for g in analysis.by_kind("hidden")] == [6]
    assert [g.exact for g in channels] == [True]
    plan = random_plan(analysis)
    assert channels[0].name in plan.keep
    fxgradnas.apply_plan(analysis, plan)  # self-checked: pruned == masked


class WriteThroughView(torch.nn.Module):
    """``h`` is written through a view of it, or after a view of it was taken: the write is seen
    through another node, so it must stay in place."""

    def __init__(self, view_first: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(6, 10), torch.nn.Linear(10, 6)
        self.view_first = view_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.view_first:
            t = h.transpose(1, 2)
            h.relu_()
            return self.fc2(t.transpose(1, 2))
        h.view(*h.shape[:-1], 2, 5).relu_()
        return self.fc2(h)


@pytest.mark.parametrize("view_first", [False, True], ids=["write-into-view", "view-before-write"])
def test_writes_other_nodes_can_see_stay_and_freeze_what_they_touch(view_first: bool) -> None:
    model = WriteThroughView(view_first).eval()
    x = torch.randn(3, 5, 6)
    analysis = fxgradnas.analyze(model, x)
    assert torch.ops.aten.relu_.default in {n.target for n in analysis.captured.module.graph.nodes}
    torch.testing.assert_close(analysis.captured.module(x), model(x), rtol=0, atol=0)
    assert not [g for g in analysis.prunable if any(t.name == "fc1.weight" and t.axis == 0 for t in g.params)]
    reasons = {reason for _, reason in analysis.walk.records.frozen}
    assert any("aten.relu_" in r and "writes in place" in r for r in reasons)
