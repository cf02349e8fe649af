"""Hugging Face integration: a pruned model stays a Hugging Face model (``generate``,
``save_pretrained``), saved and loaded without pickled code.

Needs the ``hf`` extra (transformers, safetensors).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from .analysis import Analysis, Group, check_analysis
from .errors import ArgumentError, RewriteError
from .instrument import masked
from .modules import cache_off, check_weights, device_of, fingerprint
from .plan import Plan, check_plan
from .rewrite import (
    ResolvedPlan,
    default_tolerance,
    output_difference,
    outputs_on_example,
    resolve_plan,
    slice_tensors,
    tensor_owner,
)
from .tensorfiles import INDEX_FILE, checkpoint_files, read_headers, read_state, write_in_blocks
from .units import kept_masks, removed_blocks

STRUCTURE_FILE = "fxgradnas_structure.json"
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")
HEAD_WIDTH_ATTRS = ("split_size", "all_head_size", "embed_dim", "inner_dim")
MLP_WIDTH_ATTRS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "moe_intermediate_size",
                   "shared_expert_intermediate_size")
EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
INDEX_LAYOUT_ATTRS = ("decoder_sparse_step", "first_k_dense_replace", "moe_layers", "interleave_moe_layer_step",
                      "num_decoder_layers", "decoder_layers", "encoder_layers")
"""Config entries under which write_back does not delete layers: which layers are sparse (MoE) follows from their
index, or the encoder and decoder each have a count that ``num_hidden_layers`` does not tell apart."""
EPS_ATTRS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
LAYER_INDEX_LISTS = ("mlp_only_layers",)  # config lists of layer indices (other lists named for layers: one per layer)
LAYER_INDEX_ATTRS = ("layer_idx", "layer_id")  # a module's own layer number (the KV cache's index)
aten = torch.ops.aten


def write_back(model: nn.Module, analysis: Analysis, plan: Plan, weights: GraphModule | None = None, *,
               check: bool = True, tolerance: float | None = None, share_weights: bool = False) -> dict:
    """Prune ``model`` in place to the plan: sliced parameters plus the attribute patches each family
    needs (``num_key_value_groups``, GPT-2 ``split_size``, Linear/Conv1D/norm sizes, RMSNorm rescale
    over a pruned hidden width), so it stays a Hugging Face model (``generate``, ``save_pretrained``).
    Removed blocks are deleted from their ModuleList and the layers renumbered (:func:`remove_layers`).

    Where every layer of the pruned model has the sizes one config can spell (a plan searched with
    ``SearchOptions(uniform=True)``, or one that removes blocks only), ``model.config`` is given them
    (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ...) and
    ``structure["standard"]`` is True: the model :func:`save_pruned` writes then loads with plain
    ``from_pretrained``. It is True only when a model built from that config has the pruned model's parameter
    shapes and, with ``check``, its outputs on the example inputs (without ``check`` a pruned hidden width is
    not called standard: the outputs are what shows whether the family reads its width from the config at run
    time).

    Args:
        model: The Hugging Face model ``analysis`` was made from; changed in place.
        analysis: The analysis the plan was searched on.
        plan: The units each pruned group keeps.
        weights: The pruned graph module to take parameter values from (``result.model``, e.g. after
            compensation) instead of the slices of ``model``'s own.
        check: With every pruned group exact, compare the written-back model with ``weights`` (or else the
            masked reference) on the captured example inputs.
        tolerance: The largest relative max difference the check accepts (default
            :func:`fxgradnas.rewrite.default_tolerance` of the model's dtype).
        share_weights: The model takes ``weights``' own parameters instead of copies (no memory, but training
            one then trains the other).

    Returns:
        The structure (parameter shapes, module attributes, ``"standard"``) that :func:`load_pruned` re-applies;
        it is also recorded in ``model.config.fxgradnas``.

    Raises:
        ArgumentTypeError: ``analysis`` or ``plan`` has the wrong type.
        PlanError: The plan does not fit the analysis.
        ArgumentError: ``check`` needs the weights and the model has tensors on the meta device.
        RewriteError: The plan's layers cannot be removed from this model, or the written-back model's outputs
            differ from the reference by more than ``tolerance``.
    """
    check_analysis(analysis, "write_back")
    check_plan(plan)
    if check:
        check_weights(model, "write_back's check (it runs the model; check=False writes the structure only)")
    resolved = resolve_plan(analysis, plan, model)
    moves = layer_moves(model, resolved)  # before the model changes: raises where layers cannot go
    checked = check and all(g.exact for g in resolved.groups)
    reference = masked(analysis, plan, read_only=True) if weights is None else weights
    expected = outputs_on_example(reference, analysis) if checked else None  # before the model changes
    with torch.no_grad():
        taken = _take_parameters(weights, model, resolved, share_weights) if weights is not None else set()
        slice_tensors(model, resolved, skip=taken)
        owners = _parameter_owners(model)
        norms = {}
        for rescale in _norm_rescales(model, analysis, resolved.groups, resolved.kept):
            weight = getattr(model.get_submodule(rescale.path), "weight", None)
            if isinstance(weight, torch.Tensor) and not (weights is not None and rescale.kind == "rms_norm"):
                _replace(owners, weight, rescale.weight(weight))  # from the graph: already scaled there
            norms[rescale.path] = {rescale.eps_attr: rescale.eps / rescale.ratio}
        attributes = {**_attribute_patches(model, resolved.groups, resolved.kept),
                      **_weightless_norms(model, analysis, resolved.groups, resolved.kept), **norms}
    _set_attributes(model, attributes)
    remove_layers(model, moves)
    structure = {
        "plan": json.loads(plan.to_json()),
        "shapes": {n: list(t.shape) for n, t in model.state_dict().items()},
        "attributes": {_moved(path, moves): values for path, values in attributes.items()
                       if _moved(path, moves) is not None},
    }
    values = _standard_values(model.config, resolved.groups, resolved.kept, norms)
    structure["standard"] = values is not None and _is_standard(model, analysis, values, run=check)
    if structure["standard"]:
        for attr, value in values.items():
            setattr(model.config, attr, value)
    model.config.fxgradnas = {"plan": structure["plan"]["keep"], "kept": {k: list(v) for k, v in resolved.kept.items()}}
    if expected is not None:
        with cache_off(model, analysis.captured.kwargs):  # outputs_on_example runs it in eval mode
            difference = output_difference(expected, outputs_on_example(model, analysis))
        if difference > (tolerance if tolerance is not None else default_tolerance(model)):
            raise RewriteError(
                f"the written-back {type(model).__name__} differs from the pruned module by {difference:.3g} "
                "(relative max) on the example inputs; this is a bug in fxgradnas, please report it with the model"
            )
    return structure


def remove_layers(model: nn.Module, moves: dict[str, str | None]) -> None:
    """Delete the layers that ``moves`` (:func:`layer_moves`) deletes from their ModuleList and renumber what
    transformers reads: the layer count, the config's lists with one entry per layer (``layer_types``, ...)
    and of layer indices (``mlp_only_layers``), each module's ``layer_idx`` (the KV cache's index; GPT-Neo's
    ``layer_id``)."""
    config = model.config
    for parent in dict.fromkeys(path.rpartition(".")[0] for path in moves):
        layers = model.get_submodule(parent)
        kept = [i for i in range(len(layers)) if moves.get(f"{parent}.{i}", "") is not None]
        for new, old in enumerate(kept):
            for module in layers[old].modules():
                for attr in LAYER_INDEX_ATTRS:
                    if getattr(module, attr, None) == old:
                        setattr(module, attr, new)
        for key, value in list(vars(config).items()):
            if key in LAYER_INDEX_LISTS and isinstance(value, (list, tuple)):
                setattr(config, key, [kept.index(i) for i in value if i in kept])
            elif ("layer" in key or key.endswith("_types")) and isinstance(value, (list, tuple)) \
                    and len(value) == len(layers):
                setattr(config, key, [value[i] for i in kept])
        if isinstance(getattr(config, "attention_types", None), list) and hasattr(config, "attention_layers"):
            config.attention_types = [[[kind], 1] for kind in config.attention_layers]  # GPT-Neo's, expanded on load
        config.num_hidden_layers = len(kept)
        holder, _, name = parent.rpartition(".")
        setattr(model.get_submodule(holder), name, nn.ModuleList(layers[i] for i in kept))


def layer_moves(model: nn.Module, resolved: ResolvedPlan) -> dict[str, str | None]:
    """Where each layer of the ModuleLists holding the blocks ``resolved`` removes goes once those are deleted:
    old path -> new path, None for a deleted one (layers that keep their place are left out); RewriteError
    where they cannot be deleted."""
    paths = removed_blocks(resolved.groups, resolved.grids)
    staying = [(b.path, b.stays) for g in resolved.groups for b in g.blocks if b.path in paths and b.stays]
    if staying:
        raise RewriteError(f"cannot delete {staying[0][0]}: {', '.join(staying[0][1])} on its residual stream would go "
                           "with it (use the pruned graph module)")
    moves: dict[str, str | None] = {}
    layout = {k: getattr(model.config, k) for k in INDEX_LAYOUT_ATTRS if getattr(model.config, k, None) not in (None, 0, 1, [])}
    if paths and layout:
        raise RewriteError(f"cannot delete layers of a {type(model).__name__} whose config derives layers from their "
                           f"index or counts several stacks ({', '.join(f'{k}={v}' for k, v in layout.items())}): "
                           "renumbered, the kept layers would be rebuilt differently (use the pruned graph module)")
    for parent in dict.fromkeys(path.rpartition(".")[0] for path in paths):
        layers = model.get_submodule(parent)
        count = getattr(model.config, "num_hidden_layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) != count:
            raise RewriteError(f"cannot delete layers of {parent} ({type(layers).__name__} of {len(layers)}): "
                               f"write_back deletes blocks from the ModuleList of config.num_hidden_layers ({count})")
        new = 0
        for i in range(len(layers)):
            path = f"{parent}.{i}"
            if path in paths or new != i:
                moves[path] = None if path in paths else f"{parent}.{new}"
            new += path not in paths
    return moves


def _moved(name: str, moves: dict[str, str | None]) -> str | None:
    """A module path or tensor name after the layers moved (see :func:`layer_moves`); None under a deleted one."""
    for old, new in moves.items():
        if name == old or name.startswith(old + "."):
            return None if new is None else new + name[len(old):]
    return name


def _take_parameters(source: nn.Module, model: nn.Module, resolved: ResolvedPlan, share: bool) -> set[str]:
    """Give every parameter of ``model`` the value of the same-named parameter of ``source``, whose shape must
    be the one the resolved plan slices it to (new tensors, or with ``share`` ``source``'s own parameters; tied
    names stay tied); returns the names given."""
    sliced = {n: axes for names, axes in kept_masks(resolved.groups, resolved.grids).items() for n in names}
    owners = _parameter_owners(model)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    taken = set()
    for name, value in source.named_parameters():
        owner = tensor_owner(model, name)
        if owner is None:
            raise RewriteError(f"{name!r} of the pruned module has no counterpart in {type(model).__name__}")
        target = getattr(*owner)
        axes = sliced.get(name, {})
        shape = tuple(int(axes[a].sum()) if a in axes else n for a, n in enumerate(target.shape))
        if tuple(value.shape) != shape:
            raise RewriteError(f"{name!r}: the pruned module has shape {tuple(value.shape)}, the written-back "
                               f"model {shape}; was the module made from another plan?")
        taken.update(names[id(target)])
        if share and value.dtype == target.dtype:
            for module, attr in owners.get(id(target), []):
                module._parameters[attr] = value
        else:
            _replace(owners, target, value.detach().to(target.dtype), copy=not share)
    return taken


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) holding each parameter of ``model``, by the parameter's id."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((module, attr))
    return owners


def _replace(owners: dict[int, list[tuple[nn.Module, str]]], old: torch.Tensor, value: torch.Tensor,
             copy: bool = True) -> None:
    """Put a new parameter holding ``value`` (a copy of it with ``copy``) wherever the parameter ``old`` is
    held (``owners``: see :func:`_parameter_owners`)."""
    new = nn.Parameter(value.clone() if copy else value, requires_grad=old.requires_grad)
    for module, attr in owners.get(id(old), []):
        module._parameters[attr] = new


def _attribute_patches(model: nn.Module, groups: list[Group], kept: dict[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """Module attributes that describe sizes, recomputed from the sliced parameters."""
    patches: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules():
        experts = _expert_sizes(module)
        if experts:
            patches[path] = experts
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
        elif weight.dim() == 2 and isinstance(getattr(module, "hidden_dim", None), int):  # a mixture-of-experts router
            sizes = {"num_experts": weight.shape[0], "hidden_dim": weight.shape[1]}
            sizes = {k: v for k, v in sizes.items() if isinstance(getattr(module, k, None), int)}
        changed = {k: v for k, v in sizes.items() if getattr(module, k) != v}
        if changed:
            patches[path] = changed
    for g in groups:
        if g.kind == "heads":
            for path in dict.fromkeys([g.name, *_head_count_holders(model, g)]):
                patches.setdefault(path, {}).update(_head_patches(model.get_submodule(path), g, kept[g.name]))
    return patches


def _weightless_norms(model: nn.Module, analysis: Analysis, groups: list[Group],
                      kept: dict[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """``normalized_shape`` of the norm modules with no weight to read the size from (OLMo's LayerNorm), from
    the ``layer_norm`` nodes whose shape constant is a pruned group's."""
    nodes = {n.name: n for n in analysis.captured.module.graph.nodes}
    patches: dict[str, dict[str, Any]] = {}
    for g in groups:
        for constant in g.shape_constants:
            node = nodes.get(constant.node)
            if node is None or getattr(node.target, "overloadpacket", None) is not aten.layer_norm:
                continue
            path = _innermost_module(node)
            module = model.get_submodule(path) if path else None
            if module is not None and getattr(module, "weight", None) is None and \
                    tuple(getattr(module, "normalized_shape", ())) == (g.size,):
                patches[path] = {"normalized_shape": (math.prod(kept[g.name]),)}
    return patches


def _expert_sizes(module: nn.Module) -> dict[str, int]:
    """The changed sizes of a Hugging Face experts module (stacked 3-D ``down_proj`` with ``gate_up_proj``
    or ``up_proj``): ``num_experts``, ``hidden_dim``, ``intermediate_dim``, read from ``down_proj``, which is
    (experts, hidden, intermediate), or (experts, intermediate, hidden) when ``is_transposed``."""
    down = module._parameters.get("down_proj")
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        return {}
    experts, out, inner = down.shape
    hidden, intermediate = (inner, out) if getattr(module, "is_transposed", False) else (out, inner)
    sizes = {"num_experts": experts, "hidden_dim": hidden, "intermediate_dim": intermediate}
    return {k: v for k, v in sizes.items() if isinstance(getattr(module, k, None), int) and getattr(module, k) != v}


@dataclass(frozen=True)
class _NormRescale:
    """An RMSNorm over a pruned hidden width (see :func:`_norm_rescales`)."""

    path: str
    kind: str  # "mean of squares" or "rms_norm" (the graph's reduction)
    eps_attr: str
    eps: float
    ratio: float  # kept / all hidden channels
    offset: float

    def weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The norm weight (sliced or not) that makes the model equal the masked one."""
        return (weight + self.offset) / self.ratio**0.5 - self.offset


def _norm_rescales(model: nn.Module, analysis: Analysis, groups: list[Group],
                   kept: dict[str, tuple[int, ...]]) -> list[_NormRescale]:
    """With C' of C hidden channels kept, every RMSNorm over them gets its multiplier ``w + offset`` (the
    offset is 1 in Gemma's ``(1 + w)``) scaled by sqrt(C/C') and eps by C/C', so the model equals the
    masked one. The rewrite of the graph scales the mean of squares instead, or, for an ``aten.rms_norm``
    node, the weight itself (so weights taken from the graph are already scaled there)."""
    nodes = {n.name: n for n in analysis.captured.module.graph.nodes}
    rescales: dict[str, _NormRescale] = {}
    for g in groups:
        if g.kind != "hidden" or not g.exact:
            continue
        ratio = kept[g.name][0] / g.size
        for name, kind in dict.fromkeys(g.reductions):
            if kind not in ("mean of squares", "rms_norm"):
                continue
            path = _innermost_module(nodes[name])
            module = model.get_submodule(path) if path is not None else None
            eps_attr = next((a for a in ("variance_epsilon", "eps") if isinstance(getattr(module, a, None), float)), None)
            if module is None or eps_attr is None or path in rescales:
                continue
            offset = _weight_offset(analysis, tensor_name=f"{path}.weight")
            rescales[path] = _NormRescale(path, kind, eps_attr, getattr(module, eps_attr), ratio, offset)
    return list(rescales.values())


def _innermost_module(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def _weight_offset(analysis: Analysis, tensor_name: str) -> float:
    """The constant the graph adds to a norm weight before multiplying (1.0 for ``x * (1 + w)``), else 0."""
    gm = analysis.captured.module
    node = next((n for n in gm.graph.find_nodes(op="get_attr") if n.target == tensor_name), None)
    while node is not None:
        users = [u for u in node.users if isinstance(u.meta.get("val"), torch.Tensor)]  # not the shape asserts
        if len(users) != 1:
            break
        user = users[0]
        if user.target in (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout):
            node = user
            continue
        if user.target is aten.add.Tensor:
            other = [a for a in user.args if a is not node]
            if len(other) == 1 and isinstance(other[0], (int, float)):
                return float(other[0])
        break
    return 0.0


def _head_count_holders(model: nn.Module, group: Group) -> list[str]:
    """The modules that hold the head count of a heads group's attentions: for each module owning one of its
    parameters, the nearest one up the path with a head count attribute equal to the group's heads (DeBERTa's
    ``attention.self``, each layer's ``EncDecAttention`` of a group that T5's shared zero bias spans)."""
    found = []
    for owner in dict.fromkeys(name.rpartition(".")[0] for t in group.params for name in t.names):
        path = owner
        for _ in range(3):  # the projection's module, its attention, the attention's wrapper; never the model
            if not path:
                break
            if any(getattr(model.get_submodule(path), a, None) == group.size for a in HEAD_COUNT_ATTRS):
                found.append(path)
                break
            path = path.rpartition(".")[0]
    return found


def _head_patches(attention: nn.Module, group: Group, kept: tuple[int, ...]) -> dict[str, Any]:
    n_kv = kept[0] if len(kept) == 2 else (1 if group.shared_kv else kept[0])
    heads = kept[0] * kept[1] if len(kept) == 2 else kept[0]
    patch: dict[str, Any] = {}
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            patch[attr] = heads
    for attr in KV_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            patch[attr] = n_kv
    config = getattr(attention, "config", None)
    for attr in HEAD_COUNT_ATTRS:  # Phi-3 reads its head count from the config (shared by every layer)
        if isinstance(getattr(config, attr, None), int) and getattr(config, attr) != heads:
            patch[f"config.{attr}"] = heads
    if isinstance(getattr(attention, "num_key_value_groups", None), int):
        patch["num_key_value_groups"] = heads // n_kv
    for attr in HEAD_WIDTH_ATTRS:
        if getattr(attention, attr, None) == group.size * group.unit_width:
            patch[attr] = heads * group.unit_width
    shards = getattr(attention, "mp_num", None)  # CodeGen: the fused projection viewed as (shards, q v k)
    if isinstance(shards, int) and group.unit_shape[0] == shards:
        patch["mp_num"] = kept[0]
    return patch


def _standard_values(config: Any, groups: list[Group], kept: dict[str, tuple[int, ...]],
                     norms: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """The config entries that spell the pruned sizes, or None where two layers need two values of one
    entry (or a pruned hidden width with a norm whose eps the config cannot spell)."""
    values: dict[str, Any] = {}

    def put(attr: str, value: Any) -> bool:
        return values.setdefault(attr, value) == value

    fits = True
    for g in groups:
        count = math.prod(kept[g.name])
        if g.kind == "heads":
            kv_before = 1 if g.shared_kv else g.unit_shape[0]
            kv_after = 1 if g.shared_kv else kept[g.name][0]
            fits &= all(put(a, count) for a in HEAD_COUNT_ATTRS if getattr(config, a, None) == g.size)
            fits &= all(put(a, kv_after) for a in KV_COUNT_ATTRS if getattr(config, a, None) == kv_before)
            fits &= put("head_dim", g.unit_width)
        elif g.kind == "channels":
            fits &= all(put(a, count) for a in MLP_WIDTH_ATTRS if getattr(config, a, None) == g.size)
            if getattr(config, "n_inner", 0) is None and g.size == 4 * config.hidden_size:  # GPT-2's default
                fits &= put("n_inner", count)
        elif g.kind == "experts":
            fits &= all(put(a, count) for a in EXPERT_COUNT_ATTRS if getattr(config, a, None) == g.size)
        elif g.kind == "hidden":
            fits &= put("hidden_size", count)
            heads = getattr(config, "num_attention_heads", None)
            if getattr(config, "head_dim", None) is None and isinstance(heads, int):
                values.setdefault("head_dim", config.hidden_size // heads)
    new_eps = {v for patch in norms.values() for v in patch.values()}
    old_eps = [a for a in EPS_ATTRS if isinstance(getattr(config, a, None), float)]
    if new_eps:
        fits &= len(new_eps) == 1 and len(old_eps) == 1
        if fits:
            values[old_eps[0]] = new_eps.pop()
    return values if fits else None


def _is_standard(model: nn.Module, analysis: Analysis, values: dict[str, Any], run: bool) -> bool:
    """Whether ``type(model)`` built from its config with ``values`` is ``model``: the same parameter names and
    shapes (its parameters built on the meta device) and, with ``run``, given ``model``'s tensors, the same
    outputs on the example inputs."""
    config = copy.deepcopy(model.config)
    try:
        for attr, value in values.items():
            setattr(config, attr, value)
    except AttributeError:  # an entry the config derives (Falcon's head_dim property): not for a config to spell
        return False
    from accelerate import init_empty_weights

    cls = type(model)
    try:  # parameters on the meta device; the buffers the model computes from its config are its own
        with init_empty_weights(include_buffers=False):
            fresh = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    except Exception:  # a config this family rejects (e.g. a head count the hidden width must divide)
        return False
    state = model.state_dict()
    if {n: t.shape for n, t in fresh.state_dict().items()} != {n: t.shape for n, t in state.items()}:
        return False
    if not run:
        return "hidden_size" not in values
    fresh.load_state_dict(state, assign=True)
    if any(t.is_meta for t in itertools.chain(fresh.parameters(), fresh.buffers())):
        return False
    fresh.to(device_of(model)).eval()  # the buffers it computed itself are on the CPU
    try:
        with cache_off(model, analysis.captured.kwargs), cache_off(fresh, analysis.captured.kwargs):
            difference = output_difference(outputs_on_example(model, analysis), outputs_on_example(fresh, analysis))
    except Exception:  # the family's model of that config does not run on these inputs: not the pruned model
        return False
    return difference <= default_tolerance(model)


def _set_attributes(model: nn.Module, attributes: dict[str, dict[str, Any]]) -> None:
    """Set each module's attributes; ``config.name`` sets ``name`` on a copy of the module's config that
    the module alone holds from then on (the pruned layers differ in their sizes)."""
    for path, values in attributes.items():
        module = model.get_submodule(path)
        if any(attr.startswith("config.") for attr in values):
            module.config = copy.copy(module.config)
        for attr, value in values.items():
            owner, _, name = attr.rpartition(".")
            setattr(module.config if owner else module, name, tuple(value) if name == "normalized_shape" else value)


def save_pruned(model: nn.Module, structure: dict, directory: str | Path) -> None:
    """``save_pretrained`` plus the structure :func:`load_pruned` needs (JSON, no pickled code). A standard
    structure (``structure["standard"]``, see :func:`write_back`) is saved as the family saves it, under the
    checkpoint's own tensor names: plain ``from_pretrained`` loads it.

    Args:
        model: The pruned Hugging Face model (:func:`write_back`'s).
        structure: What :func:`write_back` returned.
        directory: The directory to save to.
    """
    directory = Path(directory)
    # otherwise the model's own parameter names: transformers would rename some back to a legacy checkpoint
    # format (GPT-NeoX's embed_out, ViT's vit.encoder.layer, per-expert keys) that only its loader maps
    model.save_pretrained(directory, save_original_format=bool(structure.get("standard")))
    (directory / STRUCTURE_FILE).write_text(json.dumps(structure, default=list))


def load_pruned(directory: str | Path, model_class: Any = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`: the architecture from its config, shrunk to the
    saved shapes and attributes, then the saved weights (a standard one: ``from_pretrained``).

    Args:
        directory: What :func:`save_pruned` or :func:`prune_checkpoint` wrote.
        model_class: The transformers class to build (default: ``AutoModelForCausalLM``).

    Returns:
        The pruned model, in eval mode.

    Raises:
        RewriteError: The saved weights do not fit the rebuilt model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    structure = json.loads((directory / STRUCTURE_FILE).read_text())
    cls = model_class or AutoModelForCausalLM
    if structure.get("standard"):
        return cls.from_pretrained(directory).eval()
    config = AutoConfig.from_pretrained(directory)
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
    state = read_state(directory)
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(t) for n, t in model.state_dict(keep_vars=True).items() if n in state}
    missing = [m for m in missing if id(model.state_dict(keep_vars=True)[m]) not in loaded]
    if missing or unexpected:
        raise RewriteError(f"saved weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


# --- a plan applied to a checkpoint on disk, one tensor at a time -------------------------------------
def prune_checkpoint(source: str | Path, analysis: Analysis, plan: Plan, target: str | Path,
                     model_class: Any = None) -> dict:
    """Apply ``plan`` to the safetensors checkpoint in directory ``source`` (sharded or not) and save the
    pruned model to ``target`` as :func:`save_pruned` would save :func:`write_back`'s result (same
    weights, shard files and index, the config, the structure :func:`load_pruned` re-applies; other files,
    e.g. the tokenizer's, are copied). Tensors are read, sliced and written in blocks of rows, so memory
    stays about one block plus the mapped pages of the tensor being read, whatever the model's size.

    ``analysis`` may be of the model built on the meta device from the checkpoint's config (no weights
    are needed, nor loaded): its parameter names and shapes must be the checkpoint's. The model class
    to rebuild is the analysed model's (``model_class`` overrides it).

    Args:
        source: The checkpoint directory (config.json and safetensors).
        analysis: The analysis of the model of this checkpoint (its meta-device model will do).
        plan: The units each group keeps.
        target: The directory to write the pruned checkpoint to (not ``source``).
        model_class: The class to rebuild the model with (default: the analysed model's).

    Returns:
        The structure, as :func:`write_back` returns it.

    Raises:
        ArgumentTypeError: ``analysis`` is not an Analysis, or ``plan`` not a Plan.
        ArgumentError: ``source`` has no config.json, ``target`` is ``source``, or the checkpoint's tensors
            or the analysis are of another model.
        PlanError: The plan does not fit the model.
    """
    from transformers import AutoConfig

    check_analysis(analysis, "prune_checkpoint")
    check_plan(plan)
    source, target = Path(source), Path(target)
    if not (source / "config.json").is_file():
        raise ArgumentError(f"source must be a Hugging Face checkpoint directory with a config.json; {source} has none")
    if target.resolve() == source.resolve():
        raise ArgumentError(f"target must be another directory than source ({source}): the source is read while "
                            "the target is written")
    shards = checkpoint_files(source)
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        cls = model_class or type(analysis.captured.model)
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    headers = read_headers(source, shards)
    for shard, (_, tensors) in headers.items():
        for name, (_, shape) in tensors.items():
            if expected.get(name, shape) != shape or name not in expected:
                raise ArgumentError(
                    f"{shard} holds {name!r} of shape {shape}, but {cls.__name__} built from {source}/config.json "
                    f"has {f'shape {expected[name]}' if name in expected else 'no such tensor'}; was the checkpoint "
                    "saved from another model, or already pruned?")
    if fingerprint(model) != analysis.captured.fingerprint:
        raise ArgumentError(f"the analysis is of another model than {cls.__name__} built from {source}/config.json "
                            "(parameter names or shapes differ); analyse the model of this config")
    resolved = resolve_plan(analysis, plan, model)
    rescales = {f"{r.path}.weight": r for r in _norm_rescales(model, analysis, resolved.groups, resolved.kept)}
    moves = layer_moves(model, resolved)
    structure = write_back(model, analysis, plan, check=False)
    keep = {name: axes for names, axes in kept_masks(resolved.groups, resolved.grids).items() for name in names}
    target.mkdir(parents=True, exist_ok=True)
    total = 0
    for shard, (metadata, tensors) in headers.items():
        kept = {name: tensors[name] for name in tensors if _moved(name, moves) is not None}  # not of deleted layers
        total += _write_shard(source / shard, target / shard, metadata, kept, keep, rescales, moves)
    if (source / INDEX_FILE).is_file():
        index = json.loads((source / INDEX_FILE).read_text())
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        index["weight_map"] = {_moved(name, moves): shard for name, shard in index.get("weight_map", {}).items()
                               if _moved(name, moves) is not None}
        (target / INDEX_FILE).write_text(json.dumps(index, indent=2))
    for file in source.iterdir():
        if file.is_file() and file.name not in {"config.json", INDEX_FILE, STRUCTURE_FILE, *shards}:
            shutil.copy2(file, target / file.name)
    model.config.save_pretrained(target)
    (target / STRUCTURE_FILE).write_text(json.dumps(structure, default=list))
    return structure


def _write_shard(source: Path, target: Path, metadata: dict | None, tensors: dict[str, tuple[str, tuple]],
                 keep: dict[str, dict[int, torch.Tensor]], rescales: dict[str, _NormRescale],
                 moves: dict[str, str | None]) -> int:
    """Write ``source``'s tensors, sliced and named as the layers moved (:func:`layer_moves`), as the safetensors
    file ``target``, one block of rows at a time (the header first: every output shape is known); returns the
    bytes of tensor data written."""
    shapes = {name: [int(keep[name][a].sum()) if a in keep.get(name, {}) else n for a, n in enumerate(shape)]
              for name, (_, shape) in tensors.items()}

    def sliced(name: str, start: int, stop: int, block: torch.Tensor) -> torch.Tensor:
        for axis, mask in keep.get(name, {}).items():
            chosen = mask[start:stop] if axis == 0 else mask
            block = block.index_select(axis, chosen.nonzero().flatten())
        return rescales[name].weight(block) if name in rescales else block

    return write_in_blocks(source, target, metadata, {name: (_moved(name, moves), dtype, shape, shapes[name])
                                                      for name, (dtype, shape) in tensors.items()}, sliced)
