"""Bad inputs and misuse: every case ends in a clear fxgradnas error or a correct result, and the user's
model (state_dict, flags, hooks, .grad) and the global RNG are as they were."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxgradnas
from fxgradnas import CalibrationOptions, CompensationOptions, Plan, SearchOptions
from fxgradnas.cli import main
from fxgradnas.compensate import compensate
from fxgradnas.errors import (
    ArgumentError,
    ArgumentTypeError,
    CalibrationError,
    CaptureError,
    ConstraintError,
    DataError,
    FxGradNasError,
    PlanError,
    UnknownGroupError,
)
from fxgradnas.rewrite import default_tolerance
from fxgradnas.search import check_constraint
from tests.seeding import seeded
from tests.zoo import HF_ZOO, ZOO, analysis_of

Batch = tuple[torch.Tensor, torch.Tensor]


class Net(nn.Module):
    """Linear(6->16)-BatchNorm-ReLU-Dropout-Linear(16->3): one group of 16 channels, mode-dependent."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


def net(seed: int = 0) -> Net:
    with seeded(seed):
        model = Net().eval()
        with torch.no_grad():
            model.bn.running_mean.normal_(0, 0.1)
            model.bn.running_var.uniform_(0.5, 1.5)
    model.register_forward_hook(lambda module, args, out: None)  # the user's own hook must stay
    return model


def batches(n: int, size: int = 4, seed: int = 1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def ce(out: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(out, batch[1])


def lm_loss(out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -out.log_softmax(-1)[..., 0].mean()


def token_batches(n: int, batch: int, seq: int, seed: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (batch, seq), generator=gen) for _ in range(n)]


# --------------------------------------------------------------------------- the model is untouched


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def snapshot(model: nn.Module) -> dict[str, Any]:
    """What no entry point may change: values (state_dict hash), parameter objects, requires_grad, .grad,
    every module's training flag and hooks, instance attributes (a forward left behind), the global RNG."""
    state = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        state.update(name.encode() + _digest(tensor).encode())
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
             "_load_state_dict_pre_hooks")
    return {
        "state": state.hexdigest(),
        "params": [(n, id(p), p.requires_grad, None if p.grad is None else _digest(p.grad))
                   for n, p in model.named_parameters()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "hooks": [(n, [tuple(getattr(m, h, {})) for h in hooks]) for n, m in model.named_modules()],
        "attributes": [(n, sorted(vars(m))) for n, m in model.named_modules()],
        "rng": _digest(torch.get_rng_state()),
    }


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Asserts, also when the body raises, that ``snapshot(model)`` did not change."""
    before = snapshot(model)
    try:
        yield
    finally:
        after = snapshot(model)
        for key in before:
            assert after[key] == before[key], f"the model's {key} changed"


@pytest.fixture(scope="module")
def analysis() -> fxgradnas.Analysis:
    return fxgradnas.analyze(net(), batches(1)[0][0])


@pytest.fixture(scope="module")
def llama_analysis() -> fxgradnas.Analysis:
    model, ids = ZOO["llama"]()
    return fxgradnas.analyze(model, ids)


# --------------------------------------------------------------------------- the reported cases


def test_generator_batches_are_all_scored_when_the_first_captures_the_model() -> None:
    model = net()
    with untouched(model):
        result = fxgradnas.prune(model, None, iter(batches(4)), ce, constraint={"params": 0.8}, progress=False)
    assert result.scores.batches == 4


def test_a_one_batch_generator_is_one_batch_and_an_empty_list_a_data_error() -> None:
    model = net()
    with untouched(model):
        assert fxgradnas.prune(model, None, iter(batches(1)), ce, constraint={"params": 0.8},
                               progress=False).scores.batches == 1
        with pytest.raises(DataError, match="empty"):
            fxgradnas.prune(model, None, [], ce, constraint={"params": 0.8}, progress=False)
        with pytest.raises(DataError, match="empty"):
            fxgradnas.calibrate(model, iter([]), ce, progress=False)


def test_max_batches_truncation_is_said(analysis: fxgradnas.Analysis) -> None:
    model = analysis.captured.model
    with untouched(model), pytest.warns(UserWarning, match=r"first 128 batches .* CalibrationOptions\(max_batches=None\)"):
        result = fxgradnas.prune(analysis, None, batches(200, size=2), ce, constraint={"params": 0.8},
                                 progress=False)
    assert result.scores.batches == 128 and result.scores.truncated
    assert "max_batches reached" in result.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every batch read: nothing to say
        scores = fxgradnas.calibrate(analysis, batches(200, size=2), ce, CalibrationOptions(max_batches=None),
                                     progress=False)
    assert scores.batches == 200 and not scores.truncated


@pytest.mark.parametrize(("batch", "seq"), [(1, 7), (3, 1), (1, 1)])
def test_size_one_example_keeps_batch_and_sequence_dynamic(batch: int, seq: int) -> None:
    model, _ = ZOO["llama"]()
    example = token_batches(1, batch, seq)[0]
    with untouched(model), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no dim was fixed
        analysis = fxgradnas.analyze(model, example)
        scores = fxgradnas.calibrate(analysis, token_batches(2, 4, 5), lm_loss, progress=False)
    assert analysis.captured.dynamic_dims == ["input_ids[0]", "input_ids[1]"]
    assert scores.batches == 2
    ids = token_batches(1, 5, 6)[0]
    torch.testing.assert_close(analysis.captured.module(ids), model(ids))


def test_sample_granularity_with_a_size_one_example_scores_every_group() -> None:
    model, _ = ZOO["llama"]()
    with untouched(model):
        scores = fxgradnas.calibrate(model, token_batches(2, 1, 7), lm_loss, CalibrationOptions(granularity="sample"),
                                     progress=False)
    analysis = fxgradnas.analyze(model, token_batches(1, 3, 7)[0])
    assert set(scores) == {g.name for g in analysis.prunable}


def test_a_batch_unlike_the_example_is_a_data_error_naming_example_inputs() -> None:
    model, inputs = ZOO["bert"]()
    analysis = fxgradnas.analyze(model, inputs)
    without_mask = [{"input_ids": inputs["input_ids"]}]
    model(**without_mask[0])  # the user's own model accepts it
    with untouched(model), pytest.raises(DataError, match="lacks attention_mask.*example_inputs.*collect_fn"):
        fxgradnas.calibrate(analysis, without_mask, lambda out, b: out.logsumexp(-1).mean(), progress=False)


def test_a_batch_beyond_a_size_the_model_requires_is_a_data_error() -> None:
    model, ids = ZOO["nanogpt"]()  # block_size 16: the sequence may not exceed it
    with untouched(model), pytest.raises(DataError, match="example_inputs"):
        fxgradnas.calibrate(model, [ids, token_batches(1, 2, 17)[0]], lm_loss, progress=False)


def test_masked_has_its_own_weights_unless_shared(analysis: fxgradnas.Analysis) -> None:
    model = analysis.captured.model
    plan = Plan({"fc": list(range(8))})
    x, y = batches(1)[0]
    with untouched(model):
        reference = fxgradnas.masked(analysis, plan)
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        ce(reference(x), (x, y)).backward()
        optimizer.step()
    shared = fxgradnas.masked(analysis, plan, share_weights=True)
    assert {id(p) for p in shared.parameters()} == {id(p) for p in model.parameters()}
    assert not {id(p) for p in reference.parameters()} & {id(p) for p in model.parameters()}


def test_read_only_masked_and_instrumented_copies_view_the_model(analysis: fxgradnas.Analysis) -> None:
    model = analysis.captured.model
    plan = Plan({"fc": list(range(8))})
    x, _ = batches(1)[0]
    with untouched(model):
        view = fxgradnas.masked(analysis, plan, read_only=True)
        inst = fxgradnas.instrument(analysis, read_only=True)
        for module in (view, inst.module):
            params = list(module.parameters())
            assert not module.training and not any(p.requires_grad for p in params)
            assert {p.data_ptr() for p in params} <= {p.data_ptr() for p in model.parameters()}
            assert not {id(p) for p in params} & {id(p) for p in model.parameters()}
        torch.testing.assert_close(view(x), fxgradnas.masked(analysis, plan).eval()(x))
    for make in (lambda: fxgradnas.masked(analysis, plan, share_weights=True, read_only=True),
                 lambda: fxgradnas.instrument(analysis, share_weights=True, read_only=True)):
        with pytest.raises(ArgumentError, match="exclude each other"):
            make()


def test_concurrent_calibrations_on_one_analysis_leave_the_model_alone(analysis: fxgradnas.Analysis) -> None:
    model = analysis.captured.model
    barrier = threading.Barrier(2, timeout=60)
    results: dict[int, Any] = {}

    def loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
        barrier.wait()  # both calibrations are inside forward/backward at once
        return ce(out, batch)

    def work(k: int) -> None:
        results[k] = fxgradnas.calibrate(analysis, batches(3, seed=k), loss, progress=False)

    with untouched(model):
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for k in range(2):
        alone = fxgradnas.calibrate(analysis, batches(3, seed=k), ce, progress=False)
        torch.testing.assert_close(dict(results[k]), dict(alone))


def test_two_threads_can_prune_at_once() -> None:
    models = [net(seed) for seed in range(2)]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = fxgradnas.prune(models[k], None, batches(2), ce, constraint={"params": 0.8}, progress=False)
        except BaseException as exc:  # reported below
            errors.append(exc)

    before = [snapshot(m) for m in models]
    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [snapshot(m) for m in models] == before
    assert all(results[k].achieved["params"] <= 0.8 for k in range(2))


def test_interrupt_mid_calibration_leaves_the_model_alone(analysis: fxgradnas.Analysis) -> None:
    model = analysis.captured.model
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    model.out.bias.requires_grad_(False)
    try:
        def loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
            if batch[0][0, 0] == interrupt_at:
                raise KeyboardInterrupt
            return ce(out, batch)

        data = batches(4)
        interrupt_at = data[2][0][0, 0]
        with untouched(model), pytest.raises(KeyboardInterrupt):
            fxgradnas.calibrate(analysis, data, loss, progress=False)
        with untouched(model), pytest.raises(KeyboardInterrupt):
            fxgradnas.prune(model, None, data, loss, constraint={"params": 0.8}, progress=False)
    finally:
        model.fc.weight.grad = None
        model.out.bias.requires_grad_(True)


def test_pruned_module_follows_train_and_eval_like_the_model() -> None:
    """prune-then-fine-tune trains the network the model is: dropout on and BatchNorm statistics updating
    in train mode, the same numbers as the model in train mode from the same RNG state."""
    model = net()
    x = batches(1, size=8)[0][0]
    whole = fxgradnas.apply_plan(model, Plan(), x)
    assert not whole.training  # the model was in eval mode
    twin = copy.deepcopy(model).train()
    whole.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        expected = twin(x)
        torch.manual_seed(5)
        got = whole(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(whole.get_buffer("bn.running_mean"), twin.bn.running_mean)
    assert not torch.equal(twin.bn.running_mean, model.bn.running_mean)  # statistics moved
    pruned = fxgradnas.apply_plan(model, Plan({"fc": list(range(0, 16, 2))}), x)
    pruned.train()
    assert not torch.equal(pruned(x), pruned(x))  # dropout is on
    pruned.eval()
    torch.testing.assert_close(pruned(x), pruned(x))
    trained = fxgradnas.apply_plan(model.train(), Plan(), x)
    assert trained.training  # starts in the model's mode
    model.eval()


def test_calibrating_a_model_in_train_mode_says_it_runs_in_eval_mode() -> None:
    model = net().train()
    with untouched(model), pytest.warns(UserWarning, match="train mode: calibration runs the model in eval mode"):
        fxgradnas.calibrate(model, batches(2), ce, progress=False)


def test_a_bad_constraint_fails_before_anything_runs() -> None:
    model = net()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with untouched(model), pytest.raises(ConstraintError, match="1.5"):
        fxgradnas.prune(model, None, batches(3), ce, constraint={"params": 1.5}, progress=False)
    assert not calls  # neither captured nor calibrated


def test_plan_json_schema_is_checked(analysis: fxgradnas.Analysis) -> None:
    good = '{"format": "fxgradnas.plan/1", "fingerprint": null, "keep": {"fc": [0, 2]}}'
    assert Plan.from_json(good, analysis).keep == {"fc": [0, 2]}
    for keep in ('{"fc": [1.5]}', '{"fc": [true]}', '{"fc": [-1]}', '{"fc": [1, 1]}', '{"fc": "0,1"}',
                 '{"fc": 3}', '[0, 1]'):
        with pytest.raises(PlanError):
            Plan.from_json(f'{{"format": "fxgradnas.plan/1", "keep": {keep}}}')
    for text in ('{"format": "fxgradnas.plan/1"}', '{"format": "fxgradnas.plan/1", "keep": {}, "extra": 1}',
                 '{"format": "fxgradnas.plan/1", "keep": {}, "fingerprint": 3}', "[]", "not json"):
        with pytest.raises(PlanError):
            Plan.from_json(text)
    with pytest.raises(PlanError, match="unknown group 'nope'"):
        Plan.from_json('{"format": "fxgradnas.plan/1", "keep": {"nope": [0]}}', analysis)
    with pytest.raises(PlanError, match="out of range"):
        Plan.from_json('{"format": "fxgradnas.plan/1", "keep": {"fc": [16]}}', analysis)


@pytest.mark.parametrize("target", ["tests.zoo:NanoGPT", "tests.zoo:ZOO", "tests.zoo:nothing", "tests.zoo",
                                    "fxgradnas:prune", "os:getcwd", "no_such_module:f"])
def test_cli_reports_a_target_that_is_not_a_factory_in_one_line(target: str) -> None:
    with pytest.raises(SystemExit, match="^fxgradnas: error: [^\n]+$"):
        _cli(["inspect", target])


def test_cli_prints_no_traceback() -> None:
    done = subprocess.run([sys.executable, "-m", "fxgradnas", "inspect", "tests.zoo:NanoGPT"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("fxgradnas: error: ") and "Traceback" not in done.stderr


def test_bfloat16_self_check_runs_on_fresh_inputs_with_a_dtype_tolerance() -> None:
    model, ids = ZOO["llama"]()
    model = model.to(torch.bfloat16)
    plan = Plan({"model.layers.0.mlp": list(range(0, 48, 2)), "model.layers.1.self_attn": [0, 1]})
    with untouched(model):
        pruned = fxgradnas.apply_plan(model, plan, ids)
    check = pruned.meta["self_check"]
    assert check.tolerance == default_tolerance(pruned) == 8 * torch.finfo(torch.bfloat16).eps
    assert check.fresh is not None and check.fresh <= check.tolerance
    assert "fresh random inputs" in str(check)
    float32 = fxgradnas.apply_plan(analysis_of("llama"), plan).meta["self_check"]
    assert float32.tolerance == 1e-5 and float32.fresh <= 1e-5


def test_every_library_error_is_an_fxgradnas_error(analysis: fxgradnas.Analysis) -> None:
    for error in (ArgumentError, ArgumentTypeError, PlanError, ConstraintError, DataError, UnknownGroupError):
        assert issubclass(error, FxGradNasError)
    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentTypeError, TypeError)
    assert issubclass(DataError, CalibrationError) and issubclass(UnknownGroupError, KeyError)
    with pytest.raises(UnknownGroupError, match="no group named 'nope'"):
        analysis.group("nope")


# --------------------------------------------------------------------------- the sweep


@dataclass
class Case:
    """One misuse: ``run(env)`` must raise ``error`` (None: succeed) with the model untouched."""

    category: str
    name: str
    run: Callable[[Env], Any]
    error: type[BaseException] | None
    match: str = ""


@dataclass
class Env:
    analysis: fxgradnas.Analysis

    @property
    def model(self) -> nn.Module:
        return self.analysis.captured.model


def prune(env: Env, *, example: Any = None, data: Any = "default", loss: Any = ce, **kw: Any) -> Any:
    options = {"constraint": {"params": 0.8}, "progress": False, **kw}
    return fxgradnas.prune(env.model, example, batches(3) if data == "default" else data, loss, **options)


def calibrate(env: Env, data: Any = "default", loss: Any = ce, target: Any = None, **kw: Any) -> Any:
    return fxgradnas.calibrate(env.analysis if target is None else target, batches(3) if data == "default" else data,
                               loss, progress=False, **kw)


def search(env: Env, constraint: Any = None, scores: Any = None, **kw: Any) -> Any:
    scores = fxgradnas.random_scores(env.analysis) if scores is None else scores
    return fxgradnas.search(env.analysis, scores, constraint or {"params": 0.8}, **kw)


def _gen(n: int) -> Iterator[Batch]:
    yield from batches(n)


X = batches(1)[0][0]
_GEN = torch.Generator().manual_seed(3)
X8, X5, X1 = torch.randn(8, 6, generator=_GEN), torch.randn(4, 5, generator=_GEN), torch.randn(6, generator=_GEN)
PLAN_JSON = '{"format": "fxgradnas.plan/1", "keep": %s}'

CASES = [
    # data
    Case("data", "none", lambda e: calibrate(e, data=None), ArgumentTypeError, "data is None"),
    Case("data", "one-tensor", lambda e: calibrate(e, data=X8), ArgumentTypeError, "one tensor"),
    Case("data", "a-dict-batch", lambda e: calibrate(e, data={"x": X}), ArgumentTypeError, r"\[batch\]"),
    Case("data", "a-string", lambda e: calibrate(e, data="batches.pt"), ArgumentTypeError, "not an iterable"),
    Case("data", "an-int", lambda e: calibrate(e, data=3), ArgumentTypeError, "iterable of batches"),
    Case("data", "empty-list", lambda e: calibrate(e, data=[]), DataError, "empty"),
    Case("data", "empty-generator", lambda e: calibrate(e, data=iter([])), DataError, "empty"),
    Case("data", "prune-empty-list", lambda e: prune(e, data=[]), DataError, "empty"),
    Case("data", "prune-without-data-or-example", lambda e: prune(e, data=None), ArgumentTypeError, "need"),
    Case("data", "generator", lambda e: calibrate(e, data=_gen(3)), None),
    Case("data", "max-batches-0", lambda e: calibrate(e, options=CalibrationOptions(max_batches=0)), ArgumentError, "max_batches"),
    Case("data", "max-batches-float", lambda e: calibrate(e, options=CalibrationOptions(max_batches=2.5)),
         ArgumentTypeError, "max_batches"),
    Case("data", "max-batches-bool", lambda e: calibrate(e, options=CalibrationOptions(max_batches=True)),
         ArgumentTypeError, "max_batches"),
    Case("data", "wrong-feature-size", lambda e: calibrate(e, data=[(X5, torch.zeros(4).long())]),
         DataError, r"shape \(4, 5\).*example_inputs"),
    Case("data", "samples-not-batches", lambda e: calibrate(e, data=[(X1, torch.tensor(0))]),
         DataError, "shape"),
    Case("data", "wrong-structure", lambda e: calibrate(e, collect_fn=lambda b: {"x": b[0]}), DataError,
         "structure of example_inputs"),
    Case("data", "wrong-dtype", lambda e: calibrate(e, data=[(X.double(), torch.zeros(4).long())]), DataError,
         "dtype"),
    Case("data", "collect-fn-returns-none", lambda e: calibrate(e, collect_fn=lambda b: None), DataError, "None"),
    Case("data", "collect-fn-not-callable", lambda e: calibrate(e, collect_fn="x"), ArgumentTypeError, "collect_fn"),
    Case("data", "collect-fn-takes-two", lambda e: calibrate(e, collect_fn=lambda a, b: a), ArgumentTypeError,
         "collect_fn"),
    Case("data", "empty-tuple-batch", lambda e: calibrate(e, data=[()]), DataError, "collect_fn"),
    Case("data", "batch-of-one-sample", lambda e: calibrate(e, data=[(X[:1], torch.zeros(1).long())]), None),
    Case("data", "compensate-with-generator", lambda e: prune(e, data=_gen(3), compensation=CompensationOptions(method="ls")),
         None),
    # losses
    Case("losses", "none", lambda e: calibrate(e, loss=None), ArgumentTypeError, "loss_fn"),
    Case("losses", "not-callable", lambda e: calibrate(e, loss="ce"), ArgumentTypeError, "loss_fn"),
    Case("losses", "one-argument", lambda e: calibrate(e, loss=lambda out: out.sum()), ArgumentTypeError,
         r"loss_fn\(output, batch\)"),
    Case("losses", "returns-float", lambda e: calibrate(e, loss=lambda o, b: 1.0), CalibrationError, "scalar"),
    Case("losses", "returns-vector", lambda e: calibrate(e, loss=lambda o, b: o.sum(1)), CalibrationError, "scalar"),
    Case("losses", "returns-nan", lambda e: calibrate(e, loss=lambda o, b: o.sum() * float("nan")), CalibrationError,
         "nan"),
    Case("losses", "ignores-output", lambda e: calibrate(e, loss=lambda o, b: torch.tensor(1.0)), CalibrationError,
         "depend"),
    Case("losses", "int-tensor", lambda e: calibrate(e, loss=lambda o, b: o.argmax().sum()), CalibrationError,
         "depend"),
    Case("losses", "bfloat16-scalar", lambda e: calibrate(e, loss=lambda o, b: ce(o, b).bfloat16()), None),
    Case("losses", "prune-needs-loss", lambda e: prune(e, loss=None), ArgumentTypeError, "loss_fn"),
    Case("losses", "l1-needs-no-loss", lambda e: prune(e, loss=None, data=None, example=X,
                                                        calibration=CalibrationOptions(scorer="l1"), compensation=None),
         None),
    Case("data", "default-re-fit-needs-data", lambda e: prune(e, loss=None, data=None, example=X,
                                                                  calibration=CalibrationOptions(scorer="l1")),
         ArgumentTypeError, "compensation=None"),
    # constraints
    *[Case("constraints", f"bad-{value!r}", lambda e, v=value: prune(e, constraint={"params": v}), ConstraintError,
           "ratio|percentage|count")
      for value in (1.5, 1, 0, -0.5, 0.0, float("nan"), float("inf"), True, "lots", "150%", "0%", "-5%", None,
                    [0.5], 1e9)],
    Case("constraints", "two-metrics", lambda e: prune(e, constraint={"params": 0.5, "flops": 0.5}),
         ConstraintError, "one entry"),
    Case("constraints", "unknown-metric", lambda e: prune(e, constraint={"memory": 0.5}), ConstraintError, "metric"),
    Case("constraints", "not-a-dict", lambda e: prune(e, constraint=0.5), ConstraintError, "dict"),
    Case("constraints", "count-above-model", lambda e: search(e, {"params": 10**9}), ConstraintError, "more than"),
    Case("constraints", "infeasible", lambda e: search(e, {"params": 0.01}), ConstraintError, "cannot meet"),
    Case("constraints", "percent-string", lambda e: search(e, {"flops": " 80 % "}), None),
    Case("constraints", "int-count", lambda e: search(e, {"params": 180}), None),
    # plans
    *[Case("plans", f"json-{name}", lambda e, k=keep: Plan.from_json(PLAN_JSON % k, e.analysis), PlanError, "")
      for name, keep in (("float-index", '{"fc": [1.5]}'), ("bool-index", '{"fc": [false]}'),
                         ("negative", '{"fc": [-2]}'), ("duplicate", '{"fc": [3, 3]}'), ("unknown-group", '{"x": [0]}'),
                         ("out-of-range", '{"fc": [99]}'), ("empty", '{"fc": []}'), ("not-a-list", '{"fc": 5}'),
                         ("frozen-group", '{"out": [0]}'))],
    Case("plans", "json-bytes", lambda e: Plan.from_json(b"\xff\xfe", e.analysis), PlanError, "JSON"),
    Case("plans", "from-json-of-a-dict", lambda e: Plan.from_json({"keep": {}}), ArgumentTypeError, "JSON text"),
    Case("plans", "apply-a-dict", lambda e: fxgradnas.apply_plan(e.analysis, {"fc": [0]}), ArgumentTypeError,
         "Plan"),
    Case("plans", "masked-a-dict", lambda e: fxgradnas.masked(e.analysis, {"fc": [0]}), ArgumentTypeError, "Plan"),
    Case("plans", "other-model", lambda e: fxgradnas.apply_plan(e.analysis, Plan({"fc": [0]}, fingerprint="0" * 16)),
         PlanError, "different model"),
    Case("plans", "edited-keep", lambda e: fxgradnas.apply_plan(e.analysis, _edited_plan()), PlanError, "integers"),
    Case("plans", "constructor-float", lambda e: Plan({"fc": [0.0]}), PlanError, "integers"),
    Case("plans", "numpy-style-ints", lambda e: fxgradnas.apply_plan(e.analysis, Plan({"fc": torch.arange(4)})),
         None),
    Case("plans", "bad-tolerance", lambda e: fxgradnas.apply_plan(e.analysis, Plan(), tolerance=-1), ArgumentError,
         "tolerance"),
    # dtypes
    Case("dtypes", "float64-model", lambda e: prune(Env(fxgradnas.analyze(net().double(), X.double())),
                                                    data=[(X.double(), torch.zeros(4).long())]), None),
    Case("dtypes", "float64-batch-for-float32", lambda e: calibrate(e, data=[(X.double(), torch.zeros(4).long())]),
         DataError, "dtype"),
    Case("dtypes", "autocast-bfloat16", lambda e: calibrate(e, options=CalibrationOptions(autocast_dtype=torch.bfloat16)),
         None),
    Case("dtypes", "autocast-int8", lambda e: calibrate(e, options=CalibrationOptions(autocast_dtype=torch.int8)),
         ArgumentTypeError,
         "autocast_dtype"),
    Case("dtypes", "autocast-string", lambda e: calibrate(e, options=CalibrationOptions(autocast_dtype="bf16")),
         ArgumentError, "autocast_dtype"),
    Case("dtypes", "autocast-name", lambda e: calibrate(e, options=CalibrationOptions(autocast_dtype="bfloat16")),
         None),
    Case("dtypes", "int-token-batch-for-float-model", lambda e: calibrate(e, data=[(X.long(), torch.zeros(4).long())]),
         DataError, "dtype"),
    # devices
    Case("devices", "meta-batch", lambda e: calibrate(e, data=[(X.to("meta"), torch.zeros(4).long())]),
         CalibrationError, "cannot move"),
    Case("devices", "meta-example", lambda e: fxgradnas.calibrate(e.model, batches(2), ce, example_inputs=X.to("meta"),
                                                                   progress=False), ArgumentError, "move them"),
    Case("devices", "batches-elsewhere-are-moved", lambda e: _on_meta_model_device(e), None),
    # modes and options
    Case("modes", "granularity", lambda e: calibrate(e, options=CalibrationOptions(granularity="samples")),
         ArgumentError, "granularity"),
    Case("modes", "prune-granularity", lambda e: prune(e, calibration=CalibrationOptions(granularity="per-sample")),
         ArgumentError, "granularity"),
    Case("modes", "scorer", lambda e: prune(e, calibration=CalibrationOptions(scorer="magnitude")), ArgumentError,
         "scorer"),
    Case("modes", "calibrate-another-scorer", lambda e: calibrate(e, options=CalibrationOptions(scorer="l1")),
         ArgumentError, "fxgradnas.score"),
    Case("modes", "score-options-a-string", lambda e: fxgradnas.score(e.analysis, options="magnitude"),
         ArgumentTypeError, "CalibrationOptions"),
    Case("modes", "searcher", lambda e: prune(e, search=SearchOptions(searcher="beam")), ArgumentError, "searcher"),
    Case("modes", "kinds-string", lambda e: prune(e, search=SearchOptions(kinds="heads")), ArgumentTypeError, "kinds"),
    Case("modes", "kinds-unknown", lambda e: prune(e, search=SearchOptions(kinds=("mlp",))), ArgumentError, "kinds"),
    Case("modes", "kinds-empty", lambda e: search(e, options=SearchOptions(kinds=())), ArgumentError, "kinds"),
    Case("modes", "multiple-of-zero", lambda e: prune(e, search=SearchOptions(multiple_of=0)), ArgumentError,
         "multiple_of"),
    Case("modes", "ratios", lambda e: prune(e, search=SearchOptions(ratios=(0.5, 2.0))), ArgumentError, "ratios"),
    Case("modes", "gqa", lambda e: prune(e, search=SearchOptions(gqa="all")), ArgumentError, "gqa"),
    Case("modes", "evolve-batches", lambda e: prune(e, search=SearchOptions(searcher="evolve", evolve_batches=0)),
         ArgumentError, "evolve_batches"),
    Case("modes", "evolve-forwards", lambda e: prune(e, search=SearchOptions(searcher="evolve", evolve_forwards=1)),
         ArgumentError, "evolve_forwards >= 8"),
    Case("modes", "evolve-holds-out-all-data", lambda e: prune(e, search=SearchOptions(searcher="evolve",
                                                                                        evolve_batches=3)),
         DataError, "holds out the last 3"),
    Case("modes", "evolve-without-loss", lambda e: prune(e, loss=None, calibration=CalibrationOptions(scorer="l1"),
                                                         compensation=None, search=SearchOptions(searcher="evolve")),
         ArgumentTypeError, "pass a loss_fn"),
    Case("modes", "evolve-in-search", lambda e: search(e, options=SearchOptions(searcher="evolve")), ArgumentError,
         "fxgradnas.prune"),
    Case("modes", "evolve", lambda e: prune(e, search=SearchOptions(searcher="evolve", evolve_batches=1,
                                                                    evolve_forwards=4)), None),
    Case("modes", "compensation-method", lambda e: prune(e, compensation=CompensationOptions(method="lsq")),
         ArgumentError, "method.*compensation=None"),
    Case("modes", "options-as-a-dict", lambda e: prune(e, calibration={"batch_size": 8}), ArgumentTypeError,
         "CalibrationOptions"),
    Case("modes", "search-options-as-a-dict", lambda e: fxgradnas.search(e.analysis, fxgradnas.random_scores(
        e.analysis), {"params": 0.8}, {"kinds": ("heads",)}), ArgumentTypeError, "SearchOptions"),
    Case("modes", "patience", lambda e: calibrate(e, options=CalibrationOptions(patience=0)), ArgumentError,
         "patience"),
    Case("modes", "converged-below", lambda e: calibrate(e, options=CalibrationOptions(converged_below=-1.0)),
         ArgumentError, "converged_below"),
    Case("modes", "rounds-with-l1", lambda e: prune(e, calibration=CalibrationOptions(scorer="l1", rounds=2)),
         ArgumentError, "does not calibrate"),
    Case("modes", "seed-string", lambda e: prune(e, calibration=CalibrationOptions(scorer="random", seed="0")),
         ArgumentTypeError, "seed"),
    Case("modes", "recompute-not-bool", lambda e: calibrate(e, options=CalibrationOptions(recompute="yes")),
         ArgumentTypeError, "recompute"),
    Case("modes", "groups-not-of-analysis", lambda e: calibrate(e, groups=["fc"]), ArgumentError, "groups"),
    Case("modes", "sample-granularity", lambda e: calibrate(e, options=CalibrationOptions(granularity="sample")),
         None),
    Case("modes", "model-in-train-mode", lambda e: _in_train_mode(e), None),
    Case("modes", "scores-of-another-model", lambda e: search(e, scores={"layers.0": torch.ones(64)}), ArgumentError,
         "not a prunable group"),
    Case("modes", "scores-with-nan", lambda e: search(e, scores={"fc": torch.full((16,), float("nan"))}),
         ArgumentError, "finite"),
    Case("modes", "compensate-empty-data",
         lambda e: compensate(e.analysis, Plan({"fc": [0, 1]}), fxgradnas.apply_plan(e.analysis, Plan({"fc": [0, 1]})),
                              []), DataError, "no calibration batch"),
    # example inputs and models
    Case("inputs", "example-string", lambda e: prune(e, example="x"), ArgumentTypeError, "example_inputs"),
    Case("inputs", "example-without-tensor", lambda e: fxgradnas.analyze(e.model, (1, 2)), ArgumentTypeError,
         "no tensor"),
    Case("inputs", "model-not-a-module", lambda e: fxgradnas.analyze(lambda x: x, X), ArgumentTypeError, "Module"),
    Case("inputs", "prune-a-function", lambda e: fxgradnas.prune(print, X, batches(1), ce, constraint={"params": 0.8}),
         ArgumentTypeError, "Module"),
    Case("inputs", "model-fails-on-example", lambda e: fxgradnas.analyze(e.model, X5), CaptureError,
         "cannot capture"),
    Case("inputs", "masked-without-example", lambda e: fxgradnas.masked(e.model, Plan()), ArgumentTypeError,
         "example_inputs"),
    Case("inputs", "unknown-group-name", lambda e: e.analysis.group("fc2"), UnknownGroupError, "fc2"),
    Case("inputs", "search-a-model", lambda e: fxgradnas.search(e.model, {}, {"params": 0.8}), ArgumentTypeError,
         "Analysis"),
    Case("inputs", "cost-model-of-a-model", lambda e: fxgradnas.CostModel(e.model), ArgumentTypeError, "Analysis"),
    Case("inputs", "l1-scores-of-a-model", lambda e: fxgradnas.l1_scores(e.model), ArgumentTypeError, "Analysis"),
    Case("inputs", "random-scores-seed", lambda e: fxgradnas.random_scores(e.analysis, seed="0"), ArgumentTypeError,
         "seed"),
    Case("inputs", "instrument-a-model", lambda e: fxgradnas.instrument(e.model), ArgumentTypeError, "Analysis"),
    Case("inputs", "compensate-method",
         lambda e: compensate(e.analysis, Plan(), fxgradnas.apply_plan(e.analysis, Plan()), batches(1),
                              CompensationOptions(method="lsq")),
         ArgumentError, "method"),
    Case("inputs", "compensate-options-a-string",
         lambda e: compensate(e.analysis, Plan(), fxgradnas.apply_plan(e.analysis, Plan()), batches(1), "ls"),
         ArgumentTypeError, "CompensationOptions"),
    # interruption
    Case("interrupt", "in-loss", lambda e: calibrate(e, loss=_interrupt), KeyboardInterrupt),
    Case("interrupt", "in-collect-fn", lambda e: calibrate(e, collect_fn=_interrupt), KeyboardInterrupt),
    Case("interrupt", "in-data", lambda e: prune(e, data=_interrupted(2)), KeyboardInterrupt),
    # concurrency
    Case("concurrency", "two-calibrations", lambda e: _in_threads(lambda: calibrate(e)), None),
    Case("concurrency", "two-captures-of-one-model", lambda e: _in_threads(lambda: fxgradnas.analyze(e.model, X)),
         None),
    Case("concurrency", "two-rewrites", lambda e: _in_threads(lambda: fxgradnas.apply_plan(e.analysis, Plan({"fc": [0]}))),
         None),
    # CLI
    *[Case("cli", f"target-{target}", lambda e, t=target: _cli(["inspect", t]), SystemExit, "^fxgradnas: error: [^\n]+$")
      for target in ("tests.zoo:Llama", "tests.zoo:HF_ZOO", "tests.zoo:missing", "tests", ":llama", "tests.zoo:",
                     "math:pi", "json:dumps")],
    Case("cli", "bad-tablefmt", lambda e: _cli(["inspect", "tests.zoo:mlp", "--tablefmt", "nope"]), SystemExit,
         "^fxgradnas: error: "),
]


def _cli(argv: list[str]) -> None:
    """Run the command line; a non-zero exit raises SystemExit carrying what it printed on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    if code:
        raise SystemExit(err.getvalue().strip())


def _interrupt(*args: Any) -> None:
    raise KeyboardInterrupt


def _interrupted(after: int) -> Iterator[Batch]:
    yield from batches(after)
    raise KeyboardInterrupt


def _edited_plan() -> Plan:
    plan = Plan({"fc": [0, 1]})
    plan.keep["fc"] = [0.5]
    return plan


def _in_train_mode(env: Env) -> None:
    env.model.train()
    try:
        with pytest.warns(UserWarning, match="train mode"):
            calibrate(env)
    finally:
        env.model.eval()


def _on_meta_model_device(env: Env) -> None:
    """CPU batches are moved to the model's device (the meta device here) to capture it; a model without
    weights can be analysed but not calibrated."""
    model = net().to("meta")
    assert fxgradnas.analyze(model, X.to("meta")).prunable
    with pytest.raises(ArgumentError, match="meta device"):
        fxgradnas.calibrate(model, batches(2), ce, progress=False)


def _in_threads(work: Callable[[], Any]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_the_sweep_covers_enough_cases() -> None:
    categories = {c.category for c in CASES}
    assert len(CASES) >= 60 and {"data", "losses", "constraints", "plans", "dtypes", "devices", "modes",
                                 "concurrency", "cli"} <= categories
    assert len({(c.category, c.name) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}-{c.name}" for c in CASES])
def test_misuse(case: Case, analysis: fxgradnas.Analysis) -> None:
    env = Env(analysis)
    with untouched(env.model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(max_batches|approximate)")
        if case.error is None:
            case.run(env)
            return
        with pytest.raises(case.error, match=case.match or None) as raised:
            case.run(env)
    if case.error is SystemExit:
        assert isinstance(raised.value.code, str) or raised.value.code == 2
    elif case.error is not KeyboardInterrupt:
        assert isinstance(raised.value, FxGradNasError)


def test_check_constraint_needs_no_model() -> None:
    assert check_constraint({"params": "75%"}) == ("params", "ratio", 0.75)
    assert check_constraint({"flops": 10**9}) == ("flops", "count", 10**9)


def test_token_windows_and_interleaved_raise_fxgradnas_errors() -> None:
    """A text shorter than one window, a window or count below 1 and no windows to interleave are
    fxgradnas errors (still ValueErrors) whose message names the cause and the fix."""
    from fxgradnas.datasets import interleaved, token_windows

    def letters(text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    assert token_windows(letters, "abcdefg", 3).tolist() == [[97, 98, 99], [100, 101, 102]]
    with pytest.raises(DataError, match=r"the text has 5 tokens, fewer than one window of seq_len=8: give a longer text"):
        token_windows(letters, "abcde", 8)
    for seq_len in (0, -1, 2.5, True):
        with pytest.raises(ArgumentError, match=r"seq_len must be a whole number of tokens of at least 1"):
            token_windows(letters, "abcdefg", seq_len)
    with pytest.raises(ArgumentError, match=r"count must be .* or None \(every window\), got 0"):
        token_windows(letters, "abcdefg", 3, 0)
    with pytest.raises(DataError, match=r"interleaved got no tensor of windows: pass a list of one or more"):
        interleaved([])
    assert issubclass(DataError, ValueError) and issubclass(DataError, FxGradNasError)
    assert interleaved([torch.zeros(2, 3), torch.ones(1, 3)]).tolist() == [[0] * 3, [1] * 3, [0] * 3]


def test_batched_perplexity_and_sampled_windows_check_their_arguments() -> None:
    """A batch size below 1, batches with nothing to predict and a temperature that is not a number are
    fxgradnas errors, not a silent empty list, a ZeroDivisionError or a bare TypeError."""
    from fxgradnas.datasets import batched, perplexity

    windows = torch.arange(12).reshape(4, 3)
    assert [b.shape[0] for b in batched(windows, 3)] == [3, 1]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ArgumentError, match="batch_size must be a positive int"):
            batched(windows, bad)
    model = torch.nn.Embedding(16, 16)
    with pytest.raises(DataError, match="at least 2 tokens"):
        perplexity(model, [])
    with pytest.raises(DataError, match="at least 2 tokens"):
        perplexity(model, [torch.zeros(2, 1, dtype=torch.long)])
    assert perplexity(model, [windows]) > 1.0


@pytest.mark.hf
def test_sampled_windows_refuses_a_temperature_that_is_not_a_number() -> None:
    from fxgradnas.datasets import sampled_windows

    lm, _ = HF_ZOO["hf_llama"]()
    with pytest.raises(ArgumentTypeError, match="temperature must be a number"):
        sampled_windows(lm, 2, 4, temperature="hot", progress=False)
