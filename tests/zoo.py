"""Small deterministic example models for the tests, the benchmarks and ``inspect``.

Every factory returns ``(model, example_inputs)``: the model is in eval mode and
``example_inputs`` is a tensor, a tuple of positional arguments or a dict of keyword
arguments. Weights and inputs are drawn from ``seed`` without touching the global RNG.
Example sizes are odd (batch 3, sequence 7) so they never coincide with head counts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fxgradnas
from fxgradnas.analysis import REGISTRY, register
from fxgradnas.analysis.rules.routing import grouped_mm
from fxgradnas.capture import ExampleInputs
from tests import families
from tests.seeding import BATCH, SEQ, seeded, token_ids

__all__ = ["FUSED_SPLITS", "HF_ZOO", "ZOO", "Example", "FusedAttention", "MoE", "analysis_of", "example_of", "fused",
           "looped_mm", "save_hf_checkpoint"]
Example = tuple[nn.Module, ExampleInputs]

# --------------------------------------------------------------------------- nanoGPT


class CausalSelfAttention(nn.Module):
    """GPT-2 attention with a fused qkv projection."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        assert n_embd % n_head == 0
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head
        self.n_embd = n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPTMLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = GPTMLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """GPT-2 style decoder laid out like nanoGPT, with the lm_head tied to ``wte``."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, vocab: int, block_size: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                h=nn.ModuleList(GPTBlock(n_embd, n_head) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.size()
        assert t <= self.block_size
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def nanogpt(
    n_layer: int = 2, n_head: int = 4, n_embd: int = 32, vocab: int = 64, block_size: int = 16, seed: int = 0
) -> Example:
    """nanoGPT-style decoder; input: token ids of shape (3, 7)."""
    with seeded(seed) as gen:
        model = NanoGPT(n_layer, n_head, n_embd, vocab, block_size).eval()
        return model, token_ids(gen, vocab)


# --------------------------------------------------------------------------- Llama


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd)."""
    B, n_kv, T, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


class LlamaAttention(nn.Module):
    """Grouped-query attention with rotary embeddings and an explicit causal softmax."""

    def __init__(self, hidden: int, n_head: int, n_kv_head: int, head_dim: int) -> None:
        super().__init__()
        assert n_head % n_kv_head == 0
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.q_proj = nn.Linear(hidden, n_head * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, n_kv_head * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, n_kv_head * head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_head, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        n_rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        y = scores.softmax(dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * hd))


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden: int, n_head: int, n_kv_head: int, head_dim: int, intermediate: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = LlamaAttention(hidden, n_head, n_kv_head, head_dim)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = LlamaMLP(hidden, intermediate)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(
        self,
        n_layer: int,
        n_head: int,
        n_kv_head: int,
        head_dim: int,
        hidden: int,
        intermediate: int,
        vocab: int,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hidden, n_head, n_kv_head, head_dim, intermediate) for _ in range(n_layer)
        )
        self.norm = RMSNorm(hidden)
        self.rotary_emb = RotaryEmbedding(head_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(x)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Llama-style decoder with an untied lm_head."""

    def __init__(self, **kw: int) -> None:
        super().__init__()
        self.model = LlamaModel(**kw)
        self.lm_head = nn.Linear(kw["hidden"], kw["vocab"], bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))


def llama(
    n_layer: int = 2,
    n_head: int = 4,
    n_kv_head: int = 2,
    head_dim: int = 8,
    hidden: int = 32,
    intermediate: int = 48,
    vocab: int = 64,
    seed: int = 0,
) -> Example:
    """Llama-style GQA decoder; input: token ids of shape (3, 7)."""
    with seeded(seed) as gen:
        model = LlamaForCausalLM(
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=n_kv_head,
            head_dim=head_dim,
            hidden=hidden,
            intermediate=intermediate,
            vocab=vocab,
        ).eval()
        return model, token_ids(gen, vocab)


# --------------------------------------------------------------------------- BERT


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_pos: int, type_vocab: int = 2) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        token_type = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)
        return self.LayerNorm(x + self.token_type_embeddings(token_type))


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, n_head: int) -> None:
        super().__init__()
        assert hidden % n_head == 0
        self.n_head, self.head_dim = n_head, hidden // n_head
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), mask
        )
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


class BertResidualOutput(nn.Module):
    """dense -> residual add -> LayerNorm (post-LN)."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, n_head: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(hidden, n_head)
        self.output = BertResidualOutput(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, hidden: int, n_head: int, intermediate: int) -> None:
        super().__init__()
        self.attention = BertAttention(hidden, n_head)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = BertResidualOutput(intermediate, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, n_layer: int, hidden: int, n_head: int, intermediate: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hidden, n_head, intermediate) for _ in range(n_layer))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x[:, 0]))


class BertForSequenceClassification(nn.Module):
    """Post-LayerNorm BERT encoder with a first-token classification head."""

    def __init__(
        self,
        n_layer: int,
        n_head: int,
        hidden: int,
        intermediate: int,
        vocab: int,
        max_pos: int,
        num_labels: int,
    ) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, hidden, max_pos)
        self.encoder = BertEncoder(n_layer, hidden, n_head, intermediate)
        self.pooler = BertPooler(hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask[:, None, None, :].to(x.dtype)
        mask = (1.0 - keep) * torch.finfo(x.dtype).min
        return self.classifier(self.pooler(self.encoder(x, mask)))


def bert(
    n_layer: int = 2,
    n_head: int = 4,
    hidden: int = 32,
    intermediate: int = 64,
    vocab: int = 64,
    max_pos: int = 16,
    seed: int = 0,
) -> Example:
    """BERT-style classifier (3 labels); inputs: ``{"input_ids", "attention_mask"}`` of shape (3, 7)."""
    with seeded(seed) as gen:
        model = BertForSequenceClassification(n_layer, n_head, hidden, intermediate, vocab, max_pos, 3).eval()
        ids = token_ids(gen, vocab)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------- ResNet


def _randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)


class BasicBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class ResNet(nn.Module):
    """Constant-width ResNet with basic blocks."""

    def __init__(self, width: int, blocks: int, num_classes: int, in_ch: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(*(BasicBlock(width) for _ in range(blocks)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(width: int = 16, blocks: int = 2, num_classes: int = 10, seed: int = 0) -> Example:
    """Small ResNet with non-trivial BatchNorm statistics; input: (3, 3, 16, 16) images."""
    with seeded(seed) as gen:
        model = ResNet(width, blocks, num_classes)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                _randomize_bn(m)
        return model.eval(), torch.randn(BATCH, 3, 16, 16, generator=gen)


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze conv, then 1x1 and 3x3 expand convs concatenated."""

    def __init__(self, width: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(width, squeeze, 1), nn.BatchNorm2d(squeeze), nn.ReLU())
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.expand1x1(s), self.expand3x3(s)], dim=1)


class SqueezeNet(nn.Module):
    """A stem conv and two fire modules (each reads the previous one's concatenated branches)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU())
        self.fire1, self.fire2 = Fire(12, 6, 8), Fire(16, 6, 10)
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fire2(self.fire1(self.stem(x))).mean((2, 3)))


def squeezenet(num_classes: int = 10, seed: int = 0) -> Example:
    """Concatenated conv branches (SqueezeNet's fire modules); input: (3, 3, 16, 16) images."""
    with seeded(seed) as gen:
        model = SqueezeNet(num_classes)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                _randomize_bn(m)
        return model.eval(), torch.randn(BATCH, 3, 16, 16, generator=gen)


# --------------------------------------------------------------------------- MLP / MHA


class MLP(nn.Module):
    """Linear layers with ReLU in between."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def mlp(sizes: tuple[int, ...] = (16, 64, 32, 4), seed: int = 0) -> Example:
    """Linear-ReLU stack; input: (3, sizes[0])."""
    with seeded(seed) as gen:
        return MLP(tuple(sizes)).eval(), torch.randn(BATCH, sizes[0], generator=gen)


class MultiheadModel(nn.Module):
    """``nn.MultiheadAttention`` self-attention followed by a Linear head."""

    def __init__(self, embed: int, heads: int, out: int = 10) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.head = nn.Linear(embed, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(y)


def multihead(embed: int = 32, heads: int = 4, seed: int = 0) -> Example:
    """``nn.MultiheadAttention`` model; input: (3, 7, embed)."""
    with seeded(seed) as gen:
        return MultiheadModel(embed, heads).eval(), torch.randn(BATCH, SEQ, embed, generator=gen)


# --------------------------------------------------------------------------- fused projections
FUSED_SPLITS = ("slice", "split", "index", "grouped", "selected")


class FusedAttention(nn.Module):
    """Attention and a SwiGLU MLP on one residual stream, each from one fused projection. ``split``: how the
    fused q/k/v output is read: ``slice`` (Phi-3: ``qkv[..., a:b]``), ``split`` (GPT-BigCode: unequal
    ``split``), ``index`` (Falcon-7B: the heads axis of ``view(..., heads + 2, head_dim)`` read as
    ``[:-2]``, ``[[-2]]``, ``[[-1]]``; one KV head) or ``grouped`` (Falcon-40B: ``view(..., kv, q_per_kv + 2,
    head_dim)`` read the same way, k and v broadcast to the queries) or ``selected`` (Falcon-40B in transformers
    5.25: ``grouped`` with k and v read by integer ``select``; here k's index counts from the start and v's
    from the end, ``[..., q_per_kv, :]`` and ``[..., -1, :]``). The MLP's gate and up are
    ``chunk``-ed."""

    def __init__(self, split: str, width: int = 16, heads: int = 4, kv_heads: int = 2, head_dim: int = 4,
                 mlp: int = 12) -> None:
        super().__init__()
        self.split, self.hq, self.hkv, self.hd = split, heads, 1 if split == "index" else kv_heads, head_dim
        self.qkv = nn.Linear(width, (self.hq + 2 * self.hkv) * head_dim)
        self.o = nn.Linear(heads * head_dim, width)
        self.gate_up = nn.Linear(width, 2 * mlp)
        self.down = nn.Linear(mlp, width)
        self.head = nn.Linear(width, 3)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (b, hq, s, hd) and k, v (b, hkv or hq, s, hd)."""
        b, s, _ = x.shape
        qkv = self.qkv(x)
        q_width, kv_width = self.hq * self.hd, self.hkv * self.hd
        if self.split in ("slice", "split"):
            if self.split == "slice":
                q, k, v = qkv[..., :q_width], qkv[..., q_width:q_width + kv_width], qkv[..., q_width + kv_width:]
            else:
                q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
            return tuple(t.view(b, s, -1, self.hd).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]
        if self.split == "index":
            qkv = qkv.view(b, s, self.hq + 2, self.hd)
            q, k, v = qkv[..., :-2, :], qkv[..., [-2], :], qkv[..., [-1], :]
        elif self.split == "grouped":
            qkv = qkv.view(b, s, -1, self.hq // self.hkv + 2, self.hd)
            q, k, v = qkv[:, :, :, :-2], qkv[:, :, :, [-2]], qkv[:, :, :, [-1]]
            q, k, v = (torch.broadcast_to(t, q.shape).flatten(2, 3) for t in (q, k, v))
        else:
            qkv = qkv.view(b, s, -1, self.hq // self.hkv + 2, self.hd)
            q, k, v = qkv[..., :-2, :], qkv[..., self.hq // self.hkv, :], qkv[..., -1, :]
            k, v = (torch.broadcast_to(t[:, :, :, None], q.shape) for t in (k, v))
            q, k, v = (t.flatten(2, 3) for t in (q, k, v))
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv_heads(x)
        if k.shape[1] != q.shape[1]:  # grouped-query (or multi-query) attention
            rep = q.shape[1] // k.shape[1]
            k, v = (t[:, :, None].expand(b, k.shape[1], rep, s, self.hd).reshape(b, self.hq, s, self.hd) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, s, self.hq * self.hd))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.head(x + self.down(F.silu(gate) * up))


def fused(split: str = "slice", seed: int = 0, **sizes: int) -> Example:
    """:class:`FusedAttention`; input: (3, 7, width)."""
    with seeded(seed) as gen:
        model = FusedAttention(split, **sizes).eval()
        return model, torch.randn(BATCH, SEQ, model.qkv.in_features, generator=gen)


# --------------------------------------------------------------------------- Hugging Face


HF_ALLOWED = True  # the test session allows these models only in tests marked ``hf`` (tests/conftest.py)


def _transformers() -> Any:
    if not HF_ALLOWED:
        raise AssertionError("a test that builds a Hugging Face zoo model must be marked pytest.mark.hf")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("the Hugging Face zoo models need transformers: pip install 'fxgradnas[hf]'") from e
    return transformers


# The Hugging Face zoo models are the families of tests/families.py at a smaller size (hidden 32, 4 heads of
# 8, vocab 64, 16 positions), with the configs' own special token ids, token ids in [0, 64) and, for the
# decoders, ``use_cache=False``.
HF_SMALL = {"vocab_size": 64, "special_tokens": False}
HF_DECODER = {**HF_SMALL, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "head_dim": 8, "max_position_embeddings": 16, "tie_word_embeddings": False}


def hf_gpt2(attn_implementation: str = "sdpa", seed: int = 0) -> Example:
    """Tiny ``GPT2LMHeadModel``; kwargs ``{"input_ids", "use_cache": False}``."""
    _transformers()
    model, inputs = families.hf_gpt2(seed, **HF_SMALL, attn=attn_implementation, n_positions=16, n_embd=32,
                                     n_inner=None, bos_token_id=0, eos_token_id=0)
    return model, {**inputs, "use_cache": False}


def hf_bert(attn_implementation: str = "sdpa", seed: int = 0) -> Example:
    """Tiny ``BertForMaskedLM``; kwargs ``{"input_ids", "attention_mask"}``."""
    _transformers()
    return families.hf_bert(seed, **HF_SMALL, attn=attn_implementation, hidden_size=32, intermediate_size=64,
                            max_position_embeddings=16)


def hf_llama(n_kv_head: int = 2, attn_implementation: str = "sdpa", seed: int = 0) -> Example:
    """Tiny ``LlamaForCausalLM`` (4 heads, ``n_kv_head`` KV heads); kwargs ``{"input_ids", "use_cache": False}``."""
    _transformers()
    model, inputs = families.hf_llama(seed, **HF_DECODER, attn=attn_implementation, num_key_value_heads=n_kv_head)
    return model, {**inputs, "use_cache": False}


def hf_qwen2(n_kv_head: int = 2, attn_implementation: str = "sdpa", seed: int = 0) -> Example:
    """Tiny ``Qwen2ForCausalLM`` (4 heads, ``n_kv_head`` KV heads); kwargs ``{"input_ids", "use_cache": False}``."""
    _transformers()
    model, inputs = families.hf_qwen2(seed, **HF_DECODER, attn=attn_implementation, num_key_value_heads=n_kv_head)
    return model, {**inputs, "use_cache": False}


def save_hf_checkpoint(directory: Path, max_position_embeddings: int = 64, intermediate_size: int = 64) -> Path:
    """A random 2-layer ``LlamaForCausalLM`` (hidden 32, 4 heads on 2 KV heads, MLP ``intermediate_size``) with a byte-level tokenizer
    built without the hub, saved into ``directory`` with ``save_pretrained``: a checkpoint directory as the
    command line and ``from_pretrained`` read it."""
    tf = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<eos>": len(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    config = tf.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=max_position_embeddings,
        bos_token_id=len(alphabet), eos_token_id=len(alphabet))
    with seeded(0):
        model = tf.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


ZOO: dict[str, Callable[..., Example]] = {
    "nanogpt": nanogpt,
    "llama": llama,
    "bert": bert,
    "resnet": resnet,
    "squeezenet": squeezenet,
    "mlp": mlp,
    "multihead": multihead,
}

HF_ZOO: dict[str, Callable[..., Example]] = {
    "hf_gpt2": hf_gpt2,
    "hf_bert": hf_bert,
    "hf_llama": hf_llama,
    "hf_qwen2": hf_qwen2,
}


@functools.cache
def analysis_of(name: str, **options: Any) -> fxgradnas.Analysis:
    """The analysis of zoo model ``name`` (``options`` go to its factory), made once per test session.
    Shared: a test that changes the model or the analysis makes its own with :func:`fxgradnas.analyze`."""
    factory = ZOO.get(name) or HF_ZOO[name]
    return fxgradnas.analyze(*factory(**options))


def example_of(analysis: fxgradnas.Analysis) -> Any:
    """The example inputs ``analysis`` was captured with, in the form a zoo factory gives them."""
    args, kwargs = analysis.captured.args, analysis.captured.kwargs
    if kwargs:
        return dict(kwargs)
    return args[0] if len(args) == 1 else args


# --------------------------------------------------------------------------- mixture of experts
MOE_EXPERTS, MOE_TOP_K, MOE_WIDTH, MOE_EXPERT_WIDTH = 4, 2, 6, 10


@torch.library.custom_op("fxgradnas_zoo::grouped_mm", mutates_args=())
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


GROUPED_MM = "fxgradnas_zoo::grouped_mm"
if GROUPED_MM not in REGISTRY:  # the test op gets the rule of transformers' grouped_mm_fallback
    register(GROUPED_MM)(grouped_mm)


class MoE(nn.Module):
    """A mixture-of-experts layer as transformers 5 runs it (top-k router, sort, histc, grouped matmul experts)
    between two linears.

    ``router``: "softmax" (linear -> softmax -> top-k) or "sigmoid" (a score top-k cannot mask with -inf).
    """

    def __init__(self, router: str = "softmax") -> None:
        super().__init__()
        self.router_kind = router
        self.embed, self.head = nn.Linear(MOE_WIDTH, MOE_WIDTH), nn.Linear(MOE_WIDTH, MOE_WIDTH)
        self.router = nn.Linear(MOE_WIDTH, MOE_EXPERTS, bias=False)
        self.gate_up = nn.Parameter(torch.randn(MOE_EXPERTS, 2 * MOE_EXPERT_WIDTH, MOE_WIDTH) * 0.3)
        self.down = nn.Parameter(torch.randn(MOE_EXPERTS, MOE_WIDTH, MOE_EXPERT_WIDTH) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.embed(x).reshape(-1, MOE_WIDTH)
        logits = self.router(flat)
        scores = logits.softmax(-1) if self.router_kind == "softmax" else logits.sigmoid()
        weights, ids = scores.topk(MOE_TOP_K, dim=-1)
        ids, weights = ids.reshape(-1), weights.reshape(-1)
        sorted_ids, perm = torch.sort(ids)
        rows = flat[perm // MOE_TOP_K]
        offsets = torch.cumsum(torch.histc(sorted_ids.float(), bins=MOE_EXPERTS, min=0, max=MOE_EXPERTS - 1), 0, dtype=torch.int32)
        gate, up = looped_mm(rows, self.gate_up.transpose(-2, -1), offsets).chunk(2, dim=-1)
        out = looped_mm(F.silu(gate) * up, self.down.transpose(-2, -1), offsets)
        out = out * weights[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel())
        return self.head(out[inverse].view(-1, MOE_TOP_K, MOE_WIDTH).sum(1).reshape(x.shape))
