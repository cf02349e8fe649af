"""Cost of calibration against plain training steps on GPT-2 124M (random weights, no download).

    python benchmarks/calibration.py [--batches 4] [--repeats 5] [--threads N] [--json runs/calibration.json]

Batches of 4 x 128 random token ids with a next-token cross-entropy loss. In one run, with the
repetitions interleaved (the order rotates each repeat) so a noisy machine hurts every column alike:

* ``plain``: forward + backward of the original model with its weights requiring grad, one batch;
* ``floor``: forward + backward of the original model to the gradient of the token embeddings alone
  (``torch.autograd.grad``, no weight gradient): the activation gradients down to the embedding, no masks — what any gradient
  with respect to the residual-width mask at the embedding has to compute;
* ``calibrate``: ``calibrate(analysis, batches, loss)`` per batch, from the slope between a run on
  one batch and a run on ``--batches`` (the one-time instrumentation cost cancels), and from the
  run's own ``Scores.seconds`` (which starts after instrumentation);
* forward only (no grad) of the original model, the captured graph and the instrumented graph
  (masks at one, no recorder), one batch: the overhead of the mask nodes.

Targets: calibrate/plain <= 0.7 (only mask gradients, no weight gradients) and instrumented/captured
forward <= 1.03, judged on the best (min) wall time of the interleaved repeats (noise only adds
time); the median wall and the min process CPU time are shown next to them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

import fxgradnas
from fxgradnas.calibrate import calibrate

BATCH, TOKENS = 4, 128
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)


def next_token_loss(out: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out.logits
    ids = batch["input_ids"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def cpu_stall_us() -> float | None:
    """Linux pressure stall information: microseconds some task waited for a CPU (None if absent)."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return float(line.rsplit("total=", 1)[1])


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and process CPU seconds of ``fn()``."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="batches per calibration run (the slope's far end)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("runs/calibration.json"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batches < 2:
        parser.error("--batches must be at least 2 (the slope needs two run lengths)")

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, vocab, (BATCH, TOKENS), generator=gen), "use_cache": False}
               for _ in range(args.batches)]
    start = time.perf_counter()
    analysis = fxgradnas.analyze(model, batches[0])
    analysis_s = time.perf_counter() - start
    start = time.perf_counter()
    instrumented = fxgradnas.instrument(analysis, share_weights=True).module
    instrument_s = time.perf_counter() - start
    captured = analysis.captured.module

    current = batches[0]  # plain and forward-only jobs run one batch (rotating with the repeat)

    def plain() -> None:
        next_token_loss(model(**current), current).backward()
        model.zero_grad(set_to_none=True)

    def floor() -> None:  # the gradient of the input embeddings only: no parameter gradient is computed
        embeds = model.get_input_embeddings()(current["input_ids"]).detach().requires_grad_()
        torch.autograd.grad(next_token_loss(model(inputs_embeds=embeds, use_cache=False), current), embeds)

    def forward(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                module(**current)

        return run

    calib_seconds: list[float] = []

    def calib(n: int) -> Callable[[], None]:
        def run() -> None:
            scores = calibrate(analysis, batches[:n], next_token_loss, progress=False)
            assert scores.batches == n
            if n == len(batches):
                calib_seconds.append(scores.seconds / n)

        return run

    n = len(batches)
    jobs: dict[str, Callable[[], None]] = {
        "plain": plain,
        "floor": floor,
        "calibrate_1": calib(1),
        f"calibrate_{n}": calib(n),
        "forward_model": forward(model),
        "forward_captured": forward(captured),
        "forward_instrumented": forward(instrumented),
    }
    for warm_up in (plain, floor, calib(1), forward(instrumented)):  # first-call costs out of every column
        warm_up()
    clocks: dict[str, dict[str, list[float]]] = {"wall": {k: [] for k in jobs}, "cpu": {k: [] for k in jobs}}
    names = list(jobs)
    load_before, stall_before, loop_start = os.getloadavg()[0], cpu_stall_us(), time.perf_counter()
    for rep in range(args.repeats):
        current = batches[rep % n]
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            wall, cpu = timed(jobs[name])
            clocks["wall"][name].append(wall)
            clocks["cpu"][name].append(cpu)
        print(f"repeat {rep + 1}/{args.repeats}: "
              + ", ".join(f"{k}={v[-1]:.2f}s" for k, v in clocks["wall"].items()), flush=True)
    load_after, stall_after = os.getloadavg()[0], cpu_stall_us()
    stalled = (None if stall_before is None or stall_after is None
               else (stall_after - stall_before) / 1e6 / (time.perf_counter() - loop_start))

    def summary(times: dict[str, list[float]], stat: Callable[[list[float]], float]) -> dict[str, float]:
        t = {k: stat(v) for k, v in times.items()}
        if stat is min:  # noise only adds: the difference of the best runs
            slope = (t[f"calibrate_{n}"] - t["calibrate_1"]) / (n - 1)
        else:  # the slopes of runs made side by side in one repeat
            pairs = zip(times["calibrate_1"], times[f"calibrate_{n}"], strict=True)
            slope = stat([(long - short) / (n - 1) for short, long in pairs])
        return {
            "plain": t["plain"],
            "floor (activation gradients only, no masks)": t["floor"],
            "calibrate (slope)": slope,
            f"calibrate ({n} batches / {n})": t[f"calibrate_{n}"] / n,
            "forward: model": t["forward_model"],
            "forward: captured graph": t["forward_captured"],
            "forward: instrumented graph": t["forward_instrumented"],
        }

    def ratios_of(p: dict[str, float]) -> dict[str, float]:
        return {
            "calibrate(slope)/plain": p["calibrate (slope)"] / p["plain"],
            f"calibrate({n} batches)/plain": p[f"calibrate ({n} batches / {n})"] / p["plain"],
            "floor/plain": p["floor (activation gradients only, no masks)"] / p["plain"],
            "calibrate(slope)/floor": p["calibrate (slope)"] / p["floor (activation gradients only, no masks)"],
            "instrumented/captured forward": p["forward: instrumented graph"] / p["forward: captured graph"],
            "captured/model forward": p["forward: captured graph"] / p["forward: model"],
        }

    views = {"wall min": (clocks["wall"], min), "wall median": (clocks["wall"], statistics.median),
             "cpu min": (clocks["cpu"], min)}
    per_batch = {view: summary(times, stat) for view, (times, stat) in views.items()}
    per_batch["wall min"]["calibrate (Scores.seconds)"] = min(calib_seconds)
    per_batch["wall median"]["calibrate (Scores.seconds)"] = statistics.median(calib_seconds)
    ratios = {view: ratios_of(p) for view, p in per_batch.items()}
    targets = {"calibrate(slope)/plain": 0.7, "instrumented/captured forward": 1.03}
    primary = "wall min"  # noise only ever adds time: the best of the interleaved repeats
    print(f"\nGPT-2 124M, batch {BATCH} x {TOKENS} tokens, {n} batches, {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads; analysis {analysis_s:.1f}s, instrument {instrument_s:.2f}s; "
          f"load average {load_before:.1f} -> {load_after:.1f}, CPU stall "
          f"{'n/a' if stalled is None else f'{stalled:.0%}'}\n")
    rows = [(k, *(per_batch[v].get(k, float("nan")) for v in views)) for k in per_batch["wall min"]]
    print(tabulate(rows, headers=["seconds per batch", *views], floatfmt=".3f"))
    print()
    rows = [(k, *(ratios[v][k] for v in views), targets.get(k, ""),
             "" if k not in targets else ("ok" if ratios[primary][k] <= targets[k] else "MISSED"))
            for k in ratios[primary]]
    print(tabulate(rows, headers=["ratio", *views, "target", f"({primary})"], floatfmt=".3f"))
    # busy: tasks waited for a CPU a fifth of the time (or, without PSI, the load average is high)
    busy = stalled > 0.2 if stalled is not None else max(load_before, load_after) > (os.cpu_count() or 1) + 1.5
    if busy:
        stall = "n/a" if stalled is None else f"{stalled:.0%}"
        print(f"\nWARNING: the machine was busy (CPU stall {stall} of the time, load average up to "
              f"{max(load_before, load_after):.1f} on {os.cpu_count()} cores): other processes inflate and "
              "scatter these timings; rerun on a quiet machine (or with --threads 1)")
    result = {
        "model": "gpt2-124M (random init, eval)",
        "batch": [BATCH, TOKENS],
        "batches": n,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average": [load_before, load_after],
        "cpu_stall_fraction": stalled,
        "busy": busy,
        "analysis_s": analysis_s,
        "instrument_s": instrument_s,
        "per_batch_s": per_batch,
        "ratios": ratios,
        "targets": targets,
        "met": {k: ratios[primary][k] <= t for k, t in targets.items()},
        "met_on": primary,
        "raw_s": clocks,
        "calibrate_scores_seconds_per_batch_s": calib_seconds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
