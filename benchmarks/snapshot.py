"""A behaviour snapshot of fxgradnas's public pipeline on every test model, to show that a refactor
changes nothing.

    python benchmarks/snapshot.py [--out snapshot.json] [--only NAME ...]
    python benchmarks/snapshot.py --compare A.json B.json

Models: tests/zoo.py (``ZOO`` and ``HF_ZOO``, keys ``zoo/<name>``) and tests/families.py
(``HF_FAMILIES``, keys ``hf/<name>``); ``--only`` takes keys or bare names. Each model is built from
seed 0 and given three batches: its example inputs and two more of the same structure (new randn
floats, token ids shuffled within the batch; masks unchanged). The loss is the mean logsumexp over
the last axis of the output's first floating tensor. Only public entry points with default options:

- ``analyze(model, inputs)``: every group's name, kind, unit_shape, prunable, reason, exact;
- ``calibrate(analysis, batches, loss, progress=False)``: the scores (9 significant digits);
- ``search(analysis, scores, {"params": 0.7})``: the plan, costs and achieved ratios;
- ``apply_plan(analysis, plan)``: a digest of its output on the example inputs (per tensor: shape,
  dtype, sum, abs sum, abs max, first 8 values);
- ``prune(model, inputs, batches, loss, constraint={"params": 0.7}, progress=False)``: the plan,
  costs, achieved ratios, compensation reports and the output digest.

A stage that raises records ``"error": "<type>: <first line>"`` (the stages after it that need its
result are left out). Timings are printed, never stored. ``--compare`` prints every difference (model,
field path, A, B) and exits 1 when there is one; floats agree within a relative 1e-6 for scores and
1e-4 for outputs and compensation errors (relative to the largest magnitude of the list or output
they belong to), 1e-6 otherwise. One intra-op thread, so the numbers do not depend on the cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import fxgradnas  # noqa: E402
from tests import families, zoo  # noqa: E402

BUDGET = {"params": 0.7}
TOLERANCES = {"scores": 1e-6, "output": 1e-4, "compensation": 1e-4}
DEFAULT_TOLERANCE = 1e-6


def models() -> dict[str, Callable[..., Any]]:
    return {**{f"zoo/{n}": f for n, f in {**zoo.ZOO, **zoo.HF_ZOO}.items()},
            **{f"hf/{n}": f for n, f in families.HF_FAMILIES.items()}}


# --------------------------------------------------------------------------- inputs and loss
def batches(inputs: Any, count: int = 3) -> list[Any]:
    """The example inputs and ``count - 1`` more of the same structure, drawn from fixed seeds."""
    def new(key: str, value: Any, gen: torch.Generator) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return torch.randn(value.shape, generator=gen, dtype=value.dtype)
        if key in ("", "input_ids", "decoder_input_ids"):  # token ids: the same ids, shuffled
            return value.flatten()[torch.randperm(value.numel(), generator=gen)].view_as(value)
        return value

    out = [inputs]
    for seed in range(1, count):
        gen = torch.Generator().manual_seed(seed)
        if isinstance(inputs, dict):
            out.append({k: new(k, v, gen) for k, v in inputs.items()})
        elif isinstance(inputs, tuple):
            out.append(tuple(new("", v, gen) for v in inputs))
        else:
            out.append(new("", inputs, gen))
    return [(b,) if isinstance(b, tuple) else b for b in out]  # a tuple batch is (model inputs,)


def tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def loss_fn(output: Any, batch: Any) -> torch.Tensor:
    first = next(t for t in tensors(output) if t.is_floating_point())
    return first.float().logsumexp(-1).mean()


def call(module: torch.nn.Module, inputs: Any) -> Any:
    with torch.no_grad():
        if isinstance(inputs, dict):
            return module(**inputs)
        return module(*inputs) if isinstance(inputs, tuple) else module(inputs)


# --------------------------------------------------------------------------- records
def r(x: Any) -> float:
    return float(f"{float(x):.9g}")


def digest(output: Any) -> list[dict]:
    out = []
    for t in tensors(output):
        d: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype)}
        flat = t.detach().flatten()
        if t.is_floating_point() and flat.numel():
            flat = flat.double()
            d |= {"sum": r(flat.sum()), "abs_sum": r(flat.abs().sum()), "abs_max": r(flat.abs().max()),
                  "head": [r(x) for x in flat[:8]]}
        elif flat.numel():
            d |= {"sum": int(flat.sum()), "head": flat[:8].tolist()}
        out.append(d)
    return out


def error(exc: BaseException) -> dict:
    line = next((s.strip() for s in str(exc).splitlines() if s.strip()), "")
    return {"error": f"{type(exc).__name__}: {re.sub(r'0x[0-9a-fA-F]+', '0x?', line)}"}


def found(result: Any) -> dict:
    """Plan, costs and achieved ratios of a SearchResult or a PruneResult."""
    search = getattr(result, "search", result)
    return {"plan": {k: list(v) for k, v in sorted(result.plan.keep.items())}, "costs": dict(search.costs),
            "base": dict(search.base), "achieved": {k: r(v) for k, v in result.achieved.items()}}


def snapshot(make: Callable[..., Any]) -> dict:
    """Every stage's record for one model; a stage that raises records its error."""
    torch.manual_seed(0)
    record: dict[str, Any] = {}
    try:
        model, inputs = make(seed=0)
        data = batches(inputs)
    except Exception as exc:  # the model itself does not build here
        return {"build": error(exc)}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        try:
            value, record[name] = fn()
            return value
        except Exception as exc:  # an exception is behaviour too
            record[name] = error(exc)
            return None

    def groups(analysis: Any) -> list[dict]:
        return [{"name": g.name, "kind": g.kind, "unit_shape": list(g.unit_shape), "prunable": g.prunable,
                 "reason": g.reason, "exact": g.exact} for g in analysis.groups]

    analysis = stage("analyze", lambda: (a := fxgradnas.analyze(model, inputs), {"groups": groups(a)}))
    if analysis is not None:
        scores = stage("calibrate", lambda: (s := fxgradnas.calibrate(analysis, data, loss_fn, progress=False), {
            "batches": s.batches, "truncated": s.truncated,
            "scores": {k: [r(x) for x in v.double().flatten()] for k, v in sorted(s.items())}}))
        if scores is not None:
            plan = stage("search", lambda: ((f := fxgradnas.search(analysis, scores, BUDGET)).plan, found(f)))
            if plan is not None:
                stage("apply_plan", lambda: (None, {"output": digest(call(fxgradnas.apply_plan(analysis, plan), inputs))}))

    def prune() -> tuple[None, dict]:
        result = fxgradnas.prune(model, inputs, data, loss_fn, constraint=BUDGET, progress=False)
        compensation = [{"group": c.group, "consumer": c.consumer, "applied": c.applied,
                         "error_before": r(c.error_before), "error_after": r(c.error_after)} for c in result.compensation]
        return None, {**found(result), "compensation": compensation, "output": digest(call(result.model, inputs))}

    stage("prune", prune)
    return record


# --------------------------------------------------------------------------- compare
def close(a: float, b: float, rel: float, scale: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b), scale)


def number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def differences(a: Any, b: Any, path: str, rel: float = DEFAULT_TOLERANCE, scale: float = 0.0) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        scale = a.get("abs_max", scale) if number(a.get("abs_max")) else scale  # an output tensor's digest
        out = []
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{where}: {'only in B' if key not in a else 'only in A'}: {a.get(key, b.get(key))!r}")
                continue
            sub_scale = a.get("abs_sum", scale) if key == "sum" and number(a.get("abs_sum")) else scale
            out += differences(a[key], b[key], where, TOLERANCES.get(key, rel), sub_scale)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        magnitudes = [abs(x) for x in a if number(x) and not math.isnan(x)]
        scale = max([scale, *magnitudes])
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]", rel, scale)]
    if number(a) and number(b) and (isinstance(a, float) or isinstance(b, float)):
        return [] if close(float(a), float(b), rel, scale) else [f"{path}: {a!r} != {b!r} (rel {rel:g})"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def compare(path_a: str, path_b: str) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (path_a, path_b))
    if a.get("meta") != b.get("meta"):
        print(f"note: the environments differ: {a.get('meta')} vs {b.get('meta')}")
    diffs = differences(a["models"], b["models"], "")
    for line in diffs:
        print(line)
    changed = {line.split(".", 1)[0].split(":", 1)[0] for line in diffs}
    print(f"{len(diffs)} difference(s) in {len(changed)} of {len(a['models'])} models" if diffs
          else f"no difference ({len(a['models'])} models)")
    return 1 if diffs else 0


# --------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="snapshot.json", help="where the JSON goes")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="keys (zoo/llama, hf/llama) or bare names")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two snapshots")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    families.prepare_torchvision()
    chosen = {k: f for k, f in models().items() if not args.only or k in args.only or k.split("/")[1] in args.only}
    records, start = {}, time.perf_counter()
    for key, make in chosen.items():
        begin = time.perf_counter()
        records[key] = snapshot(make)
        errors = [s for s, v in records[key].items() if "error" in v]
        print(f"{key}: {time.perf_counter() - begin:.1f} s{' raised in ' + ', '.join(errors) if errors else ''}",
              file=sys.stderr, flush=True)
    import transformers

    meta = {"torch": torch.__version__, "transformers": transformers.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "models": records}, indent=1) + "\n")
    print(f"{len(records)} models in {time.perf_counter() - start:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
