"""Healing: a short distillation of the pruned module from the dense one.

The pruned module (the student) is trained to match the dense model's (the teacher's) output
distribution: by default the KL divergence between their softened logits, per position, averaged
over positions. The teacher only runs forward, without gradients, and is not modified; the student is
trained in place, so a :class:`~fxgradnas.PruneResult` (or a Hugging Face model written back from it)
is saved as before.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import call_with, check_callable, check_data, default_collect, is_one_shot, logits_of, to_device
from .errors import ArgumentError, ArgumentTypeError, CalibrationError, DataError
from .modules import device_of, eval_mode, module_mode


@dataclass
class HealReport:
    """What healing did: the loss of every step (one batch each) and the time."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.losses)

    def mean_loss(self, first: bool = True, window: int = 10) -> float:
        """Mean loss over the first (or last) ``window`` steps."""
        part = self.losses[:window] if first else self.losses[-window:]
        return sum(part) / len(part) if part else math.nan

    def __str__(self) -> str:
        return (f"healed {self.steps} steps in {self.seconds:.1f} s: loss "
                f"{self.mean_loss(True):.4g} (first 10 steps) -> {self.mean_loss(False):.4g} (last 10)")


def distillation_loss(student: Any, teacher: Any, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened logits over their last axis, averaged over every other
    position, times ``temperature**2`` (so gradients keep their scale)."""
    s, t = logits_of(student).float(), logits_of(teacher).float()
    if s.shape != t.shape:
        raise DataError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape: "
                        "was the teacher's vocabulary or output pruned?")
    s = torch.log_softmax(s.flatten(0, -2) / temperature, -1)
    t = torch.log_softmax(t.flatten(0, -2) / temperature, -1)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def check_heal_options(*, steps: Any, lr: Any, temperature: Any, max_grad_norm: Any, warmup: Any,
                       autocast_dtype: Any) -> None:
    """Raise ArgumentError/ArgumentTypeError for a healing option fxgradnas cannot use."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ArgumentError(f"steps must be an int of at least 1, not {steps!r}")
    for name, value in (("lr", lr), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ArgumentError(f"{name} must be a positive number, not {value!r}")
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or not max_grad_norm > 0):
        raise ArgumentError(f"max_grad_norm must be a positive number or None (no clipping), not {max_grad_norm!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < 1:
        raise ArgumentError(f"warmup must be a fraction of the steps in [0, 1), not {warmup!r}")
    if autocast_dtype is not None and not (isinstance(autocast_dtype, torch.dtype) and autocast_dtype.is_floating_point):
        raise ArgumentTypeError(f"autocast_dtype must be a floating torch.dtype like torch.bfloat16 (or None), "
                                f"not {autocast_dtype!r}")


def _cycled(data: Iterable, steps: int) -> Iterator[tuple[int, Any]]:
    """``steps`` batches of ``data`` with the index of each, starting over at the end of ``data`` (a
    one-shot iterator cannot start over: healing then stops early, with a warning)."""
    given = 0
    while given < steps:
        read = 0
        for batch in data:
            yield given, batch
            given, read = given + 1, read + 1
            if given == steps:
                return
        if not read:
            raise DataError("heal got no batch: data is empty (or a one-shot iterator already read)")
        if is_one_shot(data):
            warnings.warn(f"heal read all {given} batches of a one-shot iterator before {steps} steps; pass a list "
                          "or a DataLoader to read the data more than once", stacklevel=3)
            return


def heal(
    student: Any,
    teacher: nn.Module,
    data: Iterable,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    temperature: float = 1.0,
    warmup: float = 0.1,
    max_grad_norm: float | None = 1.0,
    loss_fn: Callable[[Any, Any, Any], torch.Tensor] | None = None,
    collect_fn: Callable[[Any], Any] | None = None,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: bool = True,
) -> HealReport:
    """Distil ``student`` (a :class:`~fxgradnas.PruneResult` or any module, trained in place) from
    ``teacher`` (the dense model, only run forward) for ``steps`` batches of ``data``.

    Each step reads one batch (``data`` starts over when it ends), calls both models on
    ``collect_fn(batch)`` and takes an AdamW step (``lr`` with a linear ``warmup`` fraction and a cosine
    decay, gradients clipped to ``max_grad_norm``) on ``loss_fn(student_output, teacher_output, batch)``,
    by default :func:`distillation_loss` at ``temperature``. ``autocast_dtype`` (e.g. ``torch.bfloat16``)
    runs both forwards under autocast on the student's device. The student runs in train mode and both
    models' modes, and the student's ``requires_grad`` flags, are restored after; the teacher's
    parameters are never touched. Deterministic for a fixed ``seed`` on the CPU.

    Args:
        student: The pruned model: a PruneResult or a module, trained in place.
        teacher: The dense model, only run forward.
        data: Training batches (an iterable, started over when it ends).
        steps: How many optimizer steps (one batch each).
        lr: The AdamW learning rate at its peak.
        temperature: The distillation temperature of the default loss.
        warmup: The fraction of the steps the learning rate rises linearly over, in [0, 1).
        max_grad_norm: The gradient norm clip (None: no clipping).
        loss_fn: ``loss_fn(student_output, teacher_output, batch)`` returning a scalar (default:
            :func:`distillation_loss`).
        collect_fn: Makes the model inputs from a batch (default: the batch as it is).
        autocast_dtype: A floating dtype to run both forwards under autocast in (None: no autocast).
        seed: The random seed.
        progress: Show a progress bar.

    Returns:
        The report: losses per step and how long healing took.

    Raises:
        ArgumentTypeError: ``student`` or ``teacher`` is not a module, ``data`` is not an iterable of batches,
            ``loss_fn`` or ``collect_fn`` is not callable, or ``autocast_dtype`` is not a floating dtype.
        ArgumentError: ``student`` is ``teacher``, an option is out of range, or the student has no
            floating-point parameter.
        CalibrationError: The loss is not a finite scalar tensor.
    """
    module = student if isinstance(student, nn.Module) else getattr(student, "model", None)  # a PruneResult
    if not isinstance(module, nn.Module):
        raise ArgumentTypeError(f"student must be a PruneResult or a torch.nn.Module, not {type(student).__name__}")
    if not isinstance(teacher, nn.Module):
        raise ArgumentTypeError(f"teacher must be a torch.nn.Module (the dense model), not {type(teacher).__name__}")
    if teacher is module:
        raise ArgumentError("student and teacher are the same module; pass the pruned module and the dense model")
    check_data(data)
    check_heal_options(steps=steps, lr=lr, temperature=temperature, max_grad_norm=max_grad_norm, warmup=warmup,
                       autocast_dtype=autocast_dtype)
    check_callable(loss_fn, "loss_fn", "student_output, teacher_output, batch")
    check_callable(collect_fn, "collect_fn", "batch")
    collect = collect_fn or default_collect
    parameters = [p for p in module.parameters() if p.is_floating_point()]
    if not parameters:
        raise ArgumentError("the student has no floating-point parameter to train")
    device, teacher_device = device_of(module), device_of(teacher)
    flags = [p.requires_grad for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warm = max(1, round(warmup * steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    report = HealReport()
    start = time.perf_counter()
    try:
        for p in parameters:
            p.requires_grad_(True)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(teacher), \
                module_mode(module, True), tqdm(total=steps, desc="healing", unit="step", disable=not progress, leave=False) as bar:
            torch.manual_seed(seed)
            for step, batch in _cycled(data, steps):
                inputs = collect(batch)
                with torch.no_grad(), autocast:
                    target = call_with(teacher, to_device(inputs, teacher_device))
                with autocast:
                    output = call_with(module, to_device(inputs, device))
                    target = to_device(target, device)
                    loss = (loss_fn(output, target, batch) if loss_fn is not None
                            else distillation_loss(output, target, temperature))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise CalibrationError(f"the healing loss must be a scalar tensor; step {step} gave "
                                           f"{type(loss).__name__}")
                if not torch.isfinite(loss):
                    raise CalibrationError(f"the healing loss is {loss.item()} at step {step}; lower lr (now {lr})")
                optimizer.zero_grad(set_to_none=True)
                loss.float().backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                optimizer.step()
                scheduler.step()
                report.losses.append(loss.detach().item())
                bar.update(1)
                bar.set_postfix(loss=f"{report.losses[-1]:.4g}")
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    report.seconds = time.perf_counter() - start
    if module is not student and hasattr(module, "meta"):
        module.meta.pop("self_check", None)  # the weights changed: the pruned == masked check no longer applies
    return report
