"""The ``fxgradnas`` command (also ``python -m fxgradnas``).

``prune`` a Hugging Face causal LM checkpoint directory (or any PyTorch model from a ``MODULE:FACTORY``)
to a params or FLOPs budget on calibration text, and write the pruned model, its plan, a report and a
picture; ``inspect`` the prunable groups of a model; ``eval`` the perplexity of a checkpoint on text.

Parsing the command line imports no torch, so ``--help`` answers at once; each command imports what it
needs when it runs. A mistake in the command or its inputs ends in a one-line ``error: ...`` and exit
code 2; an error fxgradnas raises on purpose (:class:`fxgradnas.FxGradNasError`) the same way with 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import options
from .errors import FxGradNasError

if TYPE_CHECKING:
    import torch

    from .prune import PruneResult

COMPENSATIONS = (*options.COMPENSATION_METHODS, "none")
DTYPES = ("float32", "bfloat16", "float16")
CORPORA = {
    "shakespeare": "Shakespeare's plays from 1M characters in (fxgradnas.datasets.CALIBRATION_SKIP)",
    "shakespeare-heldout": "the first 1M characters of the plays, disjoint from 'shakespeare'",
    "python-docs": "the Python language reference (pydoc_data, ships with CPython)",
    "stdlib": "CPython standard-library sources",
}
SAMPLED = "self"  # --calibration name of text the model samples itself (fxgradnas.datasets.sampled_windows)
DESCRIPTION = ("Prune a Hugging Face causal LM checkpoint (or any PyTorch model from MODULE:FACTORY) to a params "
               "or FLOPs budget on calibration text, inspect a model's prunable groups, or measure perplexity.")
PLOT_FILE, PLAN_FILE, REPORT_FILE = "pruned.png", "plan.json", "report"
FACTORY_WEIGHTS = "pruned_state_dict.pt"


class UsageError(Exception):
    """A mistake in the command line or in what it names: one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and go through :class:`UsageError`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


# --- what the arguments name -----------------------------------------------------------------------
def fraction(text: str) -> float | str:
    """``0.75`` or ``75%``: a share of the model in (0, 1], as :func:`fxgradnas.search` takes it."""
    match = re.fullmatch(r"\s*(\d*\.?\d+)\s*(%?)\s*", text)
    value = float(match[1]) / (100 if match[2] else 1) if match else -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1] like 0.75 or a percentage like 75%, got {text!r}")
    return f"{match[1]}%" if match[2] else value


def non_negative(text: str) -> float:
    """A finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive(text: str) -> int:
    """A count of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"expected {what} as MODULE:FUNCTION (e.g. tests.zoo:llama), got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``python -m`` does: modules of the current directory import
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} for {what}: {exc}") from exc
    except Exception as exc:  # the module itself fails while it is imported
        raise UsageError(f"importing {module_name!r} for {what} failed: {type(exc).__name__}: {exc}") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise UsageError(f"{module_name!r} has no function {attr!r}")
    return function


def table_format(name: str) -> str:
    """A tabulate table format name (checked before the model is loaded)."""
    from tabulate import tabulate_formats

    if name not in tabulate_formats:
        raise argparse.ArgumentTypeError(f"unknown table format {name!r}; one of {', '.join(tabulate_formats)}")
    return name


def call_factory(spec: str, what: str) -> Any:
    """Call the ``MODULE:FUNCTION`` of ``spec``; its failure is the caller's mistake, reported in one line."""
    function = load_callable(spec, what)
    try:
        return function()
    except Exception as exc:
        raise UsageError(f"{spec} failed when called as {what}: {type(exc).__name__}: {exc}") from exc


@dataclass
class Source:
    """The model argument: a checkpoint directory or a ``MODULE:FACTORY``."""

    spec: str
    directory: Path | None

    @classmethod
    def parse(cls, spec: str) -> Source:
        path = Path(spec)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(f"{spec} is not a Hugging Face checkpoint directory (no config.json)")
            return cls(spec, path)
        if path.exists():
            raise UsageError(f"{spec} is a file; expected a checkpoint directory or MODULE:FACTORY")
        if re.fullmatch(r"[\w.]+:\w+", spec):
            return cls(spec, None)
        raise UsageError(f"no such checkpoint directory: {spec}")

    def factory_model(self) -> tuple[torch.nn.Module, Any]:
        made = call_factory(self.spec, "the model factory")
        if not (isinstance(made, tuple) and len(made) == 2):
            raise UsageError(f"{self.spec} must return (model, example_inputs), not {type(made).__name__}")
        return made


def read_texts(named: Mapping[str, str]) -> dict[str, str]:
    """Each name's text (``named``: name -> the option that names it, for messages): a file (UTF-8), or else
    a built-in corpus (:data:`CORPORA`). Files are read first, so a mistake in one is reported before a corpus
    is fetched; a name given to several options is read once."""
    from . import datasets

    corpora = {
        "shakespeare": lambda: datasets.shakespeare_text(skip=datasets.CALIBRATION_SKIP),
        "shakespeare-heldout": lambda: datasets.shakespeare_text(max_chars=datasets.CALIBRATION_SKIP),
        "python-docs": datasets.python_docs_text,
        "stdlib": datasets.stdlib_text,
    }
    files = [name for name in named if Path(name).exists() or name not in corpora]
    texts = {}
    for name in files:
        try:
            texts[name] = Path(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            option = named[name]
            sampled = f", or {SAMPLED}: text the model samples" if option in ("--calibration", "--refit") else ""
            raise UsageError(f"{option}: no such file {name!r} (built-in corpora: {', '.join(CORPORA)}{sampled})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{named[name]}: cannot read {name!r} as UTF-8 text: {exc}") from exc
        if not texts[name].strip():
            raise UsageError(f"{named[name]}: {name!r} is empty")
    for name in named:
        if name not in files:
            print(f"-- reading the corpus {name}", file=sys.stderr, flush=True)
            texts[name] = corpora[name]()
    return {name: texts[name] for name in named}


def windows(tokenizer: Any, text: str, seq_len: int, count: int, name: str) -> torch.Tensor:
    """The first ``count`` windows of ``seq_len`` tokens of ``text`` (fewer if it is short), the same as
    :func:`fxgradnas.datasets.token_windows` on the whole text, tokenizing only a prefix long enough."""
    from .datasets import token_windows

    chars = max(100_000, 8 * seq_len * (count + 1))
    while True:
        try:
            found = token_windows(tokenizer, text[:chars], seq_len, count + 1)  # the prefix's last token is beyond
        except ValueError as exc:
            raise UsageError(f"{name!r}: {exc}") from None
        if len(found) > count or chars >= len(text):
            return found[:count]
        chars *= 4


# --- output ----------------------------------------------------------------------------------------
class Steps:
    """Says on stderr which step runs and how long it took; keeps the times for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, key: str, what: str) -> Iterator[None]:
        print(f"-- {what}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        print(f"   {what}: {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def show(title: str, body: str) -> None:
    """A table on stdout as soon as its step is done."""
    print(f"\n== {title}\n{body}\n", flush=True)


def output_directory(out: Path, source: Source) -> Path:
    """``--out``: new, empty, or the output of an earlier run (overwritten); never the model itself."""
    if source.directory is not None and out.resolve() == source.directory.resolve():
        raise UsageError("--out is the model's own directory; choose another")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / f"{REPORT_FILE}.json").is_file():
        raise UsageError(f"--out {out} is not empty and not the output of fxgradnas prune; choose another")
    return out


def device_of_choice(name: str | None) -> torch.device:
    import torch

    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return device


# --- models ----------------------------------------------------------------------------------------
def load_checkpoint(directory: Path, dtype: str = "float32", device: torch.device | None = None) -> tuple[Any, Any]:
    """A causal LM checkpoint (pruned by fxgradnas or not) and its tokenizer, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from .hf import STRUCTURE_FILE, load_pruned

    logging.set_verbosity_error()  # load reports and long-text warnings are not for a command line
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if (directory / STRUCTURE_FILE).is_file():
            model = load_pruned(directory).to(getattr(torch, dtype))
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load {directory} as a causal language model with its tokenizer: {first}") from exc
    return model.to(device or "cpu").eval(), tokenizer


def generate(model: Any, tokenizer: Any, prompt: str, tokens: int) -> str:
    """Greedy continuation of ``prompt``."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model: Any, sets: dict[str, list[torch.Tensor]], when: str) -> dict[str, float]:
    """Perplexity on each text, with a progress bar."""
    from tqdm.auto import tqdm

    from .datasets import perplexity

    return {name: perplexity(model, tqdm(batches, desc=f"perplexity {when}: {name}", unit="batch", leave=False))
            for name, batches in sets.items()}


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of ``model``, tied ones once."""
    return sum(p.numel() for p in model.parameters())


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of the safetensors files of a checkpoint directory."""
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


# --- commands --------------------------------------------------------------------------------------
def run_prune(args: argparse.Namespace) -> int:
    """``fxgradnas prune``: see the parser's description."""
    source = Source.parse(args.model)
    out = output_directory(args.out, source)
    kinds = tuple(dict.fromkeys(args.kinds))
    compensate = None if args.compensate == "none" else args.compensate
    if args.refit and not compensate:
        raise UsageError("--refit names what the re-fit reads; --compensate none skips the re-fit")
    if source.directory is None:
        if args.calibration or args.eval or args.refit:
            raise UsageError("--calibration, --refit and --eval read text for a checkpoint directory; a MODULE:FACTORY "
                             "model takes its calibration batches from --data MODULE:FUNCTION")
        if args.data is None and (args.scorer == "gradnas" or compensate):
            raise UsageError("a MODULE:FACTORY model needs --data MODULE:FUNCTION returning (batches, loss_fn) for "
                             "--scorer gradnas and --compensate (or use --scorer l1 --compensate none)")
    elif args.data is not None:
        raise UsageError("--data is for MODULE:FACTORY models; a checkpoint calibrates on --calibration text")
    elif not args.calibration and (args.scorer == "gradnas" or (compensate and not args.refit) or args.heal):
        raise UsageError("--calibration TEXT is needed for --scorer gradnas, --compensate (default ls; or --refit TEXT) "
                         "and --heal (or use --scorer l1 --compensate none)")
    if args.heal < 0:
        raise UsageError(f"--heal takes a number of steps (0: no healing), not {args.heal}")
    if args.heal and source.directory is None and args.data is None:
        raise UsageError("--heal needs calibration batches: --data MODULE:FUNCTION for a MODULE:FACTORY model")
    constraint = {"params": args.params} if args.params is not None else {"flops": args.flops}
    steps = Steps()
    start = time.perf_counter()
    if SAMPLED in (args.eval or []):
        raise UsageError(f"--eval {SAMPLED}: text the model samples itself is for --calibration and --refit only")
    for option, names in (("--calibration", args.calibration or []), ("--refit", args.refit or []),
                          ("--eval", args.eval or [])):
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise UsageError(f"{option}: {', '.join(twice)} given twice; name each text once")
    named: dict[str, str] = {}  # every text named, by the first option that names it
    for option, names in (("--calibration", args.calibration), ("--refit", args.refit), ("--eval", args.eval)):
        for name in names or []:
            if name != SAMPLED:
                named.setdefault(name, option)
    read = read_texts(named)
    calibration_texts = {name: read.get(name) for name in args.calibration or []}  # None: sampled by the model
    refit_texts = {name: read.get(name) for name in args.refit or []}
    eval_texts = {name: read[name] for name in args.eval or []}

    import torch

    import fxgradnas

    from .batches import to_device
    from .datasets import causal_lm_loss

    unknown = [k for k in kinds if k not in options.KINDS]
    if unknown:
        raise UsageError(f"--kinds: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(options.KINDS)}")
    device = device_of_choice(args.device)
    torch.manual_seed(args.seed)
    with steps("load", f"loading {args.model}"):
        if source.directory is not None:
            model, tokenizer = load_checkpoint(source.directory, args.dtype, device)
        else:
            model, example = source.factory_model()
            model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    report: dict[str, Any] = {"model": args.model, "command": shlex.join(["fxgradnas", *args.argv])}
    eval_sets: dict[str, list[torch.Tensor]] = {}
    calibration: list[Any] = []
    refit: list[Any] | None = None  # None: the re-fit reads the calibration batches
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = causal_lm_loss
    if source.directory is not None:
        texts = {name: text for name, text in (calibration_texts | refit_texts).items() if text is not None}
        with steps("tokenize", "cutting token windows"):  # first: a text too short is reported before sampling
            parts, eval_sets = _token_windows(args, tokenizer, texts, eval_texts,
                                              {name: "--refit" for name in refit_texts if name not in calibration_texts})
        shares = [len(refit_texts)] if SAMPLED in refit_texts else []
        if SAMPLED in calibration_texts and (args.scorer == "gradnas" or (compensate and not refit_texts) or args.heal):
            shares.append(len(calibration_texts))
        if shares:
            with steps("sample", "sampling calibration text from the model"):
                parts[SAMPLED] = _sampled(args, model, tokenizer, share=min(shares))
        calibration = _calibration_batches(args, [parts[name] for name in calibration_texts if name in parts])
        if refit_texts:
            refit = _calibration_batches(args, [parts[name] for name in refit_texts], "--refit")
        example = calibration[0] if calibration else torch.zeros(1, args.seq_len, dtype=torch.long)
    elif args.data is not None:
        with steps("data", f"calling {args.data}"):
            made = call_factory(args.data, "--data")
        if not (isinstance(made, tuple) and len(made) == 2 and callable(made[1])):
            raise UsageError(f"--data {args.data} must return (batches, loss_fn)")
        calibration, loss_fn = list(made[0]), made[1]
    example = to_device(example, device)
    before: dict[str, Any] = {"params": parameter_count(model)}
    if eval_sets:
        with steps("eval before", "perplexity before pruning"):
            before["perplexity"] = evaluate(model, eval_sets, "before")
    if args.prompt and source.directory is not None:
        before["generation"] = generate(model, tokenizer, args.prompt, args.new_tokens)

    with steps("analyze", "analysing the graph (torch.export)"):
        analysis = fxgradnas.analyze(model, example)
    show("Analysis", analysis.table())
    with steps("prune", "scoring, searching, rewriting" + (", compensating" if compensate else "")):
        result = fxgradnas.prune(
            analysis, None, calibration or None, loss_fn, constraint=constraint,
            search=options.SearchOptions(kinds=kinds, multiple_of=args.multiple_of, uniform=args.uniform),
            calibration=options.CalibrationOptions(scorer=args.scorer, granularity=args.granularity,
                                                   max_batches=args.batches, rounds=args.rounds, seed=args.seed,
                                                   recompute=args.recompute),
            compensation=options.CompensationOptions(method=compensate, damping=args.damping,
                                                     max_batches=args.batches) if compensate else None,
            compensation_data=refit)
    result.seconds["analyze"] = steps.seconds["analyze"]
    if args.heal:
        with steps("heal", f"distilling the pruned model from the dense one for {args.heal} steps"):
            healed = fxgradnas.heal(result, model, calibration, steps=args.heal, seed=args.seed)
        report["heal"] = {"steps": healed.steps, "loss first 10 steps": healed.mean_loss(first=True),
                          "loss last 10 steps": healed.mean_loss(first=False)}
    show("Plan", result.table())
    show("Summary", result.summary())

    out.mkdir(parents=True, exist_ok=True)
    files = {PLAN_FILE: "the plan (fxgradnas.Plan.from_json)"}
    if source.directory is not None:
        from .hf import save_pruned, write_back

        with steps("write back", "writing the plan back into the Hugging Face model"):
            structure = write_back(model, analysis, result.plan, weights=result.model)
        after: dict[str, Any] = {"params": parameter_count(model)}
        if eval_sets:
            with steps("eval after", "perplexity after pruning"):
                after["perplexity"] = evaluate(model, eval_sets, "after")
        if args.prompt:
            after["generation"] = generate(model, tokenizer, args.prompt, args.new_tokens)
        with steps("save", f"saving to {out}"):
            save_pruned(model, _merged(source.directory, structure), out)
            tokenizer.save_pretrained(out)
        report["checkpoint"] = (STANDARD if structure["standard"] else
                                f"per-layer sizes: fxgradnas.hf.load_pruned loads it{'' if args.uniform else NOT_UNIFORM}")
        files["config.json, *.safetensors, fxgradnas_structure.json, tokenizer"] = f"the pruned model ({report['checkpoint']})"
    else:
        after = {"params": parameter_count(result.model)}
        torch.save(result.model.state_dict(), out / FACTORY_WEIGHTS)
        files[FACTORY_WEIGHTS] = "the pruned weights: fxgradnas.apply_plan(model, plan, inputs).load_state_dict(...)"
    (out / PLAN_FILE).write_text(result.plan.to_json())
    if _draw(result, out / PLOT_FILE, Path(args.model).name if source.directory else args.model):
        files[PLOT_FILE] = "units kept per layer and every unit's score"

    report.update(_summary(args, result, before, after, source, out, device))
    report["seconds"] = {**_detailed(steps.seconds, result.seconds), "total": time.perf_counter() - start}
    report["files"] = {**files, f"{REPORT_FILE}.md, {REPORT_FILE}.json": "this report"}
    _write_report(report, out)
    _show_outcome(report)
    print(f"\nwrote {', '.join(files)} and {REPORT_FILE}.md/.json to {out}")
    return 0


def _sampled(args: argparse.Namespace, model: Any, tokenizer: Any, share: int) -> torch.Tensor:
    """1/``share`` of the calibration windows, sampled by the model from the tokenizer's BOS (or EOS)."""
    from .datasets import sampled_windows

    start = next((t for t in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
                  if t is not None), None)
    # four calibration batches at a time: a KV cache of 4 x batch x seq_len tokens is far below the activations
    # that calibration keeps for backward on one batch, and larger batches sample faster
    return sampled_windows(model, -(-args.batches * args.batch_size // share), args.seq_len, seed=args.seed,
                           start_token=start, batch_size=4 * args.batch_size)


def _token_windows(args: argparse.Namespace, tokenizer: Any, calibration_texts: dict[str, str],
                   eval_texts: dict[str, str], options: dict[str, str] | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Each calibration text's windows (up to all the calibration windows) and evaluation batches per text;
    ``options``: the option a calibration text was named in, where not ``--calibration``."""
    from .datasets import batched

    needed = args.batches * args.batch_size
    calibration = {name: windows(tokenizer, text, args.seq_len, needed, (options or {}).get(name, "--calibration") + " " + name)
                   for name, text in calibration_texts.items()}
    evaluation = {name: batched(windows(tokenizer, text, args.seq_len, args.eval_batches * args.batch_size,
                                        "--eval " + name), args.batch_size) for name, text in eval_texts.items()}
    return calibration, evaluation


def _calibration_batches(args: argparse.Namespace, parts: list[torch.Tensor],
                         option: str = "--calibration") -> list[torch.Tensor]:
    """The calibration (or re-fit) batches: windows of ``parts`` taken in turn, as many as ``--batches`` asks
    for (a part longer than its share is cut at the end)."""
    from .datasets import batched, interleaved

    if not parts:
        return []
    needed = args.batches * args.batch_size
    ids = interleaved(parts)[:needed]
    if len(ids) < needed:
        print(f"   note: the {option} text gives {len(ids)} windows of {args.seq_len} tokens, not {needed}",
              file=sys.stderr)
    return batched(ids, args.batch_size)


def _detailed(steps: dict[str, float], pruning: dict[str, float]) -> dict[str, float]:
    """The command's step times with the pruning step split into its parts (the analysis ran before)."""
    parts = {k: v for k, v in pruning.items() if k != "analyze"}
    return {k: v for step, seconds in steps.items() for k, v in (parts if step == "prune" else {step: seconds}).items()}


STANDARD = "standard: transformers' AutoModelForCausalLM.from_pretrained loads it"
NOT_UNIFORM = "; --uniform prunes every layer alike, for a standard checkpoint that plain transformers loads"


def _merged(source: Path, structure: dict) -> dict:
    """The structure to save: a checkpoint pruned before keeps the attribute patches of that pruning."""
    from .hf import STRUCTURE_FILE

    earlier = source / STRUCTURE_FILE
    if earlier.is_file():
        attributes = json.loads(earlier.read_text())["attributes"]
        for path, values in structure["attributes"].items():
            attributes[path] = {**attributes.get(path, {}), **values}
        structure = {**structure, "attributes": attributes}
    return structure


def _draw(result: PruneResult, path: Path, title: str) -> bool:
    """The picture, if matplotlib is there (else a note); whether it was drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"   note: no {path.name}: matplotlib is not installed (pip install 'fxgradnas[plot]')", file=sys.stderr)
        return False
    result.plot(path, scores=True, title=title)
    return True


def _summary(args: argparse.Namespace, result: PruneResult, before: dict, after: dict, source: Source,
             out: Path, device: torch.device) -> dict:
    """The report's record: settings, sizes, perplexity and generation before/after, plan, groups."""
    from .report import group_rows, plan_rows

    search = result.search
    sizes = {"params": {"before": before["params"], "after": after["params"]},
             "flops per example input": {"before": search.base["flops"], "after": search.costs["flops"]}}
    if source.directory is not None and checkpoint_bytes(source.directory):
        sizes["checkpoint bytes"] = {"before": checkpoint_bytes(source.directory), "after": checkpoint_bytes(out)}
    perplexity = {name: {"before": before["perplexity"][name], "after": after["perplexity"][name]}
                  for name in before.get("perplexity", {})}
    generation = ({"prompt": args.prompt, "before": before["generation"], "after": after["generation"]}
                  if "generation" in before else None)
    metric, budget = search.budget
    settings = {
        "constraint": f"{metric} <= {budget:,} ({budget / search.base[metric]:.1%})",
        "achieved": ", ".join(f"{k} {v:.2%}" for k, v in result.achieved.items()),
        "scorer": args.scorer, "granularity": args.granularity, "recompute": args.recompute,
        "kinds": ", ".join(dict.fromkeys(args.kinds)),
        "multiple of": args.multiple_of, "uniform": args.uniform, "rounds": args.rounds, "compensate": args.compensate,
        "damping": args.damping if args.compensate != "none" else "-", "heal steps": args.heal,
        "calibration": ", ".join(args.calibration or []) or args.data or "-",
        "refit on": ", ".join(args.refit or args.calibration or []) or args.data or "-"
        if args.compensate != "none" else "-",
        "calibration windows": f"{result.scores.batches} batches of {args.batch_size} x {args.seq_len} tokens"
        if result.scores.batches else "-",
        "eval": ", ".join(args.eval or []) or "-",
        "eval windows": f"up to {args.eval_batches} batches of {args.batch_size} x {args.seq_len} tokens",
        "device": str(device), "dtype": args.dtype, "seed": args.seed,
    }
    return {"settings": settings, "sizes": sizes, "perplexity": perplexity, "generation": generation,
            "plan": plan_rows(result), "groups": group_rows(result.analysis)}


def _write_report(report: dict, out: Path) -> None:
    """``report.json`` and ``report.md``."""
    from .report import markdown_report

    (out / f"{REPORT_FILE}.json").write_text(json.dumps(report, indent=1))
    (out / f"{REPORT_FILE}.md").write_text(markdown_report(report))


def _show_outcome(report: dict) -> None:
    """The before/after tables and the generations on stdout."""
    from tabulate import tabulate

    rows = [[name, f"{v['before']:,}", f"{v['after']:,}", f"{v['after'] / v['before']:.1%}"]
            for name, v in report["sizes"].items()]
    rows += [[f"perplexity {name}", f"{v['before']:.3f}", f"{v['after']:.3f}", f"{v['after'] / v['before']:.2f}x"]
             for name, v in report["perplexity"].items()]
    show("Before / after", tabulate(rows, headers=["", "before", "after", "after/before"], disable_numparse=True))
    if report.get("checkpoint"):
        show("Checkpoint", report["checkpoint"])
    if report["generation"]:
        g = report["generation"]
        show("Greedy generation", f"prompt  {g['prompt']!r}\nbefore  {g['before']!r}\nafter   {g['after']!r}")


def run_inspect(args: argparse.Namespace) -> int:
    """``fxgradnas inspect``: the analysis table (a checkpoint is analysed on random token ids)."""
    source = Source.parse(args.model)
    import torch

    import fxgradnas

    if source.directory is not None:
        model, _ = load_checkpoint(source.directory)
        vocab = model.get_input_embeddings().weight.shape[0]
        example = torch.randint(0, vocab, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    else:
        model, example = source.factory_model()
    print(fxgradnas.analyze(model, example).table(tablefmt=args.tablefmt))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``fxgradnas eval``: perplexity of a checkpoint on each text."""
    source = Source.parse(args.model)
    if source.directory is None:
        raise UsageError("eval reads a checkpoint directory, not a MODULE:FACTORY")
    texts = read_texts(dict.fromkeys(args.texts, "eval"))
    from tabulate import tabulate

    from .datasets import batched

    model, tokenizer = load_checkpoint(source.directory, args.dtype, device_of_choice(args.device))
    sets = {name: batched(windows(tokenizer, text, args.seq_len, args.batches * args.batch_size, name),
                          args.batch_size) for name, text in texts.items()}
    scores = evaluate(model, sets, "of " + args.model)
    rows = [[name, sum(len(b) for b in sets[name]), f"{ppl:.3f}"] for name, ppl in scores.items()]
    print(tabulate(rows, headers=["text", f"windows of {args.seq_len}", "perplexity"]))
    print(f"{parameter_count(model):,} parameters")
    if args.json:
        print(json.dumps({"model": args.model, "perplexity": scores, "params": parameter_count(model)}))
    return 0


# --- the parser ------------------------------------------------------------------------------------
def _add_model(parser: argparse.ArgumentParser) -> None:
    """The model argument every command takes."""
    parser.add_argument("model", metavar="MODEL", help="a Hugging Face causal LM checkpoint directory, or MODULE:FACTORY: a function "
                                      "returning (model, example_inputs)")


def _add_windows(parser: argparse.ArgumentParser) -> None:
    """Window, device and dtype options of the commands that read text."""
    parser.add_argument("--batch-size", type=positive, metavar="N", default=8, help="windows per batch (default 8)")
    parser.add_argument("--seq-len", type=positive, metavar="N", default=128, help="tokens per window (default 128)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default cuda when present)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")


def build_parser() -> Parser:
    """The command line; builds without importing torch."""
    corpora = "; ".join(f"{name}: {what}" for name, what in CORPORA.items())
    search, calibration, compensation = options.SearchOptions(), options.CalibrationOptions(), options.CompensationOptions()
    parser = Parser(prog="fxgradnas", description=DESCRIPTION,
                    epilog="fxgradnas COMMAND --help for each command's options")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    prune = sub.add_parser(
        "prune", help="prune a model to a params or FLOPs budget and write it with plan, report and picture",
        description="Calibrate gradnas scores on text, find the plan that meets the budget, rewrite the model, "
                    "optionally re-fit the layers consuming pruned units, and write into --out: the pruned "
                    "Hugging Face model (with --uniform a standard checkpoint, else fxgradnas.hf.load_pruned "
                    "loads it), plan.json, report.md/.json and pruned.png. "
                    f"Text arguments are UTF-8 files or built-in corpora ({corpora}).")
    _add_model(prune)
    budget = prune.add_mutually_exclusive_group(required=True)
    budget.add_argument("--params", type=fraction, metavar="RATIO", help="keep this share of the parameters (0.75 or 75%%)")
    budget.add_argument("--flops", type=fraction, metavar="RATIO", help="keep this share of the FLOPs (0.7 or 70%%)")
    prune.add_argument("--calibration", nargs="+", metavar="TEXT",
                       help=f"calibration text(s): windows of each taken in turn; {SAMPLED!r} adds text the model "
                            "samples itself (its share of the windows, seeded by --seed; a file named self: ./self), "
                            "for a model meant for more than the text given")
    prune.add_argument("--refit", nargs="+", metavar="TEXT",
                       help="text(s) the re-fit reads instead of the calibration text, e.g. the calibration text and "
                            f"{SAMPLED!r}: the scores choose units on the calibration text, the re-fit reproduces the "
                            "layers on broader text")
    prune.add_argument("--eval", nargs="+", metavar="TEXT", help="text(s) to measure perplexity on, before and after")
    prune.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    prune.add_argument("--batches", type=positive, metavar="N", default=16, help="calibration batches (default 16)")
    prune.add_argument("--eval-batches", type=positive, metavar="N", default=8, help="evaluation batches per text (default 8)")
    _add_windows(prune)
    prune.add_argument("--compensate", choices=COMPENSATIONS, default=compensation.method,
                       help=f"re-fit the layers consuming pruned units: ls (least squares), scale, none "
                            f"(default {compensation.method})")
    prune.add_argument("--damping", type=non_negative, metavar="D", default=compensation.damping,
                       help=f"the re-fit's ridge towards the original weights (default {compensation.damping}; lower "
                            "when the calibration text is as broad as what the model will see)")
    prune.add_argument("--rounds", type=positive, metavar="N", default=calibration.rounds,
                       help="prune in N rounds, re-calibrating with the units pruned so far masked "
                            f"(default {calibration.rounds})")
    prune.add_argument("--heal", type=int, metavar="STEPS", default=0,
                       help="then distil the pruned model from the dense one on the calibration batches (default 0)")
    prune.add_argument("--kinds", nargs="+", default=list(search.kinds), metavar="KIND",
                       help=f"group kinds to prune: {', '.join(options.KINDS)} (blocks: whole layers; default "
                            f"{' '.join(search.kinds)})")
    prune.add_argument("--scorer", choices=options.SCORERS, default=calibration.scorer,
                       help=f"unit scores (default {calibration.scorer})")
    prune.add_argument("--granularity", choices=options.GRANULARITIES, default=calibration.granularity,
                       help=f"gradnas: square the gradient per batch or per sample (default {calibration.granularity})")
    prune.add_argument("--recompute", action="store_true",
                       help="calibrate with activation checkpointing per layer: long sequences in less memory")
    prune.add_argument("--multiple-of", type=positive, metavar="N", default=search.multiple_of,
                       help=f"kept channel counts are multiples of it (default {search.multiple_of})")
    prune.add_argument("--uniform", action="store_true",
                       help="every layer keeps the same heads, KV heads and MLP width: a standard checkpoint that "
                            "plain transformers (and serving stacks) load")
    prune.add_argument("--prompt", default="Once upon a time",
                       help="greedy generation before/after in the report ('' for none)")
    prune.add_argument("--new-tokens", type=positive, metavar="N", default=24, help="tokens to generate (default 24)")
    prune.add_argument("--data", metavar="MODULE:FUNCTION",
                       help="for a MODULE:FACTORY model: a function returning (calibration batches, loss_fn)")
    prune.add_argument("--seed", type=int, default=calibration.seed,
                       help=f"torch seed, and the random scorer's (default {calibration.seed})")
    prune.set_defaults(run=run_prune)

    inspect = sub.add_parser("inspect", help="print the prunable groups of a model",
                             description="Capture and analyse a model; print one row per group.")
    _add_model(inspect)
    inspect.add_argument("--seq-len", type=positive, metavar="N", default=16, help="tokens of the example input (default 16)")
    inspect.add_argument("--tablefmt", default="simple", type=table_format,
                         help="tabulate table format (default simple)")
    inspect.set_defaults(run=run_inspect)

    evaluate_ = sub.add_parser("eval", help="perplexity of a checkpoint (pruned or not) on text",
                               description=f"Perplexity on each text: UTF-8 files or built-in corpora ({corpora}).")
    _add_model(evaluate_)
    evaluate_.add_argument("texts", nargs="+", metavar="TEXT", help="text file(s) or corpus name(s)")
    evaluate_.add_argument("--batches", type=positive, metavar="N", default=8, help="batches per text (default 8)")
    _add_windows(evaluate_)
    evaluate_.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    evaluate_.set_defaults(run=run_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code (0, 1 for fxgradnas errors, 2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.run(args)
    except UsageError as exc:
        print(f"fxgradnas: error: {exc}", file=sys.stderr)
        return 2
    except FxGradNasError as exc:
        print(f"fxgradnas: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fxgradnas: interrupted", file=sys.stderr)
        return 130
