"""Exceptions that the CLI turns into one-line messages (no traceback).

Every error a user can cause by bad input (missing or corrupt data, unknown data set
or model, bad flag values, unreadable checkpoints, outputs that cannot be written) is
raised as a subclass of :class:`GpvaeError` with a message that says what was expected
and how to fix it.
"""
import re

_MAX_DETAIL = 300


class GpvaeError(Exception):
    """Base class for user-facing errors."""


class DataError(GpvaeError):
    """A data set is missing, corrupt, or unknown."""


class ConfigError(GpvaeError):
    """An invalid option value (negative epochs, unknown model, ...)."""


class UnsupportedError(ConfigError, NotImplementedError):
    """A method lacks an optional capability (per-instance uncertainty, a fused encoder for
    export): a one-line error on the command line, a NotImplementedError in Python."""


class CheckpointError(GpvaeError):
    """A run directory or checkpoint is missing, corrupt or not a gpvae checkpoint."""


class OutputError(GpvaeError):
    """An output file or directory cannot be written (a directory where a file is meant,
    a read-only file system, a full disk); whatever was there before is left unchanged."""


class CompileError(GpvaeError):
    """A compiled unit failed in a way that left the process unable to run it eagerly
    either (a failed CUDA-graph capture); the message says to rerun with --compile off."""


class TrainingDivergedError(GpvaeError):
    """The loss or a gradient became NaN/inf; the message names epoch and step."""


def one_line(text: object) -> str:
    """``str(text)`` with every line break (and the blanks around it) turned into one space."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()


def describe(exc: BaseException) -> str:
    """A short one-line description of an exception, e.g. ``"ValueError: bad header"``;
    for an OSError its message without the errno prefix, e.g. ``"No space left on device"``."""
    if isinstance(exc, OSError) and exc.strerror:
        msg = exc.strerror
        if exc.filename is not None:
            msg += f": {exc.filename}"
        return one_line(msg)
    msg = one_line(exc)
    if len(msg) > _MAX_DETAIL:
        msg = msg[: _MAX_DETAIL - 3] + "..."
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
