"""Analysis: find every prunable dimension of a captured model and what each one touches."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from ..capture import Captured, ExampleInputs, capture
from ..errors import ArgumentError, ArgumentTypeError, UnknownGroupError
from .groups import Factor, Group, Layout, NodeAxis, TensorAxis, build_groups, factor_sizes
from .propagate import propagate
from .registry import REGISTRY, OpEntry, register
from .spaces import Size
from .state import Propagation

__all__ = [
    "Analysis", "Factor", "Group", "Layout", "NodeAxis", "OpEntry", "REGISTRY", "TensorAxis", "analyze",
    "analyze_captured", "check_analysis", "check_groups", "ensure_analysis", "factor_sizes", "register",
]


@dataclass
class Analysis:
    """The groups of a captured model, with the walk that found them.

    Attributes:
        captured: The captured model (:func:`fxgradnas.capture`).
        groups: Every group found, prunable or frozen with its reason.
        walk: The propagation over the graph that found the groups (what the cost model reads).
        seconds: Seconds per step ("capture", "analysis").
    """

    captured: Captured
    groups: list[Group]
    walk: Propagation = field(repr=False)
    seconds: dict[str, float] = field(default_factory=dict)

    def group(self, name: str) -> Group:
        """The group named ``name``.

        Args:
            name: The group's name (``group.name``, as a plan names it).

        Raises:
            UnknownGroupError: No group has that name.
        """
        for g in self.groups:
            if g.name == name:
                return g
        raise UnknownGroupError(f"no group named {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def by_kind(self, kind: str) -> list[Group]:
        """The groups of one kind.

        Args:
            kind: A group kind ("heads", "channels", "hidden", ...).
        """
        return [g for g in self.groups if g.kind == kind]

    @property
    def graph(self) -> nx.Graph:
        """Coupling graph: groups linked to the parameters, mask sites and shape constants they touch."""
        graph = nx.Graph()
        for g in self.groups:
            gid = f"group:{g.name}"
            graph.add_node(gid, kind=g.kind, units=g.size, prunable=g.prunable)
            for t in g.params + g.buffers:
                graph.add_node(f"tensor:{t.name}", names=t.names, numel=t.numel)
                graph.add_edge(gid, f"tensor:{t.name}", axis=t.axis)
            for role, entries in (("site", g.sites), ("constant", g.shape_constants)):
                for n in entries:
                    graph.add_node(f"node:{n.node}", op=role)
                    graph.add_edge(gid, f"node:{n.node}", axis=n.axis, role=role)
        return graph

    # --- what the cost model reads: tensors and contractions as products of leaf spaces ----------
    def leaf_size(self, leaf: int) -> Size:
        """Size of a leaf space (an int, or a sympy expression for batch/sequence).

        Args:
            leaf: The leaf space's index in the walk.
        """
        return self.walk.spaces.size(leaf)

    def parameter_leaves(self) -> list[tuple[torch.Tensor, list[list[list[int]]]]]:
        """Every parameter and buffer the graph reads (tied ones once), with the segments of each axis: the
        leaf spaces of each product the axis concatenates (one for an axis that is not cut into parts)."""
        return [(tensor, [self.walk.spaces.segments(s) for s in spaces])
                for tensor, spaces in self.walk.records.tensors.values()]

    def multiply_adds(self) -> list[tuple[str, list[list[list[int]]]]]:
        """Every contraction (linear, matmul, conv, attention) by node name, with the segments of each of its
        axes: its multiply-adds are the product over those axes of the summed sizes of their segments."""
        return [(node, [self.walk.spaces.segments(s) for s in spaces]) for node, spaces in self.walk.records.flops]

    def table(self, tablefmt: str = "simple") -> str:
        """The groups as a table (:func:`fxgradnas.report.analysis_table`).

        Args:
            tablefmt: A tabulate table format.
        """
        from ..report import analysis_table  # the presentation layer, loaded when a table is asked for

        return analysis_table(self, tablefmt=tablefmt)

    def __str__(self) -> str:
        return self.table()


def analyze_captured(captured: Captured) -> Analysis:
    start = time.perf_counter()
    walk = propagate(captured)
    groups = build_groups(walk)
    return Analysis(
        captured=captured,
        groups=groups,
        walk=walk,
        seconds={"capture": captured.seconds, "analysis": time.perf_counter() - start},
    )


def check_analysis(analysis: Any, function: str) -> None:
    """Raise ArgumentTypeError unless ``analysis`` is an :class:`Analysis` (``function`` takes one)."""
    if not isinstance(analysis, Analysis):
        raise ArgumentTypeError(f"{function} takes an Analysis (fxgradnas.analyze(model, example_inputs)), not "
                                f"{type(analysis).__name__}")


def check_groups(analysis: Analysis, groups: list[Group] | None) -> None:
    """Raise ArgumentTypeError unless ``groups`` is None or a list (or tuple), and ArgumentError when one of
    them is not a group of ``analysis``."""
    if groups is None:
        return
    if isinstance(groups, (str, Group)) or not isinstance(groups, (list, tuple)):
        raise ArgumentTypeError(f"groups must be a list of groups (analysis.prunable), not {type(groups).__name__}")
    known = {id(g) for g in analysis.groups}
    unknown = [g for g in groups if id(g) not in known]
    if unknown:
        shown = unknown[0].name if isinstance(unknown[0], Group) else repr(unknown[0])
        raise ArgumentError(f"groups must be groups of this analysis (e.g. analysis.prunable), not {shown}")


def ensure_analysis(model: torch.nn.Module | Analysis, example_inputs: ExampleInputs | None) -> Analysis:
    """The analysis passed in, or a fresh one of ``model`` on ``example_inputs``."""
    if isinstance(model, Analysis):
        return model
    if not isinstance(model, torch.nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module or an Analysis, not {type(model).__name__}")
    if example_inputs is None:
        raise ArgumentTypeError("example_inputs are needed to capture the model (or pass an Analysis)")
    return analyze(model, example_inputs)


def analyze(model: torch.nn.Module, example_inputs: ExampleInputs, *, dynamic_shapes: Any = "auto") -> Analysis:
    """Capture ``model`` on ``example_inputs`` and find its prunable groups.

    Every dimension a rule does not understand is frozen with a reason, never guessed.

    Args:
        model: The model to analyse (not modified).
        example_inputs: Its inputs: a tensor, a tuple of positional args or a dict of keyword args.
        dynamic_shapes: "auto" (dynamic batch and sequence), None (static) or a torch.export spec.

    Returns:
        The analysis: the captured model and its groups.

    Raises:
        ArgumentTypeError, ArgumentError, CaptureError: as :func:`fxgradnas.capture` raises them.
    """
    return analyze_captured(capture(model, example_inputs, dynamic_shapes=dynamic_shapes))
