"""fxgradnas: gradient-scored structured pruning of PyTorch models as a torch.fx graph pass."""

from .analysis import Analysis, Group, analyze
from .calibrate import calibrate
from .capture import Captured, capture
from .cost import CostModel
from .errors import (
    AnalysisError,
    CalibrationError,
    CaptureError,
    ConstraintError,
    FxGradNasError,
    PlanError,
    RewriteError,
)
from .instrument import instrument, masked
from .plan import Plan
from .prune import PruneResult, prune, score
from .rewrite import apply_plan
from .scores import Scores, l1_scores, random_scores
from .search import SearchResult, search

__all__ = [
    "Analysis", "AnalysisError", "CalibrationError", "CaptureError", "Captured", "ConstraintError", "CostModel",
    "FxGradNasError", "Group", "Plan", "PlanError", "PruneResult", "RewriteError", "Scores", "SearchResult",
    "analyze", "apply_plan", "calibrate", "capture", "instrument", "l1_scores", "masked", "prune",
    "random_scores", "score", "search",
]
__version__ = "0.1.0"
