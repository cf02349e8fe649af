"""Least-squares compensation: layer errors never go up, nothing pruned changes nothing, the
structure is the same, the re-fit beats plain pruning on a layer's own output, and the sequential
walk fits each layer on the inputs of the already-compensated pruned model."""

from __future__ import annotations

import pytest
import torch
from torch.fx import Interpreter

import fxgradnas
from fxgradnas import CompensationOptions, Plan, SearchOptions, apply_plan
from fxgradnas.compensate import compensate, consumers, input_flattener
from tests.zoo import ZOO


def _batches(vocab: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (4, 9), generator=gen) for _ in range(6)]


@pytest.fixture(scope="module")
def setup():
    model, inputs = ZOO["llama"](intermediate=64)
    analysis = fxgradnas.analyze(model, inputs)
    plan = Plan({"model.layers.0.mlp": list(range(0, 64, 3)), "model.layers.1.mlp": list(range(40)),
                 "model.layers.1.self_attn": [0, 1]})
    return model, analysis, _batches(), plan


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("method", ["scale", "ls"])
def test_errors_never_go_up_and_structure_is_kept(setup, method: str, sequential: bool) -> None:
    _, analysis, batches, plan = setup
    plain = apply_plan(analysis, plan)
    fitted = apply_plan(analysis, plan)
    reports = compensate(analysis, plan, fitted, batches,
                         CompensationOptions(method=method, sequential=sequential), progress=False)
    assert {r.group for r in reports} == set(plan.keep)
    for r in reports:
        assert r.error_after <= r.error_before
    gain = 0.9 if method == "ls" else 1.0  # per-unit scales can only do a little on a random model
    assert any(r.applied and r.error_after < gain * r.error_before for r in reports)
    shapes = {n: p.shape for n, p in plain.named_parameters()}
    assert shapes == {n: p.shape for n, p in fitted.named_parameters()}


def test_biases_take_the_mean_and_errors_drop() -> None:
    """nanoGPT's Linear layers have biases: the fit is centred and the bias absorbs the mean."""
    model, inputs = ZOO["nanogpt"]()
    analysis = fxgradnas.analyze(model, inputs)
    groups = [g for g in analysis.prunable if g.kind in ("heads", "channels")]
    plan = Plan({g.name: list(range(g.size // 2)) for g in groups})
    vocab = int(inputs.max()) + 1
    fitted = apply_plan(analysis, plan)
    before = {n: p.clone() for n, p in fitted.named_parameters()}
    reports = compensate(analysis, plan, fitted, _batches(vocab), CompensationOptions(method="ls"),
                         progress=False)
    assert reports and all(r.error_after <= r.error_before for r in reports)
    changed_biases = [n for n, p in fitted.named_parameters() if n.endswith("bias") and not torch.equal(p, before[n])]
    assert changed_biases


def test_ls_reconstructs_a_layer_better_than_pruning(setup) -> None:
    """On the calibration inputs, the re-fitted down_proj output is closer to the dense one."""
    model, analysis, batches, plan = setup
    name = "model.layers.0.mlp"  # its input is the same in the dense and the pruned model
    one = Plan({name: plan.keep[name]})
    plain = apply_plan(analysis, one)
    fitted = apply_plan(analysis, one)
    compensate(analysis, one, fitted, batches, CompensationOptions(method="ls", damping=1e-2), progress=False)
    dense_w = model.get_parameter("model.layers.0.mlp.down_proj.weight")
    kept = torch.tensor(one.keep[name])
    captured = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    x = torch.cat([c.reshape(-1, 64) for c in captured])
    target = x @ dense_w.T
    err_plain = (x[:, kept] @ plain.get_parameter("model.layers.0.mlp.down_proj.weight").T - target).pow(2).mean()
    err_fit = (x[:, kept] @ fitted.get_parameter("model.layers.0.mlp.down_proj.weight").T - target).pow(2).mean()
    assert err_fit < 0.7 * err_plain


class _Outputs(Interpreter):
    """Runs a graph module and keeps the outputs of the named nodes as rows."""

    def __init__(self, gm, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.names:
            self.seen.setdefault(n.name, []).append(value.detach().reshape(-1, value.shape[-1]))
        return value


def _outputs_of(gm, name: str, batches) -> torch.Tensor:
    """Rows of node ``name``'s output over ``batches`` (the model's own inputs)."""
    flatten = input_flattener(gm)
    with torch.no_grad():
        rows = []
        for b in batches:
            spy = _Outputs(gm, {name})
            spy.run(*flatten(b))
            rows += spy.seen[name]
    return torch.cat(rows).double()


def _with_parameter(gm, target: str, value: torch.Tensor):
    parent, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(parent), leaf, torch.nn.Parameter(value, requires_grad=False))
    return gm


def test_sequential_fits_on_the_inputs_of_the_compensated_pruned_model(setup) -> None:
    """The reported error of a later layer is E|W x - W' x_K|^2 with x the input that layer gets in
    the pruned model whose earlier layer is already compensated (not the dense model's input)."""
    _, analysis, batches, _ = setup
    plan = Plan({"model.layers.0.mlp": list(range(0, 64, 3)), "model.layers.1.mlp": list(range(40))})
    fitted = apply_plan(analysis, plan)
    reports = {r.group: r for r in compensate(analysis, plan, fitted, batches,
                                              CompensationOptions(method="ls"), progress=False)}
    first, later = consumers(analysis, plan)
    assert reports[first.group.name].applied and reports[later.group.name].applied
    compensated_first = torch.zeros_like(analysis.captured.module.get_parameter(first.weight))
    compensated_first[:, first.kept] = fitted.get_parameter(first.weight)
    site = later.group.sites[0].node
    x_plain = _outputs_of(fxgradnas.masked(analysis, plan), site, batches)
    x = _outputs_of(_with_parameter(fxgradnas.masked(analysis, plan), first.weight, compensated_first), site, batches)
    assert not torch.allclose(x, x_plain)  # the first layer's compensation changed what the later one sees
    weight = analysis.captured.module.get_parameter(later.weight).double()
    new = fitted.get_parameter(later.weight).double()
    error = (x @ weight.T - x[:, later.kept] @ new.T).pow(2).sum(1).mean()
    assert error.item() == pytest.approx(reports[later.group.name].error_after, rel=1e-5)
    before = (x @ weight.T - x[:, later.kept] @ weight[:, later.kept].T).pow(2).sum(1).mean()
    assert before.item() == pytest.approx(reports[later.group.name].error_before, rel=1e-5)


def test_sequential_walk_masks_the_groups_it_does_not_refit(setup) -> None:
    """With the residual width pruned too (its readers left alone), the MLP's statistics come from the
    pruned model: its reported error is that of its input in the model with the width masked."""
    _, analysis, batches, _ = setup
    plan = Plan({"hidden": list(range(24)), "model.layers.1.mlp": list(range(40))})
    fitted = apply_plan(analysis, plan)
    (report,) = compensate(analysis, plan, fitted, batches, CompensationOptions(method="ls", bias=False),
                           progress=False)
    (c,) = consumers(analysis, plan)
    x = _outputs_of(fxgradnas.masked(analysis, plan), c.group.sites[0].node, batches)
    weight = analysis.captured.module.get_parameter(c.weight).double()
    before = (x @ weight.T - x[:, c.kept] @ weight[:, c.kept].T).pow(2).sum(1).mean()
    assert before.item() == pytest.approx(report.error_before, rel=1e-5)


@pytest.mark.parametrize("sequential", [True, False])
def test_nothing_pruned_changes_nothing(setup, sequential: bool) -> None:
    _, analysis, batches, _ = setup
    plan = Plan({"model.layers.0.mlp": list(range(64))})
    plain = apply_plan(analysis, plan)
    fitted = apply_plan(analysis, plan)
    reports = compensate(analysis, plan, fitted, batches,
                         CompensationOptions(method="ls", sequential=sequential), progress=False)
    assert not any(r.applied for r in reports)
    for (n, a), (_, b) in zip(plain.named_parameters(), fitted.named_parameters(), strict=True):
        assert torch.equal(a, b), n


def test_prune_with_compensation_reports_each_layer(setup) -> None:
    model, _, batches, _ = setup

    def loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))

    result = fxgradnas.prune(model, None, batches, loss, constraint={"params": 0.7}, progress=False,
                             search=SearchOptions(multiple_of=8))
    assert result.compensation and "compensate" in result.seconds  # "ls" is the default
    assert "reconstruction error" in result.table()
    plain = fxgradnas.prune(result.analysis, None, batches, loss, constraint={"params": 0.7}, progress=False,
                            search=SearchOptions(multiple_of=8), compensation=None)
    assert plain.plan.keep == result.plan.keep and not plain.compensation and "compensate" not in plain.seconds
    refitted = apply_plan(result.analysis, result.plan)
    compensate(result.analysis, result.plan, refitted, batches, CompensationOptions(method="ls"),
               progress=False)
    for (name, b), (_, c) in zip(result.model.named_parameters(), refitted.named_parameters(), strict=True):
        torch.testing.assert_close(b, c, msg=name)  # the default is compensate(...)'s defaults
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.parameters(), result.model.parameters(),
                                                     strict=True))
    weak = fxgradnas.prune(result.analysis, None, batches, loss, constraint={"params": 0.7}, progress=False,
                           search=SearchOptions(multiple_of=8),
                           compensation=CompensationOptions(damping=0.01))
    refitted = apply_plan(result.analysis, result.plan)
    compensate(result.analysis, result.plan, refitted, batches, CompensationOptions(damping=0.01),
               progress=False)
    for (name, b), (_, c) in zip(weak.model.named_parameters(), refitted.named_parameters(), strict=True):
        torch.testing.assert_close(b, c, msg=name)  # prune's damping is compensate's
    assert any(not torch.equal(a, b) for a, b in zip(weak.model.parameters(), result.model.parameters(), strict=True))
    other = _batches(64)[::-1][:3]
    broad = fxgradnas.prune(result.analysis, None, batches, loss, constraint={"params": 0.7}, progress=False,
                            search=SearchOptions(multiple_of=8),
                            compensation_data=iter(other))  # one-shot: read once, by the re-fit
    assert broad.plan.keep == result.plan.keep  # the scores still come from data
    refitted = apply_plan(result.analysis, result.plan)
    compensate(result.analysis, result.plan, refitted, other, progress=False)
    for (name, b), (_, c) in zip(broad.model.named_parameters(), refitted.named_parameters(), strict=True):
        torch.testing.assert_close(b, c, msg=name)  # the re-fit read compensation_data, not data
    assert any(not torch.equal(a, b) for a, b in zip(broad.model.parameters(), result.model.parameters(), strict=True))
    with pytest.raises(ValueError, match="compensation=None there is no re-fit"):
        fxgradnas.prune(result.analysis, None, batches, loss, constraint={"params": 0.7},
                        compensation_data=batches, compensation=None)
    once = iter(batches)
    with pytest.raises(ValueError, match="compensation_data is the iterator data is"):
        fxgradnas.prune(result.analysis, None, once, loss, constraint={"params": 0.7}, compensation_data=once)
    with pytest.raises(TypeError, match="compensation_data is one tensor"):
        fxgradnas.prune(result.analysis, None, batches, loss, constraint={"params": 0.7}, compensation_data=batches[0])
    for bad in (-1, float("inf")):
        with pytest.raises(ValueError, match="damping must be a finite non-negative number"):
            fxgradnas.CompensationOptions(damping=bad)
    with pytest.raises(ValueError):
        compensate(result.analysis, result.plan, result.model, batches, CompensationOptions(method="bogus"))
    for sequential in (True, False):
        with pytest.raises(fxgradnas.CalibrationError, match="no calibration batch"):
            compensate(result.analysis, result.plan, result.model, [],
                       CompensationOptions(sequential=sequential))


@pytest.mark.hf
def test_sequential_walk_takes_keyword_inputs_and_agrees_on_the_first_layer() -> None:
    """A Hugging Face decoder called with keyword inputs (ids and a padding mask): the node-by-node
    walk sees what the model's own forward sees, so the first consumer's fit is the same both ways."""
    pytest.importorskip("transformers")
    from tests.zoo import HF_ZOO

    model, _ = HF_ZOO["hf_llama"]()
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 64, (3, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "use_cache": False})
    analysis = fxgradnas.analyze(model, batches[0])
    groups = [g for g in analysis.prunable if g.kind in ("heads", "channels")]
    plan = Plan({g.name: list(range(g.size // 2)) for g in groups if g.kind == "channels"})
    found = consumers(analysis, plan)
    walked, streamed = apply_plan(analysis, plan), apply_plan(analysis, plan)
    reports = compensate(analysis, plan, walked, batches, progress=False)
    compensate(analysis, plan, streamed, batches, CompensationOptions(sequential=False), progress=False)
    assert len(reports) == len(found) == 2 and all(r.error_after <= r.error_before for r in reports)
    first = found[0].weight
    torch.testing.assert_close(walked.get_parameter(first), streamed.get_parameter(first))
    assert not torch.allclose(walked.get_parameter(found[1].weight), streamed.get_parameter(found[1].weight))


@pytest.mark.hf
@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama"])
def test_reported_error_is_the_first_layers_real_error(name: str) -> None:
    """For the first consumer (same input in the dense and pruned model) the reported error after the
    fit is the mean squared output error of the folded weights, centred where there is a bias; GPT-2
    stores its Conv1D weights as (in, out)."""
    pytest.importorskip("transformers")
    from tests.zoo import analysis_of

    analysis = analysis_of(name)
    batches = [{"input_ids": b[:, :7], "use_cache": False} for b in _batches()]
    groups = [g for g in analysis.prunable if g.kind in ("heads", "channels")]
    plan = Plan({g.name: list(range(g.size // 2)) for g in groups})
    fitted = apply_plan(analysis, plan)
    first = consumers(analysis, plan)[0]
    report = compensate(analysis, plan, fitted, batches, progress=False)[0]
    x = _outputs_of(analysis.captured.module, first.group.sites[0].node, batches)
    weight = first.matrix(analysis.captured.module).double()
    new = first.matrix(fitted).double()
    if first.bias is not None:
        x = x - x.mean(0)
    error = (x @ weight.T - x[:, first.kept] @ new.T).pow(2).sum(1).mean()
    assert report.applied and error.item() == pytest.approx(report.error_after, rel=1e-5)


@pytest.mark.parametrize("sequential", [True, False])
def test_a_consumer_whose_outputs_are_pruned_too(sequential: bool) -> None:
    """In a Linear chain the second layer consumes the first group's channels and writes the second
    group's: its re-fit is folded into the kept rows only, and the fit still helps."""
    model, inputs = ZOO["mlp"]()
    analysis = fxgradnas.analyze(model, inputs)
    plan = Plan({g.name: list(range(0, g.size, 2)) for g in analysis.prunable})
    assert len(plan.keep) == 2
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 16, generator=gen) for _ in range(4)]
    fitted = apply_plan(analysis, plan)
    reports = compensate(analysis, plan, fitted, batches, CompensationOptions(sequential=sequential),
                         progress=False)
    assert len(reports) == 2 and any(r.applied for r in reports)
    assert {n: p.shape for n, p in fitted.named_parameters()} == {
        n: p.shape for n, p in apply_plan(analysis, plan).named_parameters()}


def test_consumers_wider_than_max_width_are_left_as_pruned(setup) -> None:
    _, analysis, batches, plan = setup
    widths = {c.weight: c.matrix(analysis.captured.module).shape[1] for c in consumers(analysis, plan)}
    limit = min(widths.values())
    wide = {name for name, width in widths.items() if width > limit}
    assert wide and len(wide) < len(widths)
    with pytest.warns(UserWarning, match="max_width"):
        reports = compensate(analysis, plan, apply_plan(analysis, plan), batches,
                             CompensationOptions(max_width=limit), progress=False)
    assert {r.consumer for r in reports} == set(widths) - wide
    full = compensate(analysis, plan, apply_plan(analysis, plan), batches,
                      CompensationOptions(max_width=None), progress=False)
    assert {r.consumer for r in full} == set(widths)
    for bad in (0, 2.5, True):
        with pytest.raises(fxgradnas.errors.ArgumentError, match="max_width"):
            compensate(analysis, plan, apply_plan(analysis, plan), batches,
                       CompensationOptions(max_width=bad), progress=False)


class _Bilinear(torch.nn.Module):
    """``c`` reads the outer product of ``a`` and ``b``: its input is a mask site of both groups."""

    def __init__(self, b_first: bool) -> None:
        super().__init__()
        first, second = (("b", 8), ("a", 4)) if b_first else (("a", 4), ("b", 8))
        for name, width in (first, second):  # the order decides which mask node the Linear reads
            setattr(self, name, torch.nn.Linear(6, width))
        self.c, self.e = torch.nn.Linear(32, 5), torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        return self.c((a[:, :, None] * b[:, None, :]).flatten(1)) + self.e(b)


def _bilinear_groups(b_first: bool) -> tuple:
    """The analysis of a seeded :class:`_Bilinear` and its groups of ``a`` (4 units) and ``b`` (8)."""
    torch.manual_seed(0)
    analysis = fxgradnas.analyze(_Bilinear(b_first).eval(), torch.randn(16, 6))
    return (analysis, *(next(g for g in analysis.prunable if g.size == size) for size in (4, 8)))


@pytest.mark.parametrize("b_first", [False, True])
def test_statistics_are_taken_before_the_fitted_groups_own_mask(b_first: bool) -> None:
    """With another group's mask site on the same input, the re-fitted group's statistics are still its
    unmasked input: the error before the re-fit is that of dropping its pruned columns, not zero."""
    analysis, a, b = _bilinear_groups(b_first)
    plan = Plan({b.name: list(range(8)), a.name: [0, 1]})
    (c,) = consumers(analysis, plan)
    batches = [torch.randn(16, 6) for _ in range(4)]
    (report,) = compensate(analysis, plan, apply_plan(analysis, plan), batches,
                           CompensationOptions(bias=False), progress=False)
    x = _outputs_of(fxgradnas.masked(analysis, Plan({})), c.group.sites[0].node, batches)
    weight = analysis.captured.module.get_parameter(c.weight).double()
    before = (x @ weight.T - x[:, c.kept] @ weight[:, c.kept].T).pow(2).sum(1).mean()
    assert report.applied and report.error_before == pytest.approx(before.item(), rel=1e-5)


def test_a_layer_whose_input_two_pruned_groups_share_is_left_as_pruned() -> None:
    """Both groups of the outer product pruned: neither alone decides ``c``'s kept columns, so ``c`` is not
    re-fitted (and nothing fails)."""
    analysis, a, b = _bilinear_groups(False)
    plan = Plan({b.name: list(range(4)), a.name: [0, 1]})
    assert consumers(analysis, plan) == []
    fitted = apply_plan(analysis, plan)
    assert compensate(analysis, plan, fitted, [torch.randn(16, 6)], progress=False) == []
    x = torch.randn(5, 6)
    torch.testing.assert_close(fitted(x), fxgradnas.masked(analysis, plan)(x))


def _linear_inputs(gm: torch.fx.GraphModule, weight: str, batches: list[torch.Tensor]) -> torch.Tensor:
    """The rows reaching the ``linear`` whose weight is ``weight``, over ``batches``."""
    (node,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default and n.args[1].target == weight]
    rows = []

    class Recorder(Interpreter):
        def run_node(self, n):
            if n is node:
                rows.append(self.env[n.args[0]].reshape(-1, self.env[n.args[0]].shape[-1]).double())
            return super().run_node(n)

    flatten = input_flattener(gm)
    for b in batches:
        Recorder(gm).run(*flatten(b), enable_io_processing=False)
    return torch.cat(rows)


def test_the_readers_of_a_pruned_residual_width_are_refitted_to_their_dense_outputs() -> None:
    """With the residual width pruned, every Linear reading it (q/k/v and gate/up through the norms, the untied
    LM head) is re-fitted from its pruned input to its dense output: the reported error is that real error,
    it goes down, the shapes stay, and the logits come closer to the dense ones than without it."""
    from fxgradnas.compensate import width_readers

    model, inputs = ZOO["llama"](intermediate=64)
    analysis = fxgradnas.analyze(model, inputs)
    (hidden,) = [g for g in analysis.prunable if g.kind == "hidden"]
    plan = Plan({hidden.name: list(range(0, hidden.size, 2)), "model.layers.0.mlp": list(range(0, 64, 3))})
    batches = _batches()
    plain = apply_plan(analysis, plan)
    readers = width_readers(analysis, plan, plain)
    names = {r.weight for r in readers}
    assert "lm_head.weight" in names and {f"model.layers.{i}.{m}.weight" for i in (0, 1) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")} <= names
    assert all(len(r.kept) == hidden.size // 2 for r in readers)
    sliced = {r.weight: r.rows.tolist() for r in readers if r.rows is not None}  # rows the MLP group prunes
    assert sliced == dict.fromkeys(["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"],
                                   list(range(0, 64, 3)))
    fitted, reports = {}, {}
    for width in (True, False):
        fitted[width] = apply_plan(analysis, plan)
        reports[width] = compensate(analysis, plan, fitted[width], iter(batches), CompensationOptions(hidden=width),
                                    progress=False)  # a generator: read once for both passes
    assert {r.consumer for r in reports[False]} == {"model.layers.0.mlp.down_proj.weight"}
    width_reports = {r.consumer: r for r in reports[True]}
    assert set(width_reports) == names | {"model.layers.0.mlp.down_proj.weight"}
    for r in width_reports.values():
        assert r.error_after <= r.error_before
    first = "model.layers.0.self_attn.q_proj.weight"  # the embeddings reach it: its pruned input is the dense one's
    x = _linear_inputs(analysis.captured.module, first, batches)
    x_pruned = _linear_inputs(fitted[True], first, batches)
    dense, new = analysis.captured.module.get_parameter(first).double(), fitted[True].get_parameter(first).double()
    error = (x @ dense.T - x_pruned @ new.T).pow(2).sum(1).mean()
    assert width_reports[first].applied and error.item() == pytest.approx(width_reports[first].error_after, rel=1e-5)
    assert width_reports[first].error_after < 0.9 * width_reports[first].error_before
    assert {n: p.shape for n, p in fitted[True].named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    logits = {key: torch.cat([gm(b) for b in batches]) for key, gm in (("dense", model), *fitted.items())}
    gaps = {key: (logits[key] - logits["dense"]).pow(2).mean().item() for key in fitted}
    assert gaps[True] < gaps[False]
