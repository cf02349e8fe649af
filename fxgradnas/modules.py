"""Helpers on modules: a model's fingerprint, the check that its weights have values, the context managers
that set its mode or bind ``use_cache=False``, the device it lives on, and copies of graph modules."""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import warnings
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.fx import GraphModule

from .errors import ArgumentError


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's parameter and buffer names and shapes (what a plan must match)."""
    items = [f"{n}:{tuple(t.shape)}" for n, t in model.state_dict(keep_vars=True).items()]
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]


def check_weights(model: nn.Module, needs: str, parameters: bool = True) -> None:
    """Raise ArgumentError when ``model`` holds parameters (``parameters``) or buffers on the meta device
    (shapes without values); ``needs`` names the step that reads the values ("calibration", ...)."""
    if not parameters and any(t.is_meta for t in model.buffers()):
        raise ArgumentError(
            f"{type(model).__name__} has buffers on the meta device: {needs} loads the parameters but cannot "
            "compute buffers (rotary frequencies, ...); build the model with its parameters alone on meta "
            "(accelerate.init_empty_weights(include_buffers=False))")
    if parameters and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise ArgumentError(
            f"{type(model).__name__} has tensors on the meta device (shapes without values): {needs} needs its "
            "weights; load them first (from_pretrained, or to_empty(device=...) and load_state_dict()). Without "
            "weights, analyze(), search() with scores from elsewhere or scorer='random', and "
            "fxgradnas.hf.prune_checkpoint() (the plan applied to a checkpoint on disk) work"
        )


@contextmanager
def module_mode(model: torch.nn.Module, training: bool):
    """Put the model in train (or eval) mode for the duration, restoring every submodule's flag after."""
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def eval_mode(model: torch.nn.Module):
    """:func:`module_mode` in eval mode."""
    return module_mode(model, False)


@contextmanager
def cache_off(model: torch.nn.Module, kwargs: dict[str, Any]):
    """Decoders with a KV cache return it as an output: capture them with ``use_cache=False`` bound
    into ``forward``, so the captured module takes the same inputs as the model."""
    try:
        accepts = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    if not accepts or "use_cache" in kwargs:
        yield
        return
    model.forward = functools.partial(model.forward, use_cache=False)
    try:
        yield
    finally:
        del model.forward


def device_of(module: nn.Module) -> torch.device:
    """Where a module's parameters (or buffers) live, the meta device last (a model whose parameters are on
    meta and buffers on the CPU runs on the CPU once its weights are loaded); the CPU for a module with
    neither."""
    tensors = [*module.parameters(), *module.buffers()]
    tensor = next((t for t in tensors if not t.is_meta), tensors[0] if tensors else None)
    return tensor.device if tensor is not None else torch.device("cpu")


def quiet_deepcopy(value: Any, memo: dict[int, object] | None = None) -> Any:
    """``copy.deepcopy`` without the FutureWarning that copying torch's own pytree specs raises (about their
    deprecated LeafSpec)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(value, memo)


def copy_graph_module(gm: GraphModule, tensors: Literal["copy", "share", "view"]) -> GraphModule:
    """A copy of ``gm`` with its own graph. ``tensors``: "copy" copies parameters and buffers; "share"
    keeps the very tensors of ``gm``; "view" gives it read-only aliases of them (the same memory, new
    parameter objects that require no grad, so nothing done with the copy reaches ``gm``'s parameters'
    flags or ``.grad``; buffers are shared). Tied tensors stay tied."""
    memo: dict[int, object] = {}
    if tensors != "copy":
        for t in gm.buffers():
            memo[id(t)] = t
        for p in gm.parameters():
            memo[id(p)] = p if tensors == "share" else nn.Parameter(p.detach(), requires_grad=False)
    return quiet_deepcopy(gm, memo)
