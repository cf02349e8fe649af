"""What the command line reads: the model argument, factories, texts, token windows and calibration batches."""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .parser import CORPORA, SAMPLED, UsageError

if TYPE_CHECKING:
    import torch

TEXT_OPTIONS = ("--calibration", "--refit", "--eval")  # the options of prune that name texts, in reading order


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


def factory_data(spec: str) -> tuple[list, Callable[[Any, Any], Any]]:
    """``--data MODULE:FUNCTION``: the calibration batches and loss_fn the function returns."""
    made = call_factory(spec, "--data")
    if not (isinstance(made, tuple) and len(made) == 2 and callable(made[1])):
        raise UsageError(f"--data {spec} must return (batches, loss_fn)")
    return list(made[0]), made[1]


def read_texts(named: Mapping[str, str]) -> dict[str, str]:
    """Each name's text (``named``: name -> the option that names it, for messages): a file (UTF-8), or else
    a built-in corpus (:data:`CORPORA`). Files are read first, so a mistake in one is reported before a corpus
    is fetched; a name given to several options is read once."""
    from .. import datasets

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


def read_named_texts(names: Mapping[str, Sequence[str]]) -> dict[str, dict[str, str | None]]:
    """The texts each option of :data:`TEXT_OPTIONS` names (``names``: option -> its names), each read once;
    :data:`SAMPLED` (text the model samples itself, for ``--calibration`` and ``--refit``) maps to None."""
    if SAMPLED in names.get("--eval", ()):
        raise UsageError(f"--eval {SAMPLED}: text the model samples itself is for --calibration and --refit only")
    for option in TEXT_OPTIONS:
        given = list(names.get(option, ()))
        twice = sorted({name for name in given if given.count(name) > 1})
        if twice:
            raise UsageError(f"{option}: {', '.join(twice)} given twice; name each text once")
    named: dict[str, str] = {}  # every text named, by the first option that names it
    for option in TEXT_OPTIONS:
        for name in names.get(option, ()):
            if name != SAMPLED:
                named.setdefault(name, option)
    read = read_texts(named)
    return {option: {name: read.get(name) for name in names.get(option, ())} for option in TEXT_OPTIONS}


def windows(tokenizer: Any, text: str, seq_len: int, count: int, name: str) -> torch.Tensor:
    """The first ``count`` windows of ``seq_len`` tokens of ``text`` (fewer if it is short), the same as
    :func:`fxgradnas.datasets.token_windows` on the whole text, tokenizing only a prefix long enough."""
    from ..datasets import token_windows

    chars = max(100_000, 8 * seq_len * (count + 1))
    while True:
        try:
            found = token_windows(tokenizer, text[:chars], seq_len, count + 1)  # the prefix's last token is beyond
        except ValueError as exc:
            raise UsageError(f"{name!r}: {exc}") from None
        if len(found) > count or chars >= len(text):
            return found[:count]
        chars *= 4


def text_windows(tokenizer: Any, texts: Mapping[str, str], seq_len: int, count: int,
                 options: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Up to ``count`` windows of each text; ``options``: the option a text was named in, where not
    ``--calibration`` (for messages)."""
    return {name: windows(tokenizer, text, seq_len, count, (options or {}).get(name, "--calibration") + " " + name)
            for name, text in texts.items()}


def evaluation_batches(tokenizer: Any, texts: Mapping[str, str], seq_len: int, batches: int,
                       batch_size: int) -> dict[str, list[torch.Tensor]]:
    """Up to ``batches`` batches of ``batch_size`` windows of each ``--eval`` text."""
    from ..datasets import batched

    return {name: batched(windows(tokenizer, text, seq_len, batches * batch_size, "--eval " + name), batch_size)
            for name, text in texts.items()}


def sampled_text(model: Any, tokenizer: Any, count: int, seq_len: int, seed: int, batch_size: int) -> torch.Tensor:
    """``count`` windows sampled by the model from the tokenizer's BOS (or EOS), seeded by ``seed``."""
    from ..datasets import sampled_windows

    start = next((t for t in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
                  if t is not None), None)
    # four calibration batches at a time: a KV cache of 4 x batch x seq_len tokens is far below the activations
    # that calibration keeps for backward on one batch, and larger batches sample faster
    return sampled_windows(model, count, seq_len, seed=seed, start_token=start, batch_size=4 * batch_size)


def calibration_batches(parts: list[torch.Tensor], batches: int, batch_size: int, seq_len: int,
                        option: str = "--calibration") -> list[torch.Tensor]:
    """The calibration (or re-fit) batches: windows of ``parts`` taken in turn, ``batches`` of ``batch_size``
    (a part longer than its share is cut at the end; a note says when the parts give fewer)."""
    from ..datasets import batched, interleaved

    if not parts:
        return []
    needed = batches * batch_size
    ids = interleaved(parts)[:needed]
    if len(ids) < needed:
        print(f"   note: the {option} text gives {len(ids)} windows of {seq_len} tokens, not {needed}",
              file=sys.stderr)
    return batched(ids, batch_size)
