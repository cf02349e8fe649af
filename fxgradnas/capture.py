"""Capture a model as an ATen-level fx graph with torch.export (non-strict, dynamic batch/sequence)."""

from __future__ import annotations

import functools
import hashlib
import inspect
import operator
import re
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch import nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from .batches import call_with
from .errors import ArgumentError, ArgumentTypeError, CaptureError, DataError

ExampleInputs = torch.Tensor | tuple | list | dict
aten = torch.ops.aten
# torch.export is not thread-safe, and capture swaps the model's mode and ``forward`` while it runs
_EXPORT_LOCK = threading.RLock()
TRAINING_FLAG = "fxgradnas_training"
# ops captured in eval mode with a ``train`` argument False that the model's mode would switch on: index of it
MODE_ARGUMENT = {
    aten.dropout.default: 2, aten.feature_dropout.default: 2, aten.alpha_dropout.default: 2,
    aten.feature_alpha_dropout.default: 2, aten.batch_norm.default: 5, aten.instance_norm.default: 5,
}


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
    training: bool = False  # the model's mode when it was captured (the graph itself is eval mode's)
    symbol_values: dict[sympy.Symbol, int] = field(default_factory=dict)  # symbolic sizes on the example

    def names_of(self, tensor: torch.Tensor) -> list[str]:
        """All names (tied ones included) under which the model holds this tensor."""
        return self.names.get(id(tensor), [])

    def check_inputs(self, inputs: Any, where: str) -> None:
        """Raise DataError unless ``inputs`` (model inputs, as ``collect_fn`` gives them) have the example
        inputs' structure, dtypes and the sizes the graph fixed; ``where`` names them ("batch 3")."""
        try:
            args, kwargs = split_inputs(inputs)
        except TypeError:
            raise DataError(f"{where}: model inputs must be a tensor, a tuple of positional args or a dict of "
                            f"keyword args, not {type(inputs).__name__}; {_FIX}") from None
        got = dict(pytree.tree_flatten_with_path((args, kwargs))[0])
        want = pytree.tree_flatten_with_path((self.args, self.kwargs))[0]
        missing = [_input_name(path) for path, _ in want if path not in got]
        extra = [_input_name(path) for path in got.keys() - {path for path, _ in want}]
        if missing or extra:
            problems = [f"it lacks {', '.join(missing)}" if missing else "",
                        f"it has {', '.join(sorted(extra))} in addition" if extra else ""]
            raise DataError(f"{where} does not have the structure of example_inputs: "
                            f"{' and '.join(p for p in problems if p)} (example_inputs: "
                            f"{', '.join(_input_name(path) for path, _ in want)}); {_FIX}")
        for (path, example), node in zip(want, self.module.graph.find_nodes(op="placeholder"), strict=False):
            _check_leaf(_input_name(path), got[path], example, node.meta.get("val"), where)

    def call(self, module: nn.Module, inputs: Any, where: str) -> Any:
        """``module`` (the captured graph or a copy of it) on ``inputs``, checked by :meth:`check_inputs`;
        a torch.export guard that fails on them is reported as a DataError."""
        self.check_inputs(inputs, where)
        try:
            return call_with(module, inputs)
        except AssertionError as exc:
            if "Guard failed" not in str(exc):
                raise
            raise DataError(f"{where} does not fit the graph captured from example_inputs: {exc} (a size "
                            f"torch.export found the model to require); {_FIX}") from None


_FIX = ("give every batch the inputs of example_inputs (same names, dtypes and non-batch sizes), or a collect_fn "
        "that makes them from a batch")


def _input_name(path: tuple) -> str:
    """``args[0]``, ``attention_mask``, ... for a leaf path of ``(args, kwargs)``."""
    head, first, *rest = path
    name = f"args[{first.idx}]" if head.idx == 0 else str(first.key)
    return name + pytree.keystr(tuple(rest))


def _check_leaf(name: str, value: Any, example: Any, captured: Any, where: str) -> None:
    if not isinstance(example, torch.Tensor):
        if isinstance(value, torch.Tensor) or value != example:
            raise DataError(f"{where}: {name} is {value!r} but the model was captured with {example!r} there (a "
                            f"constant of the graph); {_FIX}")
        return
    if not isinstance(value, torch.Tensor):
        raise DataError(f"{where}: {name} is a {type(value).__name__}, example_inputs has a tensor there; {_FIX}")
    if value.dtype != example.dtype:
        raise DataError(f"{where}: {name} has dtype {value.dtype}, example_inputs {example.dtype}; {_FIX}")
    shape = captured.shape if isinstance(captured, torch.Tensor) else example.shape
    fixed = [i for i, size in enumerate(shape) if not is_symbolic(size)]
    if value.dim() != len(shape) or any(value.shape[i] != int(shape[i]) for i in fixed):
        wanted = ", ".join("any" if is_symbolic(size) else str(int(size)) for size in shape)
        raise DataError(f"{where}: {name} has shape {tuple(value.shape)}; the graph captured from example_inputs "
                        f"takes ({wanted}); {_FIX}")


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
    raise ArgumentTypeError(
        f"example_inputs must be a tensor, a tuple of positional args or a dict of keyword args, "
        f"not {type(example_inputs).__name__}"
    )


def check_example_inputs(example_inputs: Any, model: nn.Module | None = None) -> None:
    """Raise ArgumentTypeError unless ``example_inputs`` can be split into args/kwargs holding a tensor, and
    ArgumentError when they are all on one device and ``model``'s tensors all on another."""
    args, kwargs = split_inputs(example_inputs)
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise ArgumentTypeError(f"example_inputs hold no tensor ({type(example_inputs).__name__}); pass the "
                                "model's inputs: a tensor, a tuple of positional args or a dict of keyword args")
    inputs = {t.device for t in tensors}
    held = {t.device for t in [*model.parameters(), *model.buffers()]} if model is not None else set()
    if len(inputs) == 1 and len(held) == 1 and inputs != held:
        raise ArgumentError(f"example_inputs are on {inputs.pop()} but {type(model).__name__} is on {held.pop()}; "
                            "move them there (.to(device))")


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


def _enlarged(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any], list[str]]:
    """The example with every size-1 batch or sequence dim (see :func:`_auto_dims`) repeated to a size no
    other input dim has (torch.export specialises sizes 1 and gives equal sizes one symbol), and the names
    of the dims repeated."""
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    taken = {int(s) for t in leaves for s in t.shape}
    sizes = {}
    for axis in (0, 1):
        sizes[axis] = next(k for k in range(2, 2 + len(taken) + 2) if k not in taken)
        taken.add(sizes[axis])
    grown: list[str] = []

    def grow(path: tuple, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        for axis in _auto_dims(t) or {}:
            if t.shape[axis] == 1:
                t = torch.cat([t] * sizes[axis], dim=axis)
                grown.append(f"{_input_name(path)} dim {axis}")
        return t

    args, kwargs = pytree.tree_map_with_path(grow, (args, kwargs))
    return args, kwargs, grown


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


def _user_frame(message: str) -> str:
    match = re.search(r"The following call raised this error:\s*\n(.*?)(?:\n\n|$)", message, re.S)
    if match:
        return " ".join(line.strip() for line in match.group(1).splitlines() if line.strip())
    return ""


def _capture_error(model: torch.nn.Module, exc: Exception) -> CaptureError:
    message = str(exc)
    first = next((line for line in message.splitlines() if line.strip()), type(exc).__name__).rstrip(".")
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


class TrainingFlag(nn.Module):
    """Returns its training flag, which ``.train()``/``.eval()`` of the graph module holding it set."""

    def forward(self) -> bool:
        return self.training


def follow_training_mode(gm: torch.fx.GraphModule) -> int:
    """Make the dropout and batch/instance-norm nodes that the eval-mode capture fixed to eval behaviour
    read the graph module's training flag instead, so ``.train()`` switches dropout on and BatchNorm to
    batch statistics (updating its running statistics in place), as in the model; returns how many.
    What the model decided in Python from ``self.training`` (a dropout probability of 0 in eval mode, the
    running-average momentum of a BatchNorm with ``momentum=None``) stays as captured in eval mode."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in MODE_ARGUMENT
             and len(n.args) > MODE_ARGUMENT[n.target] and n.args[MODE_ARGUMENT[n.target]] is False]
    if not nodes:
        return 0
    gm.add_submodule(TRAINING_FLAG, TrainingFlag())
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        flag = gm.graph.call_module(TRAINING_FLAG)
    for n in nodes:
        index = MODE_ARGUMENT[n.target]
        n.args = (*n.args[:index], flag, *n.args[index + 1:])
    gm.recompile()
    return len(nodes)


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


def _export(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], dynamic_shapes: Any) -> torch.fx.GraphModule:
    try:
        exported = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:  # torch.export raises many unrelated types
        raise _capture_error(model, exc) from exc
    module = exported.module()
    for name in ("train", "eval"):  # export's module refuses both; after follow_training_mode they work
        module.__dict__.pop(name, None)
    return module


def is_symbolic(size: int | torch.SymInt) -> bool:
    """Whether a captured size varies (export also writes sizes it fixed as SymInts of a constant)."""
    return isinstance(size, torch.SymInt) and not is_concrete_int(size)


def _symbolic_dims(module: torch.fx.GraphModule) -> list[str]:
    return [
        f"{ph.name}[{axis}]"
        for ph in module.graph.find_nodes(op="placeholder")
        if isinstance(ph.meta.get("val"), torch.Tensor)
        for axis, size in enumerate(ph.meta["val"].shape)
        if is_symbolic(size)
    ]


def _symbol_values(module: torch.fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> dict[sympy.Symbol, int]:
    """The value of every symbolic size on the example inputs (not on an enlarged copy export ran on)."""
    values: dict[sympy.Symbol, int] = {}
    placeholders = module.graph.find_nodes(op="placeholder")
    for node in placeholders:
        env = getattr(getattr(node.meta.get("val"), "fake_mode", None), "shape_env", None)
        if env is not None:
            values.update(env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val)
            break
    for node, value in zip(placeholders, pytree.tree_leaves((args, kwargs)), strict=False):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(value, torch.Tensor):
            for size, actual in zip(val.shape, value.shape, strict=False):
                if is_symbolic(size) and isinstance(size.node.expr, sympy.Symbol):
                    values[size.node.expr] = int(actual)
    return values


def capture(
    model: torch.nn.Module,
    example_inputs: ExampleInputs,
    *,
    dynamic_shapes: Any = "auto",
) -> Captured:
    """Export ``model`` on ``example_inputs`` to a runnable ATen graph module.

    ``dynamic_shapes="auto"`` makes the batch dim of every tensor input dynamic, and dim 1 of
    rank-2/3 inputs (sequence), also where the example has size 1 there (export then runs on a copy of
    the example repeated along those dims); pass ``None`` for a static export or a torch.export spec.
    The model is exported in eval mode and its training flags are restored afterwards; dropout and
    BatchNorm of the graph follow the graph module's own ``.train()``/``.eval()``
    (:func:`follow_training_mode`). The captured module itself is in eval mode. In-place ops become
    out-of-place where nothing else sees their write (:func:`functionalize`).
    """
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    # the lock covers every read of the model: another thread's export swaps its tensors while it traces
    with _EXPORT_LOCK:
        check_example_inputs(example_inputs, model)
        args, kwargs = split_inputs(example_inputs)
        start = time.perf_counter()
        training = model.training
        with eval_mode(model), cache_off(model, kwargs):
            module, fixed = _export_dynamic(model, args, kwargs, dynamic_shapes)
        names: dict[int, list[str]] = {}
        for name, tensor in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]:
            names.setdefault(id(tensor), []).append(name)
        model_fingerprint = fingerprint(model)
    follow_training_mode(module)
    module.eval()
    drop_whole_slices(module)
    functionalize(module)
    if fixed:
        warnings.warn(
            f"torch.export fixed {', '.join(fixed)} of {type(model).__name__} to size 1 as in example_inputs "
            "(the model did not run with those dims repeated): the captured graph only accepts size 1 there. "
            "Give example inputs with a batch and sequence of at least 2 to keep them dynamic.",
            stacklevel=2,
        )
    return Captured(
        module=module,
        model=model,
        args=args,
        kwargs=kwargs,
        names=names,
        fingerprint=model_fingerprint,
        dynamic_dims=_symbolic_dims(module),
        seconds=time.perf_counter() - start,
        training=training,
        symbol_values=_symbol_values(module, args, kwargs),
    )


def _export_dynamic(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
                    dynamic_shapes: Any) -> tuple[torch.fx.GraphModule, list[str]]:
    """The exported module and the size-1 batch/sequence dims it fixed (``dynamic_shapes="auto"`` only).
    A size-1 dim is tried repeated first; export on the example as it is when that fails."""
    if dynamic_shapes != "auto":
        return _export(model, args, kwargs, dynamic_shapes), []
    big_args, big_kwargs, grown = _enlarged(args, kwargs)
    if grown:
        try:
            module = _export(model, big_args, big_kwargs, default_dynamic_shapes(model, big_args, big_kwargs))
        except CaptureError:
            module = None
        if module is not None and not _static(module, args, kwargs, grown):
            return module, []
    module = _export(model, args, kwargs, default_dynamic_shapes(model, args, kwargs))
    return module, _static(module, args, kwargs, grown)


def _static(module: torch.fx.GraphModule, args: tuple, kwargs: dict[str, Any], names: list[str]) -> list[str]:
    """Those of the input dims ``names`` (``input_ids dim 0``, ...) that ``module`` fixed to one size."""
    leaves = pytree.tree_flatten_with_path((args, kwargs))[0]
    static = []
    for (path, _), node in zip(leaves, module.graph.find_nodes(op="placeholder"), strict=False):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            static += [f"{_input_name(path)} dim {axis}" for axis, size in enumerate(val.shape)
                       if not is_symbolic(size)]
    return [name for name in names if name in static]
