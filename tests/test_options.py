"""The option objects of fxgradnas.options: defaults, one error per bad value (naming the field), the command
line reading its choices and defaults from them, and an import without torch."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import fxgradnas
from fxgradnas import options
from fxgradnas.cli import UsageError, build_parser
from fxgradnas.errors import ArgumentError, ArgumentTypeError
from fxgradnas.options import CalibrationOptions, CompensationOptions, SearchOptions

ROOT = Path(__file__).parent.parent
PRUNE = ["prune", "m", "--params", "0.5", "--out", "o"]


def test_defaults() -> None:
    assert SearchOptions() == SearchOptions(searcher="binary", kinds=("heads", "channels", "experts"), multiple_of=32,
                                            ratios=options.RATIOS, gqa="both", uniform=False)
    assert options.RATIOS == tuple(round(0.05 * i, 2) for i in range(1, 21))
    assert CalibrationOptions() == CalibrationOptions(scorer="gradnas", granularity="batch", max_batches=128, rounds=1,
                                                      seed=0, autocast_dtype=None, converged_below=None, patience=5,
                                                      shard=False, recompute=False)
    assert CompensationOptions() == CompensationOptions(method="ls", damping=0.3, bias=True, sequential=True,
                                                        max_batches=128, max_width=16384)


def test_options_are_frozen_and_normalised() -> None:
    search = SearchOptions(kinds=["heads", "channels"], ratios=[0.5, 1.0])
    assert search.kinds == ("heads", "channels") and search.ratios == (0.5, 1.0)
    assert hash(search) == hash(SearchOptions(kinds=("heads", "channels"), ratios=(0.5, 1.0)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        search.multiple_of = 8  # type: ignore[misc]
    assert dataclasses.replace(search, multiple_of=8).multiple_of == 8
    assert CalibrationOptions(autocast_dtype="bfloat16").autocast_dtype == "bfloat16"


@pytest.mark.parametrize(("build", "error", "match"), [
    (lambda: SearchOptions(searcher="beam"), ArgumentError, "SearchOptions: searcher must be one of 'binary', 'greedy'"),
    (lambda: SearchOptions(kinds="heads"), ArgumentTypeError, "kinds must be a tuple"),
    (lambda: SearchOptions(kinds=()), ArgumentError, "kinds must be a non-empty tuple"),
    (lambda: SearchOptions(kinds=("mlp",)), ArgumentError, "'heads', 'channels', 'experts', 'hidden', 'blocks'"),
    (lambda: SearchOptions(multiple_of=0), ArgumentError, "multiple_of must be an int of at least 1"),
    (lambda: SearchOptions(multiple_of=True), ArgumentError, "multiple_of"),
    (lambda: SearchOptions(multiple_of=4.0), ArgumentError, "multiple_of"),
    (lambda: SearchOptions(ratios="0.5"), ArgumentTypeError, "ratios must be a tuple"),
    (lambda: SearchOptions(ratios=(0.5, 2.0)), ArgumentError, r"ratios must be a non-empty tuple of floats in \(0, 1\]"),
    (lambda: SearchOptions(ratios=()), ArgumentError, "ratios"),
    (lambda: SearchOptions(gqa="all"), ArgumentError, "gqa must be one of 'both', 'kv', 'queries'"),
    (lambda: SearchOptions(uniform="yes"), ArgumentTypeError, "uniform must be True or False"),
    (lambda: SearchOptions(evolve_batches=0), ArgumentError, "evolve_batches must be at least 1"),
    (lambda: SearchOptions(evolve_batches=2.0), ArgumentTypeError, "evolve_batches must be an int"),
    (lambda: SearchOptions(evolve_forwards="64"), ArgumentTypeError, "evolve_forwards must be an int"),
    (lambda: SearchOptions(evolve_forwards=True), ArgumentTypeError, "evolve_forwards must be an int"),
    (lambda: SearchOptions(evolve_forwards=6, evolve_batches=4), ArgumentError,
     "pass evolve_forwards >= 8 or fewer evolve_batches"),
    (lambda: CalibrationOptions(scorer="magnitude"), ArgumentError, "scorer must be one of 'gradnas', 'l1', 'random'"),
    (lambda: CalibrationOptions(granularity="samples"), ArgumentError, "granularity must be one of 'batch', 'sample'"),
    (lambda: CalibrationOptions(max_batches=0), ArgumentError, "max_batches must be at least 1"),
    (lambda: CalibrationOptions(max_batches=2.5), ArgumentTypeError, "max_batches must be an int"),
    (lambda: CalibrationOptions(rounds=0), ArgumentError, "rounds must be an int of at least 1"),
    (lambda: CalibrationOptions(scorer="l1", rounds=2), ArgumentError, "does not calibrate"),
    (lambda: CalibrationOptions(seed="0"), ArgumentTypeError, "seed must be an int"),
    (lambda: CalibrationOptions(autocast_dtype="bf16"), ArgumentError, "autocast_dtype must be one of 'bfloat16'"),
    (lambda: CalibrationOptions(autocast_dtype=16), ArgumentTypeError, "autocast_dtype must be a floating torch.dtype"),
    (lambda: CalibrationOptions(converged_below=-1.0), ArgumentError, "converged_below must be a non-negative"),
    (lambda: CalibrationOptions(patience=0), ArgumentError, "patience must be an int of at least 1"),
    (lambda: CalibrationOptions(shard=1), ArgumentTypeError, "shard must be True or False"),
    (lambda: CalibrationOptions(recompute="yes"), ArgumentTypeError, "recompute must be True or False"),
    (lambda: CompensationOptions(method="lsq"), ArgumentError, "method must be one of 'ls', 'scale'.*compensation=None"),
    (lambda: CompensationOptions(damping=-1), ArgumentError, "damping must be a finite non-negative number"),
    (lambda: CompensationOptions(damping=float("inf")), ArgumentError, "damping"),
    (lambda: CompensationOptions(bias=None), ArgumentTypeError, "bias must be True or False"),
    (lambda: CompensationOptions(sequential="no"), ArgumentTypeError, "sequential must be True or False"),
    (lambda: CompensationOptions(max_batches=0), ArgumentError, "CompensationOptions: max_batches"),
    (lambda: CompensationOptions(max_width=0), ArgumentError, "max_width must be a positive int or None"),
])
def test_a_bad_value_names_the_field_and_the_fix(build, error, match) -> None:
    with pytest.raises(error, match=match):
        build()


def test_torch_dtypes_for_autocast() -> None:
    torch = pytest.importorskip("torch")
    assert CalibrationOptions(autocast_dtype=torch.float16).autocast_dtype is torch.float16
    with pytest.raises(ArgumentTypeError, match="autocast_dtype"):
        CalibrationOptions(autocast_dtype=torch.int8)


def test_the_steps_take_the_option_objects_only() -> None:
    """A dict or a string where an option object goes is an error naming the class."""
    analysis = fxgradnas.analyze(*_tiny())
    scores = fxgradnas.random_scores(analysis)
    with pytest.raises(ArgumentTypeError, match="fxgradnas.SearchOptions"):
        fxgradnas.search(analysis, scores, {"params": 0.8}, {"multiple_of": 4})
    with pytest.raises(ArgumentTypeError, match="fxgradnas.CalibrationOptions"):
        fxgradnas.score(analysis, options="l1")
    with pytest.raises(ArgumentTypeError, match=r"compensation must be a fxgradnas.CompensationOptions \(or None"):
        fxgradnas.prune(analysis, constraint={"params": 0.8}, compensation="ls")


def test_the_signatures_default_to_the_option_objects() -> None:
    from fxgradnas.compensate import compensate

    for function, name, cls in ((fxgradnas.search, "options", SearchOptions),
                                (fxgradnas.calibrate, "options", CalibrationOptions),
                                (fxgradnas.score, "options", CalibrationOptions), (compensate, "options", CompensationOptions),
                                (fxgradnas.prune, "search", SearchOptions),
                                (fxgradnas.prune, "calibration", CalibrationOptions),
                                (fxgradnas.prune, "compensation", CompensationOptions)):
        assert inspect.signature(function).parameters[name].default == cls(), (function, name)
    assert fxgradnas.SearchOptions is SearchOptions and "CompensationOptions" in fxgradnas.__all__


def test_every_parameter_of_prune_is_documented() -> None:
    doc = fxgradnas.prune.__doc__
    for name in inspect.signature(fxgradnas.prune).parameters:
        assert f"\n        {name}: " in doc, name
    for cls in (SearchOptions, CalibrationOptions, CompensationOptions):
        for f in dataclasses.fields(cls):
            assert f"\n        {f.name}: " in cls.__doc__, (cls, f.name)


def test_the_command_line_reads_choices_and_defaults_from_the_options() -> None:
    args = build_parser().parse_args(PRUNE)
    search, calibration, compensation = SearchOptions(), CalibrationOptions(), CompensationOptions()
    assert tuple(args.kinds) == search.kinds and args.multiple_of == search.multiple_of
    assert args.uniform == search.uniform
    assert args.scorer == calibration.scorer and args.granularity == calibration.granularity
    assert args.rounds == calibration.rounds and args.seed == calibration.seed
    assert args.recompute == calibration.recompute
    assert args.compensate == compensation.method and args.damping is None  # resolved by PruneSettings
    for argv, choices in ((["--scorer", "magnitude"], options.SCORERS),
                          (["--granularity", "samples"], options.GRANULARITIES),
                          (["--compensate", "lsq"], (*options.COMPENSATION_METHODS, "none"))):
        with pytest.raises(UsageError, match="invalid choice") as raised:
            build_parser().parse_args([*PRUNE, *argv])
        assert all(choice in str(raised.value) for choice in choices), raised.value
    assert options.COMPENSATION_METHODS == ("ls", "scale")


def test_the_command_line_makes_the_option_objects() -> None:
    from fxgradnas.cli import PruneSettings

    argv = [*PRUNE, "--kinds", "heads", "heads", "blocks", "--multiple-of", "8", "--granularity", "sample",
            "--batches", "4", "--compensate", "scale", "--damping", "0.1", "--recompute", "--uniform"]
    settings = PruneSettings.from_args(build_parser().parse_args(argv), argv)
    assert settings.search == SearchOptions(kinds=("heads", "blocks"), multiple_of=8, uniform=True)
    assert settings.calibration == CalibrationOptions(granularity="sample", max_batches=4, recompute=True)
    assert settings.compensation == CompensationOptions(method="scale", damping=0.1, max_batches=4)
    argv = [*PRUNE, "--compensate", "none"]
    assert PruneSettings.from_args(build_parser().parse_args(argv), argv).compensation is None


def test_a_checkpoint_reads_the_models_samples_by_default(tmp_path: Path) -> None:
    """For a checkpoint, ``--calibration TEXT`` reads TEXT and ``self`` (the model's samples), with 64 batches
    and damping 0.03; ``--no-self``, a factory, or ``self`` named anywhere keep what is given, and the batches
    and damping default to 16 and 0.3 without samples in what they bound."""
    from fxgradnas.cli import PruneSettings
    from fxgradnas.cli.parser import BATCHES, BATCHES_SAMPLED

    (tmp_path / "config.json").write_text("{}")
    checkpoint = ["prune", str(tmp_path), "--params", "0.8", "--out", "o"]

    def settings(*argv: str, model: list[str] = checkpoint) -> tuple:
        found = PruneSettings.from_args(build_parser().parse_args([*model, *argv]), argv)
        damping = found.compensation.damping if found.compensation is not None else None
        return found.texts["--calibration"], found.texts["--refit"], found.batches, damping

    text, dense = "code.txt", CompensationOptions().damping
    assert settings("--calibration", text) == ((text, "self"), (), BATCHES_SAMPLED, options.SAMPLED_DAMPING)
    assert settings("--calibration", text, "--no-self") == ((text,), (), BATCHES, dense)
    assert settings("--calibration", text, "--refit", text, "self") == ((text,), (text, "self"), BATCHES_SAMPLED,
                                                                         options.SAMPLED_DAMPING)
    assert settings("--calibration", text, "--refit", text) == ((text, "self"), (text,), BATCHES_SAMPLED, dense)
    assert settings("--calibration", "self", text, "--batches", "3", "--damping", "0.2") == (("self", text), (), 3,
                                                                                             0.2)
    assert settings("--calibration", text, "--compensate", "none") == ((text, "self"), (), BATCHES_SAMPLED, None)
    assert settings("--calibration", text, "--scorer", "l1", "--compensate", "none") == ((text,), (), BATCHES, None)
    assert settings("--calibration", text, "--scorer", "l1", "--compensate", "none", "--heal", "2")[:3] == (
        (text, "self"), (), BATCHES_SAMPLED)
    assert settings("--scorer", "l1", "--compensate", "none") == ((), (), BATCHES, None)
    factory = ["prune", "tests.zoo:mlp", "--params", "0.8", "--out", "o"]
    assert settings("--data", "m:f", model=factory) == ((), (), BATCHES, dense)
    with pytest.raises(UsageError, match="--no-self leaves out"):
        settings("--calibration", text, "self", "--no-self")


def test_options_import_without_torch() -> None:
    code = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n            raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from fxgradnas import options\nfrom fxgradnas.options import SearchOptions, CalibrationOptions\n"
            "from fxgradnas.cli import build_parser\n"
            "assert SearchOptions().kinds == options.DEFAULT_KINDS\n"
            "assert CalibrationOptions(autocast_dtype='float16').autocast_dtype == 'float16'\n"
            "build_parser().parse_args(['prune', 'm', '--params', '0.5', '--out', 'o'])\n"
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def _tiny():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    return model, torch.randn(4, 6)
