"""The paper's tables from a grid's run directories (Tab. 1-4 and 9 layout).

Per data set: rows = methods, columns = latent dimensions, each cell the test IWAE-K over
the grid's splits as "mean (sd)".  The protocol of Sec. 5: in every split, of the runs of
its inits, only the one with the best *validation* ELBO (``best_valid_elbo``, the
checkpoint the run keeps) counts; its test IWAE is that split's value.  A split counts
only when all its inits are done; a cell with fewer than all splits is shown as
incomplete ("[2/3 splits]") and left out of the tests.

The best mean of a column (among complete cells) is bold.  Every other complete cell is
tested against it with two two-sided t-tests over the splits: paired by split
(``scipy.stats.ttest_rel``: every method sees the same splits) and Welch's
(``scipy.stats.ttest_ind(equal_var=False)``); both p-values are reported, and the one the
spec's ``[report] test`` names (default Welch) sets the marks: p > alpha (default 0.01, as
the paper) is marked as no evidence of a difference (the paper's blue; here italic).

Written atomically to ``DIR/report/report.{md,tex,csv,json}`` (under a lock, so the last
of several finishing processes writes the complete tables).  Nothing measured in time
goes in, so a resumed grid gives byte-identical files.  The Tab. 5/11 timing table is not
produced here (``gpvae bench-inference`` prints it).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .runs import finished_eval
from .spec import Grid
from ..checkpoint import json_text

REPORT_DIR = "report"
FILES = ("report.md", "report.tex", "report.csv", "report.json")


def _mean_sd(v: list[float]):
    if not v:
        return None, None
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None
    return m, sd


def _p(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def t_tests(best: list[float], other: list[float]) -> dict:
    """Two-sided p-values of ``other`` against ``best`` (values per split, same order):
    paired by split and Welch's.  None where undefined (one split, zero variance)."""
    from scipy import stats

    if len(best) < 2 or len(best) != len(other):
        return {"p_paired": None, "p_welch": None}
    import warnings

    with warnings.catch_warnings():  # constant inputs: scipy warns and returns nan
        warnings.simplefilter("ignore")
        return {"p_paired": _p(stats.ttest_rel(other, best).pvalue),
                "p_welch": _p(stats.ttest_ind(other, best, equal_var=False).pvalue)}


def select_split(evals: list[dict | None]) -> dict | None:
    """The run a split keeps: of its inits' ``eval.json`` (None: not done), the one with the
    highest best validation ELBO, or None if any init is not done.  The test IWAE plays no
    part in the choice."""
    if not evals or any(e is None for e in evals):
        return None
    return max(evals, key=lambda e: e["best_valid_elbo"])  # first of equals


def build_report(g: Grid, runs) -> dict:
    """The report as a JSON-ready dict (see the module docstring)."""
    evals = {run.key: finished_eval(run) for run in runs}
    n_splits = len(g.split_seeds)
    datasets = {}
    for dataset in g.datasets:
        cells: dict = {}
        for label in g.methods:
            for d in g.latent_dims:
                per_split = []
                for s in g.split_seeds:
                    chosen = select_split([evals.get((dataset, d, label, s, i))
                                           for i in g.init_seeds])
                    if chosen is not None:
                        per_split.append({"split": s, "init": chosen["key"][4],
                                          "best_valid_elbo": chosen["best_valid_elbo"],
                                          "test_iwae": chosen["test_iwae"]})
                mean, sd = _mean_sd([p["test_iwae"] for p in per_split])
                cells.setdefault(label, {})[str(d)] = {
                    "splits_done": len(per_split), "splits_total": n_splits,
                    "complete": len(per_split) == n_splits, "mean": mean, "sd": sd,
                    "best": False, "p_paired": None, "p_welch": None, "no_evidence": None,
                    "per_split": per_split}
        for d in g.latent_dims:
            column = [(label, cells[label][str(d)]) for label in g.methods]
            complete = [(label, c) for label, c in column if c["complete"]]
            if not complete:
                continue
            best_label, best = max(complete, key=lambda lc: lc[1]["mean"])  # first of equals
            best["best"] = True
            ref = [p["test_iwae"] for p in best["per_split"]]
            for label, c in complete:
                if label == best_label:
                    continue
                c.update(t_tests(ref, [p["test_iwae"] for p in c["per_split"]]))
                p = c["p_" + g.test]
                c["no_evidence"] = None if p is None else p > g.alpha
        datasets[dataset] = {"latent_dims": list(g.latent_dims), "methods": list(g.methods),
                             "cells": cells}
    return {"iwae_samples": g.iwae_samples, "epochs": g.epochs,
            "limit_train": g.limit_train, "limit_test": g.limit_test,
            "split_seeds": list(g.split_seeds), "init_seeds": list(g.init_seeds),
            "selection": "per split, the init with the highest validation ELBO",
            "marks": {"test": g.test, "alpha": g.alpha}, "datasets": datasets}


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------
def pretty(label: str) -> str:
    """``sa:2`` -> ``SA(2)``, ``gpvae`` -> ``GPVAE`` (the paper's row names)."""
    name, _, size = label.partition(":")
    return name.upper() + (f"({size})" if size else "")


def _num(c: dict) -> str:
    sd = "–" if c["sd"] is None else f"{c['sd']:.1f}"
    return f"{c['mean']:.1f} ({sd})"


def _caption(r: dict) -> str:
    test = {"welch": "Welch", "paired": "paired-by-split"}[r["marks"]["test"]]
    n, k = len(r["split_seeds"]), len(r["init_seeds"])
    return (f"Test log-likelihood, IWAE-{r['iwae_samples']} in nats (higher is better), on "
            f"each run's own test split: mean (sd) over {n} split(s); in each split the best "
            f"of {k} init(s) by validation ELBO. Runs: {r['epochs']} epochs, "
            f"{r['limit_train'] or 'all'} training images, {r['limit_test'] or 'all'} test "
            f"images. Best mean per column in bold; the others are tested against it with "
            f"a two-sided {test} t-test: p > {r['marks']['alpha']:g} (no evidence of a "
            f"difference) in italics, p <= {r['marks']['alpha']:g} plain. [k/n splits]: "
            "incomplete, not tested.")


def _md_cell(c: dict) -> str:
    if c["splits_done"] == 0:
        return f"– [0/{c['splits_total']} splits]"
    text = _num(c)
    if not c["complete"]:
        return f"{text} [{c['splits_done']}/{c['splits_total']} splits]"
    if c["best"]:
        return f"**{text}**"
    return f"*{text}*" if c["no_evidence"] else text


def _p_text(p) -> str:
    return "–" if p is None else f"{p:.3g}"


def to_markdown(r: dict) -> str:
    lines = ["# gpvae grid report", "", _caption(r), ""]
    for dataset, t in r["datasets"].items():
        head = "| method | " + " | ".join(f"d={d}" for d in t["latent_dims"]) + " |"
        rule = "|---" * (len(t["latent_dims"]) + 1) + "|"
        lines += [f"## {dataset}", "", head, rule]
        for label in t["methods"]:
            cells = [_md_cell(t["cells"][label][str(d)]) for d in t["latent_dims"]]
            lines.append(f"| {pretty(label)} | " + " | ".join(cells) + " |")
        lines += ["", "p-values against the column's best (paired by split / Welch):", "",
                  head, rule]
        for label in t["methods"]:
            cells = []
            for d in t["latent_dims"]:
                c = t["cells"][label][str(d)]
                cells.append("best" if c["best"] else
                             f"{_p_text(c['p_paired'])} / {_p_text(c['p_welch'])}")
            lines.append(f"| {pretty(label)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _tex_cell(c: dict) -> str:
    if c["splits_done"] == 0:
        return "--"
    text = _num(c).replace("–", "--")
    if not c["complete"]:
        return f"{text} [{c['splits_done']}/{c['splits_total']}]"
    if c["best"]:
        return rf"\textbf{{{text}}}"
    return rf"\textit{{{text}}}" if c["no_evidence"] else text


def to_latex(r: dict) -> str:
    out = ["% gpvae grid report: " + _caption(r).replace("%", r"\%"), ""]
    for dataset, t in r["datasets"].items():
        dims = t["latent_dims"]
        out += [f"% {dataset}", r"\begin{tabular}{l" + "c" * len(dims) + "}", r"\hline",
                " & ".join(["", *(rf"$\dim(\mathbf{{z}}) = {d}$" for d in dims)]) + r" \\",
                r"\hline"]
        for label in t["methods"]:
            cells = [_tex_cell(t["cells"][label][str(d)]) for d in dims]
            out.append(" & ".join([pretty(label).replace("_", r"\_"), *cells]) + r" \\")
        out += [r"\hline", r"\end{tabular}", ""]
    return "\n".join(out)


def to_csv(r: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "latent_dim", "method", "splits_done", "splits_total", "mean", "sd",
                "best", "p_paired", "p_welch", "marks_test", "no_evidence",
                "per_split_test_iwae", "per_split_init"])
    blank = lambda v: "" if v is None else v  # noqa: E731
    for dataset, t in r["datasets"].items():
        for label in t["methods"]:
            for d in t["latent_dims"]:
                c = t["cells"][label][str(d)]
                w.writerow([dataset, d, label, c["splits_done"], c["splits_total"],
                            blank(c["mean"]), blank(c["sd"]), c["best"], blank(c["p_paired"]),
                            blank(c["p_welch"]), r["marks"]["test"], blank(c["no_evidence"]),
                            ";".join(repr(p["test_iwae"]) for p in c["per_split"]),
                            ";".join(f"{p['split']}:{p['init']}" for p in c["per_split"])])
    return buf.getvalue()


def render(r: dict) -> dict[str, str]:
    """{file name: text} of the four report files."""
    return {"report.md": to_markdown(r), "report.tex": to_latex(r), "report.csv": to_csv(r),
            "report.json": json_text(r, indent=2) + "\n"}


def write_report(g: Grid, runs, out) -> dict:
    """Build the report from the run directories and write it to ``out/report/`` atomically,
    holding ``out/report/.lock`` so concurrent writers do not interleave; returns it."""
    from ..checkpoint import atomic_write_text

    folder = Path(out) / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with _report_lock(folder):
        r = build_report(g, runs)  # read under the lock: the last writer sees every run
        for name, text in render(r).items():
            atomic_write_text(folder / name, text)
    return r


class _report_lock:
    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self):
        import os

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)  # blocking: report writes are short
        except ImportError:  # pragma: no cover - Windows
            pass
        return self

    def __exit__(self, *exc):
        import os

        os.close(self.fd)
        return False
