"""The real-model path on SmolLM2-135M-Instruct (opt-in: ``pytest -m slow``)."""

from __future__ import annotations

import math

import pytest
import torch

import fxgradnas

pytestmark = [pytest.mark.slow, pytest.mark.hf]


def test_prune_smollm2_on_real_text() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from examples.smollm2 import load_smollm2
    from fxgradnas.datasets import (
        batched,
        causal_lm_loss,
        perplexity,
        shakespeare_text,
        stdlib_text,
        token_windows,
    )
    from fxgradnas.hf import write_back

    model, tokenizer = load_smollm2()
    calibration = batched(token_windows(tokenizer, stdlib_text(), 64, 8), 4)
    evaluation = batched(token_windows(tokenizer, shakespeare_text(), 64, 8), 4)
    result = fxgradnas.prune(model, calibration[0], calibration, causal_lm_loss, constraint={"params": 0.9},
                             progress=False)
    analysis = result.analysis
    assert len(analysis.by_kind("heads")) == 30 and all(g.unit_shape == (3, 3) for g in analysis.by_kind("heads"))
    assert len([g for g in analysis.by_kind("channels") if g.prunable]) == 30
    assert 0.89 <= result.achieved["params"] <= 0.9
    dense = perplexity(model, evaluation)
    pruned_graph = perplexity(result.model, evaluation)
    hf_model = model.__class__(model.config)
    hf_model.load_state_dict(model.state_dict())
    write_back(hf_model, analysis, result.plan)
    pruned_hf = perplexity(hf_model, evaluation)
    assert math.isfinite(pruned_graph) and dense < pruned_graph < 10 * dense
    assert pruned_hf == pytest.approx(pruned_graph, rel=1e-4)
    ids = tokenizer("def add(a, b):", return_tensors="pt")
    assert hf_model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] == \
        ids["input_ids"].shape[1] + 4
    assert torch.equal(model.model.embed_tokens.weight, hf_model.model.embed_tokens.weight)


def test_compensation_on_smollm2_lowers_perplexity_and_writes_back() -> None:
    """75 % params calibrated on Shakespeare: the layer-after-layer re-fit lowers held-out Shakespeare
    perplexity, and the written-back Hugging Face model carries the compensated weights."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from examples.smollm2 import load_smollm2
    from fxgradnas.compensate import compensate
    from fxgradnas.datasets import (
        CALIBRATION_SKIP,
        batched,
        causal_lm_loss,
        perplexity,
        shakespeare_text,
        token_windows,
    )
    from fxgradnas.hf import write_back

    model, tokenizer = load_smollm2()
    calibration = batched(token_windows(tokenizer, shakespeare_text(skip=CALIBRATION_SKIP), 128, 16), 4)
    evaluation = batched(token_windows(tokenizer, shakespeare_text(), 128, 8), 4)
    analysis = fxgradnas.analyze(model, calibration[0])
    scores = fxgradnas.calibrate(analysis, calibration, causal_lm_loss, progress=False,
                                 groups=[g for g in analysis.prunable if g.kind != "hidden"])
    plan = fxgradnas.search(analysis, scores, {"params": 0.75}).plan
    plain = fxgradnas.apply_plan(analysis, plan, check=False)
    fitted = fxgradnas.apply_plan(analysis, plan, check=False)
    reports = compensate(analysis, plan, fitted, calibration, progress=False)
    assert sum(r.applied for r in reports) >= len(reports) // 2
    assert perplexity(fitted, evaluation) < 0.95 * perplexity(plain, evaluation)
    write_back(model, analysis, plan, weights=fitted)
    assert perplexity(model, evaluation[:1]) == pytest.approx(perplexity(fitted, evaluation[:1]), rel=1e-4)
