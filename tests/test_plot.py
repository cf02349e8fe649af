"""The picture of a pruning: layers in order, one panel per kind, written as a PNG."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest

import fxgradnas
from fxgradnas import CalibrationOptions, SearchOptions
from fxgradnas.plot import layer_positions
from tests.zoo import llama

pytest.importorskip("matplotlib")


def test_layers_are_ordered_by_number_and_other_groups_by_name() -> None:
    groups = [SimpleNamespace(name=f"model.layers.{i}.mlp") for i in (10, 2, 1)]
    ordered, ticks, axis = layer_positions(groups)
    assert ticks == ["1", "2", "10"] and axis == "layer" and ordered[0] is groups[2]
    groups = [SimpleNamespace(name=n) for n in ("layer2.0.conv1", "layer10.0.conv1", "layer1.0.conv1")]
    assert layer_positions(groups)[1:] == (["layer1.0.conv1", "layer2.0.conv1", "layer10.0.conv1"], "group")


@functools.cache
def _result() -> fxgradnas.PruneResult:
    """One pruning for both pictures (``plot`` only reads the result)."""
    model, inputs = llama(n_layer=3)
    return fxgradnas.prune(model, inputs, None, None, constraint={"params": 0.6}, progress=False,
                           search=SearchOptions(multiple_of=4, kinds=("heads", "channels", "hidden")),
                           calibration=CalibrationOptions(scorer="l1"), compensation=None)


@pytest.mark.parametrize("scores", [False, True])
def test_plot_writes_a_png_with_a_panel_per_kind(tmp_path: Path, scores: bool) -> None:
    from matplotlib.image import imread

    result = _result()
    path = result.plot(tmp_path / "pruned.png", scores=scores, title="llama")
    assert path == tmp_path / "pruned.png"
    height, width, _ = imread(path).shape
    kinds = {result.analysis.group(name).kind for name in result.search.choices}
    assert kinds == {"heads", "channels", "hidden"}
    assert width >= 800 and height > (1300 if scores else 700)
