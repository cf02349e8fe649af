"""A plan searched with ``uniform=True`` gives a Hugging Face model one size per config entry: written back
and saved, it is a standard checkpoint that plain ``from_pretrained`` loads in a process that never imports
fxgradnas, with the pruned module's logits and the same cached greedy generation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import fxgradnas
from fxgradnas import Plan, SearchOptions
from fxgradnas.scores import random_scores
from tests import families

transformers = pytest.importorskip("transformers")

from fxgradnas.hf import STRUCTURE_FILE, load_pruned, save_pruned, write_back  # noqa: E402

pytestmark = pytest.mark.hf

# family -> the kinds a uniform plan of it prunes into a standard config (GPT-2's attention width is its
# hidden width, so its heads cannot be spelled by a config)
FAMILIES = {"llama": ("heads", "channels", "hidden"), "qwen2": ("heads", "channels", "hidden"),
            "qwen3": ("heads", "channels"), "mistral": ("heads", "channels", "hidden"),
            "gemma": ("heads", "channels"), "gpt2": ("channels",), "qwen2_moe": ("heads", "channels", "experts"),
            "qwen3_moe": ("heads", "channels", "experts")}
NEW_TOKENS = 6

def _uniform_prune(name: str, seed: int = 0) -> tuple[torch.nn.Module, fxgradnas.SearchResult, dict, Plan,
                                                       torch.fx.GraphModule, torch.Tensor]:
    """A tiny random-init model of ``name`` searched with uniform counts on random scores to 70 % params,
    written back into a copy: (the copy, the search, the structure, the plan, the pruned module, token ids)."""
    model, inputs = families.HF_FAMILIES[name](seed)
    analysis = fxgradnas.analyze(model, inputs)
    found = fxgradnas.search(analysis, random_scores(analysis, seed=seed), {"params": 0.7},
                             SearchOptions(kinds=FAMILIES[name], uniform=True, multiple_of=8))
    pruned = fxgradnas.apply_plan(analysis, found.plan)
    written = copy.deepcopy(model)
    structure = write_back(written, analysis, found.plan, weights=pruned)
    return written, found, structure, found.plan, pruned, inputs["input_ids"]


def test_a_uniform_plan_keeps_one_count_per_kind_and_each_layer_its_own_best_units() -> None:
    model, inputs = families.HF_FAMILIES["llama"](0)
    analysis = fxgradnas.analyze(model, inputs)
    mlps = [g for g in analysis.prunable if g.kind == "channels"]
    scores = random_scores(analysis, seed=3)
    scores = scores.replaced({**scores, mlps[1].name: scores[mlps[1].name] * 1e-3})  # the second MLP matters less
    found = fxgradnas.search(analysis, scores, {"params": 0.85}, SearchOptions(uniform=True, multiple_of=8))
    for kind in ("heads", "channels"):
        assert len({c.kept for g, c in found.choices.items() if analysis.group(g).kind == kind}) == 1, found.choices
    assert found.costs["params"] <= found.budget[1]
    found = fxgradnas.search(analysis, scores, {"params": 0.85},
                             SearchOptions(kinds=("channels",), uniform=True, multiple_of=8))
    count, = {c.kept[0] for c in found.choices.values()}
    assert count < mlps[0].size
    for g in mlps:  # the layer's top-scored channels
        best = torch.argsort(scores[g.name], descending=True, stable=True)[:count].sort().values.tolist()
        assert list(found.plan.kept(g.name)) == best
    free = fxgradnas.search(analysis, scores, {"params": 0.85},
                            SearchOptions(kinds=("channels",), multiple_of=8))
    assert len({c.kept for c in free.choices.values()}) > 1, \
        "the scores should make per-layer widths differ, or the uniform test shows nothing"


def test_uniform_must_be_a_bool() -> None:
    model, inputs = families.HF_FAMILIES["llama"](0)
    analysis = fxgradnas.analyze(model, inputs)
    with pytest.raises(fxgradnas.errors.ArgumentTypeError, match="uniform must be True or False"):
        fxgradnas.search(analysis, random_scores(analysis), {"params": 0.6}, SearchOptions(uniform="yes"))


def test_uniform_checkpoints_load_with_plain_transformers_in_a_process_without_fxgradnas(tmp_path: Path) -> None:
    expected = {}
    for name in FAMILIES:
        written, found, structure, plan, pruned, ids = _uniform_prune(name)
        assert structure["standard"], f"{name}: {found.choices}"
        assert plan.keep, name
        save_pruned(written, structure, tmp_path / name)
        torch.save(ids, tmp_path / name / "ids.pt")
        with torch.no_grad():
            tokens = written.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                      use_cache=True, pad_token_id=0)
            expected[name] = (pruned(input_ids=ids).logits, tokens)
        config = json.loads((tmp_path / name / "config.json").read_text())
        suffix, entry = (".experts", "moe_intermediate_size") if name.endswith("moe") else \
            ("mlp", "n_inner" if name == "gpt2" else "intermediate_size")
        widths = {c.kept[0] for g, c in found.choices.items() if g.endswith(suffix)}
        assert [config[entry]] == list(widths), name
    results = families.load_with_plain_transformers(tmp_path, list(FAMILIES), NEW_TOKENS)
    for name, (logits, tokens) in expected.items():
        loaded = results[name]
        difference = float((loaded["logits"] - logits).abs().max() / logits.abs().max())
        assert difference < 1e-5, (name, difference)
        assert torch.equal(loaded["tokens"], tokens), name
        assert torch.equal(load_pruned(tmp_path / name)(input_ids=tokens).logits,
                           transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name)(input_ids=tokens).logits)


def test_per_layer_widths_are_not_standard_and_load_with_load_pruned(tmp_path: Path) -> None:
    model, inputs = families.HF_FAMILIES["llama"](0)
    analysis = fxgradnas.analyze(model, inputs)
    mlps = [g.name for g in analysis.prunable if g.kind == "channels"]
    plan = Plan({mlps[0]: list(range(0, 96, 2)), mlps[1]: list(range(0, 96, 3))})
    structure = write_back(model, analysis, plan)
    assert structure["standard"] is False
    assert model.config.intermediate_size == families.MLP  # the config is not changed
    save_pruned(model, structure, tmp_path)
    assert not json.loads((tmp_path / STRUCTURE_FILE).read_text())["standard"]
    with torch.no_grad():
        assert torch.equal(load_pruned(tmp_path)(**inputs).logits, model(**inputs).logits)


def test_a_hidden_width_the_family_reads_from_its_config_at_run_time_is_not_standard() -> None:
    """Gemma multiplies its embeddings by sqrt(hidden_size) of the config: a model built from a config with
    the pruned width would differ, which the run on the example inputs shows."""
    model, inputs = families.HF_FAMILIES["gemma"](0)
    analysis = fxgradnas.analyze(model, inputs)
    hidden = analysis.by_kind("hidden")[0]
    structure = write_back(model, analysis, Plan({hidden.name: list(range(0, hidden.size, 2))}))
    assert structure["standard"] is False
    assert model.config.hidden_size == families.HIDDEN


def test_a_config_that_derives_the_head_width_is_not_standard_for_pruned_heads() -> None:
    """Falcon's ``head_dim`` is a property of ``hidden_size / num_attention_heads``: fewer heads cannot be
    spelled, so the checkpoint keeps its per-layer structure (and nothing raises)."""
    model, inputs = families.HF_FAMILIES["falcon_new"](0)
    analysis = fxgradnas.analyze(model, inputs)
    heads = analysis.by_kind("heads")
    structure = write_back(model, analysis, Plan({g.name: [0, 1] for g in heads}))
    assert structure["standard"] is False


def test_a_weightless_layer_norm_over_a_pruned_hidden_width_is_resized(tmp_path: Path) -> None:
    """OLMo's LayerNorm has no weight to slice: its ``normalized_shape`` follows the width (it used to keep
    the old one, and the written-back model failed)."""
    model, inputs = families.HF_FAMILIES["olmo"](0)
    analysis = fxgradnas.analyze(model, inputs)
    hidden = analysis.by_kind("hidden")[0]
    plan = Plan({hidden.name: list(range(0, hidden.size, 2))})
    with pytest.warns(UserWarning, match="approximate"):
        pruned = fxgradnas.apply_plan(analysis, plan)
    structure = write_back(model, analysis, plan, weights=pruned)
    assert model.model.norm.normalized_shape == (hidden.size // 2,)
    with torch.no_grad():
        assert torch.allclose(model(**inputs, use_cache=False).logits, pruned(**inputs).logits, atol=1e-5)
    assert structure["standard"]
    save_pruned(model, structure, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs, use_cache=False).logits, model(**inputs, use_cache=False).logits)
