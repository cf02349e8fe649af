"""Billion-parameter models on a small machine: analysis without weights, streamed plan application.

    python benchmarks/scale.py analysis [--models llama-3.1-8b llama-3.1-70b qwen2.5-72b] [--dynamic]
    python benchmarks/scale.py checkpoint [--dir runs/scale-1b] [--shard 500MB] [--verify]
    python benchmarks/scale.py sharded-calibration runs/scale-1b [--ranks-only]
    python benchmarks/scale.py end-to-end runs/scale-1b [--dtype bfloat16|float32] [--batches 2] [--seq-len 128]
        [--params 0.6] [--new-tokens 8] [--share both|write-back|none]
    python benchmarks/scale.py recompute CHECKPOINT_DIR [--dtype bfloat16|float32] [--seq-len 2048]

``analysis``: each model is built from its real config on the meta device (no weights) and analysed
in a fresh process (static shapes; ``--dynamic``: dynamic batch and sequence); rows give capture and analysis time, peak RSS of that process, the groups, and a
plan from random scores searched to 60 % of the parameters.

``checkpoint``: a random-init Llama-3.2-1B-shaped model (1.24B parameters, bfloat16, tied embeddings) is
saved sharded; a meta-device analysis and a random-score plan at 60 % params are applied to it shard by
shard with :func:`fxgradnas.hf.prune_checkpoint`, in a fresh process whose peak RSS is reset just before
the call; the row compares the peak's rise over the process before the call with one shard plus 10 % of
the model's bytes. ``--verify`` compares the result, loaded by ``load_pruned``, with ``write_back`` of the
loaded model in memory.

``sharded-calibration``: two gloo ranks whose model has its parameters on the meta device calibrate it
with ``shard=True`` and the weights read from that checkpoint, against one process with the whole model
loaded, on the same batches.

``end-to-end``: the checkpoint that ``checkpoint`` saves, loaded (every weight read once), analysed,
calibrated, searched, rewritten by ``apply_plan`` and written back (``--share``: which of the two share
weights instead of copying), then asked to generate, in one fresh process whose peak RSS (VmHWM) is reset
before each step; each step's time and peak as a multiple of the model's bytes.

``recompute``: one batch of 1 x seq-len tokens calibrated without and with ``recompute=True``, each in a
fresh process; time, peak RSS and its rise over the RSS before the call, and whether the scores are equal.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

import torch
from tabulate import tabulate

CONFIGS = {
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False)),
    "llama-3.1-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                    tie_word_embeddings=False)),
    "qwen2.5-72b": ("qwen2", dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                  tie_word_embeddings=False)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
}


def config(name: str):
    from transformers import LlamaConfig, Qwen2Config

    family, values = CONFIGS[name]
    return (LlamaConfig if family == "llama" else Qwen2Config)(**values)


def peak_rss_bytes() -> int:
    """The process's peak resident set (VmHWM; reset by :func:`reset_peak_rss`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def meta_analysis(name: str, ratio: float = 0.6, dynamic: bool = False):
    """Build ``name`` on the meta device, analyse it and search a random-score plan; returns the row."""
    from transformers import AutoModelForCausalLM

    import fxgradnas
    from fxgradnas.scores import random_scores

    start = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(name))
    built = time.perf_counter() - start
    ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    analysis = fxgradnas.analyze(model, {"input_ids": ids}, dynamic_shapes="auto" if dynamic else None)
    start = time.perf_counter()
    scores = random_scores(analysis)
    found = fxgradnas.search(analysis, scores, {"params": ratio})
    searched = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return analysis, found, {
        "model": name, "params (B)": round(params / 1e9, 2), "build s": round(built, 2),
        "capture s": round(analysis.seconds["capture"], 1), "analysis s": round(analysis.seconds["analysis"], 1),
        "search s": round(searched, 1), "groups": len(analysis.groups), "prunable": len(analysis.prunable),
        "achieved params": round(found.achieved["params"], 4), "achieved flops": round(found.achieved["flops"], 4),
    }


def one_analysis(name: str, dynamic: bool) -> None:
    start = time.perf_counter()
    analysis, _, row = meta_analysis(name, dynamic=dynamic)
    row["shapes"] = "dynamic" if dynamic else "static"
    row["total s"] = round(time.perf_counter() - start, 1)
    row["peak RSS GB"] = round(peak_rss_bytes() / 1e9, 2)
    lines = analysis.table().splitlines()
    print("\n".join([*lines[:12], "...", *lines[-2:]]), file=sys.stderr)
    print(json.dumps(row))


def make_checkpoint(directory: Path, shard: str) -> None:
    """Save a random-init Llama-3.2-1B-shaped model in bfloat16, sharded (skipped when it exists)."""
    if (directory / "model.safetensors.index.json").is_file():
        return
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config("llama-3.2-1b"), dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=shard)


def one_checkpoint(directory: Path, target: Path) -> None:
    """A meta-device analysis and random-score plan at 60 % params applied to ``directory`` by
    :func:`fxgradnas.hf.prune_checkpoint`; the row holds the peak RSS rise during the call."""
    from fxgradnas.hf import prune_checkpoint

    analysis, found, _ = meta_analysis("llama-3.2-1b")
    (directory.parent / "plan.json").write_text(found.plan.to_json())
    shards = sorted(directory.glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    prune_checkpoint(directory, analysis, found.plan, target)
    seconds = time.perf_counter() - start
    rise = peak_rss_bytes() - before
    budget = largest + 0.1 * model_bytes
    pruned_bytes = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    print(json.dumps({
        "model GB": round(model_bytes / 1e9, 3), "shards": len(shards), "largest shard GB": round(largest / 1e9, 3),
        "pruned GB": round(pruned_bytes / 1e9, 3), "seconds": round(seconds, 1),
        "RSS before GB": round(before / 1e9, 3), "peak rise GB": round(rise / 1e9, 3),
        "target (shard + 10 %) GB": round(budget / 1e9, 3), "rise / target": round(rise / budget, 3),
    }))


def verify_checkpoint(directory: Path, target: Path) -> None:
    """The streamed result loaded by load_pruned against write_back of the loaded model in memory."""
    from transformers import AutoModelForCausalLM

    import fxgradnas
    from fxgradnas import Plan
    from fxgradnas.hf import load_pruned, write_back

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    plan = Plan.from_json((directory.parent / "plan.json").read_text())
    analysis = fxgradnas.analyze(model, {"input_ids": torch.randint(0, 1000, (2, 16))}, dynamic_shapes=None)
    write_back(model, analysis, plan)
    expected = model.state_dict()
    del analysis
    loaded = load_pruned(target).to(torch.bfloat16).state_dict()
    unequal = [n for n, t in expected.items() if not torch.equal(loaded[n], t)]
    print(json.dumps({"tensors": len(expected), "unequal": len(unequal), "first unequal": unequal[:3],
                      "peak RSS GB": round(peak_rss_bytes() / 1e9, 2)}))


def _calibration_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128256, (1, 32), generator=generator) for _ in range(2)]


def _sharded_rank(rank: int, world: int, init_file: str, directory: str, out: str) -> None:
    """One rank: the model with its parameters on meta, calibrated with its blocks read from the checkpoint
    and sharded over the ranks."""
    from datetime import timedelta

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    import fxgradnas
    from fxgradnas.datasets import causal_lm_loss

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=timedelta(seconds=600))
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config("llama-3.2-1b"), dtype=torch.bfloat16).eval()
        model.tie_weights()
        batches = _calibration_batches()
        analysis = fxgradnas.analyze(model, batches[0], dynamic_shapes=None)
        before = rss_bytes()
        start = time.perf_counter()
        scores = fxgradnas.calibrate(analysis, batches[rank::world], causal_lm_loss,
                                     fxgradnas.CalibrationOptions(shard=True), checkpoint=directory, progress=False)
        seconds = time.perf_counter() - start
        torch.save({"scores": dict(scores), "seconds": seconds, "peak": peak_rss_bytes(), "before": before},
                   Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def sharded_calibration(directory: Path, single_process: bool = True) -> None:
    """Two gloo ranks calibrating the 1.24B model from its checkpoint with sharded blocks, then one process
    with the whole model in memory on the same batches; peak RSS of each and the largest score difference."""
    import tempfile

    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    import fxgradnas
    from fxgradnas.datasets import causal_lm_loss

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_sharded_rank, args=(2, f"{out}/init", str(directory), out), nprocs=2)
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(2)]
    if not single_process:
        print(json.dumps({"rank RSS before calibration GB": [round(r["before"] / 1e9, 2) for r in ranks],
                          "rank peak RSS GB": [round(r["peak"] / 1e9, 2) for r in ranks]}))
        return
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    batches = _calibration_batches()
    start = time.perf_counter()
    single = fxgradnas.calibrate(model, batches, causal_lm_loss, example_inputs=batches[0], progress=False)
    seconds = time.perf_counter() - start
    worst = max(float((ranks[0]["scores"][k] - v).abs().max() / v.abs().max()) for k, v in single.items())
    print(json.dumps({
        "ranks": 2, "rank RSS before calibration GB": [round(r["before"] / 1e9, 2) for r in ranks],
        "rank peak RSS GB": [round(r["peak"] / 1e9, 2) for r in ranks],
        "rank seconds": [round(r["seconds"], 1) for r in ranks],
        "one process peak RSS GB": round(peak_rss_bytes() / 1e9, 2), "one process seconds": round(seconds, 1),
        "max relative score difference": worst,
    }))


class Steps:
    """Each step's time and peak RSS (VmHWM, reset by /proc/self/clear_refs just before it) in one process."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def run(self, name: str, call):
        gc.collect()
        before = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        value = call()
        seconds = time.perf_counter() - start
        self.rows.append({"step": name, "seconds": round(seconds, 1), "RSS before GB": round(before / 1e9, 3),
                          "peak RSS GB": round(peak_rss_bytes() / 1e9, 3)})
        print(json.dumps(self.rows[-1]), file=sys.stderr, flush=True)
        return value


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, tied ones once."""
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in unique.values())


def one_end_to_end(directory: Path, dtype: str, batches: int, seq_len: int, ratio: float, new_tokens: int,
                   share: str = "both") -> None:
    """Load, analyse, calibrate, search, rewrite, write back and generate in this process; one row per step.
    ``share``: which of ``apply_plan`` and ``write_back`` get ``share_weights=True`` ("both", "write-back",
    "none")."""
    from transformers import AutoModelForCausalLM

    import fxgradnas
    from fxgradnas.datasets import causal_lm_loss
    from fxgradnas.hf import write_back

    steps = Steps()
    generator = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 128256, (1, seq_len), generator=generator) for _ in range(batches)]
    imports = rss_bytes()
    model = steps.run("load (from_pretrained, every weight read)", lambda: resident(AutoModelForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype)).eval()))
    model_bytes = tensor_bytes(model)
    analysis = steps.run("analyse", lambda: fxgradnas.analyze(model, data[0], dynamic_shapes=None))
    scores = steps.run("calibrate", lambda: fxgradnas.calibrate(analysis, data, causal_lm_loss, progress=False))
    found = steps.run("search", lambda: fxgradnas.search(analysis, scores, {"params": ratio}))
    pruned = steps.run("rewrite (apply_plan, checked)",
                       lambda: fxgradnas.apply_plan(analysis, found.plan, share_weights=share == "both"))
    check = pruned.meta["self_check"]
    steps.run("write back (checked)",
              lambda: write_back(model, analysis, found.plan, weights=pruned, share_weights=share != "none"))
    analysis = pruned = None  # the dense weights go with the analysis' graph
    prompt = data[0][:, :16]
    generated = steps.run("generate", lambda: model.generate(prompt, max_new_tokens=new_tokens,
                                                              min_new_tokens=new_tokens, do_sample=False))
    for row in steps.rows:
        row["peak / model bytes"] = round(row.pop("peak RSS GB") * 1e9 / model_bytes, 3)
    print(json.dumps({
        "dtype": dtype, "model GB": round(model_bytes / 1e9, 3), "RSS after imports GB": round(imports / 1e9, 3),
        "calibration": f"{batches} x 1 x {seq_len} tokens", "achieved params": round(found.achieved["params"], 4),
        "share_weights": share, "self-check": str(check), "pruned model GB": round(tensor_bytes(model) / 1e9, 3),
        "generated": generated.shape[1] - prompt.shape[1], "score sums": str({t.dtype for t in scores.values()}),
        "steps": steps.rows,
    }))


def resident(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every weight read once: from_pretrained maps the safetensors files, whose pages count in the
    RSS only once read."""
    with torch.no_grad():
        for t in model.state_dict().values():
            t.sum()
    return model


def one_recompute(directory: Path, dtype: str, seq_len: int, recompute: bool, out: Path) -> None:
    """One batch of 1 x ``seq_len`` tokens calibrated with or without ``recompute``; the scores go to ``out``."""
    from transformers import AutoModelForCausalLM

    import fxgradnas
    from fxgradnas.datasets import causal_lm_loss

    model = resident(AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval())
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    analysis = fxgradnas.analyze(model, ids, dynamic_shapes=None)
    gc.collect()
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    scores = fxgradnas.calibrate(analysis, [ids], causal_lm_loss, fxgradnas.CalibrationOptions(recompute=recompute),
                                 progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    torch.save(dict(scores), out)
    print(json.dumps({"recompute": recompute, "seconds": round(seconds, 1), "RSS before GB": round(before / 1e9, 3),
                      "peak RSS GB": round(peak / 1e9, 3), "peak rise GB": round((peak - before) / 1e9, 3),
                      "model GB": round(tensor_bytes(model) / 1e9, 3)}))


def recompute_side_by_side(directory: Path, dtype: str, seq_len: int) -> None:
    """Calibration of one long sequence without and with ``recompute``, each in a fresh process."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        rows = [in_subprocess("one-recompute", str(directory), f"--dtype={dtype}", f"--seq-len={seq_len}",
                              *(["--recompute"] if flag else []), f"--out={out}/{flag}.pt") for flag in (False, True)]
        plain, recomputed = (torch.load(f"{out}/{flag}.pt") for flag in (False, True))
    equal = all(torch.equal(plain[k], recomputed[k]) for k in plain)
    rows[1]["slowdown"] = round(rows[1]["seconds"] / rows[0]["seconds"], 2)
    rows[1]["peak rise ratio"] = round(rows[1]["peak rise GB"] / rows[0]["peak rise GB"], 3)
    print(f"{directory.name}, {dtype}, 1 x {seq_len} tokens; scores equal: {equal}")
    print(tabulate(rows, headers="keys", tablefmt="github"))


def end_to_end(directory: Path, args: list[str]) -> None:
    result = in_subprocess("one-end-to-end", str(directory), *args)
    print(tabulate(result.pop("steps"), headers="keys", tablefmt="github"))
    print(json.dumps(result, indent=1))


def in_subprocess(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    sys.stderr.write(out.stderr[-3000:])
    if out.returncode:
        raise SystemExit(f"{args} failed with {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analysis")
    a.add_argument("--models", nargs="+", default=["llama-3.1-8b", "llama-3.1-70b", "qwen2.5-72b"])
    a.add_argument("--dynamic", action="store_true", help="dynamic batch and sequence (default: static)")
    one = sub.add_parser("one-analysis")
    one.add_argument("model")
    one.add_argument("--dynamic", action="store_true")
    c = sub.add_parser("checkpoint")
    c.add_argument("--dir", type=Path, default=Path("runs/scale-1b"))
    c.add_argument("--shard", default="500MB", help="max_shard_size of the saved checkpoint")
    c.add_argument("--verify", action="store_true", help="also compare with write_back in memory (about 6 GB)")
    for step in ("one-checkpoint", "verify-checkpoint", "sharded-calibration"):
        sub.add_parser(step).add_argument("dir", type=Path)
    sub.choices["sharded-calibration"].add_argument("--ranks-only", action="store_true")
    for step in ("end-to-end", "one-end-to-end"):
        e = sub.add_parser(step)
        e.add_argument("dir", type=Path)
        e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
        e.add_argument("--batches", type=int, default=2)
        e.add_argument("--seq-len", type=int, default=128)
        e.add_argument("--params", type=float, default=0.6)
        e.add_argument("--new-tokens", type=int, default=8)
        e.add_argument("--share", default="both", choices=["both", "write-back", "none"],
                       help="the steps given share_weights=True: apply_plan and write_back (default), one, none")
    for step in ("recompute", "one-recompute"):
        r = sub.add_parser(step)
        r.add_argument("dir", type=Path, help="a Hugging Face checkpoint directory")
        r.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
        r.add_argument("--seq-len", type=int, default=2048)
    sub.choices["one-recompute"].add_argument("--recompute", action="store_true")
    sub.choices["one-recompute"].add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "recompute":
        recompute_side_by_side(args.dir, args.dtype, args.seq_len)
    elif args.command == "one-recompute":
        one_recompute(args.dir, args.dtype, args.seq_len, args.recompute, args.out)
    elif args.command in ("end-to-end", "one-end-to-end"):
        options = [args.dtype, args.batches, args.seq_len, args.params, args.new_tokens]
        if args.command == "one-end-to-end":
            one_end_to_end(args.dir / "source", *options, share=args.share)
        else:
            end_to_end(args.dir, [f"--{k}={v}" for k, v in zip(["dtype", "batches", "seq-len", "params", "new-tokens"],
                                                             options, strict=True)] + [f"--share={args.share}"])
    elif args.command == "one-analysis":
        one_analysis(args.model, args.dynamic)
    elif args.command == "analysis":
        rows = [in_subprocess("one-analysis", name, *(["--dynamic"] if args.dynamic else [])) for name in args.models]
        print(tabulate(rows, headers="keys", tablefmt="github"))
    elif args.command == "checkpoint":
        make_checkpoint(args.dir / "source", args.shard)
        print(tabulate([in_subprocess("one-checkpoint", str(args.dir))], headers="keys", tablefmt="github"))
        if args.verify:
            print(tabulate([in_subprocess("verify-checkpoint", str(args.dir))], headers="keys", tablefmt="github"))
    elif args.command == "one-checkpoint":
        one_checkpoint(args.dir / "source", args.dir / "pruned")
    elif args.command == "verify-checkpoint":
        verify_checkpoint(args.dir / "source", args.dir / "pruned")
    elif args.command == "sharded-calibration":
        sharded_calibration(args.dir / "source", single_process=not args.ranks_only)


if __name__ == "__main__":
    main()
