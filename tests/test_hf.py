"""Hugging Face integration: in-place writeback equals the masked graph, generate() still works,
save/load restores the pruned model; text helpers."""

from __future__ import annotations

import pytest
import torch

import fxgradnas
from fxgradnas import Plan, SearchOptions

transformers = pytest.importorskip("transformers")

from fxgradnas.datasets import (  # noqa: E402
    batched,
    causal_lm_loss,
    interleaved,
    perplexity,
    sampled_windows,
    token_windows,
    with_samples,
)
from fxgradnas.hf import load_pruned, save_pruned, write_back  # noqa: E402
from tests.zoo import HF_ZOO, analysis_of  # noqa: E402

pytestmark = pytest.mark.hf


def _plan(analysis: fxgradnas.Analysis, hidden: bool) -> Plan:
    keep = {}
    for g in analysis.prunable:
        if g.kind == "heads":
            keep[g.name] = [2, 3] if len(g.unit_shape) == 2 else [0, 2, 3]
        elif g.kind == "channels":
            keep[g.name] = list(range(1, g.size, 3))
        elif hidden and g.exact:
            keep[g.name] = list(range(0, g.size, 2))
    return Plan(keep)


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["hf_llama", "hf_qwen2", "hf_gpt2", "hf_bert"])
def test_write_back_equals_masked_graph_with_padding(name: str, attn: str) -> None:
    model, inputs = HF_ZOO[name](attn_implementation=attn)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, :2] = 0
    inputs = {**inputs, "attention_mask": mask}
    analysis = fxgradnas.analyze(model, inputs)
    plan = _plan(analysis, hidden=True)
    with torch.no_grad():
        reference = _logits(fxgradnas.masked(analysis, plan)(**inputs))
        write_back(model, analysis, plan)
        out = _logits(model(**inputs))
    assert out.shape == reference.shape
    assert float((out - reference).abs().max() / reference.abs().max()) < 1e-5
    assert model.config.fxgradnas["plan"] == plan.keep


@pytest.mark.parametrize("name", ["hf_llama", "hf_gpt2"])
def test_generate_and_save_load_round_trip(name: str, tmp_path) -> None:
    model, inputs = HF_ZOO[name]()
    analysis = fxgradnas.analyze(model, inputs)
    plan = _plan(analysis, hidden=name == "hf_llama")
    structure = write_back(model, analysis, plan)
    ids = inputs["input_ids"][:1]
    generated = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    save_pruned(model, structure, tmp_path)
    restored = load_pruned(tmp_path, model_class=type(model))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert sum(p.numel() for p in restored.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["hf_llama", "hf_gpt2"])
def test_write_back_carries_compensated_weights(name: str) -> None:
    """``write_back(..., weights=result.model)`` makes the Hugging Face model equal the compensated
    graph module (GPT-2: Conv1D weights stored (in, out))."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (3, 7), generator=gen) for _ in range(4)]
    result = fxgradnas.prune(analysis_of(name), None, batches, causal_lm_loss, constraint={"params": 0.8},
                             progress=False, collect_fn=lambda b: {"input_ids": b, "use_cache": False},
                             search=SearchOptions(multiple_of=4))
    applied = [r for r in result.compensation if r.applied]
    assert applied
    model, inputs = HF_ZOO[name]()  # the same weights as the analysed model (same seed)
    with torch.no_grad():
        write_back(model, result.analysis, result.plan, weights=result.model)
        reference = _logits(result.model(**inputs))
        torch.testing.assert_close(_logits(model(**inputs)), reference)
        other, _ = HF_ZOO[name]()
        write_back(other, result.analysis, result.plan)  # plain slices: differs where the fit applied
        assert not torch.allclose(_logits(other(**inputs)), reference)


class CharTokenizer:
    """The part of a Hugging Face tokenizer the text helpers use."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 64 for c in text]}


def test_windows_loss_and_perplexity() -> None:
    windows = token_windows(CharTokenizer(), "abcdefghij" * 10, seq_len=8, count=5)
    assert windows.shape == (5, 8)
    batches = batched(windows, 2)
    assert [len(b) for b in batches] == [2, 2, 1]
    model, _ = HF_ZOO["hf_llama"]()
    loss = causal_lm_loss(model(batches[0]), batches[0])
    with torch.no_grad():
        ppl = perplexity(model, batches)
    assert loss.dim() == 0 and 1 < ppl < 1e4
    with pytest.raises(fxgradnas.DataError, match="fewer than one window of seq_len=8: give a longer text"):
        token_windows(CharTokenizer(), "abc", seq_len=8)


def test_windows_of_several_texts_are_taken_in_turn() -> None:
    a, b = torch.arange(6).reshape(3, 2), torch.arange(100, 104).reshape(2, 2)
    assert interleaved([a, b]).tolist() == [[0, 1], [100, 101], [2, 3], [102, 103], [4, 5]]
    assert torch.equal(interleaved([a]), a)
    with pytest.raises(fxgradnas.DataError, match="interleaved got no tensor of windows"):
        interleaved([])


def test_sampled_windows_are_seeded_and_touch_neither_the_model_nor_the_global_rng() -> None:
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
                                      attention_dropout=0.5)  # so that sampling in train mode would differ
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[2] += 5.0  # end of text far likelier than any other token: suppressed all the same
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    first = sampled_windows(model, 5, 9, batch_size=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert first.shape == (5, 9) and first.dtype == torch.long and first.device.type == "cpu"
    assert not (first == 2).any() and len({tuple(w.tolist()) for w in first}) == 5
    assert torch.equal(sampled_windows(model, 5, 9, batch_size=2, progress=False), first)
    assert not torch.equal(sampled_windows(model, 5, 9, batch_size=2, seed=1, progress=False), first)
    own = model.generation_config
    own.update(repetition_penalty=5.0, suppress_tokens=list(range(3, 12)), forced_eos_token_id=2, top_k=2)
    model.train()
    assert torch.equal(sampled_windows(model, 5, 9, batch_size=2, progress=False), first)  # none of those apply
    assert model.generation_config is own and own.top_k == 2 and model.training
    model.eval()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items()) and not model.training
    with pytest.raises(TypeError, match="generate"):
        sampled_windows(torch.nn.Linear(2, 2), 1, 4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampled_windows(model, 1, 4, temperature=0)
    with pytest.raises(ValueError, match="count must be a positive int"):
        sampled_windows(model, 0, 4)
    config.bos_token_id = model.generation_config.bos_token_id = None
    with pytest.raises(ValueError, match="pass start_token="):
        sampled_windows(model, 1, 4)
    assert sampled_windows(model, 1, 4, start_token=3, progress=False).shape == (1, 4)


def test_with_samples_takes_the_windows_in_turn_with_as_many_samples() -> None:
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    windows = torch.randint(3, 16, (3, 6), dtype=torch.int32)
    mixed = with_samples(model, windows, seed=4, batch_size=2, progress=False)
    sampled = sampled_windows(model, 3, 6, seed=4, batch_size=2, progress=False)
    assert mixed.dtype == windows.dtype and torch.equal(mixed[0::2], windows)
    assert torch.equal(mixed[1::2], sampled.to(torch.int32))
    assert not torch.equal(with_samples(model, windows, seed=5, progress=False), mixed)
    for bad, error in ((windows[0], TypeError), (windows.float(), TypeError), ([[1, 2]], TypeError),
                       (windows[:0], ValueError)):
        with pytest.raises(error, match="with_samples: windows"):
            with_samples(model, bad, progress=False)


@pytest.mark.parametrize("family", ["Gemma2", "Olmo2"])
def test_hidden_width_write_back_with_graph_weights_is_exact(family: str) -> None:
    """Pruning the residual width: the graph rewrite scales each RMSNorm's mean of squares, the write-back
    scales the Hugging Face norm's multiplier (``1 + w`` in Gemma) and eps, also when the weights come
    from the pruned module; post-sublayer norms (Gemma2, OLMo2) are exact too. ``write_back`` checks
    itself against ``weights`` and raises otherwise."""
    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.5, 0.2)  # away from the initial ones, so a wrong rescale shows
    inputs = {"input_ids": torch.randint(0, 64, (3, 7))}
    analysis = fxgradnas.analyze(model, inputs)
    hidden = analysis.group("hidden")
    assert hidden.prunable and hidden.exact
    plan = Plan({"hidden": list(range(0, 32, 3))})
    pruned = fxgradnas.apply_plan(analysis, plan)  # raises unless pruned == masked
    write_back(model, analysis, plan, weights=pruned)  # raises unless the HF model == pruned
    with torch.no_grad():
        torch.testing.assert_close(_logits(model(**inputs)), _logits(pruned(**inputs)))


@pytest.mark.parametrize("share", [False, True])
def test_write_back_copies_the_pruned_modules_weights_unless_sharing_is_asked(share: bool) -> None:
    """``weights=`` copies the pruned module's parameters into the model; ``share_weights=True`` hands the model
    those very parameters (no memory: both are then the same weights); tied embeddings stay tied."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 64, (3, 7))}
    analysis = fxgradnas.analyze(model, inputs)
    plan = _plan(analysis, hidden=False)
    pruned = fxgradnas.apply_plan(analysis, plan)
    write_back(model, analysis, plan, weights=pruned, share_weights=share)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    held = {t.untyped_storage().data_ptr() for t in pruned.parameters()}
    in_model = [p.untyped_storage().data_ptr() in held for p in model.parameters()]
    assert all(in_model) if share else not any(in_model)
    with torch.no_grad():
        torch.testing.assert_close(_logits(model(**inputs)), _logits(pruned(**inputs)), rtol=0, atol=0)
        pruned.get_parameter("model.layers.0.mlp.up_proj.weight").mul_(2)
        changed = not torch.equal(_logits(model(**inputs)), _logits(pruned(**inputs)))
    assert changed != share


def test_codegen_with_two_heads_per_shard_writes_back_and_reloads(tmp_path) -> None:
    """CodeGen views its fused projection as 4 shards of (q, v, k): with 8 heads a heads unit is (shard,
    head in shard); keeping the same heads in 3 of the 4 shards sets ``mp_num`` to 3."""
    config = transformers.CodeGenConfig(vocab_size=96, n_positions=32, n_embd=128, n_layer=1, n_head=8,
                                        rotary_dim=8, n_inner=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.CodeGenForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))}
    analysis = fxgradnas.analyze(model, inputs)
    heads = analysis.group("transformer.h.0.attn")
    assert heads.prunable and heads.unit_shape == (4, 2)
    plan = Plan({heads.name: [0, 1, 4, 5, 6, 7]})  # shards 0, 2 and 3, both heads of each
    reference = fxgradnas.masked(analysis, plan)
    structure = write_back(model, analysis, plan)
    assert model.transformer.h[0].attn.mp_num == 3
    save_pruned(model, structure, tmp_path)
    loaded = load_pruned(tmp_path)
    with torch.no_grad():
        expected = _logits(reference(**inputs))
        torch.testing.assert_close(model(**inputs, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(**inputs, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)
