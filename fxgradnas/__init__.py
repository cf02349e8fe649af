"""fxgradnas: gradient-scored structured pruning of PyTorch models as a torch.fx graph pass."""

from .analysis import Analysis, Group, analyze
from .capture import Captured, capture
from .errors import AnalysisError, CaptureError, FxGradNasError

__all__ = ["Analysis", "AnalysisError", "CaptureError", "Captured", "FxGradNasError", "Group", "analyze", "capture"]
__version__ = "0.1.0"
