"""``fxgradnas inspect`` and ``fxgradnas eval``, each with the settings it needs."""

from __future__ import annotations

import json
from collections.abc import Sequence

from .inputs import Source, read_texts, windows
from .models import device_of_choice, evaluate, load_checkpoint, parameter_count
from .parser import UsageError


def run_inspect(model_spec: str, seq_len: int, tablefmt: str) -> int:
    """``fxgradnas inspect``: the analysis table (a checkpoint is analysed on ``seq_len`` random token ids)."""
    source = Source.parse(model_spec)
    import torch

    import fxgradnas

    if source.directory is not None:
        model, _ = load_checkpoint(source.directory)
        vocab = model.get_input_embeddings().weight.shape[0]
        example = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))
    else:
        model, example = source.factory_model()
    print(fxgradnas.analyze(model, example).table(tablefmt=tablefmt))
    return 0


def run_eval(model_spec: str, texts: Sequence[str], *, batches: int, batch_size: int, seq_len: int,
             device: str | None, dtype: str, as_json: bool) -> int:
    """``fxgradnas eval``: perplexity of a checkpoint on each text (``as_json``: also one JSON line)."""
    source = Source.parse(model_spec)
    if source.directory is None:
        raise UsageError("eval reads a checkpoint directory, not a MODULE:FACTORY")
    read = read_texts(dict.fromkeys(texts, "eval"))
    from tabulate import tabulate

    from ..datasets import batched

    model, tokenizer = load_checkpoint(source.directory, dtype, device_of_choice(device))
    sets = {name: batched(windows(tokenizer, text, seq_len, batches * batch_size, name), batch_size)
            for name, text in read.items()}
    scores = evaluate(model, sets, "of " + model_spec)
    rows = [[name, sum(len(b) for b in sets[name]), f"{ppl:.3f}"] for name, ppl in scores.items()]
    print(tabulate(rows, headers=["text", f"windows of {seq_len}", "perplexity"]))
    print(f"{parameter_count(model):,} parameters")
    if as_json:
        print(json.dumps({"model": model_spec, "perplexity": scores, "params": parameter_count(model)}))
    return 0
