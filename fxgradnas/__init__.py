"""fxgradnas: gradient-scored structured pruning of PyTorch models as a torch.fx graph pass."""

from .analysis import Analysis, Group, analyze
from .capture import Captured, capture
from .errors import AnalysisError, CaptureError, FxGradNasError, PlanError, RewriteError
from .instrument import instrument, masked
from .plan import Plan
from .rewrite import apply_plan

__all__ = [
    "Analysis", "AnalysisError", "CaptureError", "Captured", "FxGradNasError", "Group", "Plan", "PlanError",
    "RewriteError", "analyze", "apply_plan", "capture", "instrument", "masked",
]
__version__ = "0.1.0"
