"""Models without weights: analysis, cost and search of a model on the meta device, clear errors for the
steps that need weights, and a plan applied to a sharded safetensors checkpoint tensor by tensor."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import fxgradnas
from fxgradnas import CalibrationOptions, Plan, SearchOptions
from fxgradnas.cost import CostModel
from fxgradnas.errors import ArgumentError
from fxgradnas.modules import check_weights
from fxgradnas.scores import l1_scores, random_scores
from tests.ranks import run_gloo_ranks

transformers = pytest.importorskip("transformers")

from fxgradnas.hf import load_pruned, prune_checkpoint, write_back  # noqa: E402

pytestmark = pytest.mark.hf
IDS = torch.tensor([[3, 7, 1, 9, 4, 2], [5, 8, 2, 6, 1, 3]])


def _config(tied: bool = False) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=96, tie_word_embeddings=tied)


def _model(config, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config).eval()


def _meta_analysis(config) -> fxgradnas.Analysis:
    """The analysis of the model of ``config`` on the meta device, made once per configuration (shared:
    the tests only read it)."""
    return _meta_analysis_of(config.to_json_string())


@functools.cache
def _meta_analysis_of(config_json: str) -> fxgradnas.Analysis:
    config = transformers.LlamaConfig(**json.loads(config_json))
    return fxgradnas.analyze(_model(config, "meta"), {"input_ids": IDS.to("meta")})


def _plan(analysis: fxgradnas.Analysis) -> Plan:
    keep = {}
    for g in analysis.prunable:
        if g.kind == "heads":
            keep[g.name] = [2, 3]  # the second KV head with both its queries
        elif g.kind == "channels":
            keep[g.name] = list(range(1, g.size, 3))
        elif g.exact:  # the residual width: every RMSNorm is rescaled
            keep[g.name] = list(range(0, g.size, 2))
    return Plan(keep)


def test_meta_analysis_cost_and_search_equal_the_real_model() -> None:
    config = _config()
    real = fxgradnas.analyze(_model(config), {"input_ids": IDS})
    meta = _meta_analysis(config)
    assert [(g.name, g.kind, g.size, g.prunable) for g in meta.groups] == \
        [(g.name, g.kind, g.size, g.prunable) for g in real.groups]
    assert meta.captured.fingerprint == real.captured.fingerprint
    assert "model.layers.1.mlp" in meta.table()
    assert CostModel(meta).base == CostModel(real).base
    found_meta = fxgradnas.search(meta, random_scores(meta), {"params": 0.6})
    found_real = fxgradnas.search(real, random_scores(real), {"params": 0.6})
    assert found_meta.plan.keep == found_real.plan.keep
    assert found_meta.achieved == found_real.achieved and found_meta.achieved["params"] <= 0.6
    randomly = fxgradnas.score(meta, options=CalibrationOptions(scorer="random"))
    assert fxgradnas.search(meta, randomly, {"params": 0.6}).plan.keep == found_meta.plan.keep
    # scores computed elsewhere: the later units of every group score higher, so the search keeps those
    by_hand = fxgradnas.Scores({g.name: torch.arange(g.size, dtype=torch.float) for g in meta.prunable},
                               scorer="external")
    kept = fxgradnas.search(meta, by_hand, {"params": 0.6}).plan.keep["model.layers.0.mlp"]
    assert kept == list(range(128 - len(kept), 128))


def test_steps_that_need_weights_name_the_meta_device() -> None:
    meta = _meta_analysis(_config())
    model = meta.captured.model
    plan = _plan(meta)
    batches = [{"input_ids": IDS.to("meta")}]
    calls = {
        "calibrate": lambda: fxgradnas.calibrate(meta, batches, lambda out, batch: out.logits.sum()),
        "l1": lambda: l1_scores(meta),
        "apply_plan": lambda: fxgradnas.apply_plan(meta, plan),
        "prune": lambda: fxgradnas.prune(model, batches[0], None, None, constraint={"params": 0.6},
                                         calibration=CalibrationOptions(scorer="random")),
        "write_back": lambda: write_back(model, meta, plan),
    }
    for name, call in calls.items():
        with pytest.raises(ArgumentError, match="meta device") as error:
            call()
        assert "load them first" in str(error.value), name
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 128)  # write_back changed nothing
    structure = write_back(model, meta, plan, check=False)  # the structure alone needs no weights
    assert model.model.layers[0].mlp.down_proj.weight.shape == (32, 43)
    assert structure["shapes"]["model.layers.0.mlp.down_proj.weight"] == [32, 43]


@pytest.mark.parametrize("tied", [False, True])
def test_prune_checkpoint_streams_shards_and_loads_as_write_back(tied: bool, tmp_path) -> None:
    config = _config(tied)
    source, target = tmp_path / "source", tmp_path / "pruned"
    _model(config).save_pretrained(source, max_shard_size="40KB")
    (source / "tokenizer_config.json").write_text("{}")
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert len(shards) > 3
    meta = _meta_analysis(config)
    plan = _plan(meta)
    structure = prune_checkpoint(source, meta, plan, target)

    reference = transformers.LlamaForCausalLM.from_pretrained(source).eval()
    expected = write_back(reference, fxgradnas.analyze(reference, {"input_ids": IDS}), plan)
    # the plan is uniform but prunes the hidden width: write_back's run shows a model built from the config is
    # the pruned one, which prune_checkpoint (no weights loaded) cannot, so it keeps the per-layer structure
    assert expected.pop("standard") and not structure.pop("standard")
    assert structure == json.loads(json.dumps(expected, default=list))
    assert sorted(p.name for p in target.glob("*.safetensors")) == shards
    index = json.loads((target / "model.safetensors.index.json").read_text())
    weights = sum(t.numel() * t.element_size() for n, t in reference.state_dict().items()
                  if not (tied and n == "lm_head.weight"))
    assert index["metadata"]["total_size"] == weights
    assert (target / "tokenizer_config.json").is_file()
    loaded = load_pruned(target)
    assert loaded.config.fxgradnas == reference.config.fxgradnas
    state = loaded.state_dict()
    for name, value in reference.state_dict().items():
        assert torch.equal(state[name], value), name
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, reference(IDS).logits, rtol=0, atol=0)


def test_prune_checkpoint_refuses_another_model(tmp_path) -> None:
    source = tmp_path / "source"
    _model(_config()).save_pretrained(source)
    other = transformers.LlamaConfig(**{**_config().to_dict(), "intermediate_size": 96})
    meta = _meta_analysis(other)
    with pytest.raises(ArgumentError, match="shape"):
        prune_checkpoint(source, meta, _plan(meta), tmp_path / "out")
    meta = _meta_analysis(_config())
    with pytest.raises(ArgumentError, match="another directory"):
        prune_checkpoint(source, meta, _plan(meta), source)
    assert not (tmp_path / "out").exists()


def test_prune_checkpoint_gpt2_conv1d(tmp_path) -> None:
    """GPT-2: Conv1D weights stored (in, out), fused q/k/v, tied embeddings, LayerNorm over the width."""
    from tests.zoo import HF_ZOO

    model, inputs = HF_ZOO["hf_gpt2"]()
    model.save_pretrained(tmp_path / "source", max_shard_size="30KB")
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    meta = fxgradnas.analyze(skeleton, {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
    plan = _plan(meta)
    prune_checkpoint(tmp_path / "source", meta, plan, tmp_path / "pruned")
    write_back(model, fxgradnas.analyze(model, inputs), plan)
    loaded = load_pruned(tmp_path / "pruned")
    state = loaded.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), name


# --------------------------------------------------------------------------- weights sharded over ranks


def _sharded_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 96, (2, 6), generator=generator)} for _ in range(4)]


def _lm_loss(output, batch) -> torch.Tensor:
    logits = output.logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


def _sharded_worker(rank: int, world: int, checkpoint: str) -> dict:
    from fxgradnas.shard import shard_blocks

    model = _model(_config())
    batches = _sharded_batches()
    analysis = fxgradnas.analyze(model, batches[0])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    scores = fxgradnas.calibrate(analysis, batches[rank::world], _lm_loss, CalibrationOptions(shard=True),
                                 progress=False)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    recomputed = fxgradnas.calibrate(analysis, batches[rank::world], _lm_loss,
                                     CalibrationOptions(shard=True, recompute=True), progress=False)
    sharded = shard_blocks(analysis.captured.module)
    local = {n: tuple(p.to_local().shape) for n, p in sharded.named_parameters()}
    # no weights in memory: every rank reads its shard of each parameter from the checkpoint
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        empty = transformers.LlamaForCausalLM(_config(tied=True)).eval()
    empty.tie_weights()  # init_empty_weights unties them
    loaded = fxgradnas.calibrate(empty, batches[rank::world], _lm_loss, CalibrationOptions(shard=True),
                                 example_inputs=batches[0], checkpoint=checkpoint, progress=False)
    return {"scores": dict(scores), "batches": scores.batches, "local": local, "loaded": dict(loaded),
            "recomputed": dict(recomputed)}


def test_two_gloo_ranks_with_sharded_blocks_equal_one_process(tmp_path) -> None:
    """Two gloo ranks scoring half the batches each with sharded blocks give the scores of one process, also
    with the blocks recomputed in backward and with the weights read from a checkpoint."""
    _model(_config(tied=True)).save_pretrained(tmp_path / "tied", max_shard_size="40KB")
    results = run_gloo_ranks(_sharded_worker, tmp_path, str(tmp_path / "tied"), timeout=180)
    single = fxgradnas.calibrate(_model(_config()), _sharded_batches(), _lm_loss, progress=False)
    tied = fxgradnas.calibrate(_model(_config(tied=True)), _sharded_batches(), _lm_loss, progress=False)
    for rank in range(2):
        result = results[rank]
        for name, value in tied.items():
            torch.testing.assert_close(result["loaded"][name], value, rtol=1e-4, atol=1e-12)
        assert result["batches"] == 4
        assert result["scores"].keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(result["scores"][name], value, rtol=1e-4, atol=1e-12)
            torch.testing.assert_close(result["recomputed"][name], result["scores"][name], rtol=0, atol=0)
        # one submodule per decoder layer, each holding half of its parameters' rows on this rank
        assert result["local"]["submod_1.model_layers_0_mlp_down_proj_weight"] == (32, 128)
        assert result["local"]["submod_2.model_layers_1_self_attn_q_proj_weight"] == (32, 64)


def test_shard_needs_an_initialised_process_group(tmp_path) -> None:
    meta = _meta_analysis(_config())
    with pytest.raises(ArgumentError, match="init_process_group"):
        fxgradnas.calibrate(meta, [{"input_ids": IDS}], _lm_loss, CalibrationOptions(shard=True))
    with pytest.raises(ArgumentError, match="shard=True"):
        fxgradnas.calibrate(meta, [{"input_ids": IDS}], _lm_loss, checkpoint=tmp_path)
    with pytest.raises(ArgumentError, match="buffers on the meta device"):  # rotary frequencies
        check_weights(meta.captured.model, "calibration from a checkpoint", parameters=False)


def test_split_blocks_computes_the_same_with_each_layer_owning_its_parameters() -> None:
    from fxgradnas.shard import split_blocks

    model = _model(_config(tied=True))
    analysis = fxgradnas.analyze(model, {"input_ids": IDS})
    split = split_blocks(analysis.captured.module)
    with torch.no_grad():
        torch.testing.assert_close(split(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)
    owned = [[n for n, _ in sub.named_parameters(recurse=False)] for sub in split.children()]
    for layer in range(2):  # 4 attention and 3 MLP projections, 2 norms
        assert sum(all(f"model_layers_{layer}_" in n for n in names) and len(names) == 9 for names in owned) == 1
    on_root = dict(split.named_parameters(remove_duplicate=False))  # tied to lm_head: on the root
    assert on_root["model.embed_tokens.weight"] is on_root["lm_head.weight"]
    assert len(list(analysis.captured.module.parameters())) == len(list(split.parameters()))


def _lm_loss_of_batch(output, batch: torch.Tensor) -> torch.Tensor:
    from fxgradnas.datasets import causal_lm_loss

    return causal_lm_loss(output, batch)


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_recompute_gives_the_scores_without_it(mode: str) -> None:
    """Recomputing the activations of each decoder layer in backward changes what backward keeps, not the mask gradients."""
    model = _model(_config(tied=True))
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 96, (3, 9), generator=generator) for _ in range(3)]
    analysis = fxgradnas.analyze(model, batches[0])
    plain = fxgradnas.calibrate(analysis, batches, _lm_loss_of_batch, CalibrationOptions(granularity=mode),
                                progress=False)
    recomputed = fxgradnas.calibrate(analysis, batches, _lm_loss_of_batch,
                                     CalibrationOptions(granularity=mode, recompute=True), progress=False)
    assert plain.keys() == recomputed.keys() and len(plain) == 6  # hidden, 2 x (heads, channels), blocks
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name
    result = fxgradnas.prune(analysis, None, batches, _lm_loss_of_batch, constraint={"params": 0.8},
                             progress=False, search=SearchOptions(multiple_of=4),
                             calibration=CalibrationOptions(recompute=True))
    assert torch.equal(result.scores["model.layers.1.mlp"], plain["model.layers.1.mlp"]) or mode == "sample"


def test_recompute_keeps_the_layer_inputs_only() -> None:
    """With every decoder layer recomputed, a forward saves for backward the activations outside the layers
    and the layers' inputs only."""
    from fxgradnas.instrument import GradientRecorder, instrument
    from fxgradnas.shard import BLOCKS, Recomputed, recompute_blocks, split_blocks

    analysis = fxgradnas.analyze(_model(_config()), IDS)
    saved = {}
    for recompute in (False, True):
        inst = instrument(analysis, read_only=True)
        inst.attach(GradientRecorder())
        for mask in inst.masks.values():
            mask.requires_grad_(True)
        split = split_blocks(inst.module)
        if recompute:
            split = recompute_blocks(split)
            assert len(split.meta[BLOCKS]) == 2
            assert sum(isinstance(m, Recomputed) for m in split.modules()) == 2
        weights = {t.untyped_storage().data_ptr() for t in split.parameters()}
        total = []

        def pack(t: torch.Tensor, total: list = total, weights: set = weights) -> torch.Tensor:  # not the weights
            total.append(0 if t.untyped_storage().data_ptr() in weights else t.numel() * t.element_size())
            return t

        long_ids = torch.randint(0, 96, (2, 64))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _lm_loss_of_batch(split(long_ids), long_ids)
        loss.backward()
        saved[recompute] = sum(total)
    assert saved[True] < 0.5 * saved[False]  # 0.19 here
