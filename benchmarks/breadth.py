"""How many real architectures fxgradnas handles: Hugging Face families and torchvision classifiers.

    python benchmarks/breadth.py [--only NAME ...] [--hf] [--torchvision] [--timeout S] [--json FILE] [--write]

Each model (tests/families.py: tiny random configs, no download) runs in a forked child process with
a time limit, so a crash or a hang is reported as that model's failure. The checks (capture and
analysis, heads found, pruned == masked for random plans, prune to 60 % of the parameters, Hugging
Face writeback / generate / save+load, and Torch-Pruning on the torchvision models) are those of
tests/breadth_checks.py, which tests/test_breadth.py runs too. ``--write`` replaces the "## Breadth"
section of benchmarks/RESULTS.md with the table.

torchvision and Torch-Pruning are optional: ``pip install --no-deps torchvision==0.28.0
torch-pruning==1.6.1`` (torchvision also needs pillow).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

from tests import breadth_checks as bc  # noqa: E402
from tests import families  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Breadth"
KINDS = ("heads", "channels", "experts", "hidden")
COLUMNS = [
    ("analyze", "analyze"),
    ("heads", "heads found"),
    ("plan_hc", "=masked h+c"),
    ("plan_hidden", "=masked hidden"),
    ("plan_all", "=masked all"),
    ("prune", "prune 60%"),
    ("write_back", "write-back"),
    ("generate", "generate"),
    ("save_load", "save/load"),
    ("torch_pruning", "Torch-Pruning"),
]


# --------------------------------------------------------------------------- running
def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
    except ImportError:
        pass


def _torch_pruning_only(name: str, progress) -> bc.Report:
    source, _ = bc.factory(name)
    report = bc.Report(name, source)
    progress("torch_pruning", report)
    report.checks["torch_pruning"] = bc.timed(lambda: bc.run_torch_pruning(name))
    return report


def _child(name: str, checks: tuple[str, ...], conn) -> None:
    _quiet()

    def progress(check: str, report: bc.Report) -> None:
        conn.send(("progress", check, report.to_dict()))

    try:
        if checks == ("torch_pruning",):
            report = _torch_pruning_only(name, progress)
        else:
            report = bc.run_checks(name, checks, progress=progress)
        conn.send(("report", None, report.to_dict()))
    except BaseException as exc:  # a crash outside the checks still reports
        conn.send(("error", None, bc.first_line(exc)))
    finally:
        conn.close()


def run_model(name: str, checks: tuple[str, ...], timeout: float) -> bc.Report:
    """``run_checks`` in a forked child; a hang or a crash fails the check it was in, and the checks
    done before it keep their results."""
    source, _ = bc.factory(name)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(name, checks, send), daemon=True)
    start = time.perf_counter()
    process.start()
    send.close()
    current, partial, result, error = checks[0], None, None, None
    deadline = start + timeout
    while result is None and error is None:
        left = deadline - time.perf_counter()
        if left <= 0:
            error = f"hang: no result after {timeout:.0f} s"
            break
        if not receive.poll(min(left, 1.0)):
            if not process.is_alive() and not receive.poll(0):
                error = f"child process died (exit code {process.exitcode})"
            continue
        try:
            kind, check, value = receive.recv()
        except EOFError:
            error = f"child process died (exit code {process.exitcode})"
            break
        if kind == "progress":
            current, partial = check, value
        elif kind == "report":
            result = bc.Report.from_dict(value)
        else:
            error = value
    if process.is_alive():
        process.kill()
    process.join(5)
    if result is None:
        result = bc.Report.from_dict(partial) if partial is not None else bc.Report(name, source)
        result.checks[current] = bc.Check(False, error)
        result.seconds = time.perf_counter() - start
    return result


def run_all(name: str, checks: tuple[str, ...], timeout: float, tp_timeout: float) -> bc.Report:
    """fxgradnas's checks, then Torch-Pruning in a child of its own (its own time limit)."""
    own = tuple(c for c in checks if c != "torch_pruning")
    report = run_model(name, own, timeout)
    if "torch_pruning" in checks and report.source == "torchvision":
        peer = run_model(name, ("torch_pruning",), tp_timeout)
        report.checks["torch_pruning"] = peer.checks["torch_pruning"]
    return report


# --------------------------------------------------------------------------- reporting
def _cell(check: bc.Check | None, name: str = "") -> str:
    if check is None or check.ok is None:
        return "–"
    if name == "heads":
        return "ok" if check.ok else ("silent" if check.detail.startswith("silent") else "frozen")
    number = re.match(r"^(params )?([0-9.e+-]+)", check.detail)
    value = number.group(2) if number else ""
    return ("ok " if check.ok else "FAIL ") + value if value else ("ok" if check.ok else "FAIL")


def _groups(report: bc.Report) -> str:
    parts = [f"{ {'hidden': 'hid', 'experts': 'exp'}.get(kind, kind[0])} {p}/{t}"
             for kind in KINDS for k, (p, t) in report.groups.items() if k == kind]
    return ", ".join(parts) or "–"


def first_failure(report: bc.Report, limit: int = 110) -> str:
    for name, detail in report.failures():
        if name == "torch_pruning":
            continue
        if re.match(r"^\d\.\de[+-]\d+( |$)", detail):
            detail = f"relative difference {detail}"
        text = f"{name}: {detail}"
        return text if len(text) <= limit else text[: limit - 3] + "..."
    return ""


def table(reports: list[bc.Report], tablefmt: str = "github", with_tp: bool = True) -> str:
    columns = [c for c in COLUMNS if with_tp or c[0] != "torch_pruning"]
    headers = ["model", "groups prunable/total", *[h for _, h in columns], "capture+analysis s", "s",
               "first failure"]
    rows = []
    for r in reports:
        rows.append([r.name, _groups(r), *[_cell(r.checks.get(c), c) for c, _ in columns],
                     f"{r.capture_s + r.analysis_s:.1f}", f"{r.seconds:.0f}",
                     first_failure(r).replace("|", "/")])
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def counts(reports: list[bc.Report]) -> list[str]:
    lines = []
    for source, label in (("hf", "Hugging Face"), ("torchvision", "torchvision")):
        chosen = [r for r in reports if r.source == source]
        if chosen:
            lines.append(f"{label}: {sum(r.fully_passes for r in chosen)} of {len(chosen)} fully pass")
    tp = [r.checks["torch_pruning"] for r in reports if "torch_pruning" in r.checks
          and r.checks["torch_pruning"].ok is not None]
    if tp:
        lines.append(f"Torch-Pruning 1.6.1 (MetaPruner, magnitude, channel ratio {bc.TP_RATIO}): "
                     f"{sum(bool(c.ok) for c in tp)} of {len(tp)} run and forward")
    return lines


def frozen_table(reports: list[bc.Report], tablefmt: str = "github") -> str:
    rows = [[r.name, "; ".join(r.frozen[:4]) + (f"; +{len(r.frozen) - 4} more" if len(r.frozen) > 4 else "")]
            for r in reports if r.frozen]
    return tabulate(rows, headers=["model", "frozen groups: count x first reason"], tablefmt=tablefmt)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"torch {torch.__version__}"]
    for package in ("transformers", "torchvision", "torch-pruning"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} not installed")
    return ", ".join(parts)


def section(reports: list[bc.Report], seconds: float, tp_note: str | None) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        SECTION,
        "",
        f"`python benchmarks/breadth.py --write` on {today} ({versions()}; {os.cpu_count()} CPUs, "
        f"{seconds:.0f} s in all). Tiny random-init configs from tests/families.py: Hugging Face families with "
        "2 layers, hidden 64, 4 heads (2 KV heads where the family has GQA), MLP 96, vocab 128, on batch 3 x "
        "sequence 7; torchvision classifiers with `weights=None`, 10 classes, on 2 images of 64x64 (32x32 for "
        "vgg11_bn, convnext_tiny, vit_b_16; 75x75 for inception_v3; 224x224 for maxvit_t, whose 7x7 windows "
        "need it).",
        "",
        "Columns: groups found per kind (h heads, c channels, exp experts, hid hidden) as prunable/total; `analyze` capture "
        "+ analysis ran; `heads found` every attention has a prunable heads group (– no attention); "
        "`=masked` the physically pruned module equals the masked one (max relative difference on the example "
        "and on fresh inputs, pass at 1e-5) for a seeded random plan keeping half of every prunable exact "
        "group (heads+channels+experts, hidden, all; – nothing to prune); `prune 60%` `fxgradnas.prune(constraint="
        "{'params': 0.6}, calibration=CalibrationOptions(scorer='random'))` meets the budget (achieved ratio); `write-back` "
        "`fxgradnas.hf.write_back` of the 'all' plan gives the masked graph's outputs; `generate` greedy "
        "generate (KV cache) of the written-back model gives the masked graph's greedy tokens, with and "
        "without left padding; `save/load` `save_pruned`/`load_pruned` gives the same logits; `Torch-Pruning` "
        "the peer library on the same torchvision model (parameter ratio after pruning); `capture+analysis s` "
        "the time of `fxgradnas.analyze`, `s` of all fxgradnas checks of the model. "
        "A model fully passes when no check fails (Torch-Pruning not counted).",
        "",
        *[f"- {line}" for line in counts(reports)],
    ]
    if tp_note:
        lines.append(f"- {tp_note}")
    lines += ["", table(reports), "", "Frozen groups (why a group is not prunable):", "", frozen_table(reports), ""]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace the "## Breadth" section (up to the next "## " heading) or append it."""
    content = path.read_text() if path.exists() else "# Measured results\n"
    start = content.find(f"\n{SECTION}\n")
    if start < 0:
        content = content.rstrip("\n") + "\n\n" + text
    else:
        after = content.find("\n## ", start + 1)
        tail = content[after + 1:] if after >= 0 else ""
        content = content[: start + 1] + text.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    path.write_text(content if content.endswith("\n") else content + "\n")


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these models only")
    parser.add_argument("--hf", action="store_true", help="the Hugging Face families")
    parser.add_argument("--torchvision", action="store_true", help="the torchvision models")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per model (default 300)")
    parser.add_argument("--tp-timeout", type=float, default=180.0, help="seconds per Torch-Pruning run (default 180)")
    parser.add_argument("--json", type=Path, help="also write the reports as JSON")
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION}' section of {RESULTS.name}")
    args = parser.parse_args(argv)
    _quiet()
    families.prepare_torchvision()
    both = not args.hf and not args.torchvision
    names: list[str] = []
    if args.hf or both:
        names += list(families.HF_FAMILIES) if families.has_transformers() else []
    tv_missing = None
    if args.torchvision or both:
        if families.has_torchvision():
            names += list(families.TORCHVISION_MODELS)
        else:
            tv_missing = "torchvision is not installed: no torchvision models"
    if args.only:
        unknown = [n for n in args.only if n not in families.HF_FAMILIES and n not in families.TORCHVISION_MODELS]
        if unknown:
            parser.error(f"unknown models {unknown}; known: {', '.join([*families.HF_FAMILIES, *families.TORCHVISION_MODELS])}")
        names = list(args.only)
    tp_note = None if bc.has_torch_pruning() else "Torch-Pruning is not installed (pip install --no-deps torch-pruning==1.6.1): column skipped"
    checks = bc.CHECKS if bc.has_torch_pruning() else tuple(c for c in bc.CHECKS if c != "torch_pruning")
    reports = []
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        report = run_all(name, checks, args.timeout, args.tp_timeout)
        reports.append(report)
        status = "pass" if report.fully_passes else first_failure(report)
        print(f"[{i}/{len(names)}] {name}: {report.seconds:.1f} s  {status}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    print(table(reports, tablefmt="simple", with_tp=bc.has_torch_pruning()))
    print()
    for line in counts(reports) + [n for n in (tp_note, tv_missing) if n]:
        print(line)
    print(f"{seconds:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.to_dict() for r in reports], indent=1))
    if args.write:
        write_section(section(reports, seconds, tp_note or tv_missing))
        print(f"wrote the '{SECTION}' section of {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
