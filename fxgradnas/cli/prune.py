"""``fxgradnas prune``: its steps, each with the settings it needs.

:func:`run_prune` runs them in turn: :func:`check_inputs` (which inputs the settings need, before anything is
read), :func:`load_model`, :func:`text_data` or :func:`factory_calibration` (the calibration, re-fit and
evaluation batches), :func:`measure` (perplexity and generation), :func:`prune_analysed`, :func:`heal_pruned`
and :func:`write_outputs` (the pruned model, plan, picture and report).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .inputs import (
    Source,
    calibration_batches,
    evaluation_batches,
    factory_data,
    read_named_texts,
    sampled_text,
    text_windows,
)
from .models import device_of_choice, evaluate, generate, load_checkpoint, parameter_count
from .output import (
    FACTORY_WEIGHTS,
    NOT_UNIFORM,
    PLAN_FILE,
    PLOT_FILE,
    REPORT_FILE,
    STANDARD,
    Steps,
    detailed_seconds,
    draw,
    merged_structure,
    outcome_record,
    output_directory,
    settings_record,
    show,
    show_outcome,
    write_report,
)
from .parser import SAMPLED, PruneSettings, UsageError

if TYPE_CHECKING:
    import torch

    from ..analysis import Analysis
    from ..prune import PruneResult


@dataclass
class Batches:
    """What the pruning reads: calibration batches, the re-fit's own (None: the calibration batches), the
    evaluation batches per text, the example inputs, the loss and how many windows the model sampled."""

    calibration: list[Any] = field(default_factory=list)
    refit: list[Any] | None = None
    evaluation: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    example: Any = None
    loss_fn: Callable[[Any, Any], Any] | None = None
    sampled: int = 0


def check_inputs(source: Source, texts: Mapping[str, tuple[str, ...]], data: str | None, *, gradnas: bool,
                 refits: bool, heal: int) -> None:
    """Raise UsageError unless the model argument gets the inputs the settings need: text options for a
    checkpoint, ``--data`` for a ``MODULE:FACTORY`` (``gradnas``: the gradnas scorer; ``refits``: a re-fit)."""
    calibration, refit, evaluation = texts["--calibration"], texts["--refit"], texts["--eval"]
    if refit and not refits:
        raise UsageError("--refit names what the re-fit reads; --compensate none skips the re-fit")
    if source.directory is None:
        if calibration or evaluation or refit:
            raise UsageError("--calibration, --refit and --eval read text for a checkpoint directory; a MODULE:FACTORY "
                             "model takes its calibration batches from --data MODULE:FUNCTION")
        if data is None and (gradnas or refits):
            raise UsageError("a MODULE:FACTORY model needs --data MODULE:FUNCTION returning (batches, loss_fn) for "
                             "--scorer gradnas and --compensate (or use --scorer l1 --compensate none)")
    elif data is not None:
        raise UsageError("--data is for MODULE:FACTORY models; a checkpoint calibrates on --calibration text")
    elif not calibration and (gradnas or (refits and not refit) or heal):
        raise UsageError("--calibration TEXT is needed for --scorer gradnas, --compensate (default ls; or --refit TEXT) "
                         "and --heal (or use --scorer l1 --compensate none)")
    if heal and source.directory is None and data is None:
        raise UsageError("--heal needs calibration batches: --data MODULE:FUNCTION for a MODULE:FACTORY model")


def load_model(source: Source, dtype: str, device: torch.device) -> tuple[Any, Any, Any]:
    """The model in eval mode on ``device``, with its tokenizer (a checkpoint) or its example inputs (a factory)."""
    import torch

    if source.directory is not None:
        model, tokenizer = load_checkpoint(source.directory, dtype, device)
        return model, tokenizer, None
    model, example = source.factory_model()
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), None, example


def text_data(model: Any, tokenizer: Any, texts: Mapping[str, Mapping[str, str | None]], steps: Steps, *,
              batches: int, batch_size: int, seq_len: int, eval_batches: int, seed: int, samples_needed: bool) -> Batches:
    """A checkpoint's batches from the texts each option names (None: text the model samples itself, sampled
    when it is read: by the re-fit, or by the calibration when ``samples_needed``)."""
    import torch

    from ..datasets import causal_lm_loss

    calibration, refit = texts["--calibration"], texts["--refit"]
    named = {name: text for name, text in (calibration | refit).items() if text is not None}
    with steps("tokenize", "cutting token windows"):  # first: a text too short is reported before sampling
        parts = text_windows(tokenizer, named, seq_len, batches * batch_size,
                             {name: "--refit" for name in refit if name not in calibration})
        evaluation = evaluation_batches(tokenizer, texts["--eval"], seq_len, eval_batches, batch_size)
    shares = [len(refit)] if SAMPLED in refit else []
    if SAMPLED in calibration and samples_needed:
        shares.append(len(calibration))
    found = Batches(evaluation=evaluation, loss_fn=causal_lm_loss)
    if shares:
        found.sampled = -(-batches * batch_size // min(shares))
        with steps("sample", f"sampling {found.sampled} windows of text from the model"):
            parts[SAMPLED] = sampled_text(model, tokenizer, found.sampled, seq_len, seed, batch_size)
    found.calibration = calibration_batches([parts[name] for name in calibration if name in parts], batches,
                                            batch_size, seq_len)
    if refit:
        found.refit = calibration_batches([parts[name] for name in refit], batches, batch_size, seq_len, "--refit")
    found.example = found.calibration[0] if found.calibration else torch.zeros(1, seq_len, dtype=torch.long)
    return found


def factory_calibration(example: Any, data: str | None, steps: Steps) -> Batches:
    """A ``MODULE:FACTORY`` model's batches: ``--data``'s (batches, loss_fn), if given."""
    found = Batches(example=example)
    if data is not None:
        with steps("data", f"calling {data}"):
            found.calibration, found.loss_fn = factory_data(data)
    return found


def measure(model: Any, tokenizer: Any, evaluation: dict[str, list[torch.Tensor]], steps: Steps, when: str,
            prompt: str, new_tokens: int) -> dict[str, Any]:
    """Params, perplexity on each text and the greedy generation of ``prompt`` (with a tokenizer and a prompt)."""
    figures: dict[str, Any] = {"params": parameter_count(model)}
    if evaluation:
        with steps(f"eval {when}", f"perplexity {when} pruning"):
            figures["perplexity"] = evaluate(model, evaluation, when)
    if prompt and tokenizer is not None:
        figures["generation"] = generate(model, tokenizer, prompt, new_tokens)
    return figures


def prune_analysed(analysis: Analysis, batches: Batches, settings: PruneSettings, steps: Steps) -> PruneResult:
    """:func:`fxgradnas.prune` of the analysed model with the settings' options."""
    import fxgradnas

    what = "scoring, searching, rewriting" + (", compensating" if settings.compensation is not None else "")
    with steps("prune", what):
        result = fxgradnas.prune(analysis, None, batches.calibration or None, batches.loss_fn,
                                 constraint=settings.constraint, search=settings.search,
                                 calibration=settings.calibration, compensation=settings.compensation,
                                 compensation_data=batches.refit)
    result.seconds["analyze"] = steps.seconds["analyze"]
    return result


def heal_pruned(result: PruneResult, model: Any, calibration: list[Any], heal: int, seed: int,
                steps: Steps) -> dict[str, Any]:
    """Distil the pruned module from the dense ``model`` for ``heal`` steps; the report's record of it."""
    import fxgradnas

    with steps("heal", f"distilling the pruned model from the dense one for {heal} steps"):
        healed = fxgradnas.heal(result, model, calibration, steps=heal, seed=seed)
    return {"steps": healed.steps, "loss first 10 steps": healed.mean_loss(first=True),
            "loss last 10 steps": healed.mean_loss(first=False)}


def write_outputs(result: PruneResult, model: Any, tokenizer: Any, source: Source, out: Path, steps: Steps,
                  evaluation: dict[str, list[torch.Tensor]], *, uniform: bool, prompt: str,
                  new_tokens: int) -> tuple[dict[str, str], dict[str, Any], str | None]:
    """The pruned model (a checkpoint written back and saved, or a factory model's weights), the plan and the
    picture in ``out``: the files written (name -> what), the figures after pruning and what the checkpoint is."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    files = {PLAN_FILE: "the plan (fxgradnas.Plan.from_json)"}
    checkpoint = None
    if source.directory is not None:
        from ..hf import save_pruned, write_back

        with steps("write back", "writing the plan back into the Hugging Face model"):
            structure = write_back(model, result.analysis, result.plan, weights=result.model)
        after = measure(model, tokenizer, evaluation, steps, "after", prompt, new_tokens)
        with steps("save", f"saving to {out}"):
            save_pruned(model, merged_structure(source.directory, structure), out)
            tokenizer.save_pretrained(out)
        checkpoint = (STANDARD if structure["standard"] else
                      f"per-layer sizes: fxgradnas.hf.load_pruned loads it{'' if uniform else NOT_UNIFORM}")
        files["config.json, *.safetensors, fxgradnas_structure.json, tokenizer"] = f"the pruned model ({checkpoint})"
    else:
        after = {"params": parameter_count(result.model)}
        torch.save(result.model.state_dict(), out / FACTORY_WEIGHTS)
        files[FACTORY_WEIGHTS] = "the pruned weights: fxgradnas.apply_plan(model, plan, inputs).load_state_dict(...)"
    (out / PLAN_FILE).write_text(result.plan.to_json())
    if draw(result, out / PLOT_FILE, Path(source.spec).name if source.directory else source.spec):
        files[PLOT_FILE] = "units kept per layer and every unit's score"
    return files, after, checkpoint


def run_prune(settings: PruneSettings) -> int:
    """``fxgradnas prune``: see the parser's description."""
    source = Source.parse(settings.model)
    out = output_directory(settings.out, source)
    calibration, compensation = settings.calibration, settings.compensation
    gradnas, refits = calibration.scorer == "gradnas", compensation is not None
    check_inputs(source, settings.texts, settings.data, gradnas=gradnas, refits=refits, heal=settings.heal)
    steps = Steps()
    start = time.perf_counter()
    texts = read_named_texts(settings.texts)

    import torch

    import fxgradnas

    from ..batches import to_device

    device = device_of_choice(settings.device)
    torch.manual_seed(calibration.seed)
    with steps("load", f"loading {settings.model}"):
        model, tokenizer, example = load_model(source, settings.dtype, device)
    report: dict[str, Any] = {"model": settings.model, "command": shlex.join(settings.command)}
    if source.directory is not None:
        needs_calibration_text = gradnas or (refits and not settings.texts["--refit"]) or bool(settings.heal)
        held_out = settings.search.evolve_batches if settings.search.searcher == "evolve" else 0  # not scored
        batches = text_data(model, tokenizer, texts, steps, batches=settings.batches + held_out,
                            batch_size=settings.batch_size, seq_len=settings.seq_len,
                            eval_batches=settings.eval_batches, seed=calibration.seed,
                            samples_needed=needs_calibration_text)
    else:
        batches = factory_calibration(example, settings.data, steps)
    batches.example = to_device(batches.example, device)
    before = measure(model, tokenizer, batches.evaluation, steps, "before", settings.prompt, settings.new_tokens)

    with steps("analyze", "analysing the graph (torch.export)"):
        analysis = fxgradnas.analyze(model, batches.example)
    show("Analysis", analysis.table())
    result = prune_analysed(analysis, batches, settings, steps)
    if settings.heal:
        report["heal"] = heal_pruned(result, model, batches.calibration, settings.heal, calibration.seed, steps)
    show("Plan", result.table())
    show("Summary", result.summary())

    files, after, checkpoint = write_outputs(result, model, tokenizer, source, out, steps, batches.evaluation,
                                             uniform=settings.search.uniform, prompt=settings.prompt,
                                             new_tokens=settings.new_tokens)
    if checkpoint is not None:
        report["checkpoint"] = checkpoint
    report["settings"] = settings_record(settings, result, device, batches.sampled)
    report.update(outcome_record(result, before, after, source, out, settings.prompt))
    report["seconds"] = {**detailed_seconds(steps.seconds, result.seconds), "total": time.perf_counter() - start}
    report["files"] = {**files, f"{REPORT_FILE}.md, {REPORT_FILE}.json": "this report"}
    write_report(report, out)
    show_outcome(report)
    print(f"\nwrote {', '.join(files)} and {REPORT_FILE}.md/.json to {out}")
    return 0

