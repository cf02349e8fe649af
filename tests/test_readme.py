"""Every code block of README.md runs: each ```python block, and each ``fxgradnas ...`` line of the ```bash
blocks, on tiny models in a prepared working directory.

A python block runs as written, in a temporary directory holding the files and checkpoints the README
names (:data:`WORKSPACE`: a random tiny Llama checkpoint, short texts); the names it uses without
defining them (the user's ``model``, ``example_inputs``, ``calibration_batches``, ``loss_fn``, ``scores``...)
come from :data:`PROVIDERS`. A command line runs through ``fxgradnas.cli.main`` with the README's own
arguments followed by :data:`FAST` settings; built-in corpora that are downloaded (Shakespeare) are
replaced by a short stand-in. Other lines of the bash blocks (``make``, ``tox``, benchmarks) are not run:
:data:`NOT_RUN` lists their prefixes, and a line that matches neither fails the test.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"

# prefixes of bash lines that are not run here (installs, the suite itself, benchmarks)
NOT_RUN = ("make ", "tox ", "pytest ", "python benchmarks/", "PYTHONPATH=.venv/torchvision python benchmarks/")
# options appended to each command line (argparse: the last one given wins) so that it runs in seconds
FAST = {
    "prune": ["--batches", "2", "--batch-size", "2", "--seq-len", "16", "--multiple-of", "4", "--eval-batches", "1",
              "--new-tokens", "2"],
    "eval": ["--batches", "1", "--seq-len", "16"],
    "inspect": [],
}
CHECKPOINT = "checkpoint"  # a WORKSPACE entry: the tiny random Llama checkpoint
# what the README's paths name, made in each block's working directory ("~" is a folder of it too)
WORKSPACE = {
    "my-checkpoint": CHECKPOINT,
    "Llama-3.1-70B": CHECKPOINT,
    "path/to/checkpoint": CHECKPOINT,
    "~/.cache/fxgradnas/smollm2-135m-instruct": CHECKPOINT,
    "my_text.txt": "text",
    "held_out.txt": "text",
}


@dataclass
class Block:
    language: str
    line: int  # of the opening fence, 1-based
    code: str

    @property
    def id(self) -> str:
        return f"{self.language}-line{self.line}"

    @property
    def hf(self) -> bool:
        return "transformers" in self.code or "fxgradnas.hf" in self.code


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order."""
    found, language, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^```(\S*)\s*$", line)
        if fence and language is None:
            language, start, lines = fence.group(1), number, []
        elif fence and not fence.group(1):
            found.append(Block(language, start, "\n".join(lines) + "\n"))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"README.md: the block opened at line {start} is not closed"
    return found


BLOCKS = blocks(README.read_text())


def free_names(code: str) -> set[str]:
    """Names a block reads that it neither assigns nor imports (nor are builtins)."""
    tree = ast.parse(code)
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound - set(dir(builtins))


# --- what the blocks expect to exist -----------------------------------------------------------------
def _zoo_llama(context: dict[str, Any]) -> dict[str, Any]:
    from fxgradnas.datasets import causal_lm_loss
    from tests import zoo

    model, example_inputs = zoo.llama(intermediate=256)  # wide enough MLPs for a 60 % budget
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (3, 7), generator=gen) for _ in range(4)]
    return {"model": model, "example_inputs": example_inputs, "calibration_batches": batches, "batches": batches,
            "loss_fn": causal_lm_loss}


def _checkpoint_scores(context: dict[str, Any]) -> dict[str, Any]:
    """Gradient scores of the tiny checkpoint, as if computed elsewhere."""
    from transformers import AutoModelForCausalLM

    import fxgradnas
    from fxgradnas.datasets import causal_lm_loss

    lm = AutoModelForCausalLM.from_pretrained(context["checkpoint"])
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, lm.config.vocab_size, (2, 16), generator=gen) for _ in range(2)]
    analysis = fxgradnas.analyze(lm, batches[0])
    return {"scores": fxgradnas.calibrate(analysis, batches, causal_lm_loss)}


# name a block reads -> (needs transformers, the function making it and the names made with it)
PROVIDERS: dict[str, tuple[bool, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    **dict.fromkeys(["model", "example_inputs", "calibration_batches", "batches", "loss_fn"], (False, _zoo_llama)),
    "scores": (True, _checkpoint_scores),
}


@pytest.fixture(scope="module")
def materials(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint (made on first use, in a test marked hf) and a text of 20,000 characters."""
    from fxgradnas.datasets import python_docs_text

    directory = tmp_path_factory.mktemp("readme")
    text = directory / "text.txt"
    text.write_text(python_docs_text(20_000))
    return {"directory": directory, "text": text}


def _checkpoint(materials: dict[str, Path]) -> Path:
    from tests import zoo

    if CHECKPOINT not in materials:
        materials[CHECKPOINT] = zoo.save_hf_checkpoint(materials["directory"] / CHECKPOINT, max_position_embeddings=128,
                                                          intermediate_size=256)  # 60 % of the params can be reached
    return materials[CHECKPOINT]


@pytest.fixture
def workspace(tmp_path: Path, materials: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
              request: pytest.FixtureRequest) -> Path:
    """A working directory with every :data:`WORKSPACE` path (links to the materials); the checkpoints only
    in a test marked hf."""
    hf = request.node.get_closest_marker("hf") is not None
    for relative, kind in WORKSPACE.items():
        if kind == CHECKPOINT and not hf:
            continue
        path = tmp_path / relative.replace("~", "home", 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(_checkpoint(materials) if kind == CHECKPOINT else materials[kind])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _param(*values: Any, hf: bool, id: str) -> Any:
    return pytest.param(*values, marks=[pytest.mark.hf] if hf else [], id=id)


# --- python blocks -----------------------------------------------------------------------------------
PYTHON = [b for b in BLOCKS if b.language == "python"]


def test_readme_has_the_blocks_this_module_runs() -> None:
    assert len(PYTHON) >= 4 and len(COMMANDS) >= 3, "README.md lost its examples? (or this parser broke)"
    languages = {b.language for b in BLOCKS}
    assert languages <= {"python", "bash", "text"}, f"blocks of a language this test does not run: {languages}"


def _needs_hf(block: Block) -> bool:
    return block.hf or any(PROVIDERS.get(name, (False,))[0] for name in free_names(block.code))


@pytest.mark.parametrize("block", [_param(b, hf=_needs_hf(b), id=b.id) for b in PYTHON])
def test_python_block_runs(block: Block, workspace: Path, materials: dict[str, Path]) -> None:
    names = free_names(block.code)
    unknown = names - set(PROVIDERS)
    assert not unknown, (f"README.md line {block.line}: the block reads {sorted(unknown)}, which it does not define; "
                         "define them in the block or add them to PROVIDERS in tests/test_readme.py")
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    context = {"checkpoint": _checkpoint(materials) if _needs_hf(block) else None}
    for name in sorted(names):
        if name not in namespace:
            namespace.update(PROVIDERS[name][1](context))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        # padded so that a traceback names the README's own line numbers
        exec(compile("\n" * block.line + block.code, str(README), "exec"), namespace)


# --- command lines -----------------------------------------------------------------------------------
def command_lines(block: Block) -> list[tuple[int, str]]:
    """(line number, command) of each command in a bash block: continuation lines joined, comments and
    blank lines dropped."""
    commands, pending, first = [], "", 0
    for offset, line in enumerate(block.code.splitlines(), 1):
        if not pending:
            first = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            commands.append((first, command))
    return commands


COMMANDS = [(b, line, command) for b in BLOCKS if b.language == "bash" for line, command in command_lines(b)]


def test_every_command_line_is_run_or_known_not_to_be() -> None:
    strange = [(line, c) for _, line, c in COMMANDS if not c.startswith(("fxgradnas ", *NOT_RUN))]
    assert not strange, f"README.md command lines this test neither runs nor lists in NOT_RUN: {strange}"


def _argv(command: str, home: Path) -> list[str]:
    words = shlex.split(command, comments=True)
    assert words[0] == "fxgradnas"
    words = [str(home / w[2:]) if w.startswith("~/") else w for w in words[1:]]
    return [*words, *FAST[words[0]]]


def _is_factory(command: str) -> bool:
    return bool(re.match(r"^fxgradnas \S+ [\w.]+:\w+", command))


@pytest.mark.parametrize(("block", "line", "command"), [
    _param(b, line, c, hf=not _is_factory(c), id=f"line{line}-{c.split()[1]}")
    for b, line, c in COMMANDS if c.startswith("fxgradnas ")])
def test_command_line_runs(block: Block, line: int, command: str, workspace: Path,
                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from fxgradnas import datasets
    from fxgradnas.cli import main

    # the Shakespeare corpus is a download: a stand-in of the same kind (prose) keeps the test offline
    monkeypatch.setattr(datasets, "shakespeare_text", lambda max_chars=2_000_000, skip=0, directory=None:
                        datasets.python_docs_text(min(max_chars, 20_000)))
    if _is_factory(command):
        monkeypatch.chdir(ROOT)  # MODULE:FACTORY is imported from the current directory
    code = main(_argv(command, workspace / "home"))
    _, err = capsys.readouterr()
    assert code == 0, f"README.md line {line}: `{command}` exited with {code}:\n{err[-2000:]}"
