"""Progress: a redrawn tqdm bar on a terminal, plain lines in a log.

:func:`progress_bar` picks the mode from where stderr goes, or from the environment
variable ``GPVAE_PROGRESS``:

* ``bar`` (stderr is a terminal): tqdm, redrawn in place;
* ``lines`` (stderr is a file, a pipe, a Slurm log, a worker process): no redraws; one
  line each time the caller reports a result with ``set_postfix`` (the trainer does once
  per epoch, with the validation ELBO), otherwise at most one line every
  :data:`LINE_INTERVAL` seconds, and a last one at ``close`` if anything is unreported;
* ``off``: nothing.

Lines are prefixed with the label set by :func:`line_prefix` (a grid names the run), so
the logs of several runs interleaved in one file stay readable.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

#: seconds between two lines of a bar that reports no results (an evaluation)
LINE_INTERVAL = 60.0
_MODES = ("bar", "lines", "off")
_prefix: list[str] = []


def progress_mode() -> str:
    """``bar``, ``lines`` or ``off``: ``GPVAE_PROGRESS`` if set to one of them, else
    ``bar`` when stderr is a terminal and ``lines`` when it is not."""
    mode = os.environ.get("GPVAE_PROGRESS", "").strip().lower()
    if mode in _MODES:
        return mode
    return "bar" if sys.stderr.isatty() else "lines"


@contextlib.contextmanager
def line_prefix(label: str):
    """Prefix every progress line written inside the ``with`` block with ``label``."""
    _prefix.append(label)
    try:
        yield
    finally:
        _prefix.pop()


def progress_bar(total: int, desc: str = "", unit: str = "it", enabled: bool = True, **kw):
    """A progress bar with tqdm's ``update``, ``set_description``, ``set_postfix`` and
    ``close`` in the mode :func:`progress_mode` says (``enabled=False``: silent)."""
    mode = progress_mode() if enabled else "off"
    if mode == "lines":
        return LineProgress(total, desc=desc, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=mode == "off", dynamic_ncols=True,
                mininterval=0.2, leave=True, **kw)


def echo(message: str) -> None:
    """Print a log line to stderr without breaking a tqdm bar drawn there."""
    if progress_mode() == "bar":
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class LineProgress:
    """The ``lines`` mode of :func:`progress_bar`: one line per reported result, e.g.
    ``mnist/d10/vae/split0/init0 | epoch 3/20 | 72/480 step (15%) | 12.3 s | valid_elbo=-98.1``.
    """

    def __init__(self, total: int, desc: str = "", unit: str = "it", stream=None,
                 interval: float = LINE_INTERVAL):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self.stream = stream
        self.interval = interval
        self.start = self._last = time.monotonic()
        self._reported = None  # (n, postfix) of the last line
        self.prefix = _prefix[-1] if _prefix else ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._line()

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())
        self._line()

    def close(self) -> None:
        if self._reported != (self.n, self.postfix):
            self._line()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _line(self) -> None:
        now = time.monotonic()
        self._last = now
        self._reported = (self.n, self.postfix)
        done = f"{self.n}/{self.total} {self.unit}"
        if self.total:
            done += f" ({100 * self.n // self.total}%)"
        parts = [p for p in (self.prefix, self.desc, done, f"{now - self.start:.1f} s",
                             self.postfix) if p]
        print(" | ".join(parts), file=self.stream or sys.stderr, flush=True)
