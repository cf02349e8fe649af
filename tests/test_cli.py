"""The ``fxgradnas`` command end to end: prune, inspect and eval a tiny random Hugging Face checkpoint
saved in a temporary directory, a MODULE:FACTORY model, and the one-line errors with their exit codes."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

import fxgradnas
from fxgradnas import CalibrationOptions, CompensationOptions, SearchOptions, options
from fxgradnas.cli import CORPORA, build_parser, fraction, main
from tests.zoo import mlp, save_hf_checkpoint

ROOT = Path(__file__).parent.parent
TINY = ["--batches", "2", "--batch-size", "2", "--seq-len", "16", "--multiple-of", "4"]


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``fxgradnas ARGV`` in this process: exit code, stdout, stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, after_progress: bool = False) -> str:
    """The error line of stderr: all of it, or ``after_progress`` the last line after the step lines."""
    lines = err.strip().splitlines()
    if after_progress:
        assert all(line.startswith(("-- ", "   ")) for line in lines[:-1]), err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("fxgradnas: error: "), err
    return lines[0]


# --- without a model -------------------------------------------------------------------------------
def test_help_answers_at_once_without_torch() -> None:
    code = ("import sys, time\nfrom fxgradnas.cli import main\nfor argv in ([], ['prune'], ['inspect'], ['eval']):\n"
            "    try:\n        main([*argv, '--help'])\n    except SystemExit as exc:\n        assert exc.code == 0\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip().splitlines()[-1] == "False"
    seconds = {}
    for name, argv in (("python", ["-c", "pass"]), ("help", ["-m", "fxgradnas", "prune", "--help"])):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], capture_output=True, check=True, cwd=ROOT)
        seconds[name] = time.perf_counter() - start
    assert seconds["help"] < 1.0 or seconds["help"] - seconds["python"] < 0.5  # a loaded machine starts slowly


def test_console_script_plot_extra_and_choices_match_the_library() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fxgradnas"] == "fxgradnas.cli:main"
    assert any(r.startswith("matplotlib") for r in project["optional-dependencies"]["plot"])
    assert set(CORPORA) == {"shakespeare", "shakespeare-heldout", "python-docs", "stdlib"}
    args = build_parser().parse_args(["prune", "m", "--params", "0.5", "--out", "o"])
    assert args.damping is None and args.batches is None  # defaults by what is read: tests/test_options.py


def test_fraction() -> None:
    assert fraction("0.75") == 0.75 and fraction("75%") == "75%" and fraction("1") == 1.0
    for bad in ("1.5", "0", "150%", "abc", "-0.5", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a ratio"):
            fraction(bad)


@pytest.fixture
def fake_checkpoint(tmp_path: Path) -> Path:
    """A directory that looks like a checkpoint: the errors below come before any model is loaded."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    return directory


def test_user_mistakes_are_one_line_errors_with_exit_code_2(tmp_path: Path, fake_checkpoint: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "out")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    cases = {
        "no such checkpoint directory": ["prune", str(tmp_path / "missing"), "--params", "0.8", "--out", out],
        "expected a ratio": ["prune", str(fake_checkpoint), "--params", "1.5", "--out", out],
        "no such file": ["prune", str(fake_checkpoint), "--params", "0.8", "--calibration", "nope.txt", "--out", out],
        "cannot read": ["prune", str(fake_checkpoint), "--params", "80%", "--calibration", str(binary), "--out", out],
        "no config.json": ["eval", str(tmp_path), "python-docs"],
        "one of the arguments --params --flops is required": ["prune", str(fake_checkpoint), "--out", out],
        "--calibration TEXT is needed": ["prune", str(fake_checkpoint), "--params", "0.8", "--out", out],
        "not empty": ["prune", str(fake_checkpoint), "--params", "0.8", "--scorer", "l1", "--out", str(tmp_path)],
        "invalid choice": ["prune", str(fake_checkpoint), "--params", "0.8", "--scorer", "magic", "--out", out],
        "expected a number >= 0": ["prune", str(fake_checkpoint), "--params", "0.8", "--damping", "-1", "--out", out],
        "stdlib given twice": ["prune", str(fake_checkpoint), "--params", "0.8", "--calibration", "stdlib", "self",
                               "stdlib", "--out", out],
        "--compensate none": ["prune", "tests.zoo:mlp", "--params", "0.8", "--scorer", "l1", "--out", out],
        "for --calibration and --refit only": ["prune", str(fake_checkpoint), "--params", "0.8", "--calibration",
                                               "stdlib", "--eval", "self", "--out", out],
        "--compensate none skips the re-fit": ["prune", str(fake_checkpoint), "--params", "0.8", "--calibration",
                                               "stdlib", "--refit", "self", "--compensate", "none", "--out", out],
        "--refit: self given twice": ["prune", str(fake_checkpoint), "--params", "0.8", "--calibration", "stdlib",
                                      "--refit", "self", "self", "--out", out],
        "--refit: no such file 'nope.txt' (built-in corpora: shakespeare, shakespeare-heldout, python-docs, stdlib, "
        "or self": ["prune", str(fake_checkpoint), "--params", "0.8", "--calibration", "stdlib",
                    "--refit", "nope.txt", "--out", out],
    }
    for message, argv in cases.items():
        code, _, err = run(argv, capsys)
        assert code == 2, (message, err)
        assert message in one_line_error(err)


class Letters:
    """A tokenizer of one token per character."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}


def test_several_calibration_texts_are_mixed_in_every_batch() -> None:
    """``--calibration A B``: windows of A and B in turn (not A's windows first, which would leave B out)."""
    from fxgradnas.cli import calibration_batches, evaluation_batches, text_windows

    batches, batch_size, seq_len = 3, 2, 4
    parts = text_windows(Letters(), {"a": "a" * 400, "b": "b" * 400}, seq_len, batches * batch_size)
    evaluation = evaluation_batches(Letters(), {"b": "b" * 40}, seq_len, 1, batch_size)
    calibration = calibration_batches(list(parts.values()), batches, batch_size, seq_len)
    assert [[chr(int(w[0])) for w in batch] for batch in calibration] == [["a", "b"]] * 3
    assert list(evaluation) == ["b"] and evaluation["b"][0].shape == (2, 4)
    parts = text_windows(Letters(), {"a": "a" * 400, "b": "b" * 9}, seq_len, batches * batch_size)  # b: 2 windows
    short = calibration_batches(list(parts.values()), batches, batch_size, seq_len)
    assert "".join(chr(int(w[0])) for batch in short for w in batch) == "ababaa"


def test_calibration_self_interleaves_text_the_model_samples() -> None:
    """``--calibration a self``: every other window is sampled by the model, seeded by ``--seed``."""
    transformers = pytest.importorskip("transformers")
    from fxgradnas.cli import calibration_batches, sampled_text, text_windows
    from fxgradnas.datasets import sampled_windows

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    batches, batch_size, seq_len = 3, 2, 4
    sampled = sampled_text(model, Letters(), batches * batch_size // 2, seq_len, seed=5, batch_size=batch_size)
    assert torch.equal(sampled, sampled_windows(model, 3, 4, seed=5, batch_size=8, progress=False))
    parts = text_windows(Letters(), {"a": "a" * 400}, seq_len, batches * batch_size)
    calibration = calibration_batches([sampled, parts["a"]], batches, batch_size, seq_len)
    windows = torch.cat(calibration)
    assert windows.shape == (6, 4) and (windows[1::2] == ord("a")).all() and torch.equal(windows[::2], sampled)


def test_exit_code_and_stderr_of_the_process(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "fxgradnas", "eval", str(tmp_path / "missing"), "python-docs"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert "no such checkpoint directory" in one_line_error(done.stderr)


# --- MODULE:FACTORY models -------------------------------------------------------------------------
def mlp_data() -> tuple[list, object]:
    """Calibration batches ``(x, y)`` for ``tests.zoo:mlp`` and their loss (``--data``)."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(3)]
    return batches, lambda output, batch: torch.nn.functional.mse_loss(output, batch[1])


def test_prune_a_factory_model_and_reload_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(["prune", "tests.zoo:mlp", "--params", "0.6", "--data", "tests.test_cli:mlp_data",
                        "--compensate", "ls", "--multiple-of", "1", "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "== Plan" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sizes"]["params"]["after"] <= 0.6 * report["sizes"]["params"]["before"]
    model, inputs = mlp()
    plan = fxgradnas.Plan.from_json((tmp_path / "plan.json").read_text())
    pruned = fxgradnas.apply_plan(model, plan, inputs)
    pruned.load_state_dict(torch.load(tmp_path / "pruned_state_dict.pt", weights_only=True))
    assert sum(p.numel() for p in pruned.parameters()) == report["sizes"]["params"]["after"]


def test_flops_percentage_with_weight_magnitude_scores(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, _ = run(["prune", "tests.zoo:mlp", "--flops", "70%", "--scorer", "l1", "--compensate", "none",
                      "--multiple-of", "1", "--out", str(tmp_path)], capsys)
    assert code == 0
    flops = json.loads((tmp_path / "report.json").read_text())["sizes"]["flops per example input"]
    assert flops["after"] <= 0.7 * flops["before"]


def test_fxgradnas_errors_exit_with_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["prune", "tests.zoo:mlp", "--params", "0.01", "--scorer", "l1", "--compensate", "none",
                        "--out", str(tmp_path)], capsys)
    assert code == 1
    assert "cannot meet params" in one_line_error(err, after_progress=True)


def test_inspect_a_factory(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(["inspect", "tests.zoo:mlp"], capsys)
    assert code == 0 and "prunable" in out


# --- a tiny Hugging Face checkpoint ----------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 32, 4 heads on 2 KV heads) with a byte-level tokenizer built
    without the hub, saved with ``save_pretrained``; calibration and evaluation texts beside it."""
    pytest.importorskip("transformers")
    from fxgradnas.datasets import python_docs_text

    directory = tmp_path_factory.mktemp("tiny")
    save_hf_checkpoint(directory / "model")
    text = python_docs_text(40_000)
    (directory / "calibration.txt").write_text(text[:20_000])
    (directory / "eval.txt").write_text(text[20_000:])
    return directory


def prune_argv(checkpoint: Path, out: Path) -> list[str]:
    """Calibration on a text file, which a checkpoint's prune mixes with the model's own samples by default."""
    return ["prune", str(checkpoint / "model"), "--params", "0.8", "--calibration", str(checkpoint / "calibration.txt"),
            "--eval", str(checkpoint / "eval.txt"), "--eval-batches", "2", "--compensate", "ls",
            "--prompt", "def", "--new-tokens", "4", *TINY, "--out", str(out)]


@pytest.fixture(scope="module")
def pruned(checkpoint: Path) -> tuple[Path, str]:
    """The output directory of one ``fxgradnas prune`` run on the tiny checkpoint, and its stdout."""
    out = checkpoint / "pruned"
    stdout = io.StringIO()  # capsys is function-scoped
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(prune_argv(checkpoint, out)) == 0
    return out, stdout.getvalue()


@pytest.mark.hf
def test_prune_writes_a_loadable_model_plan_report_and_picture(pruned: tuple[Path, str]) -> None:
    from fxgradnas.hf import load_pruned

    out, stdout = pruned
    for title in ("== Analysis", "== Plan", "== Summary", "== Before / after", "== Greedy generation"):
        assert title in stdout
    report = json.loads((out / "report.json").read_text())
    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == report["sizes"]["params"]["after"]
    assert report["sizes"]["params"]["after"] <= 0.8 * report["sizes"]["params"]["before"]
    ids = torch.tensor([[68, 69, 70]])
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 6)
    plan = fxgradnas.Plan.from_json((out / "plan.json").read_text())
    assert [r["group"] for r in report["plan"]] == ["model.layers.0.self_attn", "model.layers.0.mlp",
                                                   "model.layers.1.self_attn", "model.layers.1.mlp"]
    assert all(r["kept"] == len(plan.keep.get(r["group"], range(r["of"]))) for r in report["plan"])
    assert set(report["perplexity"]) == {str(Path(out).parent / "eval.txt")}
    assert {"score", "search", "rewrite", "compensate", "write back", "total"} <= set(report["seconds"])
    markdown = (out / "report.md").read_text()
    assert "## Plan" in markdown and "## Perplexity" in markdown and "model.layers.1.mlp" in markdown
    if (out / "pruned.png").exists():
        assert (out / "pruned.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.hf
def test_uniform_writes_a_standard_checkpoint_and_says_so(checkpoint: Path, pruned: tuple[Path, str],
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    from fxgradnas.hf import STRUCTURE_FILE

    default = json.loads((pruned[0] / "report.json").read_text())
    standard = json.loads((pruned[0] / STRUCTURE_FILE).read_text())["standard"]
    assert default["checkpoint"].startswith("standard" if standard else "per-layer sizes")
    argv = prune_argv(checkpoint, tmp_path / "out")
    assert main([*argv[:argv.index("--prompt")], *TINY, "--uniform", "--out", str(tmp_path / "out")]) == 0
    assert "== Checkpoint\nstandard: transformers' AutoModelForCausalLM.from_pretrained loads it" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["uniform"] is True and report["checkpoint"].startswith("standard")
    assert "## Checkpoint" in (tmp_path / "out" / "report.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    config = model.config
    assert (config.intermediate_size, config.num_attention_heads) != (64, 4), "nothing was pruned"
    assert sum(p.numel() for p in model.parameters()) == report["sizes"]["params"]["after"]
    ids = torch.tensor([[68, 69, 70]])
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.hf
def test_cli_perplexity_equals_the_python_api(checkpoint: Path, pruned: tuple[Path, str]) -> None:
    """The same settings through the Python API give the same plan and the same perplexities: by default the
    calibration (scores and re-fit) reads the text and the model's samples, half the windows each, sampled
    from the tokenizer's only special token, and the re-fit's ridge is the weaker one for sampled data."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fxgradnas.datasets import (
        batched,
        causal_lm_loss,
        interleaved,
        perplexity,
        sampled_windows,
        token_windows,
    )
    from fxgradnas.hf import write_back

    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "model")
    text = token_windows(tokenizer, (checkpoint / "calibration.txt").read_text(), 16, 4)
    sampled = sampled_windows(model, 2, 16, start_token=tokenizer.eos_token_id, batch_size=8, progress=False)
    calibration = batched(interleaved([text, sampled])[:4], 2)
    evaluation = batched(token_windows(tokenizer, (checkpoint / "eval.txt").read_text(), 16, 4), 2)
    dense = perplexity(model, evaluation)
    result = fxgradnas.prune(model, calibration[0], calibration, causal_lm_loss, constraint={"params": 0.8},
                             progress=False, search=SearchOptions(multiple_of=4),
                             calibration=CalibrationOptions(max_batches=2),
                             compensation=CompensationOptions(damping=options.SAMPLED_DAMPING, max_batches=2))
    write_back(model, result.analysis, result.plan, weights=result.model)
    report = json.loads((pruned[0] / "report.json").read_text())
    settings = report["settings"]
    assert settings["calibration"].endswith(", self") and settings["refit on"] == settings["calibration"]
    assert settings["damping"] == options.SAMPLED_DAMPING
    assert settings["self"] == "2 windows of 16 tokens the model sampled from its start token (seed 0)"
    (figures,) = report["perplexity"].values()
    assert json.loads((pruned[0] / "plan.json").read_text())["keep"] == result.plan.keep
    assert figures["before"] == pytest.approx(dense, rel=1e-6)
    assert figures["after"] == pytest.approx(perplexity(model, evaluation), rel=1e-6)


@pytest.mark.hf
def test_refit_text_is_what_the_refit_reads(checkpoint: Path, tmp_path: Path) -> None:
    """``--calibration a --refit a self``: the scores read the text, the re-fit the text and the model's samples
    taken in turn: the Python API's ``compensation_data``; ``--no-self`` scores and re-fits on the text alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fxgradnas import datasets
    from fxgradnas.hf import write_back

    text_file, eval_file = str(checkpoint / "calibration.txt"), str(checkpoint / "eval.txt")
    argv = ["prune", str(checkpoint / "model"), "--params", "0.8", "--calibration", text_file, "--refit", text_file,
            "self", "--eval", eval_file, "--eval-batches", "2", "--damping", "0.1", "--prompt", "", *TINY]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["refit on"] == f"{text_file}, self"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "model")
    text = datasets.token_windows(tokenizer, (checkpoint / "calibration.txt").read_text(), 16, 4)
    evaluation = datasets.batched(datasets.token_windows(tokenizer, (checkpoint / "eval.txt").read_text(), 16, 4), 2)
    after = {}
    for label, refit in (("text", None), ("text and samples", "samples")):
        model = AutoModelForCausalLM.from_pretrained(checkpoint / "model").eval()
        if refit is not None:
            sampled = datasets.sampled_windows(model, 2, 16, start_token=tokenizer.eos_token_id, batch_size=8, progress=False)
            refit = datasets.batched(datasets.interleaved([text, sampled])[:4], 2)
        result = fxgradnas.prune(model, text[:2], datasets.batched(text, 2), datasets.causal_lm_loss,
                                 constraint={"params": 0.8}, compensation_data=refit, progress=False,
                                 search=SearchOptions(multiple_of=4),
                                 calibration=CalibrationOptions(max_batches=2),
                                 compensation=CompensationOptions(damping=0.1, max_batches=2))
        write_back(model, result.analysis, result.plan, weights=result.model)
        after[label] = datasets.perplexity(model, evaluation)
    assert report["perplexity"][eval_file]["after"] == pytest.approx(after["text and samples"], rel=1e-6)
    assert after["text"] != pytest.approx(after["text and samples"], rel=1e-4)
    options = [a for a in argv if a not in ("--refit", "self")]
    options.remove(text_file)  # named twice: for --calibration and for --refit
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*options, "--no-self", "--out", str(tmp_path / "text")]) == 0
    alone = json.loads((tmp_path / "text" / "report.json").read_text())
    assert alone["settings"]["calibration"] == alone["settings"]["refit on"] == text_file
    assert alone["settings"]["self"] == "-"
    assert alone["perplexity"][eval_file]["after"] == pytest.approx(after["text"], rel=1e-6)


@pytest.mark.hf
def test_searcher_evolve_holds_out_more_batches_of_the_calibration(checkpoint: Path, tmp_path: Path) -> None:
    """``--searcher evolve`` reads ``evolve_batches`` more batches than ``--batches``, measures the candidates on
    them and gives the Python API's plan and perplexity; the report says what the refinement did."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fxgradnas import datasets
    from fxgradnas.hf import write_back

    text_file, eval_file = str(checkpoint / "calibration.txt"), str(checkpoint / "eval.txt")
    argv = ["prune", str(checkpoint / "model"), "--params", "0.8", "--calibration", text_file, "--no-self",
            "--eval", eval_file, "--eval-batches", "2", "--prompt", "", "--searcher", "evolve", *TINY,
            "--out", str(tmp_path / "out")]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    held_out = SearchOptions().evolve_batches
    assert report["settings"]["searcher"].startswith("evolve (held-out loss ")
    assert f"({held_out} batches)" in report["settings"]["searcher"]
    assert report["settings"]["calibration windows"].startswith("2 batches")  # the held-out ones are not scored
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "model")
    text = datasets.token_windows(tokenizer, (checkpoint / "calibration.txt").read_text(), 16, (2 + held_out) * 2)
    evaluation = datasets.batched(datasets.token_windows(tokenizer, (checkpoint / "eval.txt").read_text(), 16, 4), 2)
    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model").eval()
    result = fxgradnas.prune(model, text[:2], datasets.batched(text, 2), datasets.causal_lm_loss,
                             constraint={"params": 0.8}, progress=False,
                             search=SearchOptions(multiple_of=4, searcher="evolve"),
                             calibration=CalibrationOptions(max_batches=2),
                             compensation=CompensationOptions(max_batches=2))
    assert result.search.evolve is not None and result.search.evolve.batches == held_out
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["keep"] == result.plan.keep
    write_back(model, result.analysis, result.plan, weights=result.model)
    assert report["perplexity"][eval_file]["after"] == pytest.approx(datasets.perplexity(model, evaluation), rel=1e-6)


@pytest.mark.hf
def test_eval_and_inspect_a_checkpoint(checkpoint: Path, pruned: tuple[Path, str],
                                       capsys: pytest.CaptureFixture) -> None:
    out = pruned[0]
    code, stdout, _ = run(["eval", str(out), str(checkpoint / "eval.txt"), "--json", "--batches", "2",
                           "--batch-size", "2", "--seq-len", "16"], capsys)
    assert code == 0
    figures = json.loads(stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    assert figures["perplexity"][str(checkpoint / "eval.txt")] == pytest.approx(
        report["perplexity"][str(checkpoint / "eval.txt")]["after"], rel=1e-6)
    assert figures["params"] == report["sizes"]["params"]["after"]
    code, stdout, _ = run(["inspect", str(checkpoint / "model")], capsys)
    assert code == 0 and "model.layers.1.self_attn" in stdout and "4 (2 kv x 2)" in stdout


@pytest.mark.hf
def test_prune_a_pruned_checkpoint_again(checkpoint: Path, pruned: tuple[Path, str],
                                         capsys: pytest.CaptureFixture) -> None:
    """A checkpoint written by ``prune`` prunes again (in two rounds calibrated with recomputed layers, then
    healed); the second save keeps the first one's patches."""
    from fxgradnas.hf import load_pruned

    out = checkpoint / "twice"
    code, _, err = run(["prune", str(pruned[0]), "--params", "0.9", "--calibration", str(checkpoint / "calibration.txt"),
                        "--prompt", "", "--rounds", "2", "--recompute", "--heal", "2", *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["heal"]["steps"] == 2 and report["settings"]["rounds"] == 2 and "heal" in report["seconds"]
    assert report["settings"]["recompute"] is True
    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == report["sizes"]["params"]["after"]
    with torch.no_grad():
        assert model(torch.tensor([[68, 69, 70]])).logits.shape == (1, 3, 257)


def test_console_script_imports_factories_from_the_current_directory(tmp_path: Path) -> None:
    """The installed ``fxgradnas`` script, unlike ``python -m``, does not put the current directory on
    sys.path by itself; a MODULE:FACTORY of the current directory must import all the same."""
    (tmp_path / "my_models.py").write_text(
        "import torch\n\ndef mlp():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),"
        " torch.nn.Linear(8, 2)), torch.randn(3, 4)\n")
    script = Path(sys.executable).with_name("fxgradnas")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from fxgradnas.cli import main; sys.path.remove(''); sys.exit(main())"]
    done = subprocess.run([*command, "inspect", "my_models:mlp"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "prunable" in done.stdout
