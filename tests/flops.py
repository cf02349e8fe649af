"""FLOPs of a module run on the example inputs of an analysis, as torch's FlopCounterMode counts them."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import fxgradnas

__all__ = ["flops_of"]


def flops_of(module: torch.nn.Module, analysis: fxgradnas.Analysis) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*analysis.captured.args, **analysis.captured.kwargs)
    return counter.get_total_flops()
