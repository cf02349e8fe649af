"""Calibration: score every unit of every group by Sum((dLoss/dMask)^2) over calibration batches."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .analysis import Analysis, Group, check_groups, ensure_analysis
from .batches import Reader, batch_size_of, check_callable, check_data, default_collect, peek, to_device
from .capture import check_example_inputs
from .errors import ArgumentError, ArgumentTypeError, CalibrationError
from .instrument import GradientRecorder, instrument
from .modules import check_weights, device_of
from .options import CalibrationOptions, check_instance
from .plan import Plan, check_plan
from .scores import Scores
from .shard import BLOCKS, recompute_blocks, shard_blocks, split_blocks


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
            f"granularity='sample' needs a batch axis at every mask site; group(s) {', '.join(g.name for g in shared)} "
            "have a site shared by all samples. Use granularity='batch' or leave them out of groups"
        )
    if shared:
        warnings.warn(f"granularity='sample' leaves out group(s) {', '.join(g.name for g in shared)}: a mask site "
                      "is shared by all samples (use granularity='batch' to score them)", stacklevel=3)
    return [g for g in groups if g not in shared]


def check_sharding(options: CalibrationOptions, checkpoint: Any = None) -> None:
    """Raise ArgumentError unless the sharding ``options`` ask for can run here: ``shard`` needs an initialised
    torch.distributed, ``checkpoint`` (a safetensors directory the shards are read from) needs ``shard``."""
    if options.shard and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ArgumentError("shard=True shards the weights over torch.distributed ranks: call "
                            "torch.distributed.init_process_group() in every rank first")
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, Path)):
            raise ArgumentTypeError(f"checkpoint must be a directory (str or Path), not {type(checkpoint).__name__}")
        if not options.shard:
            raise ArgumentError("checkpoint is read shard by shard into the ranks: pass "
                                "CalibrationOptions(shard=True) with it")
        if not Path(checkpoint).is_dir():
            raise ArgumentError(f"checkpoint must be a safetensors checkpoint directory; {checkpoint} is none")


def autocast_dtype(options: CalibrationOptions) -> torch.dtype | None:
    """The torch.dtype of ``options.autocast_dtype`` (a name or a dtype), or None."""
    dtype = options.autocast_dtype
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def calibrate(
    model: torch.nn.Module | Analysis,
    data: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    options: CalibrationOptions = CalibrationOptions(),
    *,
    example_inputs: Any = None,
    collect_fn: Callable[[Any], Any] | None = None,
    groups: list[Group] | None = None,
    plan: Plan | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> Scores:
    """Score every unit of the prunable groups by ``Sum((dLoss/dMask)^2)`` over calibration batches.

    Runs where the model is (batches are moved there), always in eval mode (dropout off, BatchNorm on its
    running statistics; a warning says so for a model in train mode), on read-only views of the model's
    parameters: only mask gradients are computed, and the model's flags and ``.grad`` are never touched.
    Under ``torch.distributed`` the sums are all-reduced, so N ranks on N shards give the scores of one process
    on all batches. With ``options.shard`` the graph's blocks are also sharded over the ranks (FSDP2,
    :func:`fxgradnas.shard.shard_blocks`): each rank keeps 1/N of every block's weights and gathers one block
    at a time. With ``options.recompute`` each block of the graph (``model.layers.N``) runs under activation
    checkpointing (:func:`fxgradnas.shard.recompute_blocks`): backward keeps each block's inputs only and runs
    its forward again, so it holds one block's activations instead of all of them; the scores are the same.

    Args:
        model: A module, or its analysis (:func:`fxgradnas.analyze`) to score without capturing again.
        data: An iterable of batches, read once (without ``example_inputs`` its first batch also captures the
            model); at most ``options.max_batches`` are used (a warning says when more were left).
        loss_fn: ``loss_fn(output, batch)`` returns a scalar tensor.
        options: Granularity, batch limit, autocast, early stop, sharding and recomputation
            (:class:`fxgradnas.CalibrationOptions`; its ``scorer`` must be ``"gradnas"``).
        example_inputs: What the model is captured with, when ``model`` is a module (default: the first batch).
        collect_fn: ``collect_fn(batch)`` gives the model inputs (default
            :func:`fxgradnas.batches.default_collect`), which must have the structure of the example inputs.
        groups: Groups of the analysis to score (default: every prunable group).
        plan: Units already pruned: their masks are zero while the others are scored.
        checkpoint: With ``options.shard``, a safetensors checkpoint directory the ranks read the weights from
            one block at a time, each keeping its shard, so the model may have its parameters on the meta
            device (``accelerate.init_empty_weights(include_buffers=False)``, then ``tie_weights()``).
        progress: Show a progress bar.

    Returns:
        The averaged unit scores of every scored group, with how they were made.

    Raises:
        ArgumentTypeError: ``model``, ``data``, ``loss_fn``, ``collect_fn`` or ``options`` has a type
            calibration cannot use.
        ArgumentError: ``options.scorer`` is not ``"gradnas"``, ``groups`` or ``plan`` do not belong to the
            model, or the sharding asked for cannot run here.
        DataError: ``data`` is empty or a batch does not match the example inputs.
        CalibrationError: The loss is not a finite scalar depending on the output, or no mask gets a gradient.
    """
    if not isinstance(model, (torch.nn.Module, Analysis)):
        raise ArgumentTypeError(f"model must be a torch.nn.Module or an Analysis, not {type(model).__name__}")
    check_instance(options, CalibrationOptions, "options")
    if options.scorer != "gradnas":
        raise ArgumentError(f"calibrate computes the gradnas scores; CalibrationOptions(scorer={options.scorer!r}) "
                            "is for fxgradnas.score")
    check_data(data)
    check_callable(loss_fn, "loss_fn", "output, batch", optional=False)
    check_callable(collect_fn, "collect_fn", "batch")
    check_sharding(options, checkpoint)
    if example_inputs is not None:
        check_example_inputs(example_inputs)
    check_weights(model.captured.model if isinstance(model, Analysis) else model, "calibration",
                  parameters=checkpoint is None)
    collect = collect_fn or default_collect
    if not isinstance(model, Analysis) and example_inputs is None:
        first, data = peek(data)
        example_inputs = to_device(collect(first), device_of(model))
    analysis = ensure_analysis(model, example_inputs)
    check_groups(analysis, groups)
    chosen = list(groups) if groups is not None else analysis.prunable
    if not chosen:
        raise CalibrationError("the model has no prunable group to score; see analyze(...).table()")
    max_batches, converged_below, patience = options.max_batches, options.converged_below, options.patience
    shard, recompute, granularity = options.shard, options.recompute, options.granularity
    if granularity == "sample":
        chosen = _per_sample_groups(chosen, explicit=groups is not None)
    if plan is not None:
        check_plan(plan)
        plan.validate(analysis)
    masked = [analysis.group(name) for name in (plan.keep if plan is not None else {})]
    inst = instrument(analysis, [*chosen, *(g for g in masked if g not in chosen)], read_only=True)
    if shard:
        aliases = {n: [o for o in names if o != n] for names in analysis.captured.names.values() for n in names}
        inst.module = shard_blocks(inst.module, checkpoint_dir=checkpoint, aliases=aliases)
    if recompute:
        inst.module = recompute_blocks(inst.module if shard else split_blocks(inst.module))
        if not inst.module.meta[BLOCKS]:
            warnings.warn(f"recompute=True found no block to recompute in {type(analysis.captured.model).__name__} "
                          "(a numbered submodule such as model.layers.3): calibration keeps every activation",
                          stacklevel=2)
    training = [name or type(m).__name__ for name, m in analysis.captured.model.named_modules() if m.training]
    if training:
        warnings.warn(f"{', '.join(training[:3])}{' ...' if len(training) > 3 else ''} in train mode: calibration runs "
                      "the model in eval mode (dropout off, BatchNorm on its running statistics) and leaves its "
                      "modes as they are", stacklevel=2)
    device = device_of(inst.module)
    recorder = GradientRecorder(per_sample=granularity == "sample")
    if plan is not None:
        inst.set_plan(masked, plan)
    inst.attach(recorder)
    for group in masked:
        if group not in chosen:  # masked, not scored
            for site in inst.sites[group.name]:
                site.recorder = None
    for name in (g.name for g in chosen):
        inst.masks[name].requires_grad_(True)
    sums = {g.name: torch.zeros(g.unit_shape, device=device) for g in chosen}
    dtype = autocast_dtype(options)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    history: list[float] = []
    previous, calm, count = None, 0, 0
    start = time.perf_counter()
    reader = Reader(data, max_batches, "calibration")
    bar = tqdm(total=max_batches, desc="calibrating", unit="batch", disable=not progress, leave=False)
    with bar:
        for index, batch in enumerate(reader):
            batch = to_device(batch, device)
            inputs = collect(batch)
            with autocast:
                output = analysis.captured.call(inst.module, inputs, f"batch {index}")
                recorder.batch_size = batch_size_of(inputs)
                loss = loss_fn(output, batch)
                del output  # freed before backward
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
    return Scores(scores, scorer="gradnas", granularity=granularity, batches=count, seconds=time.perf_counter() - start,
                  history=history, truncated=reader.truncated)
