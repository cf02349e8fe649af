"""Exceptions raised by fxgradnas; each message names the cause and what to try.

``except FxGradNasError`` catches every error fxgradnas raises on purpose. An argument fxgradnas cannot
use raises :class:`ArgumentError` (a ``ValueError``) or :class:`ArgumentTypeError` (a ``TypeError``), or
one of their subclasses, before any capture or calibration runs.
"""


class FxGradNasError(Exception):
    """Base class of every error fxgradnas raises on purpose."""


class ArgumentError(FxGradNasError, ValueError):
    """An argument has a value fxgradnas cannot use; the message names the argument, the value and the fix."""


class ArgumentTypeError(FxGradNasError, TypeError):
    """An argument has a type fxgradnas cannot use; the message names the argument, the type and the fix."""


class CaptureError(FxGradNasError):
    """The model could not be captured as a graph."""


class AnalysisError(FxGradNasError):
    """The captured graph could not be analysed."""


class PlanError(ArgumentError):
    """A plan is malformed or does not fit the model it is applied to."""


class UnknownGroupError(FxGradNasError, KeyError):
    """No group has the name asked for."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RewriteError(FxGradNasError):
    """The physically pruned module could not be built or does not match the masked one."""


class CalibrationError(FxGradNasError):
    """Calibration data, loss or device do not allow scoring."""


class DataError(CalibrationError, ArgumentError):
    """The calibration data (or a batch of it) cannot be read as given: empty, not an iterable of batches,
    or a batch that does not match the example inputs the model was captured with."""


class ConstraintError(ArgumentError):
    """A constraint is malformed or cannot be met."""

