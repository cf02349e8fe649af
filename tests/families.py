"""Tiny random-init models of many real architectures, for measuring how much of them fxgradnas handles.

Every factory returns ``(model, example_inputs)``: the model in eval mode, the inputs a dict of
keyword arguments (Hugging Face) or an image batch (torchvision). Weights and inputs are drawn from
``seed`` without touching the global RNG. No weights are downloaded.

- ``HF_FAMILIES``: Hugging Face transformers families, 2 layers, hidden 64, 4 heads (2 KV heads where
  the family has grouped-query attention), MLP 96, vocab 128; token inputs of batch 3, sequence 7.
  Decoders are ``*ForCausalLM`` (``generate`` works); encoder-decoders get ``decoder_input_ids``.
- ``TORCHVISION_MODELS``: torchvision classifiers (``weights=None``, 10 classes) on small images.
- ``TORCHVISION_SHALLOW``: the same architectures with fewer blocks and stages where their classes
  take a configuration (ResNet, DenseNet, EfficientNet, MobileNet, RegNet, ShuffleNet, ConvNeXt, ViT,
  Swin, MaxViT): every kind of block the full model has, at a fraction of the capture time; the test
  suite uses them, ``benchmarks/breadth.py`` the full models.

torchvision's PyPI wheel is a CUDA build: on a CPU-only torch its ``_C`` extension does not load and
``import torchvision`` fails on the fake registration of ``torchvision::nms`` / ``qnms``.
:func:`prepare_torchvision` defines those two schemas first (the classification models use no
torchvision op), so call it before anything imports torchvision -- transformers does so on import
when torchvision is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.seeding import BATCH, SEQ, seeded, token_ids

VOCAB = 128
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MLP = 96
LAYERS = 2
MAX_POS = 64
CLASSES = 10
PAD, BOS, EOS = 0, 1, 2
FIRST_TOKEN = 3  # token inputs avoid the pad/bos/eos ids

Example = tuple[nn.Module, Any]

__all__ = [
    "HF_FAMILIES", "TORCHVISION_MODELS", "TORCHVISION_SHALLOW", "Example", "has_torchvision", "has_transformers", "import_torchvision",
    "prepare_torchvision",
]


# --------------------------------------------------------------------------- torchvision import
_TORCHVISION_LIBRARY: torch.library.Library | None = None  # kept alive: the schemas live while it does
_NMS_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


def prepare_torchvision() -> None:
    """Make ``import torchvision`` work (does not import it): load its ``_C`` extension if it loads on
    this torch, else define the two op schemas its fake registrations need. Idempotent; a no-op when
    torchvision is not installed."""
    global _TORCHVISION_LIBRARY
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _op_exists("nms"):
        return
    folder = Path(next(iter(spec.submodule_search_locations)))
    for library in sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(library))
        except OSError:
            continue
        if _op_exists("nms"):
            return
    _TORCHVISION_LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _NMS_SCHEMAS:
        if not _op_exists(schema.split("(")[0]):
            _TORCHVISION_LIBRARY.define(schema)


def import_torchvision() -> Any:
    """``import torchvision`` after :func:`prepare_torchvision`."""
    prepare_torchvision()
    import torchvision

    return torchvision


# --------------------------------------------------------------------------- Hugging Face
def _tf() -> Any:
    prepare_torchvision()  # transformers imports torchvision when it is installed
    import transformers

    return transformers


def _attention(model_cls: type) -> str:
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"


def _build(config_cls: str, model_cls: str, seed: int, attn: str | None = None, **config: Any) -> tuple[nn.Module, torch.Generator]:
    tf = _tf()
    cls = getattr(tf, model_cls)
    cfg = getattr(tf, config_cls)(**config, attn_implementation=attn or _attention(cls))
    with seeded(seed) as gen:
        model = cls(cfg).eval()
        # the inputs' generator is independent of the global RNG the weights used
        return model, gen


def _tokens_common() -> dict[str, Any]:
    return {"vocab_size": VOCAB, "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}


def _causal(config_cls: str, model_cls: str, seed: int, attn: str | None = None, special_tokens: bool = True,
            **config: Any) -> Example:
    """Token ids in ``[FIRST_TOKEN, vocab)`` with the pad/bos/eos ids set (``special_tokens``), in
    ``[0, vocab)`` with the config's own defaults otherwise."""
    common = _tokens_common() if special_tokens else {"vocab_size": VOCAB}
    model, gen = _build(config_cls, model_cls, seed, attn, **{**common, **config})
    return model, {"input_ids": token_ids(gen, model.config.vocab_size, FIRST_TOKEN if special_tokens else 0)}


def llama_like(config_cls: str, model_cls: str, seed: int, attn: str | None = None, gqa: bool = True,
                **extra: Any) -> Example:
    """The Llama argument names (hidden_size, intermediate_size, num_key_value_heads, ...)."""
    config = dict(
        hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        max_position_embeddings=MAX_POS,
    )
    if gqa:
        config["num_key_value_heads"] = KV_HEADS
    return _causal(config_cls, model_cls, seed, attn, **{**config, **extra})


def _masked_lm(config_cls: str, model_cls: str, seed: int, attn: str | None = None, special_tokens: bool = True,
               **config: Any) -> Example:
    """An encoder with an attention mask whose second row ends in two padding tokens; ``special_tokens``
    as in :func:`_causal`."""
    common = _tokens_common() if special_tokens else {"vocab_size": VOCAB}
    model, gen = _build(config_cls, model_cls, seed, attn, **{**common, **config})
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0
    ids = token_ids(gen, model.config.vocab_size, FIRST_TOKEN if special_tokens else 0)
    return model, {"input_ids": ids, "attention_mask": mask}


def _bert_like(config_cls: str, model_cls: str, seed: int, **extra: Any) -> Example:
    config = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
                  max_position_embeddings=MAX_POS)
    return _masked_lm(config_cls, model_cls, seed, **{**config, **extra})


# hf_llama, hf_qwen2, hf_gpt2 and hf_bert take ``options``: config arguments over the family's, ``attn`` and
# ``special_tokens`` (tests/zoo.py's smaller models of the same families are made with them).
def hf_llama(seed: int = 0, **options: Any) -> Example:
    return llama_like("LlamaConfig", "LlamaForCausalLM", seed, **{"head_dim": HEAD_DIM, **options})


def hf_mistral(seed: int = 0) -> Example:
    return llama_like("MistralConfig", "MistralForCausalLM", seed, head_dim=HEAD_DIM)


def hf_qwen2(seed: int = 0, **options: Any) -> Example:
    return llama_like("Qwen2Config", "Qwen2ForCausalLM", seed, **options)


def hf_qwen3(seed: int = 0) -> Example:
    return llama_like("Qwen3Config", "Qwen3ForCausalLM", seed, head_dim=HEAD_DIM)


def hf_gemma(seed: int = 0) -> Example:
    return llama_like("GemmaConfig", "GemmaForCausalLM", seed, head_dim=HEAD_DIM)


def hf_gemma2(seed: int = 0) -> Example:
    return llama_like("Gemma2Config", "Gemma2ForCausalLM", seed, attn="eager", head_dim=HEAD_DIM,
                       query_pre_attn_scalar=HEAD_DIM, sliding_window=4)


def hf_gemma3(seed: int = 0) -> Example:
    return llama_like("Gemma3TextConfig", "Gemma3ForCausalLM", seed, attn="eager", head_dim=HEAD_DIM,
                       query_pre_attn_scalar=HEAD_DIM, sliding_window=4)


def hf_phi(seed: int = 0) -> Example:
    return llama_like("PhiConfig", "PhiForCausalLM", seed)


def hf_phi3(seed: int = 0) -> Example:
    return llama_like("Phi3Config", "Phi3ForCausalLM", seed)


def hf_stablelm(seed: int = 0) -> Example:
    return llama_like("StableLmConfig", "StableLmForCausalLM", seed)


def hf_starcoder2(seed: int = 0) -> Example:
    return llama_like("Starcoder2Config", "Starcoder2ForCausalLM", seed)


def hf_olmo(seed: int = 0) -> Example:
    return llama_like("OlmoConfig", "OlmoForCausalLM", seed)


def hf_olmo2(seed: int = 0) -> Example:
    return llama_like("Olmo2Config", "Olmo2ForCausalLM", seed)


def hf_granite(seed: int = 0) -> Example:
    return llama_like("GraniteConfig", "GraniteForCausalLM", seed, embedding_multiplier=2.0,
                       residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=2.0)


def hf_cohere(seed: int = 0) -> Example:
    return llama_like("CohereConfig", "CohereForCausalLM", seed)


def hf_smollm3(seed: int = 0) -> Example:
    return llama_like("SmolLM3Config", "SmolLM3ForCausalLM", seed, no_rope_layer_interval=2)


def hf_nemotron(seed: int = 0) -> Example:
    return llama_like("NemotronConfig", "NemotronForCausalLM", seed, head_dim=HEAD_DIM)


def hf_mixtral(seed: int = 0) -> Example:
    return llama_like("MixtralConfig", "MixtralForCausalLM", seed, head_dim=HEAD_DIM, num_local_experts=4,
                       num_experts_per_tok=2)


def hf_qwen2_moe(seed: int = 0) -> Example:
    return llama_like("Qwen2MoeConfig", "Qwen2MoeForCausalLM", seed, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=48, shared_expert_intermediate_size=MLP, decoder_sparse_step=1)


def hf_qwen3_moe(seed: int = 0) -> Example:
    return llama_like("Qwen3MoeConfig", "Qwen3MoeForCausalLM", seed, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=48, decoder_sparse_step=1)


def hf_gpt2(seed: int = 0, **options: Any) -> Example:
    return _causal("GPT2Config", "GPT2LMHeadModel", seed, **{"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS,
                                                              "n_inner": MLP, "n_positions": MAX_POS, **options})


def hf_gpt_bigcode(seed: int = 0) -> Example:
    """Multi-query attention (one KV head), the default of the family."""
    return _causal("GPTBigCodeConfig", "GPTBigCodeForCausalLM", seed, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                   n_inner=MLP, n_positions=MAX_POS, multi_query=True)


def hf_gptj(seed: int = 0) -> Example:
    return _causal("GPTJConfig", "GPTJForCausalLM", seed, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=MLP,
                   n_positions=MAX_POS, rotary_dim=8)


def hf_codegen(seed: int = 0) -> Example:
    return _causal("CodeGenConfig", "CodeGenForCausalLM", seed, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                   n_inner=MLP, n_positions=MAX_POS, n_ctx=MAX_POS, rotary_dim=8)


def hf_gpt_neo(seed: int = 0) -> Example:
    return _causal("GPTNeoConfig", "GPTNeoForCausalLM", seed, hidden_size=HIDDEN, num_layers=LAYERS,
                   num_heads=HEADS, intermediate_size=MLP, max_position_embeddings=MAX_POS,
                   attention_types=[[["global", "local"], 1]], window_size=4)


def hf_gpt_neox(seed: int = 0) -> Example:
    return _causal("GPTNeoXConfig", "GPTNeoXForCausalLM", seed, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, intermediate_size=MLP, max_position_embeddings=MAX_POS)


def hf_opt(seed: int = 0) -> Example:
    return _causal("OPTConfig", "OPTForCausalLM", seed, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, ffn_dim=MLP, word_embed_proj_dim=HIDDEN, max_position_embeddings=MAX_POS)


def hf_biogpt(seed: int = 0) -> Example:
    return _causal("BioGptConfig", "BioGptForCausalLM", seed, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, intermediate_size=MLP, max_position_embeddings=MAX_POS)


def hf_falcon(seed: int = 0) -> Example:
    """Falcon-7B layout: ``new_decoder_architecture=False``, multi-query, parallel attention."""
    return _causal("FalconConfig", "FalconForCausalLM", seed, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, ffn_hidden_size=MLP, new_decoder_architecture=False, multi_query=True,
                   parallel_attn=True, max_position_embeddings=MAX_POS)


def hf_falcon_new(seed: int = 0) -> Example:
    """Falcon-40B layout: ``new_decoder_architecture=True`` with 2 KV heads."""
    return _causal("FalconConfig", "FalconForCausalLM", seed, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_kv_heads=KV_HEADS, ffn_hidden_size=MLP,
                   new_decoder_architecture=True, max_position_embeddings=MAX_POS)


def hf_falcon_alibi(seed: int = 0) -> Example:
    """``hf_falcon_new`` with ``alibi=True``: ALiBi position biases instead of rotary embeddings."""
    return _causal("FalconConfig", "FalconForCausalLM", seed, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, num_kv_heads=KV_HEADS, ffn_hidden_size=MLP,
                   new_decoder_architecture=True, alibi=True, max_position_embeddings=MAX_POS)


def hf_bloom(seed: int = 0) -> Example:
    return _causal("BloomConfig", "BloomForCausalLM", seed, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)


def hf_mpt(seed: int = 0) -> Example:
    return _causal("MptConfig", "MptForCausalLM", seed, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                   expansion_ratio=2, max_seq_len=MAX_POS)


def hf_bert(seed: int = 0, **options: Any) -> Example:
    return _bert_like("BertConfig", "BertForMaskedLM", seed, **options)


def hf_roberta(seed: int = 0) -> Example:
    return _bert_like("RobertaConfig", "RobertaForMaskedLM", seed, pad_token_id=1, bos_token_id=0)


def hf_electra(seed: int = 0) -> Example:
    return _bert_like("ElectraConfig", "ElectraForMaskedLM", seed, embedding_size=32)


def hf_albert(seed: int = 0) -> Example:
    """One set of layer weights shared by both layers (the ALBERT default)."""
    return _bert_like("AlbertConfig", "AlbertForMaskedLM", seed, embedding_size=32)


def hf_distilbert(seed: int = 0) -> Example:
    return _masked_lm("DistilBertConfig", "DistilBertForMaskedLM", seed, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                      hidden_dim=MLP, max_position_embeddings=MAX_POS)


def hf_deberta_v2(seed: int = 0) -> Example:
    """The DeBERTa-v3 layout: disentangled relative attention, log buckets, shared attention keys."""
    return _bert_like("DebertaV2Config", "DebertaV2ForMaskedLM", seed, relative_attention=True,
                      pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
                      position_buckets=8, norm_rel_ebd="layer_norm", share_att_key=True)


def hf_modernbert(seed: int = 0) -> Example:
    return _masked_lm("ModernBertConfig", "ModernBertForMaskedLM", seed, hidden_size=HIDDEN, intermediate_size=MLP,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=MAX_POS,
                      local_attention=4, cls_token_id=BOS, sep_token_id=EOS)


def hf_t5(seed: int = 0) -> Example:
    tf = _tf()
    cfg = tf.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HEAD_DIM, d_ff=MLP, num_layers=LAYERS, num_heads=HEADS,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, attn_implementation="eager")
    with seeded(seed) as gen:
        model = tf.T5ForConditionalGeneration(cfg).eval()
        return model, {"input_ids": token_ids(gen, VOCAB, FIRST_TOKEN),
                       "decoder_input_ids": token_ids(gen, VOCAB, FIRST_TOKEN)}


def hf_bart(seed: int = 0) -> Example:
    tf = _tf()
    cfg = tf.BartConfig(**_tokens_common(), d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=MLP,
                        decoder_ffn_dim=MLP, max_position_embeddings=MAX_POS, decoder_start_token_id=EOS,
                        forced_eos_token_id=None, attn_implementation=_attention(tf.BartForConditionalGeneration))
    with seeded(seed) as gen:
        model = tf.BartForConditionalGeneration(cfg).eval()
        return model, {"input_ids": token_ids(gen, VOCAB, FIRST_TOKEN),
                       "decoder_input_ids": token_ids(gen, VOCAB, FIRST_TOKEN)}


def hf_clip_text(seed: int = 0) -> Example:
    tf = _tf()
    cfg = tf.CLIPTextConfig(**_tokens_common(), hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, max_position_embeddings=MAX_POS, projection_dim=32,
                            attn_implementation=_attention(tf.CLIPTextModel))
    with seeded(seed) as gen:
        model = tf.CLIPTextModel(cfg).eval()
        ids = token_ids(gen, VOCAB, FIRST_TOKEN)
    ids[:, -1] = EOS  # the pooled output is read at the end-of-text token
    return model, {"input_ids": ids}


def hf_whisper_encoder(seed: int = 0) -> Example:
    """The Whisper encoder alone; input: log-mel features (3, 16 mel bins, 14 frames -> 7 positions)."""
    tf = _tf()
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = tf.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, encoder_layers=LAYERS, encoder_attention_heads=HEADS,
                           decoder_layers=LAYERS, decoder_attention_heads=HEADS, encoder_ffn_dim=MLP,
                           decoder_ffn_dim=MLP, d_model=HIDDEN, max_source_positions=SEQ, max_target_positions=MAX_POS,
                           pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=BOS,
                           attn_implementation=_attention(WhisperEncoder))
    with seeded(seed) as gen:
        model = WhisperEncoder(cfg).eval()
        return model, {"input_features": torch.randn(BATCH, 16, 2 * SEQ, generator=gen)}


def hf_vit(seed: int = 0) -> Example:
    """ViT classifier on 32x32 images with 8x8 patches (16 patches + CLS)."""
    tf = _tf()
    cfg = tf.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
                       image_size=32, patch_size=8, num_labels=CLASSES,
                       attn_implementation=_attention(tf.ViTForImageClassification))
    with seeded(seed) as gen:
        model = tf.ViTForImageClassification(cfg).eval()
        return model, {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=gen)}


HF_FAMILIES: dict[str, Callable[..., Example]] = {
    "llama": hf_llama,
    "mistral": hf_mistral,
    "qwen2": hf_qwen2,
    "qwen3": hf_qwen3,
    "gemma": hf_gemma,
    "gemma2": hf_gemma2,
    "gemma3": hf_gemma3,
    "phi": hf_phi,
    "phi3": hf_phi3,
    "stablelm": hf_stablelm,
    "starcoder2": hf_starcoder2,
    "olmo": hf_olmo,
    "olmo2": hf_olmo2,
    "granite": hf_granite,
    "cohere": hf_cohere,
    "smollm3": hf_smollm3,
    "nemotron": hf_nemotron,
    "mixtral": hf_mixtral,
    "qwen2_moe": hf_qwen2_moe,
    "qwen3_moe": hf_qwen3_moe,
    "gpt2": hf_gpt2,
    "gpt_bigcode": hf_gpt_bigcode,
    "gptj": hf_gptj,
    "codegen": hf_codegen,
    "gpt_neo": hf_gpt_neo,
    "gpt_neox": hf_gpt_neox,
    "opt": hf_opt,
    "biogpt": hf_biogpt,
    "falcon": hf_falcon,
    "falcon_new": hf_falcon_new,
    "falcon_alibi": hf_falcon_alibi,
    "bloom": hf_bloom,
    "mpt": hf_mpt,
    "bert": hf_bert,
    "roberta": hf_roberta,
    "distilbert": hf_distilbert,
    "albert": hf_albert,
    "electra": hf_electra,
    "modernbert": hf_modernbert,
    "deberta_v2": hf_deberta_v2,
    "t5": hf_t5,
    "bart": hf_bart,
    "clip_text": hf_clip_text,
    "whisper_encoder": hf_whisper_encoder,
    "vit": hf_vit,
}


# --------------------------------------------------------------------------- torchvision
def _tv(name: str, image: int = 64, batch: int = 2, **kwargs: Any) -> Callable[..., Example]:
    """A factory for ``torchvision.models.<name>(weights=None, num_classes=10, **kwargs)`` on
    ``batch`` images of ``image`` x ``image``."""
    factory = shallow(lambda models: getattr(models, name)(weights=None, num_classes=CLASSES, **kwargs), image, batch)
    factory.__name__ = f"tv_{name}"
    factory.__doc__ = f"torchvision {name} on ({batch}, 3, {image}, {image}) images"
    return factory


def shallow(build: Callable[[Any], nn.Module], image: int = 64, batch: int = 2) -> Callable[..., Example]:
    """A factory for ``build(torchvision.models)`` (10 classes) on ``batch`` images of ``image`` x ``image``."""

    def factory(seed: int = 0) -> Example:
        models = import_torchvision().models
        with seeded(seed) as gen:
            model, images = _no_zero_weights(build(models)), torch.randn(batch, 3, image, image, generator=gen)
            return _batch_norm_statistics(model, images).eval(), images

    return factory


def _batch_norm_statistics(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics of ``images`` (one forward in training mode): with the statistics of a
    fresh BatchNorm (mean 0, variance 1) a random-init CNN's activations shrink layer by layer until its
    output is its classifier's bias, and pruning (or a wrong rewrite) changes it by less than the tolerance
    (Inception v3: 3e-6 relative)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.momentum = None  # a cumulative average: after one batch, that batch's statistics
        with torch.no_grad():
            model.train()(images)
    return model


def _no_zero_weights(model: nn.Module) -> nn.Module:
    """Redraw weight matrices initialised to zero (ViT's classifier): an output that is 0 for every input
    would make pruned == masked hold whatever the rewrite does."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    return model


def _first_stages(configs: list[Any], stages: int, layers: int = 2) -> list[Any]:
    """The first ``stages`` stage configs of an EfficientNet/MobileNet setting, at most ``layers`` blocks each."""
    for config in configs[:stages]:
        if hasattr(config, "num_layers"):
            config.num_layers = min(config.num_layers, layers)
    return configs[:stages]


def _efficientnet(name: str, stages: int) -> Callable[[Any], nn.Module]:
    def build(models: Any) -> nn.Module:
        from torchvision.models.efficientnet import _efficientnet_conf

        setting, last_channel = _efficientnet_conf(name, width_mult=1.0, depth_mult=1.0)
        return models.EfficientNet(_first_stages(setting, stages), 0.2, last_channel=last_channel,
                                   num_classes=CLASSES)
    return build


def _mobilenet_v3(name: str, stages: int) -> Callable[[Any], nn.Module]:
    def build(models: Any) -> nn.Module:
        from torchvision.models.mobilenetv3 import _mobilenet_v3_conf

        setting, last_channel = _mobilenet_v3_conf(name)
        return models.MobileNetV3(setting[:stages], last_channel, num_classes=CLASSES)
    return build


def _resnet(layers: list[int], **kwargs: Any) -> Callable[[Any], nn.Module]:
    def build(models: Any) -> nn.Module:
        from torchvision.models.resnet import Bottleneck

        return models.ResNet(Bottleneck, layers, num_classes=CLASSES, **kwargs)
    return build


def _regnet(**params: Any) -> Callable[[Any], nn.Module]:
    def build(models: Any) -> nn.Module:
        from torchvision.models.regnet import BlockParams

        return models.RegNet(BlockParams.from_init_params(**params), num_classes=CLASSES)
    return build


def _convnext(models: Any) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig

    return models.ConvNeXt([CNBlockConfig(96, 192, 2), CNBlockConfig(192, None, 1)], stochastic_depth_prob=0.1,
                           num_classes=CLASSES)


TORCHVISION_MODELS: dict[str, Callable[..., Example]] = {
    "resnet18": _tv("resnet18"),
    "resnet50": _tv("resnet50"),
    "resnext50_32x4d": _tv("resnext50_32x4d"),
    "wide_resnet50_2": _tv("wide_resnet50_2"),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "efficientnet_b0": _tv("efficientnet_b0"),
    "efficientnet_v2_s": _tv("efficientnet_v2_s"),
    "regnet_x_400mf": _tv("regnet_x_400mf"),
    "regnet_y_400mf": _tv("regnet_y_400mf"),
    "shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "squeezenet1_0": _tv("squeezenet1_0"),
    "squeezenet1_1": _tv("squeezenet1_1"),
    "densenet121": _tv("densenet121"),
    "googlenet": _tv("googlenet", aux_logits=False, init_weights=False),
    "inception_v3": _tv("inception_v3", image=75, aux_logits=False, init_weights=False),
    "alexnet": _tv("alexnet"),
    "vgg11_bn": _tv("vgg11_bn", image=32),
    "mnasnet0_5": _tv("mnasnet0_5"),
    "convnext_tiny": _tv("convnext_tiny", image=32),
    "vit_b_16": _tv("vit_b_16", image=32, image_size=32),
    "swin_t": _tv("swin_t", image=64),
    "maxvit_t": _tv("maxvit_t", image=224),  # 7x7 windows at stride 32: nothing smaller
}


# Which of the full model's blocks each one keeps: every block kind (downsampling and identity residual
# blocks, squeeze-excitation, hard-swish, fused and plain MBConv, grouped and depthwise convs, shifted
# windows, window and grid attention) at least once.
TORCHVISION_SHALLOW: dict[str, Callable[..., Example]] = {
    **TORCHVISION_MODELS,
    "resnet50": shallow(_resnet([1, 2, 1, 1])),
    "resnext50_32x4d": shallow(_resnet([1, 2, 1, 1], groups=32, width_per_group=4)),
    "wide_resnet50_2": shallow(_resnet([1, 2, 1, 1], width_per_group=128)),
    "mobilenet_v2": shallow(lambda models: models.MobileNetV2(
        CLASSES, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2]])),
    "mobilenet_v3_small": shallow(_mobilenet_v3("mobilenet_v3_small", 5)),
    "mobilenet_v3_large": shallow(_mobilenet_v3("mobilenet_v3_large", 8)),
    "efficientnet_b0": shallow(_efficientnet("efficientnet_b0", 3)),
    "efficientnet_v2_s": shallow(_efficientnet("efficientnet_v2_s", 4)),
    "regnet_x_400mf": shallow(_regnet(depth=6, w_0=24, w_a=24.48, w_m=2.54, group_width=16)),
    "regnet_y_400mf": shallow(_regnet(depth=6, w_0=48, w_a=27.89, w_m=2.09, group_width=8, se_ratio=0.25)),
    "shufflenet_v2_x0_5": shallow(lambda models: models.ShuffleNetV2([2, 1, 1], [24, 48, 96, 192, 1024],
                                                                      num_classes=CLASSES)),
    "densenet121": shallow(lambda models: models.DenseNet(32, (2, 2), 64, num_classes=CLASSES)),
    "convnext_tiny": shallow(_convnext, image=32),
    "vit_b_16": shallow(lambda models: models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=256,
        num_classes=CLASSES), image=32),
    "swin_t": shallow(lambda models: models.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[7, 7],
        stochastic_depth_prob=0.2, num_classes=CLASSES)),
    "maxvit_t": shallow(lambda models: models.MaxVit(
        input_size=(56, 56), stem_channels=16, partition_size=7, block_channels=[32, 64], block_layers=[1, 1],
        head_dim=16, stochastic_depth_prob=0.2, num_classes=CLASSES), image=56),
}


# Run by a fresh interpreter: fxgradnas cannot be imported there (a None entry in sys.modules makes the
# import fail), so only transformers reads the checkpoints.
PLAIN_LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["fxgradnas"] = None
    import torch
    from transformers import AutoModelForCausalLM
    root, new_tokens = sys.argv[1], int(sys.argv[2])
    for name in json.load(open(f"{root}/names.json")):
        model = AutoModelForCausalLM.from_pretrained(f"{root}/{name}", dtype=torch.float32).eval()
        ids = torch.load(f"{root}/{name}/ids.pt")
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            tokens = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    use_cache=True, pad_token_id=0)
        torch.save({"logits": logits, "tokens": tokens, "layers": model.config.num_hidden_layers},
                   f"{root}/{name}/loaded.pt")
    assert not any(m.startswith("fxgradnas") for m in sys.modules if sys.modules[m] is not None)
""")

def load_with_plain_transformers(root: Path, names: list[str], new_tokens: int) -> dict[str, dict]:
    """Load each checkpoint ``root/NAME`` (beside its ``ids.pt``) in a fresh interpreter that cannot import
    fxgradnas: per name its logits on the ids, a cached greedy generation of ``new_tokens`` and its layer count."""
    (root / "names.json").write_text(json.dumps(names))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", PLAIN_LOADER, str(root), str(new_tokens)], check=True, env=env, cwd=root,
                   timeout=600)
    return {name: torch.load(root / name / "loaded.pt") for name in names}
