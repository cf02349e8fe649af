"""Capture a model as an ATen-level fx graph with torch.export (non-strict, dynamic batch/sequence)."""

from __future__ import annotations

import inspect
import re
import threading
import time
import warnings
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
from .export_passes import drop_whole_slices, follow_training_mode, functionalize
from .modules import cache_off, eval_mode, fingerprint

ExampleInputs = torch.Tensor | tuple | list | dict
# torch.export is not thread-safe, and capture swaps the model's mode and ``forward`` while it runs
_EXPORT_LOCK = threading.RLock()


@dataclass
class Captured:
    """A captured model: the runnable graph module plus what is needed to read it.

    Attributes:
        module: The exported ATen graph module (eval mode).
        model: The user's model it was captured from.
        args: The example inputs' positional args.
        kwargs: The example inputs' keyword args.
        names: Per tensor id, every name (tied ones included) the model holds it under.
        fingerprint: The model's parameter names and shapes, hashed (what a plan is checked against).
        dynamic_dims: The input dims the graph keeps symbolic ("input_ids dim 0", ...).
        seconds: How long the capture took.
        training: The model's mode when it was captured (the graph itself is eval mode's).
        symbol_values: The sizes of the graph's symbolic dims on the example inputs.
    """

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
        """All names (tied ones included) under which the model holds this tensor.

        Args:
            tensor: A parameter or buffer of the model.
        """
        return self.names.get(id(tensor), [])

    def check_inputs(self, inputs: Any, where: str) -> None:
        """Check that model inputs have the example inputs' structure, dtypes and the sizes the graph fixed.

        Args:
            inputs: Model inputs, as ``collect_fn`` gives them.
            where: What names them in the message ("batch 3").

        Raises:
            DataError: They are not a tensor, tuple or dict, or differ from the example inputs.
        """
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
        """``module`` run on ``inputs``, checked first by :meth:`check_inputs`.

        Args:
            module: The captured graph or a copy of it.
            inputs: Model inputs, as ``collect_fn`` gives them.
            where: What names them in a message ("batch 3").

        Returns:
            The module's output.

        Raises:
            DataError: As :meth:`check_inputs` raises it, or a torch.export guard fails on the inputs.
        """
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
    (:func:`~fxgradnas.export_passes.follow_training_mode`). The captured module itself is in eval mode. In-place ops become
    out-of-place where nothing else sees their write (:func:`~fxgradnas.export_passes.functionalize`).

    Args:
        model: The model to export (its training flags are restored afterwards).
        example_inputs: Its inputs: a tensor, a tuple of positional args or a dict of keyword args.
        dynamic_shapes: "auto", None (static) or a torch.export dynamic_shapes spec.

    Returns:
        The captured model.

    Raises:
        ArgumentTypeError: ``model`` is not a Module, or ``example_inputs`` are not a tensor, tuple or dict
            or hold no tensor.
        ArgumentError: ``example_inputs`` are on another device than the model.
        CaptureError: torch.export fails on the model.
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
