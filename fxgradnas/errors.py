"""Exceptions raised by fxgradnas; each message names the cause and what to try."""


class FxGradNasError(Exception):
    """Base class of every error fxgradnas raises on purpose."""


class CaptureError(FxGradNasError):
    """The model could not be captured as a graph."""


class AnalysisError(FxGradNasError):
    """The captured graph could not be analysed."""


class PlanError(FxGradNasError):
    """A plan does not fit the model it is applied to."""


class RewriteError(FxGradNasError):
    """The physically pruned module could not be built or does not match the masked one."""


class CalibrationError(FxGradNasError):
    """Calibration data, loss or device do not allow scoring."""


class ConstraintError(FxGradNasError):
    """A constraint is malformed or cannot be met."""
