"""Convolutions as users build them: depthwise and grouped convs, squeeze-excitation and in-place
activations and residual adds (torchvision's style). Each pattern's channels are found, and a random
plan over every prunable exact group prunes to the masked output."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch
from torch import nn

import fxgradnas
from fxgradnas import Analysis, Group

B, C = 3, 4  # batch, stem channels
aten = torch.ops.aten


def axes(g: Group) -> set[tuple[str, int]]:
    return {(name, t.axis) for t in g.params for name in t.names}


def groups_at(a: Analysis, name: str, axis: int) -> list[Group]:
    return [g for g in a.groups if (name, axis) in axes(g)]


def conv_bn(cin: int, cout: int, kernel: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1 expand -> depthwise 3x3 (``multiplier`` outputs per channel) -> 1x1 project,
    with in-place ReLU6 and a residual add."""

    def __init__(self, expand: int = 3, multiplier: int = 1) -> None:
        super().__init__()
        hidden = C * expand
        self.expand = nn.Sequential(*conv_bn(C, hidden), nn.ReLU6(inplace=True))
        self.depthwise = nn.Sequential(*conv_bn(hidden, hidden * multiplier, 3, groups=hidden), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(*conv_bn(hidden * multiplier, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


class Bottleneck(nn.Module):
    """ResNeXt: 1x1 -> grouped 3x3 -> 1x1, in-place ReLU and ``out += identity``."""

    def __init__(self, width: int = 12, groups: int = 3) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(C, width)
        self.conv2, self.bn2 = conv_bn(width, width, 3, groups=groups)
        self.conv3, self.bn3 = conv_bn(width, C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x
        return self.relu(out)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: average over space -> 1x1 -> ReLU -> 1x1 -> sigmoid -> scale."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class SEBlock(nn.Module):
    """1x1 -> BN -> SiLU(in place) -> squeeze-excitation -> 1x1."""

    def __init__(self, width: int = 10, squeeze: int = 3) -> None:
        super().__init__()
        self.conv, self.bn = conv_bn(C, width)
        self.act = nn.SiLU(inplace=True)
        self.se = SqueezeExcitation(width, squeeze)
        self.out = nn.Conv2d(width, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.se(self.act(self.bn(self.conv(x)))))


class GroupedTranspose(nn.Module):
    """A grouped transposed conv between two 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.up, self.conv3 = nn.Conv2d(C, 6, 1), nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.Conv2d(4, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.up(torch.relu(self.conv1(x)))))


class CNN(nn.Module):
    """stem (3 -> C) -> block -> global average pool -> classifier."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, C, 3), nn.ReLU(inplace=True))
        self.block = block
        self.fc = nn.Linear(C, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def randomize_batch_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that a pruned channel matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model.eval()


def analyze(block: nn.Module) -> Analysis:
    return fxgradnas.analyze(randomize_batch_norms(CNN(block)), torch.randn(B, 3, 9, 9))


def check_random_plans(a: Analysis, random_plan: Callable, seeds: int = 3) -> None:
    """apply_plan self-checks pruned == masked on the example input; a fresh input of another batch
    size must agree too."""
    x = torch.randn(B + 2, 3, 9, 9)
    for seed in range(seeds):
        plan = random_plan(a, seed)
        pruned = fxgradnas.apply_plan(a, plan)
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), fxgradnas.masked(a, plan)(x), rtol=1e-5, atol=1e-5)


def test_depthwise_conv_couples_its_channels_and_patches_groups(random_plan: Callable) -> None:
    a = analyze(InvertedResidual(expand=3))
    (g,) = groups_at(a, "block.expand.0.weight", 0)
    assert g.prunable and g.exact and g.size == 3 * C
    assert {("block.depthwise.0.weight", 0), ("block.depthwise.1.weight", 0), ("block.project.0.weight", 1)} <= axes(g)
    nodes = {n.name: n for n in a.captured.module.graph.nodes}
    assert [nodes[c.node].target for c in g.shape_constants] == [aten.conv2d.default]  # its groups argument
    assert a.group("hidden").prunable
    check_random_plans(a, random_plan)


def test_depthwise_conv_with_a_channel_multiplier(random_plan: Callable) -> None:
    """groups == in channels, out = 2 x in: each input channel is a conv group of two outputs; a conv
    group unit and an output-within-every-group unit are separate groups."""
    a = analyze(InvertedResidual(expand=2, multiplier=2))
    (whole,) = groups_at(a, "block.expand.0.weight", 0)
    assert whole.prunable and whole.size == 2 * C and ("block.project.0.weight", 1) in axes(whole)
    (within,) = [g for g in groups_at(a, "block.depthwise.0.weight", 0) if g is not whole]
    assert within.prunable and within.size == 2 and ("block.project.0.weight", 1) in axes(within)
    check_random_plans(a, random_plan)


def test_grouped_conv_prunes_whole_conv_groups_and_the_same_channels_in_every_group(random_plan: Callable) -> None:
    """ResNeXt: 3 conv groups of 4 channels. One group of whole conv groups (their input and output
    channels together), one of the 4 input channels within every conv group, one of the 4 outputs."""
    a = analyze(Bottleneck(width=12, groups=3))
    (whole,) = [g for g in groups_at(a, "block.conv1.weight", 0) if ("block.conv2.weight", 0) in axes(g)]
    assert whole.prunable and whole.exact and whole.size == 3
    assert ("block.conv3.weight", 1) in axes(whole)
    (within_in,) = groups_at(a, "block.conv2.weight", 1)
    assert within_in.prunable and within_in.size == 4 and ("block.conv1.weight", 0) in axes(within_in)
    (within_out,) = [g for g in groups_at(a, "block.conv3.weight", 1) if g is not whole]
    assert within_out.prunable and within_out.size == 4 and ("block.bn2.weight", 0) in axes(within_out)
    assert a.group("hidden").prunable and a.group("hidden").exact
    check_random_plans(a, random_plan)
    keep = {whole.name: [0, 2], within_in.name: [1, 3], within_out.name: [0]}
    pruned = fxgradnas.apply_plan(a, fxgradnas.Plan(keep))
    assert pruned.get_parameter("block.conv2.weight").shape == (2, 2, 3, 3)  # 2 groups x 1 out, 2 in per group


def test_grouped_transposed_conv(random_plan: Callable) -> None:
    """Transposed: the weight is (in channels, outputs per group, ...)."""
    a = analyze(GroupedTranspose())
    (whole,) = [g for g in groups_at(a, "block.up.weight", 0) if ("block.conv3.weight", 1) in axes(g)]
    assert whole.prunable and whole.size == 2 and ("block.conv1.weight", 0) in axes(whole)
    (within_in,) = [g for g in groups_at(a, "block.up.weight", 0) if g is not whole]
    assert within_in.prunable and within_in.size == 3
    (within_out,) = groups_at(a, "block.up.weight", 1)
    assert within_out.prunable and within_out.size == 2
    check_random_plans(a, random_plan)


def test_squeeze_excitation_keeps_channels_prunable(random_plan: Callable) -> None:
    """The SE gate multiplies each channel by its own scale: the block's channels run through the SE
    convs and stay one exact group; the squeeze width is a group of its own."""
    a = analyze(SEBlock(width=10, squeeze=3))
    (g,) = groups_at(a, "block.conv.weight", 0)
    assert g.prunable and g.exact and g.size == 10
    assert {("block.se.fc1.weight", 1), ("block.se.fc2.weight", 0), ("block.se.fc2.bias", 0),
            ("block.out.weight", 1)} <= axes(g)
    (squeeze,) = groups_at(a, "block.se.fc1.weight", 0)
    assert squeeze.prunable and squeeze.exact and squeeze.size == 3
    check_random_plans(a, random_plan)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_mobilenet_v3_small(random_plan: Callable) -> None:
    """Depthwise convs, squeeze-excitation, in-place Hardswish/ReLU/Dropout and residual adds."""
    import torchvision

    model = randomize_batch_norms(torchvision.models.mobilenet_v3_small(weights=None, num_classes=10))
    a = fxgradnas.analyze(model, torch.randn(2, 3, 64, 64))
    frozen = [g for g in a.groups if not g.prunable]
    assert len(a.prunable) >= 25 and len(frozen) <= 3, a.table()
    assert all("input" in g.reason or "output" in g.reason for g in frozen), a.table()
    plan = random_plan(a)
    pruned = fxgradnas.apply_plan(a, plan)  # self-checked: pruned == masked
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        reference = fxgradnas.masked(a, plan)(x)
        assert float((pruned(x) - reference).abs().max() / reference.abs().max()) <= 1e-5
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
