"""Progress bars: tqdm on a terminal; sparse updates when stderr is a log file."""
from __future__ import annotations

import sys


def progress_bar(total: int, desc: str = "", unit: str = "it", enabled: bool = True, **kw):
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.2 if interactive else 30.0, leave=interactive, **kw)
