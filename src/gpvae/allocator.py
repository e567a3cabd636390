"""The C library's memory allocator, set for PyTorch's CPU work (glibc on Linux).

PyTorch's CPU tensors come from ``malloc``.  glibc serves a request above its *mmap
threshold* with a fresh ``mmap`` (returned to the system on ``free``), and hands free memory
at the top of its heap beyond the *trim threshold* back to the system; either way the next
batch's activations are faulted in again page by page (the kernel zeroes each page).  Both
thresholds adapt to what the process has freed so far (freeing an mmapped block raises the
mmap threshold to its size and the trim threshold to twice that), so a network that
allocates the same activations batch after batch may fault in every page of them on every
call (a 3 MiB activation is 768 pages of 4 KiB) -- or none, depending on what the process
happened to free earlier.  A timing then depends on the process's history, not just on the
code (measured: docs/benchmarks.md, "The memory allocator").

:func:`tune_cpu_allocator` fixes the thresholds (``mallopt``): blocks below
``mmap_threshold`` (32 MiB, glibc's largest adaptive value) come from the heap and are
reused, and up to ``trim_threshold`` (256 MiB) of free memory at the top of the heap is
kept for the next batch instead of being handed back.  The values computed are the same;
only where the memory comes from changes.  The cost: the process may hold up to
``trim_threshold`` of freed memory.

The ``gpvae`` command does this at start (and its grid workers); a library user can call
it.  It does nothing where it does not apply (not glibc), when the environment sets
``GPVAE_CPU_ALLOCATOR=default``, or when the user set glibc's own ``MALLOC_MMAP_THRESHOLD_``
/ ``MALLOC_TRIM_THRESHOLD_`` (their choice wins).  jemalloc or tcmalloc preloaded with
``LD_PRELOAD`` replace ``malloc`` altogether and are unaffected.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20

#: the environment variable that turns the tuning off (``default``: leave glibc's)
ENV = "GPVAE_CPU_ALLOCATOR"
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None


def _glibc():
    """glibc's ``mallopt`` as a ctypes function, or None where this is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_cpu_allocator(mmap_threshold: int = MMAP_THRESHOLD,
                       trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds (module docstring); returns whether they are set
    (by this call or an earlier one).  Idempotent; never raises."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(ENV, "").strip().lower() in ("default", "off", "0"):
        _applied = False
    elif any(name in os.environ for name in _GLIBC_ENV):
        _applied = False
    else:
        mallopt = _glibc()
        # mallopt returns 1 on success; the trim threshold first (setting either one stops
        # glibc adapting both, and the heap must not be trimmed below the mmap threshold)
        _applied = bool(mallopt is not None
                        and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
                        and mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1)
    return _applied
