"""Capture a model as an ATen-level fx graph with torch.export (non-strict, dynamic batch/sequence)."""

from __future__ import annotations

import functools
import hashlib
import inspect
import operator
import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import CaptureError

ExampleInputs = torch.Tensor | tuple | list | dict


@dataclass
class Captured:
    """A captured model: the runnable graph module plus what is needed to read it."""

    module: torch.fx.GraphModule
    model: torch.nn.Module
    args: tuple
    kwargs: dict[str, Any]
    names: dict[int, list[str]] = field(default_factory=dict)
    fingerprint: str = ""
    dynamic_dims: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def names_of(self, tensor: torch.Tensor) -> list[str]:
        """All names (tied ones included) under which the model holds this tensor."""
        return self.names.get(id(tensor), [])


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's parameter and buffer names and shapes (what a plan must match)."""
    items = [f"{n}:{tuple(t.shape)}" for n, t in model.state_dict(keep_vars=True).items()]
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]


def split_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict[str, Any]]:
    """Normalise example inputs given as a tensor, a tuple/list of args, or a dict of kwargs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(
        f"example_inputs must be a tensor, a tuple of positional args or a dict of keyword args, "
        f"not {type(example_inputs).__name__}"
    )


def _auto_dims(tensor: torch.Tensor) -> dict[int, Any] | None:
    """Dim 0 is the batch; dim 1 is the sequence for rank-2 and rank-3 inputs. Dim.AUTO lets
    export keep a dim static where the model requires it instead of failing."""
    if tensor.dim() == 0:
        return None
    dims = {0: Dim.AUTO}
    if tensor.dim() in (2, 3):
        dims[1] = Dim.AUTO
    return dims


def default_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """A torch.export ``dynamic_shapes`` spec with :func:`_auto_dims` for every tensor input."""

    def spec(x: Any) -> Any:
        return _auto_dims(x) if isinstance(x, torch.Tensor) else None

    if not kwargs:
        return tuple(pytree.tree_map(spec, a) for a in args)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


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


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Put the model in eval mode for the duration, restoring every submodule's flag after."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def _user_frame(message: str) -> str:
    match = re.search(r"The following call raised this error:\s*\n(.*?)(?:\n\n|$)", message, re.S)
    if match:
        return " ".join(line.strip() for line in match.group(1).splitlines() if line.strip())
    return ""


def _capture_error(model: torch.nn.Module, exc: Exception) -> CaptureError:
    message = str(exc)
    first = next((line for line in message.splitlines() if line.strip()), type(exc).__name__)
    where = _user_frame(message)
    if "data-dependent" in message or "GuardOnDataDependent" in type(exc).__name__:
        hint = (
            "the model branches on tensor values; compute that decision outside forward(), or use "
            "torch.cond / torch._check so torch.export can trace it"
        )
    elif "Constraints violated" in message or "specialized" in message:
        hint = "pass dynamic_shapes=None (static shapes) or give dynamic_shapes for the inputs yourself"
    else:
        hint = (
            "check that forward() runs on the example inputs and avoids Python-side effects on tensor "
            "values; see the torch.export documentation on non-strict export"
        )
    where_text = f" at {where}" if where else ""
    return CaptureError(
        f"cannot capture {type(model).__name__} with torch.export (non-strict): {first}{where_text}. "
        f"Try: {hint}."
    )


_INT64_MAX = 2**63 - 1  # export's "to the end" for a slice


def drop_whole_slices(gm: torch.fx.GraphModule) -> int:
    """Remove ``slice`` nodes that keep a whole axis (start 0, step 1, end past the size); returns how
    many. Export writes one for every ``x[:, ...]``; each would cost a zero-filled full-size gradient
    in backward and would otherwise count as slicing the axis."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.slice.Tensor:
            continue
        source, dim, start, end, step = (*node.args, *[None] * (5 - len(node.args)))[:5]
        dim = 0 if dim is None else dim
        val = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or start not in (None, 0) or step not in (None, 1):
            continue
        size = val.shape[dim]
        if end is None or (isinstance(end, int) and end >= _INT64_MAX) or (
            isinstance(end, int) and isinstance(size, int) and end >= size
        ):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            dropped += 1
    if dropped:
        gm.recompile()
    return dropped


def mutated_argument(target: Any) -> int | None:
    """Index of the argument an op writes into (``relu_``, ``add_``, ``copy_``, ``out=``), else None."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return i
    return None


def _returns_alias(target: Any) -> bool:
    """Whether an op's result may share memory with an argument (a view, or an in-place op's self)."""
    schema = getattr(target, "_schema", None)
    return schema is None or any(r.alias_info is not None for r in schema.returns)


def _out_of_place(target: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.relu.default`` for ``aten.relu_.default``, ``aten.__and__.Tensor`` for ``__iand__``:
    the same op and overload without the write, when torch has it with the same arguments."""
    name = target.overloadpacket.__name__
    if name.startswith("__i"):
        name = "__" + name[3:]
    elif name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    else:
        return None
    packet = getattr(torch.ops.aten, name, None)
    functional = getattr(packet, target._overloadname, None) if packet is not None else None
    if functional is None or mutated_argument(functional) is not None:
        return None
    return functional if _signature(functional) == _signature(target) else None


def _signature(op: torch._ops.OpOverload) -> list[tuple[str, bool]]:
    """Argument types and keyword-only flags (names differ: ``dropout_(self)`` vs ``dropout(input)``)."""
    return [(str(a.type), a.kwarg_only) for a in op._schema.arguments]


def _owned(node: Any) -> bool:
    """Whether only ``node`` and its own users can reach its value: a fresh tensor (made by an op that
    returns no alias: not a view, an input, a parameter or a buffer), or a view of an owned tensor that
    no other node reads (``flatten`` before an in-place dropout)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target is operator.getitem:
        producer = node.args[0]
        return isinstance(producer, torch.fx.Node) and producer.op == "call_function" and not _returns_alias(producer.target)
    if not _returns_alias(node.target):
        return True
    base = node.args[0] if node.args else None
    return mutated_argument(node.target) is None and isinstance(base, torch.fx.Node) and len(base.users) == 1 and _owned(base)


def functionalize(gm: torch.fx.GraphModule) -> int:
    """Replace in-place ops (``relu_``, ``add_``, ``hardswish_``, ``dropout_``, ...) by their
    out-of-place forms where nothing else can see the write, and let the nodes after one read its
    result instead of the tensor it wrote into; returns how many. That holds when the written tensor is
    owned (see :func:`_owned`) and no view of it is taken before the write. Any other write stays, and
    the analysis freezes what it touches. The module computes the same values with plain data flow."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if mutated_argument(node.target) != 0 or (functional := _out_of_place(node.target)) is None:
            continue
        written = node.args[0]
        if not _owned(written):
            continue
        earlier = [u for u in written.users if u is not node and order[u] < order[node]]
        if any(u.op != "call_function" or _returns_alias(u.target) for u in earlier):
            continue
        node.target = functional
        for user in [u for u in written.users if order[u] > order[node]]:
            user.replace_input_with(written, node)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced


def capture(
    model: torch.nn.Module,
    example_inputs: ExampleInputs,
    *,
    dynamic_shapes: Any = "auto",
) -> Captured:
    """Export ``model`` on ``example_inputs`` to a runnable ATen graph module.

    ``dynamic_shapes="auto"`` makes the batch dim of every tensor input dynamic, and dim 1 of
    rank-2/3 inputs (sequence); pass ``None`` for a static export or a torch.export spec.
    The model is exported in eval mode and its training flags are restored afterwards. In-place ops
    become out-of-place where nothing else sees their write (:func:`functionalize`).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    args, kwargs = split_inputs(example_inputs)
    if dynamic_shapes == "auto":
        dynamic_shapes = default_dynamic_shapes(model, args, kwargs)
    start = time.perf_counter()
    with eval_mode(model), cache_off(model, kwargs):
        try:
            exported = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
        except Exception as exc:  # torch.export raises many unrelated types
            raise _capture_error(model, exc) from exc
        module = exported.module()
    drop_whole_slices(module)
    functionalize(module)
    names: dict[int, list[str]] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        names.setdefault(id(tensor), []).append(name)
    dynamic = [
        f"{ph.name}[{axis}]"
        for ph in module.graph.find_nodes(op="placeholder")
        if isinstance(ph.meta.get("val"), torch.Tensor)
        for axis, size in enumerate(ph.meta["val"].shape)
        if isinstance(size, torch.SymInt)
    ]
    if dynamic_shapes is not None and not dynamic:
        warnings.warn(
            f"torch.export kept every input dim of {type(model).__name__} static (a batch of 1 is always "
            "specialised): the captured graph only accepts these exact shapes. Give example inputs with "
            "batch and sequence of at least 2 to keep them dynamic.",
            stacklevel=2,
        )
    return Captured(
        module=module,
        model=model,
        args=args,
        kwargs=kwargs,
        names=names,
        fingerprint=fingerprint(model),
        dynamic_dims=dynamic,
        seconds=time.perf_counter() - start,
    )
