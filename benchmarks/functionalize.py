"""In-place ops at capture: what functionalising them costs, and what the captured module then runs.

    python benchmarks/functionalize.py [--threads 1]

Per model (torchvision resnet50, 2x3x64x64; GPT-2 124M, 3x65 tokens; random weights): export time,
fxgradnas.export_passes.functionalize time (in-place ops replaced / kept), torch's run_decompositions({})
time, and the forward time (min of 5 interleaved rounds) of the eager model, of the export as it is (in-place ops kept,
which rules would have to read), after functionalize, and after run_decompositions. Needs torchvision
and transformers.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import torch
from tabulate import tabulate
from torch.export import Dim

from fxgradnas.export_passes import drop_whole_slices, functionalize, mutated_argument


def _import_torchvision() -> Any:
    """torchvision's CUDA wheel imports on CPU torch once two op schemas exist (see tests/conftest.py)."""
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            lib.define(schema)
        except RuntimeError:
            pass
    import torchvision

    _import_torchvision.lib = lib  # keep the fragment alive
    return torchvision


def _writes(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and mutated_argument(n.target) is not None)


def _best(calls: dict[str, Callable[[], Any]], repeats: int = 5) -> dict[str, float]:
    """Min time of each call over ``repeats`` rounds, the calls interleaved so load changes hit all."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def measure(name: str, model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: Any, run: tuple) -> dict:
    model.eval()
    start = time.perf_counter()
    exported = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic)
    captured = exported.module()
    drop_whole_slices(captured)
    export_s = time.perf_counter() - start
    functional = copy.deepcopy(captured)
    start = time.perf_counter()
    replaced = functionalize(functional)
    functionalize_s = time.perf_counter() - start
    start = time.perf_counter()
    decomposed = exported.run_decompositions({}).module()
    decompositions_s = time.perf_counter() - start
    modules = {"eager": model, "in place": captured, "functionalize": functional, "run_decompositions": decomposed}
    run_args, run_kwargs = run
    with torch.no_grad():
        forward = _best({k: functools.partial(m, *run_args, **run_kwargs) for k, m in modules.items()})
    return {
        "model": name,
        "export_s": export_s,
        "functionalize_ms": functionalize_s * 1e3,
        "replaced": replaced,
        "kept": _writes(functional),
        "run_decompositions_s": decompositions_s,
        **{f"forward_ms[{k}]": v * 1e3 for k, v in forward.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    if importlib.util.find_spec("torchvision") is not None:
        resnet = _import_torchvision().models.resnet50(weights=None, num_classes=10)
        rows.append(measure("resnet50", resnet, (torch.randn(2, 3, 64, 64),), {}, ({0: Dim.AUTO},),
                            ((torch.randn(32, 3, 64, 64),), {})))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config()).eval()
    gpt2.forward = functools.partial(gpt2.forward, use_cache=False)
    rows.append(measure("gpt2-124M", gpt2, (), {"input_ids": torch.randint(0, 50257, (3, 65))},
                        {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}},
                        ((), {"input_ids": torch.randint(0, 50257, (4, 256))})))
    print(tabulate(rows, headers="keys", floatfmt=".2f"))


if __name__ == "__main__":
    main()
