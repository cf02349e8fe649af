"""Calibration batches to model inputs: what calibration and compensation both read data with.

Data is read once: a batch taken to capture the model is chained back in front of the rest
(:func:`peek`), and reading stops at ``max_batches`` with a warning when batches were left unread
(:class:`Reader`).
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import ArgumentTypeError, CalibrationError, DataError

EMPTY = "data is empty: pass an iterable with at least one batch (a list, a DataLoader, a generator)"


def default_collect(batch: Any) -> Any:
    """Model inputs of a batch: the batch itself if a tensor or dict, its first item if a sequence."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("an empty tuple/list is not a batch; pass collect_fn")
        return batch[0]
    return batch


def call_with(module: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    return module(inputs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: ``.logits``, the first item of a tuple or list, or the tensor."""
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if not isinstance(output, torch.Tensor):
        raise ArgumentTypeError(f"cannot find logits in a model output of type {type(output).__name__}; pass "
                                "a function that extracts them")
    return output


def to_device(inputs: Any, device: torch.device) -> Any:
    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.device != device:
            try:
                return x.to(device)
            except RuntimeError as exc:
                raise CalibrationError(f"cannot move a batch tensor from {x.device} to {device}: {exc}") from exc
        return x

    return pytree.tree_map(move, inputs)


def batch_size_of(inputs: Any) -> int:
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        raise DataError("a batch has no tensor with a batch dimension; pass a collect_fn that returns the model inputs")
    return int(tensors[0].shape[0])


def check_data(data: Any, name: str = "data") -> None:
    """Raise ArgumentTypeError unless ``data`` is an iterable of batches (it is not read)."""
    if data is None:
        raise ArgumentTypeError(f"{name} is None: pass an iterable of calibration batches (a list, a DataLoader, "
                                "a generator)")
    if isinstance(data, torch.Tensor):
        raise ArgumentTypeError(f"{name} is one tensor of shape {tuple(data.shape)}: iterating it would give its rows "
                                f"as batches. Pass an iterable of batches, e.g. [tensor] or list(tensor.split(8))")
    if isinstance(data, (str, bytes, Mapping)):
        raise ArgumentTypeError(f"{name} is a {type(data).__name__}, not an iterable of batches; a dict is one batch: "
                                "pass [batch]")
    if not (hasattr(type(data), "__iter__") or hasattr(type(data), "__getitem__")):
        raise ArgumentTypeError(f"{name} must be an iterable of batches (a list, a DataLoader, a generator), not "
                                f"{type(data).__name__}")


def check_callable(value: Any, name: str, arguments: str, optional: bool = True) -> None:
    """Raise ArgumentTypeError unless ``value`` is a function taking ``arguments`` ("output, batch"),
    positionally (or None where ``optional``)."""
    if value is None and optional:
        return
    if not callable(value):
        raise ArgumentTypeError(f"{name} must be a function of ({arguments}), not {type(value).__name__}")
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin without a signature: it is called as it is
        return
    try:
        signature.bind(*arguments.split(", "))
    except TypeError as exc:
        raise ArgumentTypeError(f"{name} is called as {name}({arguments}), but {exc}") from None


def peek(data: Iterable) -> tuple[Any, Iterable]:
    """The first batch of ``data`` and an iterable of all of its batches, that one included: a one-shot
    iterator (a generator) continues behind the batch taken from it; anything that iterates afresh (a list,
    a DataLoader) is returned as it is. Raises DataError for empty data."""
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError(EMPTY) from None
    return first, (itertools.chain([first], iterator) if iterator is data else data)


def is_one_shot(data: Iterable) -> bool:
    """Whether iterating ``data`` consumes it (a generator or an iterator), so it cannot be read twice."""
    return isinstance(data, Iterator)


class Reader:
    """The batches of ``data``, at most ``max_batches``, read once. When more were left, warns (naming
    ``what`` read them) and sets ``truncated``; ``count`` is the number of batches given out. Raises
    DataError for empty data."""

    def __init__(self, data: Iterable, max_batches: int | None, what: str) -> None:
        self.data, self.max_batches, self.what = data, max_batches, what
        self.count = 0
        self.truncated = False

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.data):
            if self.max_batches is not None and index >= self.max_batches:
                self.truncated = True
                warnings.warn(f"{self.what} used the first {self.max_batches} batches of data and left the rest "
                              f"unread (max_batches={self.max_batches}); pass {self.what.capitalize()}Options(max_batches=None) "
                              "to use every batch",
                              stacklevel=3)
                return
            self.count += 1
            yield batch
        if not self.count:
            raise DataError(f"{self.what} got no calibration batch: {EMPTY}")

