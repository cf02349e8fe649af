"""Checks of fxgradnas on one model of :mod:`families`, shared by ``tests/test_breadth.py`` and
``benchmarks/breadth.py``.

Every check returns a :class:`Check`: ``ok`` True (pass), False (fail) or None (not applicable),
with a ``detail`` (a measurement, or the first line of the exception) and its time. A failing check
never stops the next one.

Checks (``CHECKS``):

- ``analyze``: ``fxgradnas.analyze`` runs.
- ``heads``: where the graph has attention (SDPA, or a softmax over a rank >= 3 tensor), at least one
  heads group exists (none at all is a *silent omission*) and every heads group is prunable.
- ``plan_hc`` / ``plan_hidden`` / ``plan_all``: a seeded random plan keeping about half the units of
  every prunable exact group (heads and channels / the hidden width / all of them) is applied with
  ``apply_plan(check=False)`` and compared with ``masked`` on the example inputs and on fresh random
  inputs of the same shapes: pass if the relative max difference is at most ``TOLERANCE``.
- ``prune``: ``fxgradnas.prune(..., constraint={"params": 0.6}, calibration=CalibrationOptions(scorer="random"))``
  reaches 60 %, with the default re-fit (``CompensationOptions()``) on the example batch for Hugging Face models; torchvision
  models, whose only re-fittable layers are classifiers of up to 25,088 inputs, skip it.
- ``write_back`` (Hugging Face): ``fxgradnas.hf.write_back`` of the ``plan_all`` plan into a copy of
  the model; its output equals the masked graph's.
- ``generate`` (causal LMs): greedy ``generate`` of the written-back model (3 new tokens, KV cache)
  gives the tokens of a cache-free greedy loop over the masked graph, without and with left padding.
- ``save_load`` (causal LMs): ``save_pruned`` / ``load_pruned`` round trip gives the same logits.
- ``torch_pruning`` (torchvision, optional): Torch-Pruning's MetaPruner with magnitude importance at
  channel ratio ``TP_RATIO`` runs and the pruned model's forward works (the peer to compare with).
"""

from __future__ import annotations

import importlib.util
import math
import re
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from tests import families
from tests.plans import random_plan

TOLERANCE = 1e-5
BUDGET = 0.6
TP_RATIO = 0.25  # channel ratio: about (1 - 0.25)^2 = 56 % of the parameters
NEW_TOKENS = 3
CHECKS = ("analyze", "heads", "plan_hc", "plan_hidden", "plan_all", "prune", "write_back", "generate", "save_load",
          "torch_pruning")
PLAN_KINDS = {"plan_hc": ("heads", "channels", "experts"), "plan_hidden": ("hidden",),
              "plan_all": ("heads", "channels", "experts", "hidden")}
ATTENTION_OPS = ("scaled_dot_product_attention", "_scaled_dot_product", "softmax", "_softmax", "_safe_softmax")


@dataclass
class Check:
    ok: bool | None
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    """Everything measured on one model."""

    name: str
    source: str  # "hf" or "torchvision"
    checks: dict[str, Check] = field(default_factory=dict)
    groups: dict[str, list[int]] = field(default_factory=dict)  # kind -> [prunable, total]
    frozen: list[str] = field(default_factory=list)
    attention_ops: int = 0
    capture_s: float = 0.0
    analysis_s: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Report:
        data = dict(data)
        data["checks"] = {k: Check(**v) for k, v in data["checks"].items()}
        return cls(**data)

    def failures(self) -> list[tuple[str, str]]:
        return [(name, c.detail) for name, c in self.checks.items() if c.ok is False]

    @property
    def fully_passes(self) -> bool:
        """Every applicable check passed (Torch-Pruning is the peer's column, not fxgradnas's)."""
        return all(c.ok is not False for name, c in self.checks.items() if name != "torch_pruning")


# --------------------------------------------------------------------------- helpers
def first_line(exc: BaseException, limit: int = 200) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    where = ""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if "fxgradnas" in f.filename and "tests" not in f.filename]
    if inside:
        f = inside[-1]
        where = f" [{f.filename.rpartition('fxgradnas/')[2]}:{f.lineno}]"
    message = f"{type(exc).__name__}: {text}"
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    return message + where


def timed(fn: Callable[[], Check]) -> Check:
    """Run a check; an exception is a failure with its first line."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # every failure is a measurement
        result = Check(False, first_line(exc))
    result.seconds = time.perf_counter() - start
    return result


def factory(name: str, shallow: bool = False) -> tuple[str, Callable[..., Any]]:
    """The source and factory of a model; ``shallow``: torchvision's :data:`families.TORCHVISION_SHALLOW`."""
    if name in families.HF_FAMILIES:
        return "hf", families.HF_FAMILIES[name]
    if name in families.TORCHVISION_MODELS:
        return "torchvision", (families.TORCHVISION_SHALLOW if shallow else families.TORCHVISION_MODELS)[name]
    raise KeyError(f"unknown model {name!r}")


def call(module: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


def tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def relative_difference(reference: Any, other: Any) -> float:
    """Largest |a - b| over all output tensors, relative to the largest |a| (as
    :func:`fxgradnas.rewrite.relative_difference`, on given outputs)."""
    ref, out = tensors(reference), tensors(other)
    if len(ref) != len(out):
        ref, out = ref[:1], out[:1]
    worst = 0.0
    for a, b in zip(ref, out, strict=True):
        if a.shape != b.shape:
            return math.inf
        if a.is_floating_point():
            scale = a.abs().max().clamp_min(1e-12)
            worst = max(worst, float((a - b).abs().max() / scale))
        elif not torch.equal(a, b):
            return math.inf
    return worst


def vocab_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", None) or families.VOCAB)


def fresh_inputs(model: nn.Module, inputs: Any, seed: int = 1) -> Any:
    """Inputs of the same structure and shapes: new token ids within the vocabulary, new randn
    floats; masks and other integer inputs unchanged."""
    gen = torch.Generator().manual_seed(seed)
    vocab = vocab_of(model)

    def new(key: str, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return torch.randn(value.shape, generator=gen, dtype=value.dtype)
        if key.endswith("input_ids"):
            return torch.randint(3, vocab, value.shape, generator=gen, dtype=value.dtype)
        return value

    if isinstance(inputs, dict):
        return {k: new(k, v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(new("", v) for v in inputs)
    return new("", inputs)


def attention_ops(analysis: Any) -> int:
    """SDPA nodes plus softmaxes over rank >= 3 tensors (attention probabilities; an MoE router's
    softmax is over a rank-2 tensor)."""
    count = 0
    for node in analysis.captured.module.graph.nodes:
        if node.op != "call_function" or not hasattr(node.target, "overloadpacket"):
            continue
        name = node.target.overloadpacket.__name__
        if name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
            count += 1
        elif name in ("softmax", "_softmax", "_safe_softmax"):
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() >= 3:
                count += 1
    return count


def shorten(reason: str, limit: int = 70) -> str:
    """The first reason, without the node names that make each group's reason unique."""
    reason = re.sub(r" at [A-Za-z_][A-Za-z0-9_.]*(?=$|[ ,:;)])", "", reason.split(";")[0].strip())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


# --------------------------------------------------------------------------- checks
def check_heads(analysis: Any) -> Check:
    n_attention = attention_ops(analysis)
    heads = analysis.by_kind("heads")
    if n_attention == 0:
        return Check(None, "no attention" + (f" ({len(heads)} heads groups)" if heads else ""))
    if not heads:
        return Check(False, f"silent omission: {n_attention} attention ops, no heads group")
    frozen = [g for g in heads if not g.prunable]
    if frozen:
        return Check(False, f"{len(frozen)} of {len(heads)} heads groups frozen: {shorten(frozen[0].reason)}")
    return Check(True, f"{len(heads)} heads groups, {n_attention} attention ops")


def check_plan(analysis: Any, plan: Any, model: nn.Module, inputs: Any) -> Check:
    """``apply_plan`` equals ``masked`` on the example inputs and on fresh ones."""
    import fxgradnas

    if not plan.keep:
        return Check(None, "no prunable exact group of these kinds")
    pruned = fxgradnas.apply_plan(analysis, plan, check=False)
    reference = fxgradnas.masked(analysis, plan)
    worst = 0.0
    with torch.no_grad():
        for batch in (inputs, fresh_inputs(model, inputs)):
            worst = max(worst, relative_difference(call(reference, batch), call(pruned, batch)))
    units = sum(len(k) for k in plan.keep.values())
    total = sum(analysis.group(n).size for n in plan.keep)
    return Check(worst <= TOLERANCE, f"{worst:.1e} ({len(plan.keep)} groups, {units}/{total} units)")


def _zero_loss(output: Any, batch: Any) -> torch.Tensor:
    return torch.zeros(())


def check_prune(analysis: Any, inputs: Any, refit: bool = True) -> Check:
    """``prune`` to :data:`BUDGET` of the params with its default kinds; where those cannot reach it and the
    residual width is an exact prunable group (a CNN whose BatchNorms make it exact: ResNeXt keeps most of
    its params in the residual convs), with the hidden width too, as the error message suggests; ``refit``:
    with the default re-fit."""
    import fxgradnas

    def run(search: Any = None) -> Any:
        return fxgradnas.prune(analysis, None, [inputs], _zero_loss, constraint={"params": BUDGET},
                               search=search or fxgradnas.SearchOptions(), progress=False,
                               calibration=fxgradnas.CalibrationOptions(scorer="random"),
                               compensation=fxgradnas.CompensationOptions() if refit else None)

    note = ""
    try:
        result = run()
    except fxgradnas.ConstraintError as exc:
        smallest = re.search(r"keeps [0-9,]+ params \(([0-9.]+%)\)", str(exc))
        if smallest is None:
            raise
        failure = Check(False, f"ConstraintError: the smallest model keeps {smallest.group(1)} of the params")
        if not any(g.kind == "hidden" and g.exact for g in analysis.prunable):
            return failure
        try:
            result = run(fxgradnas.SearchOptions(kinds=("heads", "channels", "experts", "hidden")))
        except fxgradnas.ConstraintError:
            return failure
        note = " (with the hidden width)"
    achieved = result.achieved["params"]
    return Check(achieved <= BUDGET + 1e-9, f"params {achieved:.3f}{note}")


def is_causal_lm(model: nn.Module) -> bool:
    return "ForCausalLM" in type(model).__name__ or type(model).__name__.endswith("LMHeadModel")


def hf_call_inputs(model: nn.Module, inputs: dict) -> dict:
    """The model's own forward gets ``use_cache=False`` where it takes it (as the capture does)."""
    import inspect

    if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in inputs:
        return {**inputs, "use_cache": False}
    return inputs


def check_write_back(written: nn.Module, reference: nn.Module, error: str | None, inputs: dict) -> Check:
    if error is not None:
        return Check(False, error)
    with torch.no_grad():
        worst = max(relative_difference(call(reference, batch), call(written, hf_call_inputs(written, batch)))
                    for batch in (inputs, fresh_inputs(written, inputs)))
    return Check(worst <= TOLERANCE, f"{worst:.1e}")


def greedy_reference(graph: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation by full forwards of a graph module (no cache). The end-of-sequence token
    is never chosen, as in ``generate`` with ``min_new_tokens == max_new_tokens``."""
    with torch.no_grad():
        for _ in range(steps):
            logits = tensors(graph(input_ids=ids))[0][:, -1].clone()
            logits[:, families.EOS] = -math.inf
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def generate_tokens(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=families.PAD)
    return out[:, ids.shape[1]:]


def left_padded(ids: torch.Tensor, pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 1 is shortened by ``pad`` tokens and padded on the left."""
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1] = torch.cat([torch.full((pad,), families.PAD, dtype=ids.dtype), ids[1, : ids.shape[1] - pad]])
    mask[1, :pad] = 0
    return padded, mask


def padding_agrees(model: nn.Module, ids: torch.Tensor, reference_short: torch.Tensor) -> tuple[bool, str]:
    """Left-padded row 1 generates what the reference generates from its unpadded tokens."""
    padded, mask = left_padded(ids)
    got = generate_tokens(model, padded, mask)[1]
    want = reference_short[1, -NEW_TOKENS:]
    return bool(torch.equal(got, want)), f"padded {got.tolist()} vs {want.tolist()}"


def check_generate(written: nn.Module, original: nn.Module, reference: nn.Module, inputs: dict) -> Check:
    """Greedy generate (KV cache) of the written-back model = greedy loop over the masked graph,
    without and with left padding. If the unpruned model itself disagrees with its own graph under
    left padding, only the unpadded part is judged."""
    ids = inputs["input_ids"]
    want = greedy_reference(reference, ids, NEW_TOKENS)[:, -NEW_TOKENS:]
    got = generate_tokens(written, ids, torch.ones_like(ids))
    if not torch.equal(got, want):
        return Check(False, f"generate {got.tolist()} != masked graph {want.tolist()}")
    short = ids[:, :-2]
    ok, detail = padding_agrees(written, ids, greedy_reference(reference, short, NEW_TOKENS))
    if ok:
        return Check(True, "same tokens, with and without left padding")
    control, _ = padding_agrees(original, ids, greedy_reference(original_graph(original, inputs), short, NEW_TOKENS))
    if not control:
        return Check(True, "same tokens without padding (left padding differs in the unpruned model too)")
    return Check(False, f"left padding: {detail}")


def original_graph(model: nn.Module, inputs: dict) -> nn.Module:
    """The unpruned model as a plain callable on ``input_ids`` (for the padding control)."""

    class Plain(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> Any:
            return model(**hf_call_inputs(model, {"input_ids": input_ids}))

    return Plain()


def check_save_load(written: nn.Module, structure: dict, inputs: dict) -> Check:
    from fxgradnas.hf import load_pruned, save_pruned

    with tempfile.TemporaryDirectory() as folder:
        save_pruned(written, structure, folder)
        restored = load_pruned(folder, model_class=type(written))
    batch = hf_call_inputs(written, inputs)
    with torch.no_grad():
        worst = relative_difference(call(written, batch), call(restored, batch))
    return Check(worst <= 1e-6, f"{worst:.1e}")


def has_torch_pruning() -> bool:
    return importlib.util.find_spec("torch_pruning") is not None


def run_torch_pruning(name: str, seed: int = 0) -> Check:
    _, make = factory(name)
    return check_torch_pruning(*make(seed=seed))


def check_torch_pruning(model: nn.Module, inputs: torch.Tensor) -> Check:
    """Torch-Pruning 1.6 MetaPruner, magnitude importance, the classifier layer ignored, the head
    count of every ``nn.MultiheadAttention`` given."""
    if not has_torch_pruning():
        return Check(None, "torch-pruning not installed")
    import torch_pruning as tp

    before = sum(p.numel() for p in model.parameters())
    ignored = [m for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.shape[0] == families.CLASSES]
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=TP_RATIO, ignored_layers=ignored, num_heads=num_heads)
    pruner.step()
    with torch.no_grad():
        out = model(inputs)
    if out.shape != (inputs.shape[0], families.CLASSES):
        return Check(False, f"output shape {tuple(out.shape)}")
    return Check(True, f"params {sum(p.numel() for p in model.parameters()) / before:.3f}")


# --------------------------------------------------------------------------- one model
def analyse(name: str, seed: int = 0, progress: Callable[[str, Report], None] | None = None, shallow: bool = False
            ) -> tuple[Report, Any, nn.Module, Any]:
    """Build the model (``shallow``: see :func:`factory`), analyse it and fill the report's analysis part."""
    import fxgradnas

    source, make = factory(name, shallow)
    report = Report(name, source)
    if progress:
        progress("analyze", report)
    model, inputs = make(seed=seed)
    holder: dict[str, Any] = {}

    def run() -> Check:
        holder["analysis"] = fxgradnas.analyze(model, inputs)
        return Check(True, "")

    report.checks["analyze"] = timed(run)
    analysis = holder.get("analysis")
    if analysis is not None:
        report.capture_s = analysis.seconds.get("capture", 0.0)
        report.analysis_s = analysis.seconds.get("analysis", 0.0)
        kinds = Counter(g.kind for g in analysis.groups)
        prunable = Counter(g.kind for g in analysis.prunable)
        report.groups = {k: [prunable[k], kinds[k]] for k in sorted(kinds)}
        reasons = Counter(shorten(g.reason) for g in analysis.groups if not g.prunable)
        report.frozen = [f"{n}x {r}" for r, n in reasons.most_common()]
        report.attention_ops = attention_ops(analysis)
        report.checks["heads"] = timed(lambda: check_heads(analysis))
    return report, analysis, model, inputs


def write_back_model(name: str, analysis: Any, plan: Any, seed: int = 0) -> tuple[nn.Module, dict | None, str | None]:
    """A fresh copy of the model (same seed) with the plan written back."""
    from fxgradnas.hf import write_back

    _, make = factory(name)
    model, _ = make(seed=seed)
    try:
        structure = write_back(model, analysis, plan)
    except Exception as exc:
        return model, None, first_line(exc)
    return model.eval(), structure, None


def run_checks(name: str, checks: tuple[str, ...] = CHECKS, seed: int = 0,
               progress: Callable[[str, Report], None] | None = None) -> Report:
    """Every check of ``checks`` that applies to the model, each caught on its own. ``progress`` is
    given the name of each check before it starts, with the report so far."""
    start = time.perf_counter()
    report, analysis, model, inputs = analyse(name, seed, progress)
    if analysis is None:
        report.seconds = time.perf_counter() - start
        return report

    def record(check: str, fn: Callable[[], Check]) -> None:
        if progress:
            progress(check, report)
        report.checks[check] = timed(fn)

    for check, kinds in PLAN_KINDS.items():
        if check in checks:
            plan = random_plan(analysis, seed, half=True, kinds=kinds, allow_empty=True)
            record(check, lambda p=plan: check_plan(analysis, p, model, inputs))
    if "prune" in checks:
        record("prune", lambda: check_prune(analysis, inputs, report.source == "hf"))
    hf_checks = [c for c in ("write_back", "generate", "save_load") if c in checks]
    if report.source == "hf" and hf_checks:
        plan = random_plan(analysis, seed, half=True, kinds=PLAN_KINDS["plan_all"], allow_empty=True)
        if not plan.keep:
            for c in hf_checks:
                report.checks[c] = Check(None, "no prunable exact group")
        else:
            run_hf_checks(report, name, analysis, model, inputs, plan, hf_checks, record, seed)
    if report.source == "torchvision" and "torch_pruning" in checks:
        record("torch_pruning", lambda: run_torch_pruning(name, seed))
    report.seconds = time.perf_counter() - start
    return report


def run_hf_checks(report: Report, name: str, analysis: Any, model: nn.Module, inputs: dict, plan: Any,
                  checks: list[str], record: Callable[[str, Callable[[], Check]], None], seed: int = 0) -> None:
    """write_back into a fresh copy of the model, then the checks that use the written-back model."""
    import fxgradnas

    record("write_back", lambda: Check(None))  # tells progress; replaced below
    written, structure, error = write_back_model(name, analysis, plan, seed)
    try:
        reference, reference_error = fxgradnas.masked(analysis, plan), None
    except Exception as exc:
        reference, reference_error = None, f"masked: {first_line(exc)}"
    if "write_back" in checks:
        record("write_back", lambda: check_write_back(written, reference, error or reference_error, inputs))
    else:
        del report.checks["write_back"]
    causal = is_causal_lm(model)
    for check in ("generate", "save_load"):
        if check not in checks:
            continue
        if not causal:
            report.checks[check] = Check(None, "not a causal LM")
        elif error is not None:
            report.checks[check] = Check(False, f"write_back failed: {error}")
        elif check == "generate":
            if reference is None:
                report.checks[check] = Check(False, reference_error)
            else:
                record(check, lambda: check_generate(written, model, reference, inputs))
        else:
            record(check, lambda: check_save_load(written, structure, inputs))
