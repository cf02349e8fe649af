"""Calibration batches to model inputs: what calibration and compensation both read data with."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from .errors import CalibrationError


def default_collect(batch: Any) -> Any:
    """Model inputs of a batch: the batch itself if a tensor or dict, its first item if a sequence."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise CalibrationError("an empty tuple/list is not a batch; pass collect_fn")
        return batch[0]
    return batch


def call_with(module: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, (tuple, list)):
        return module(*inputs)
    return module(inputs)


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
        raise CalibrationError("a batch has no tensor with a batch dimension")
    return int(tensors[0].shape[0])
