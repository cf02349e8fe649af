"""Walk the captured graph once and label every tensor axis with a dimension space.

Each node's rule (:mod:`fxgradnas.analysis.rules`) runs in graph order on the shared
:class:`~fxgradnas.analysis.state.Propagation`; records hold space ids and are resolved to final leaf
spaces only after the walk, since later unions refine earlier spaces.
"""

from __future__ import annotations

import operator

import torch

from ..capture import Captured
from .rules import apply_rule
from .state import Propagation


def propagate(captured: Captured) -> Propagation:
    """Label every axis of every tensor in ``captured`` with a space and gather the records."""
    p = Propagation(captured)
    tensor_spaces: dict[int, list[int]] = {}
    for node in p.gm.graph.nodes:
        p.node = node
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(p.gm)
            if isinstance(value, torch.Tensor) and node.users:
                p.axes[node] = tensor_spaces.get(id(value)) or p.fresh([int(s) for s in value.shape])
                p.weightlike.add(node)
                if id(value) in tensor_spaces:
                    continue  # a tied weight: one tensor, one set of spaces
                tensor_spaces[id(value)] = p.axes[node]
                if captured.names_of(value):
                    p.records.tensors[node.name] = (value, p.axes[node])
                else:
                    for s in p.axes[node]:
                        p.freeze(s, f"constant tensor {node.target} has a fixed shape")
        elif node.op == "placeholder":
            if p.is_tensor(node):
                p.axes[node] = p.fresh(p.shape(node), f"model input {node.name}")
        elif node.op == "output":
            for x in p.tensor_inputs(node):
                for s in p.of(x):
                    p.freeze(s, "reaches the model output")
                if isinstance(p.values.get(x), int):
                    p.freeze(p.values[x], "its indices reach the model output")
        elif node.op == "call_function":
            apply_rule(p, node)
    p.node = None
    return p

