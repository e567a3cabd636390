"""The q(W, U) learning-rate table of docs/results.md (issue 9, item 4): per GPVAE run
directory ROOT/ARM/seedS, the per-epoch q(W, U) summaries of metrics.csv (the gp_* columns)
at a few epochs, the best validation ELBO, the test IWAE of ``eval.json`` (written by
``gpvae evaluate ... --json > RUN/eval.json``) with its paired difference to the first arm
(over the seeds both have; two-sided paired t-test), and, when there, the mean amortization
gap (``gpvae gap ... --json > RUN/gap.json``) and the Spearman correlation of the uncertainty
Tr V(f) + Tr V(h) with it (``gpvae uncertainty ... --gap-csv RUN/gap.csv --json >
RUN/uncertainty_gap.json``).

    python scripts/qwu_table.py ROOT --arms default,lr0.005,lr0.05 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

GP = ("gp_mu_norm", "gp_eta_norm", "gp_sigma_trace", "gp_gamma_trace", "gp_sigma_logdet",
      "gp_gamma_logdet")


def load(run: Path) -> dict | None:
    if not (run / "metrics.csv").is_file():
        return None
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {"rows": rows, "best": max(float(r["valid_elbo"]) for r in rows)}
    for name in ("eval", "gap", "uncertainty_gap"):
        p = run / f"{name}.json"
        if p.is_file():
            out[name] = json.loads(p.read_text())
    return out


def ms(v):
    v = [x for x in v if x is not None]
    if not v:
        return "—"
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return f"{m:.2f} ± {s:.2f}" if len(v) > 1 else f"{m:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("--arms", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", default="1,5,20", help="epochs whose gp_* values to show")
    args = ap.parse_args()
    arms = args.arms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs = [int(e) for e in args.epochs.split(",")]
    runs = {a: {s: load(Path(args.root) / a / f"seed{s}") for s in seeds} for a in arms}
    print("Test IWAE-100 (1000 test images), best validation ELBO, amortization gap (100 "
          "test images): mean ± sd over the seeds present\n")
    from scipy import stats

    ref = arms[0]
    print(f"| arm | seeds | test IWAE-100 | Δ IWAE vs {ref} (± se; paired p) | best valid ELBO | "
          "amortization gap | Spearman(uncertainty, amortization gap) per seed |")
    print("|---|---|---|---|---|---|---|")
    for a in arms:
        got = [r for r in runs[a].values() if r is not None]
        both = [s for s in seeds if runs[a][s] and runs[ref][s] and "eval" in runs[a][s]
                and "eval" in runs[ref][s]]
        if a == ref or len(both) < 2:
            delta = "—"
        else:
            d = [runs[a][s]["eval"]["test_iwae"] - runs[ref][s]["eval"]["test_iwae"]
                 for s in both]
            m = sum(d) / len(d)
            se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
            p = stats.ttest_rel([runs[a][s]["eval"]["test_iwae"] for s in both],
                                [runs[ref][s]["eval"]["test_iwae"] for s in both]).pvalue
            delta = f"{m:+.2f} ± {se:.2f}; p = {p:.3g}"
        rho = ", ".join(f"{r['uncertainty_gap']['spearman_vs_amortization_gap']['total']['rho']:+.2f}"
                        for r in got if "uncertainty_gap" in r) or "—"
        print(f"| {a} | {len(got)} | {ms([r['eval']['test_iwae'] for r in got if 'eval' in r])} | "
              f"{delta} | {ms([r['best'] for r in got])} | "
              f"{ms([r['gap']['amortization_gap']['mean'] for r in got if 'gap' in r])} | {rho} |")
    print(f"\nq(W, U) over training (seed {seeds[0]}): ||mu||_F, ||eta||_F, mean_j tr Sigma_j, "
          "mean_j tr Gamma_j, mean_j log det Sigma_j, mean_j log det Gamma_j\n")
    print("| arm | epoch | " + " | ".join(GP) + " |")
    print("|---|---|" + "---|" * len(GP))
    for a in arms:
        r = runs[a][seeds[0]]
        if r is None:
            continue
        for row in r["rows"]:
            if int(row["epoch"]) in epochs:
                print(f"| {a} | {row['epoch']} | " +
                      " | ".join(f"{float(row[k]):.4g}" for k in GP) + " |")


if __name__ == "__main__":
    main()
