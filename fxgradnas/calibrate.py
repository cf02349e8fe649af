"""Calibration: score every unit of every group by Sum((dLoss/dMask)^2) over calibration batches."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm

from .analysis import Analysis, Group, ensure_analysis
from .batches import batch_size_of, call_with, default_collect, to_device
from .errors import CalibrationError
from .instrument import GradientRecorder, device_of, instrument
from .scores import Scores

MODES = ("batch", "sample")


@contextmanager
def frozen_parameters(module: torch.nn.Module):
    """Parameters stop requiring grad (only mask gradients are needed); flags restored after."""
    params = list({id(p): p for p in module.parameters()}.values())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _relative_change(previous: dict[str, torch.Tensor] | None, current: dict[str, torch.Tensor]) -> float:
    if previous is None:
        return math.inf
    num = sum(float((current[k] - previous[k]).abs().sum()) for k in current)
    den = sum(float(current[k].abs().sum()) for k in current)
    return num / den if den > 0 else 0.0


def _per_sample_groups(groups: list[Group], explicit: bool) -> list[Group]:
    """Groups whose every mask site has the batch as its leading axis (per-sample gradients can be
    read there). A site shared by all samples (a position embedding) cannot split its gradient."""
    shared = [g for g in groups if not all(site.batch_major for site in g.sites)]
    if shared and explicit:
        raise CalibrationError(
            f"mode='sample' needs a batch axis at every mask site; group(s) {', '.join(g.name for g in shared)} "
            "have a site shared by all samples. Use mode='batch' or leave them out of groups"
        )
    if shared:
        warnings.warn(f"mode='sample' leaves out group(s) {', '.join(g.name for g in shared)}: a mask site is "
                      "shared by all samples (use mode='batch' to score them)", stacklevel=3)
    return [g for g in groups if g not in shared]


def calibrate(
    model: torch.nn.Module | Analysis,
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    example_inputs: Any = None,
    collect_fn: Callable[[Any], Any] | None = None,
    max_batches: int | None = 128,
    mode: str = "batch",
    groups: list[Group] | None = None,
    autocast_dtype: torch.dtype | None = None,
    converged_below: float | None = None,
    patience: int = 5,
    progress: bool = True,
) -> Scores:
    """Score every unit of the prunable groups by ``Sum((dLoss/dMask)^2)`` over calibration batches.

    ``data``: an iterable of batches; ``collect_fn(batch)`` gives the model inputs (default
    :func:`default_collect`); ``loss_fn(output, batch)`` returns a scalar. ``mode="batch"`` squares
    each batch's gradient (the reference); ``"sample"`` squares each sample's (an empirical
    Fisher), at the same backward cost. Runs where the model is (batches are moved there); only
    mask gradients are computed (parameters are frozen for the duration, flags restored after).
    With ``converged_below``, stops early once the mean relative change of the averaged scores stays
    below it for ``patience`` batches. Under ``torch.distributed`` the sums are all-reduced, so N
    ranks on N shards give the scores of one process on all batches.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be at least 1 (or None for all batches), not {max_batches}")
    collect = collect_fn or default_collect
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise CalibrationError("calibration data is empty: pass an iterable with at least one batch") from None
    if not isinstance(model, Analysis) and example_inputs is None:
        example_inputs = to_device(collect(first), device_of(model))
    analysis = ensure_analysis(model, example_inputs)
    chosen = groups if groups is not None else analysis.prunable
    if not chosen:
        raise CalibrationError("the model has no prunable group to score; see analyze(...).table()")
    if mode == "sample":
        chosen = _per_sample_groups(chosen, explicit=groups is not None)
    inst = instrument(analysis, chosen)
    device = device_of(inst.module)
    recorder = GradientRecorder(per_sample=mode == "sample")
    inst.attach(recorder)
    for mask in inst.masks.values():
        mask.requires_grad_(True)
    sums = {g.name: torch.zeros(g.unit_shape, device=device) for g in chosen}
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    history: list[float] = []
    previous, calm, count = None, 0, 0
    start = time.perf_counter()
    total = max_batches if max_batches is not None else None
    bar = tqdm(total=total, desc="calibrating", unit="batch", disable=not progress, leave=False)

    def batches():
        yield first
        yield from iterator

    with frozen_parameters(inst.module), bar:
        for index, batch in enumerate(batches()):
            if max_batches is not None and index >= max_batches:
                break
            batch = to_device(batch, device)
            inputs = collect(batch)
            recorder.batch_size = batch_size_of(inputs)
            with autocast:
                loss = loss_fn(call_with(inst.module, inputs), batch)  # the output is freed before backward
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise CalibrationError(f"loss_fn must return a scalar tensor; batch {index} gave {type(loss).__name__}"
                                       f"{'' if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
            if not torch.isfinite(loss).all():
                raise CalibrationError(f"loss is {loss.item()} on batch {index}: check the batch and the model")
            if not loss.requires_grad:
                raise CalibrationError("the loss does not depend on the model output (no gradient reaches any mask)")
            loss.float().backward()
            grads = recorder.take()
            if not grads:
                raise CalibrationError("no gradient reached any mask: does loss_fn use the model output?")
            for name, g in grads.items():
                sums[name] += (g**2).sum(0) if recorder.per_sample else g**2
            count += 1
            averaged = {k: v / count for k, v in sums.items()}
            change = _relative_change(previous, averaged)
            previous = averaged
            history.append(change)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}", change=f"{change:.2e}")
            calm = calm + 1 if converged_below is not None and change < converged_below else 0
            if not distributed and converged_below is not None and calm >= patience:
                break
    if distributed:
        counter = torch.tensor([float(count)], device=device)
        torch.distributed.all_reduce(counter)
        for v in sums.values():
            torch.distributed.all_reduce(v)
        count = int(counter.item())
    scores = {k: v.detach().reshape(-1).cpu() for k, v in sums.items()}
    return Scores(scores, scorer="gradnas", mode=mode, batches=count, seconds=time.perf_counter() - start,
                  history=history)
