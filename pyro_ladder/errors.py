"""Errors that mean "the input is wrong", each carrying a one-line fix.

The command line catches :class:`PyroLadderError` and prints its message with exit
status 2 and no traceback; everything else is a bug and keeps its traceback.
"""


class PyroLadderError(Exception):
    """Base class: a problem with the user's input, reported in one line."""


class ConfigError(PyroLadderError, ValueError):
    """An option or configuration value is invalid (sizes, names, unknown keys)."""


class DataError(PyroLadderError, ValueError):
    """A data set is missing, malformed, or does not suit the chosen likelihood."""


class CheckpointError(PyroLadderError, ValueError):
    """A checkpoint is missing, truncated, corrupted, or not one of ours."""


class TrainingError(PyroLadderError, RuntimeError):
    """Training cannot go on (a NaN or infinite loss); the message names the step."""


class NumericalError(PyroLadderError, ArithmeticError):
    """A computation produced NaN or infinity where a number was due; nothing is reported."""
