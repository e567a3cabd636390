"""The approximation / amortization gap table of docs/results.md (issue 9) from ``gpvae gap``
outputs: one Markdown row per method, mean ± sd over seeds of the per-seed means, and
two-sided paired t-tests against the reference method over seeds (each seed shares its split
and its test images across methods), plus the pooled per-image paired difference.

    python scripts/gap_table.py ROOT --methods vae,cmvae,gpvae --seeds 0,1,2 [--csv gap.csv]

reads ROOT/METHOD/seedS/gap.csv (written by ``gpvae gap ... --csv``); the first method is
the reference.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

COLUMNS = ("log_px", "elbo_q", "elbo_qstar", "approximation_gap", "amortization_gap")
LABELS = {"log_px": "log p̂(x)", "elbo_q": "L[q]", "elbo_qstar": "L[q*]",
          "approximation_gap": "approx. gap", "amortization_gap": "amort. gap"}


def read(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return {c: [float(r[c]) for r in rows] for c in COLUMNS} | {
        "index": [int(r["index"]) for r in rows]}


def mean(v):
    return sum(v) / len(v)


def sd(v):
    if len(v) < 2:
        return math.nan
    m = mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def main() -> None:
    from scipy import stats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("--methods", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--csv", default="gap.csv", help="file name inside each run directory")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    data = {m: {s: read(Path(args.root) / m / f"seed{s}" / args.csv) for s in seeds}
            for m in methods}
    ref = methods[0]
    for m in methods:
        for s in seeds:
            if data[m][s]["index"] != data[ref][s]["index"]:
                raise SystemExit(f"{m} seed {s} was measured on other images than {ref}")
    n = len(data[ref][seeds[0]]["index"])
    print(f"mean ± sd over seeds {seeds} of each seed's mean over {n} test images (nats); "
          f"Δ: paired over seeds vs {ref} (p: two-sided paired t-test, df={len(seeds) - 1}); "
          "per image: pooled paired difference ± se over all seeds' images\n")
    head = "| method | " + " | ".join(LABELS[c] for c in COLUMNS) + \
        f" | Δ amort. gap vs {ref} (p) | Δ amort. gap per image (± se) |"
    print(head)
    print("|" + "---|" * (len(COLUMNS) + 3))
    for m in methods:
        cells = []
        for c in COLUMNS:
            per_seed = [mean(data[m][s][c]) for s in seeds]
            cells.append(f"{mean(per_seed):.2f} ± {sd(per_seed):.2f}")
        if m == ref:
            cells += ["—", "—"]
        else:
            a = [mean(data[m][s]["amortization_gap"]) for s in seeds]
            b = [mean(data[ref][s]["amortization_gap"]) for s in seeds]
            p = stats.ttest_rel(a, b).pvalue if len(seeds) > 1 else math.nan
            diff = [x - y for x, y in zip(a, b)]
            cells.append(f"{mean(diff):+.2f} (p = {p:.3g})")
            pooled = [x - y for s in seeds for x, y in
                      zip(data[m][s]["amortization_gap"], data[ref][s]["amortization_gap"])]
            cells.append(f"{mean(pooled):+.2f} ± {sd(pooled) / math.sqrt(len(pooled)):.2f}")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
