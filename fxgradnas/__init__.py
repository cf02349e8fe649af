"""fxgradnas: gradient-scored structured pruning of PyTorch models as a torch.fx graph pass.

The pipeline, one module per pass: :mod:`~fxgradnas.capture` (torch.export) -> :mod:`~fxgradnas.analysis`
(prunable groups) -> :mod:`~fxgradnas.instrument` (mask nodes) -> :mod:`~fxgradnas.calibrate` (scores)
-> :mod:`~fxgradnas.search` with :mod:`~fxgradnas.cost` (a plan meeting the constraint) ->
:mod:`~fxgradnas.rewrite` (the smaller module) -> :mod:`~fxgradnas.compensate` (re-fit what consumed the
pruned units) -> :mod:`~fxgradnas.heal` (distil the pruned module from the dense one) ->
:mod:`~fxgradnas.report`; :func:`prune` composes them, :mod:`fxgradnas.hf` keeps Hugging
Face models Hugging Face models. The choices of every step are three option objects (:mod:`~fxgradnas.options`:
:class:`SearchOptions`, :class:`CalibrationOptions`, :class:`CompensationOptions`). Names load on first use, so
``import fxgradnas`` does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "Analysis", "AnalysisError", "ArgumentError", "ArgumentTypeError", "CalibrationError", "CalibrationOptions",
    "CaptureError", "Captured", "CompensationOptions", "ConstraintError", "CostModel", "DataError", "FxGradNasError",
    "Group", "Plan", "PlanError", "PruneResult", "RewriteError", "Scores", "SearchOptions", "SearchResult",
    "UnknownGroupError", "analyze", "apply_plan", "calibrate", "capture",
    "heal", "instrument", "l1_scores", "masked", "prune", "random_scores", "score", "search",
]
_MODULE_OF = {
    "Analysis": "analysis", "Group": "analysis", "analyze": "analysis", "calibrate": "calibrate",
    "Captured": "capture", "capture": "capture", "CostModel": "cost", "heal": "heal", "instrument": "instrument",
    "masked": "instrument", "Plan": "plan", "PruneResult": "prune", "prune": "prune", "score": "prune",
    "apply_plan": "rewrite", "Scores": "scores", "l1_scores": "scores", "random_scores": "scores",
    "SearchResult": "search", "search": "search",
    "CalibrationOptions": "options", "CompensationOptions": "options", "SearchOptions": "options",
    **dict.fromkeys(["AnalysisError", "ArgumentError", "ArgumentTypeError", "CalibrationError", "CaptureError",
                     "ConstraintError", "DataError", "FxGradNasError", "PlanError", "RewriteError", "UnknownGroupError"],
                    "errors"),
}

if TYPE_CHECKING:
    from .analysis import Analysis, Group, analyze
    from .calibrate import calibrate
    from .capture import Captured, capture
    from .cost import CostModel
    from .errors import (
        AnalysisError,
        ArgumentError,
        ArgumentTypeError,
        CalibrationError,
        CaptureError,
        ConstraintError,
        DataError,
        FxGradNasError,
        PlanError,
        RewriteError,
        UnknownGroupError,
    )
    from .heal import heal
    from .instrument import instrument, masked
    from .options import CalibrationOptions, CompensationOptions, SearchOptions
    from .plan import Plan
    from .prune import PruneResult, prune, score
    from .rewrite import apply_plan
    from .scores import Scores, l1_scores, random_scores
    from .search import SearchResult, search


class _Package(types.ModuleType):
    """The public names load their module on first use. They win over the submodules of the same name
    (``fxgradnas.prune`` is the function; the module is ``sys.modules["fxgradnas.prune"]``)."""

    def __getattribute__(self, name: str) -> Any:
        module = _MODULE_OF.get(name)
        if module is not None:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
        return super().__getattribute__(name)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *__all__})


sys.modules[__name__].__class__ = _Package
