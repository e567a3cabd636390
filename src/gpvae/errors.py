"""Exceptions that the CLI turns into one-line messages (no traceback).

Every error a user can cause by bad input (missing or corrupt data, unknown data set
or model, bad flag values, unreadable checkpoints) is raised as a subclass of
:class:`GpvaeError` with a message that says what was expected and how to fix it.
"""


class GpvaeError(Exception):
    """Base class for user-facing errors."""


class DataError(GpvaeError):
    """A data set is missing, corrupt, or unknown."""


class ConfigError(GpvaeError):
    """An invalid option value (negative epochs, unknown model, ...)."""


class CheckpointError(GpvaeError):
    """A run directory or checkpoint is missing, corrupt or not a gpvae checkpoint."""


class TrainingDivergedError(GpvaeError):
    """The loss or a gradient became NaN/inf; the message names epoch and step."""
