"""Where a grid stands: each run done, running, failed or pending (``gpvae grid --status``).

A run is **done** when its ``eval.json`` scores what the spec asks for, **running** when a
live process holds its run directory's lock (a killed process holds none), **failed**
when its last attempt left an ``error.json`` (the next ``gpvae grid`` retries it), and
**pending** otherwise (never started, or killed midway: the next ``gpvae grid`` resumes it).
"""
from __future__ import annotations

from collections import Counter

from .runs import ERROR_FILE, RunSpec, finished_eval, lock_held, read_json

STATES = ("done", "running", "failed", "pending")


def run_state(run: RunSpec) -> tuple[str, dict | None]:
    """(state, its record): the ``eval.json`` of a done run, the ``error.json`` of a failed
    one, else None."""
    ev = finished_eval(run)
    if ev is not None:
        return "done", ev
    if lock_held(run.run_dir):
        return "running", None
    err = read_json(run.run_dir / ERROR_FILE)
    if isinstance(err, dict):
        return "failed", err
    return "pending", None


#: the error type (``error.json``) of a run whose checkpoint or run files cannot be used: a
#: rerun resumes from the same damaged files and fails the same way
CHECKPOINT_ERROR = "CheckpointError"


def grid_status(runs) -> dict:
    """``{"cells": {(dataset, d, method): Counter of states}, "totals": Counter,
    "failed": [(label, "Type: message")], "states": {label: state}, "hints": {label: what
    to do}}``; a run that failed on its checkpoint (:data:`CHECKPOINT_ERROR`) gets the hint
    to delete its directory, also appended to its failure."""
    cells: dict = {}
    totals: Counter = Counter()
    failed, states, hints = [], {}, {}
    for run in runs:
        state, record = run_state(run)
        cells.setdefault(run.key[:3], Counter())[state] += 1
        totals[state] += 1
        states[run.label] = state
        if state == "failed":
            kind = record.get("type", "Error")
            error = f"{kind}: {record.get('error', '?')}"
            if kind == CHECKPOINT_ERROR:
                hints[run.label] = ("a rerun fails the same way (it cannot repair the run's "
                                    f"files): delete {run.run_dir} to train the run anew")
                error += f"; {hints[run.label]}"
            failed.append((run.label, error))
    return {"cells": cells, "totals": totals, "failed": failed, "states": states,
            "hints": hints}


def _bar(counts: Counter, width: int = 20) -> str:
    total = sum(counts.values())
    done = round(width * counts["done"] / total) if total else 0
    run = round(width * (counts["done"] + counts["running"]) / total) - done if total else 0
    return "[" + "#" * done + ">" * run + "." * (width - done - run) + "]"


def format_status(status: dict, out) -> str:
    """The ``--status`` text: one row per (dataset, d, method) cell, then the failures."""
    t = status["totals"]
    total = sum(t.values())
    lines = [f"grid {out}: {total} runs: " + ", ".join(f"{t[s]} {s}" for s in STATES), ""]
    rows = [("dataset", "d", "method", "done", "running", "failed", "pending", "")]
    for (dataset, d, label), c in status["cells"].items():
        n = sum(c.values())
        rows.append((dataset, str(d), label, f"{c['done']}/{n}", str(c["running"]),
                     str(c["failed"]), str(c["pending"]), _bar(c)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if status["failed"]:
        lines += ["", f"failed runs ({len(status['failed'])}; the next gpvae grid retries "
                      "them):"]
        lines += [f"  {label}: {error}" for label, error in status["failed"]]
    return "\n".join(lines) + "\n"
