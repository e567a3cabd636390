"""Run directories: what a run writes where, and who may write it.

A run directory (``gpvae train --out DIR``) holds ``config.json``, ``last.safetensors``,
``best.safetensors``, ``metrics.csv`` and ``tensorboard/`` (see :mod:`gpvae.training`), and
a lock file ``.gpvae.lock``.  The rules, enforced before any training work starts:

* only one process writes a run directory at a time: the writer holds an exclusive
  ``flock`` on the lock file, which the kernel releases when the process ends however it
  ends (``kill -9`` included), so a dead run never leaves the directory stuck; a second
  writer is refused with a one-line error naming the holder's pid;
* a new run goes only into a new or empty directory (the lock file aside), never over a
  user's files; an existing run is continued only with ``--resume``;
* a directory that cannot be written (a file, a read-only file system, ``/proc``) is a
  one-line error.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import CheckpointError, ConfigError, OutputError, describe

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not guarded
    fcntl = None

CONFIG_FILE = "config.json"
LAST = "last.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.csv"
LOCK_FILE = ".gpvae.lock"
#: the files the trainer writes (atomically, under the lock)
RUN_FILES = (CONFIG_FILE, LAST, BEST, METRICS)


def check_out_path(out) -> Path:
    """``--out`` as a Path; refuses the empty string (which would mean the current
    directory by accident) and a path that exists but is not a directory."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).strip():
        raise ConfigError(f"--out must name a directory, got {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} exists and is not a directory")
    return path


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextlib.contextmanager
def locked_run_dir(out, *, create: bool):
    """Hold the exclusive write lock of run directory ``out`` for the ``with`` block.

    ``create``: make the directory (and its parents) if it does not exist; otherwise it
    must exist.  Raises :class:`~gpvae.errors.ConfigError` if another process holds the lock
    and :class:`~gpvae.errors.OutputError` if the directory cannot be created or written.
    """
    path = check_out_path(out)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise CheckpointError(f"{path} is not a gpvae run directory (it does not exist)")
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write the run directory {path}: {describe(exc)}") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{path} is being written by another gpvae process"
                                  f"{_holder(fd)}; wait for it to finish or choose another "
                                  "--out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def foreign_entries(path: Path) -> list[str]:
    """What ``path`` holds besides the lock file (sorted)."""
    return sorted(e for e in os.listdir(path) if e != LOCK_FILE)


def require_empty(path: Path) -> None:
    """A new run may only be written into a new or empty directory."""
    held = foreign_entries(path)
    if not held:
        return
    shown = ", ".join(held[:4]) + (f" (+{len(held) - 4} more)" if len(held) > 4 else "")
    if is_run_dir(path):
        raise ConfigError(f"{path} already holds a run; pass --resume to continue it or "
                          "choose another --out")
    raise ConfigError(f"--out {path} is not empty (it holds {shown}); gpvae train writes "
                      "only into a new or empty directory: choose another --out")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a readable gpvae ``config.json``."""
    from .training import read_config

    try:
        read_config(path)
    except (CheckpointError, ConfigError):
        return False
    return True
