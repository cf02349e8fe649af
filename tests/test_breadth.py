"""Breadth: fxgradnas on real architectures (tests/families.py), with the checks of
tests/breadth_checks.py that benchmarks/breadth.py reports.

Failures measured now are strict xfails: a fix makes the test XPASS, and KNOWN_FAILURES must then be
updated (re-measure with ``python benchmarks/breadth.py``). The benchmark's random-plan checks for
heads+channels and hidden alone, and the Torch-Pruning comparison, are left to the benchmark; here
each model is captured once and gets the "all" plan. The torchvision models are the shallow variants of
``families.TORCHVISION_SHALLOW`` (the benchmark runs the full ones).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests import breadth_checks as bc
from tests import families
from tests.plans import random_plan

pytestmark = pytest.mark.breadth

TEST_CHECKS = ("analyze", "heads", "plan_all", "prune", "write_back", "generate", "save_load")
HF_ONLY = ("write_back", "generate", "save_load")

# (model, check) -> the failure measured by benchmarks/breadth.py (first line, shortened)
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ('mpt', 'heads'): '1 of 1 heads groups frozen: created with a fixed shape (the ALiBi slopes, shared by every layer)',
    ('bloom', 'heads'): '1 of 1 heads groups frozen: created with a fixed shape (the ALiBi slopes, shared by every layer)',
    ('falcon_alibi', 'heads'): '1 of 1 heads groups frozen: created with a fixed shape (the ALiBi slopes, shared by every layer)',
    # with its heads frozen the smallest model keeps more than the 60 % budget
    ('falcon_alibi', 'prune'): 'ConstraintError: the smallest model keeps 71.7% of the params',
}


def _params() -> list[Any]:
    params = []
    for source, names in (("hf", families.HF_FAMILIES), ("torchvision", families.TORCHVISION_MODELS)):
        for name in names:
            for check in TEST_CHECKS:
                if source != "hf" and check in HF_ONLY:
                    continue
                marks = [pytest.mark.hf] if source == "hf" else []
                reason = KNOWN_FAILURES.get((name, check))
                if reason is not None:
                    marks.append(pytest.mark.xfail(strict=True, reason=reason))
                params.append(pytest.param(name, check, marks=marks, id=f"{name}-{check}"))
    return params


class _State:
    """The model whose checks run now (tests are ordered model by model); one at a time in memory."""

    name: str | None = None
    values: dict[str, Any] = {}


def _state(name: str) -> dict[str, Any]:
    if _State.name != name:
        _State.name, _State.values = None, {}
        source, _ = bc.factory(name)
        if source == "hf" and not families.has_transformers():
            pytest.skip("needs transformers")
        if source == "torchvision" and not families.has_torchvision():
            pytest.skip("needs torchvision (pip install --no-deps torchvision==0.28.0)")
        report, analysis, model, inputs = bc.analyse(name, shallow=True)
        _State.name = name
        _State.values = {"report": report, "analysis": analysis, "model": model, "inputs": inputs}
    return _State.values


def _hf_checks(name: str, state: dict[str, Any]) -> dict[str, bc.Check]:
    if "hf" not in state:
        report = bc.Report(name, "hf")
        analysis = state["analysis"]
        plan = random_plan(analysis, half=True, kinds=bc.PLAN_KINDS["plan_all"], allow_empty=True)
        if not plan.keep:
            state["hf"] = {c: bc.Check(None, "no prunable exact group") for c in HF_ONLY}
        else:
            bc.run_hf_checks(report, name, analysis, state["model"], state["inputs"], plan, list(HF_ONLY),
                             lambda check, fn: report.checks.__setitem__(check, bc.timed(fn)))
            state["hf"] = report.checks
    return state["hf"]


def _result(name: str, check: str) -> bc.Check:
    state = _state(name)
    report, analysis = state["report"], state["analysis"]
    if check == "analyze":
        return report.checks["analyze"]
    if analysis is None:
        pytest.skip("the analysis failed")
    if check == "heads":
        return report.checks["heads"]
    if check.startswith("plan_"):
        plan = random_plan(analysis, half=True, kinds=bc.PLAN_KINDS[check], allow_empty=True)
        return bc.timed(lambda: bc.check_plan(analysis, plan, state["model"], state["inputs"]))
    if check == "prune":
        refit = state["report"].source == "hf"
        return bc.timed(lambda: bc.check_prune(analysis, state["inputs"], refit))
    return _hf_checks(name, state)[check]


@pytest.mark.parametrize(("name", "check"), _params())
def test_breadth(name: str, check: str) -> None:
    result = _result(name, check)
    if result.ok is None:
        pytest.skip(f"not applicable: {result.detail}")
    assert result.ok, f"{name} {check}: {result.detail}"
