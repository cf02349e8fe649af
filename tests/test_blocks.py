"""Whole layers as pruning units (the ``blocks`` kind): one group per stack of residual blocks, scored by mask
gradients, removed exactly (pruned == masked, the cost model counts the real module), written back into a
Hugging Face model as a standard checkpoint that plain transformers loads, with a working KV cache."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxgradnas
from fxgradnas import CostModel, Plan, PlanError, SearchOptions, apply_plan
from fxgradnas.instrument import instrument
from fxgradnas.units import keep_grid, kept_per_unit_axis
from tests import families, zoo
from tests.breadth_checks import greedy_reference
from tests.flops import flops_of
from tests.zoo import analysis_of

VOCAB = 64  # the zoo decoders'
NEW_TOKENS = 5


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(seed))


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _removed(analysis: fxgradnas.Analysis, plan: Plan) -> list[str]:
    group = analysis.group("blocks")
    return [b.path for b, kept in zip(group.blocks, keep_grid(group, plan.kept("blocks")).tolist(), strict=True)
            if not kept]


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


ZOO_STACKS = {"llama": ({"n_layer": 4}, "model.layers", 2), "nanogpt": ({"n_layer": 3}, "transformer.h", 2),
              "resnet": ({"blocks": 3}, "layer1", 1)}  # model -> (options, the ModuleList, residual adds per layer)


@pytest.mark.parametrize("name", list(ZOO_STACKS))
def test_one_blocks_group_with_one_unit_per_layer(name: str) -> None:
    options, stack, adds = ZOO_STACKS[name]
    analysis = analysis_of(name, **options)
    (group,) = analysis.by_kind("blocks")
    layers = next(iter(options.values()))
    assert (group.name, group.prunable, group.exact, group.size) == ("blocks", True, True, layers)
    assert [b.path for b in group.blocks] == [f"{stack}.{i}" for i in range(layers)]
    assert all(len(b.adds) == adds for b in group.blocks)
    assert [site.unit for site in group.sites] == [i for i in range(layers) for _ in range(adds)]
    assert all(bool(b.stays) == (name == "resnet") for b in group.blocks)  # the ReLU after the add stays
    assert group.params_per_unit == sum(p.numel() for p in analysis.captured.model.get_submodule(f"{stack}.0").parameters())
    assert f"{stack}.0" in analysis.table()


@pytest.mark.parametrize("name", list(ZOO_STACKS))
def test_random_layers_with_every_other_kind_prune_exactly_and_cost_what_the_module_holds(
        name: str, random_plan: Callable) -> None:
    analysis = analysis_of(name, **ZOO_STACKS[name][0])
    model = CostModel(analysis)
    removed_any = False
    for seed in range(4):
        plan = random_plan(analysis, seed)
        assert "blocks" in plan.keep
        pruned = apply_plan(analysis, plan, check=all(analysis.group(n).exact for n in plan.keep))
        removed = _removed(analysis, plan)
        removed_any |= bool(removed)
        assert not [n for n, _ in pruned.named_parameters() if n.startswith(tuple(p + "." for p in removed))]
        for path in removed:
            with pytest.raises(AttributeError):
                pruned.get_submodule(path)
        kept = {n: kept_per_unit_axis(analysis.group(n), keep_grid(analysis.group(n), plan.kept(n))) for n in plan.keep}
        costs = model.evaluate(kept)
        assert costs["params"] == _params(pruned)
        if name != "nanogpt":  # torch's flop counter does not count the CPU SDPA kernel
            assert costs["flops"] == flops_of(pruned, analysis)
    assert removed_any


def test_block_scores_are_squared_mask_gradients() -> None:
    analysis = analysis_of("llama", n_layer=4)
    group = analysis.group("blocks")
    batches = [_tokens(seed) for seed in range(3)]
    scores = fxgradnas.calibrate(analysis, batches, _next_token_loss, groups=[group], progress=False)
    expected = torch.zeros(group.size)
    for ids in batches:
        inst = instrument(analysis, [group])
        mask = inst.masks["blocks"].requires_grad_()
        _next_token_loss(inst.module(ids), ids).backward()
        expected += mask.grad**2
    torch.testing.assert_close(scores["blocks"], expected)
    assert bool((expected > 0).all())


def test_prune_removes_the_best_scored_layers_last_and_meets_the_budget() -> None:
    model, ids = zoo.llama(n_layer=4)
    batches = [_tokens(seed) for seed in range(4)]
    result = fxgradnas.prune(model, ids, batches, _next_token_loss, constraint={"params": 0.75},
                             progress=False, search=SearchOptions(kinds=("blocks",)), compensation=None)
    kept = result.plan.keep["blocks"]
    assert len(kept) == 2  # one layer less is 78 % of the params
    assert kept == sorted(torch.argsort(result.scores["blocks"], descending=True)[:2].tolist())
    assert result.search.costs["params"] == _params(result.model) <= 0.75 * _params(model)
    assert result.self_check.example <= 1e-5


def test_blocks_combine_with_heads_and_channels_and_the_refit_skips_removed_layers() -> None:
    model, ids = zoo.llama(n_layer=4)
    batches = [_tokens(seed) for seed in range(4)]
    result = fxgradnas.prune(model, ids, batches, _next_token_loss, constraint={"params": 0.5},
                             progress=False, search=SearchOptions(kinds=("blocks", "heads", "channels")))
    assert len(result.plan.keep["blocks"]) < 4
    assert result.search.costs["params"] == _params(result.model) <= 0.5 * _params(model)
    removed = tuple(p + "." for p in _removed(result.analysis, result.plan))
    assert result.compensation and not [r for r in result.compensation if r.consumer.startswith(removed)]
    with torch.no_grad():
        assert torch.isfinite(result.model(ids)).all()


def test_post_norm_layers_are_frozen_with_the_reason() -> None:
    analysis = analysis_of("bert")
    (group,) = analysis.by_kind("blocks")
    assert not group.prunable and group.size == 2
    assert "post-norm" in group.reason and "layer_norm" in group.reason
    assert "frozen: encoder.layer.0" in analysis.table()
    with pytest.raises(PlanError, match="frozen"):
        apply_plan(analysis, Plan({group.name: [0]}))


@pytest.mark.skipif(not families.has_torchvision(), reason="needs torchvision")
def test_torchvision_resnet_blocks_are_those_whose_widths_match(random_plan: Callable) -> None:
    from torchvision.models.resnet import BasicBlock

    model, images = families.shallow(lambda models: models.ResNet(BasicBlock, [2, 2, 1, 1], num_classes=10))()
    analysis = fxgradnas.analyze(model, images)
    groups = {g.name: ([b.path for b in g.blocks], g.prunable) for g in analysis.by_kind("blocks")}
    assert groups["layer1.blocks"] == (["layer1.0", "layer1.1"], True)
    assert groups["layer2.blocks"] == (["layer2.1"], True)
    frozen = [g for g in analysis.by_kind("blocks") if not g.prunable]
    assert sorted(b.path for g in frozen for b in g.blocks) == ["layer2.0", "layer3.0", "layer4.0"]
    assert all("shortcut is not the identity" in g.reason for g in frozen)
    model_cost = CostModel(analysis)
    for seed in range(3):
        plan = random_plan(analysis, seed)
        pruned = apply_plan(analysis, plan)  # self-checked: pruned == masked
        kept = {n: kept_per_unit_axis(analysis.group(n), keep_grid(analysis.group(n), plan.kept(n))) for n in plan.keep}
        assert model_cost.evaluate(kept)["params"] == _params(pruned)


def test_the_command_line_prunes_layers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fxgradnas.cli import main

    assert main(["prune", "tests.zoo:llama", "--params", "0.8", "--kinds", "blocks", "--scorer", "random",
                 "--compensate", "none", "--out", str(tmp_path)]) == 0
    plan = Plan.from_json((tmp_path / "plan.json").read_text())
    assert list(plan.keep) == ["blocks"] and len(plan.keep["blocks"]) == 1
    assert "blocks" in capsys.readouterr().out


# --- Hugging Face ----------------------------------------------------------------------------------
HF_FAMILIES = {name: lambda seed, name=name: families.HF_FAMILIES[name](seed)
               for name in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")}
HF_FAMILIES["qwen2-sliding"] = lambda seed: families.llama_like(  # layer_types: full, full, sliding, sliding
    "Qwen2Config", "Qwen2ForCausalLM", seed, use_sliding_window=True, max_window_layers=2, sliding_window=4)


def _some_layers(analysis: fxgradnas.Analysis, random_plan: Callable) -> Plan:
    """A random plan of the blocks alone that removes a layer before a kept one (the kept are renumbered)."""
    for seed in range(32):
        keep = random_plan(analysis, seed).keep["blocks"]
        if keep != list(range(len(keep))):
            return Plan({"blocks": keep})
    raise AssertionError("no such plan")


@pytest.mark.hf
def test_hf_layers_removed_save_a_standard_checkpoint_that_plain_transformers_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, random_plan: Callable) -> None:
    monkeypatch.setattr(families, "LAYERS", 4)
    from fxgradnas.hf import save_pruned, write_back

    expected = {}
    for name, build in HF_FAMILIES.items():
        model, inputs = build(0)
        ids = inputs["input_ids"]
        analysis = fxgradnas.analyze(model, inputs)
        (group,) = analysis.by_kind("blocks")
        assert group.prunable and group.size == 4, name
        stack = group.blocks[0].path.rpartition(".")[0]
        plan = _some_layers(analysis, random_plan)
        keep = plan.keep["blocks"]
        pruned = apply_plan(analysis, plan)
        written = copy.deepcopy(model)
        types = getattr(written.config, "layer_types", None)
        structure = write_back(written, analysis, plan, weights=pruned)
        assert structure["standard"], name
        assert written.config.num_hidden_layers == len(keep) == len(written.get_submodule(stack)), name
        if types is not None:
            assert written.config.layer_types == [types[i] for i in keep], name
        indices = [m.layer_idx for m in written.modules() if isinstance(getattr(m, "layer_idx", None), int)
                   and "Attention" in type(m).__name__]
        assert indices == list(range(len(keep))), name
        assert _params(written) == _params(pruned), name
        save_pruned(written, structure, tmp_path / name)
        torch.save(ids, tmp_path / name / "ids.pt")
        with torch.no_grad():
            logits = pruned(**inputs).logits
            tokens = written.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                      use_cache=True, pad_token_id=0)
        assert torch.equal(tokens, greedy_reference(pruned, ids, NEW_TOKENS)), name  # the cache after renumbering
        expected[name] = (logits, tokens, len(keep))
    results = families.load_with_plain_transformers(tmp_path, list(expected), NEW_TOKENS)
    for name, (logits, tokens, layers) in expected.items():
        loaded = results[name]
        assert loaded["layers"] == layers, name
        difference = float((loaded["logits"] - logits).abs().max() / logits.abs().max())
        assert difference < 1e-5, (name, difference)
        assert torch.equal(loaded["tokens"], tokens), name


@pytest.mark.hf
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_layers_with_heads_and_channels_write_back_and_reload(name: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  random_plan: Callable) -> None:
    monkeypatch.setattr(families, "LAYERS", 4)
    from fxgradnas.hf import load_pruned, save_pruned, write_back

    model, inputs = families.HF_FAMILIES[name](0)
    analysis = fxgradnas.analyze(model, inputs)
    plan = next(p for seed in range(32) if len((p := random_plan(analysis, seed)).keep["blocks"]) in (2, 3)
                and len(p.keep) > 2)
    pruned = apply_plan(analysis, plan)
    structure = write_back(model, analysis, plan)  # checked against the masked model
    assert not structure["standard"]
    assert _params(model) == _params(pruned)
    save_pruned(model, structure, tmp_path)
    loaded = load_pruned(tmp_path)
    ids = inputs["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        tokens = loaded.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0)
    assert torch.equal(tokens, greedy_reference(pruned, ids, NEW_TOKENS))


@pytest.mark.hf
def test_hf_post_norm_bert_is_frozen() -> None:
    analysis = fxgradnas.analyze(*families.HF_FAMILIES["bert"](0))
    (group,) = analysis.by_kind("blocks")
    assert not group.prunable and "post-norm" in group.reason


@pytest.mark.hf
def test_prune_checkpoint_deletes_and_renames_the_removed_layers(tmp_path: Path) -> None:
    import transformers

    from fxgradnas.hf import load_pruned, prune_checkpoint, write_back

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    source = tmp_path / "source"
    transformers.LlamaForCausalLM(config).save_pretrained(source, max_shard_size="20KB")
    ids = _tokens(0)
    with torch.device("meta"):
        empty = transformers.LlamaForCausalLM(config)
    meta = fxgradnas.analyze(empty, {"input_ids": ids.to("meta")})
    plan = Plan({"blocks": [1, 2], "model.layers.2.mlp": list(range(0, 48, 2))})
    structure = prune_checkpoint(source, meta, plan, tmp_path / "pruned")
    reference = transformers.LlamaForCausalLM.from_pretrained(source).eval()
    assert write_back(reference, fxgradnas.analyze(reference, {"input_ids": ids}), plan) == \
        json.loads(json.dumps(structure))
    index = json.loads((tmp_path / "pruned" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(reference.state_dict())
    loaded = load_pruned(tmp_path / "pruned")
    assert loaded.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.hf
def test_layers_whose_kind_the_config_derives_from_their_index_are_not_deleted() -> None:
    """Qwen3-MoE with ``decoder_sparse_step=2`` makes every second layer sparse: renumbered, a kept dense layer
    would be rebuilt as a sparse one, so write_back refuses (the pruned graph module still removes it)."""
    from fxgradnas.hf import write_back

    model, inputs = families.llama_like("Qwen3MoeConfig", "Qwen3MoeForCausalLM", 0, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=2)
    analysis = fxgradnas.analyze(model, inputs)
    blocks, = [g for g in analysis.prunable if g.kind == "blocks"]
    plan = fxgradnas.Plan({blocks.name: [1]})
    fxgradnas.apply_plan(analysis, plan)  # self-checked
    with pytest.raises(fxgradnas.errors.RewriteError, match="decoder_sparse_step=2"):
        write_back(model, analysis, plan)
    assert len(model.model.layers) == families.LAYERS  # refused before anything changed


@pytest.mark.parametrize("uniform", [False, True])
def test_the_search_trades_layers_for_width_by_the_least_total_degradation(uniform: bool) -> None:
    analysis = analysis_of("llama", n_layer=4)
    widths = ("heads", "channels")

    def lost(result: fxgradnas.SearchResult) -> float:
        return sum(c.degradation for c in result.choices.values())

    traded = 0
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        scale = 5 if uniform else 1  # a layer's scores against one unit's (a uniform slot sums four)
        scores = {g.name: torch.rand(g.size, generator=generator) * (scale if g.kind == "blocks" else 1)
                  for g in analysis.prunable}
        for budget in (0.5, 0.7):
            both = fxgradnas.search(analysis, scores, {"params": budget},
                                    SearchOptions(kinds=("blocks", *widths), uniform=uniform))
            assert both.costs["params"] <= both.budget[1]
            for alone in (widths, ("blocks",)):  # each is one of the candidates the trade compares
                try:
                    other = fxgradnas.search(analysis, scores, {"params": budget},
                                             SearchOptions(kinds=alone, uniform=uniform))
                except fxgradnas.ConstraintError:
                    continue
                assert lost(both) <= lost(other) + 1e-12
            kept_layers = sum(both.choices["blocks"].kept)
            traded += 0 < kept_layers < 4
            group = analysis.group("blocks")
            removed = [b.path + "." for b, k in zip(group.blocks, both.choices["blocks"].kept, strict=True) if not k]
            inside = [g for g in both.choices if analysis.group(g).kind != "blocks" and all(
                n.startswith(tuple(removed)) for t in analysis.group(g).params for n in t.names)]
            for g in inside:  # a removed layer's heads and channels stay whole and remove nothing themselves
                if not uniform:
                    assert g not in both.plan.keep and both.params_removed[g] == 0, g
    assert traded
