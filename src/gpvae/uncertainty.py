"""Per-instance uncertainty of the posterior approximation (paper Sec. 3.3 step 3, Sec. 5.3).

For the GPVAE, Tr V(f(x)|D) = psi^m(x)^T (sum_j Sigma_j) psi^m(x) and Tr V(h(x)|D) likewise
with psi^s and Gamma_j; Fig. 1 ranks test images by their sum.  The paper's claim is that
high uncertainty marks images whose true posterior is far from Gaussian.  To let you check
that on your own run, ``gpvae uncertainty`` also reports each image's IWAE - ELBO gap (an
estimate of how far q(z|x) is from p(z|x): it tends to KL(q || p(z|x)) as K grows) and the
Spearman rank correlation between the two.

With ``--gap-csv`` (a file written by ``gpvae gap`` on the same run, test images and
checkpoint) it also reports each image's amortization gap L[q*] - L[q] (Cremer et al. 2018:
what per-instance optimization of a diagonal Gaussian gains over the encoder) and the
Spearman correlation of each uncertainty (Tr V(f), Tr V(h), their sum) with it, with a
paired percentile-bootstrap 95% interval (:func:`spearman_bootstrap`).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_text, json_text
from .devices import model_device_dtype
from .errors import UnsupportedError
from .models.base import without_grad
from .progress import progress_bar


def instance_uncertainty(model, data, batch_size: int = 256, device="cpu",
                         progress: bool = True) -> dict[str, torch.Tensor]:
    """{"tr_f", "tr_h", "total"}: one value per image of ``data`` (an ImageData), from
    ``model.uncertainty`` (:class:`~gpvae.errors.UnsupportedError` for a model without it),
    on the images prepared as every evaluation prepares them
    (:func:`gpvae.evaluation.prepared_batches`: a binary likelihood's fixed binarization)."""
    if not model.supports_uncertainty():
        raise UnsupportedError(f"model {type(model).__name__} has no per-instance uncertainty "
                               "(only the GPVAE defines Tr V(f(x)|D), Tr V(h(x)|D))")
    from .evaluation import prepared_batches

    out: dict[str, list] = {"tr_f": [], "tr_h": []}
    bar = progress_bar(len(data), desc="uncertainty", unit="img", enabled=progress)
    with torch.inference_mode():
        # the images as evaluate and gap score them (a binary likelihood: binarized, the
        # encoder's inputs in training), so the uncertainty pairs with their gaps
        for _, x in prepared_batches(model, data, batch_size, *model_device_dtype(model, device)):
            u = without_grad(model, model.uncertainty, x)
            for k in out:
                out[k].append(u[k].detach().double().cpu())
            bar.update(x.shape[0])
    bar.close()
    res = {k: torch.cat(v) for k, v in out.items()}
    res["total"] = res["tr_f"] + res["tr_h"]
    return res


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy import stats

    return float(stats.spearmanr(a.numpy(), b.numpy()).statistic)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of a, b (R, n): Pearson's correlation of the rows'
    average ranks (ties share the mean of the ranks they span); NaN for a constant row."""
    from scipy import stats

    ra = stats.rankdata(a, axis=1)
    rb = stats.rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(1) / np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))


def bootstrap_indices(n: int, resamples: int, seed: int, chunk: int = 256):
    """The resamples of :func:`spearman_bootstrap`: index arrays (r, n) of r <= ``chunk``
    resamples each, n draws with replacement from 0..n-1, from
    ``numpy.random.default_rng(seed)``, chunk after chunk."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        yield rng.integers(0, n, size=(min(chunk, resamples - start), n))


def spearman_bootstrap(a: torch.Tensor, b: torch.Tensor, resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> dict:
    """Spearman's rho of paired per-instance values a, b (n,) and its percentile bootstrap
    interval: the instances are resampled with replacement ``resamples`` times, pairs kept
    together (:func:`bootstrap_indices`), rho recomputed on each resample, and the
    (1 - level)/2 and (1 + level)/2 quantiles of those (resamples where a or b is constant
    have no rho and are left out) bound the interval.  {"rho", "ci_low", "ci_high",
    "level", "resamples"}."""
    an, bn = a.double().cpu().numpy(), b.double().cpu().numpy()
    if an.shape != bn.shape or an.ndim != 1 or an.size < 2:
        raise ValueError(f"spearman_bootstrap needs two (n,) arrays with n >= 2, got "
                         f"{an.shape} and {bn.shape}")
    rhos = np.concatenate([_spearman_rows(an[idx], bn[idx])
                           for idx in bootstrap_indices(an.size, resamples, seed)])
    rhos = rhos[np.isfinite(rhos)]
    lo, hi = (np.quantile(rhos, [(1 - level) / 2, (1 + level) / 2]) if rhos.size
              else (math.nan, math.nan))
    return {"rho": spearman(a.double().cpu(), b.double().cpu()), "ci_low": float(lo),
            "ci_high": float(hi), "level": level, "resamples": resamples}


def summarize(values: torch.Tensor) -> dict:
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {"mean": float(v.mean()), "sd": float(v.std()) if v.numel() > 1 else math.nan,
            "min": float(v.min()), "p05": float(q[0]), "median": float(q[1]),
            "p95": float(q[2]), "max": float(v.max())}


def uncertainty_report(model, test, *, device, gap_samples: int, seed: int, progress: bool,
                       amortization_gap: torch.Tensor | None = None, bootstrap: int = 2000):
    """Per-instance table (list of dict rows) and a summary dict.  ``amortization_gap``
    (N,), one per image of ``test`` (from ``gpvae gap``): added to the rows, summarized, and
    the Spearman correlation of each uncertainty with it, with a ``bootstrap``-resample 95%
    interval (:func:`spearman_bootstrap`, seeded by ``seed``)."""
    from .evaluation import estimate

    u = instance_uncertainty(model, test, device=device, progress=progress)
    rows = [{"index": i, "tr_f": float(u["tr_f"][i]), "tr_h": float(u["tr_h"][i]),
             "total": float(u["total"][i])} for i in range(len(test))]
    summary = {k: summarize(u[k]) for k in ("tr_f", "tr_h", "total")}
    summary["n"] = len(test)
    if gap_samples > 0:
        est = estimate(model, test, samples=gap_samples, device=device, seed=seed,
                       progress=progress)
        gap = est.iwae - est.elbo
        for i, row in enumerate(rows):
            row.update(iwae=float(est.iwae[i]), elbo=float(est.elbo[i]), gap=float(gap[i]))
        summary["gap"] = summarize(gap)
        summary["gap_samples"] = gap_samples
        summary["spearman_total_vs_gap"] = spearman(u["total"], gap)
    if amortization_gap is not None:
        amort = amortization_gap.double().cpu()
        if amort.shape != (len(test),):
            raise ValueError(f"amortization_gap must have one value per image ({len(test)}), "
                             f"got shape {tuple(amort.shape)}")
        for i, row in enumerate(rows):
            row["amortization_gap"] = float(amort[i])
        summary["amortization_gap"] = summarize(amort)
        summary["spearman_vs_amortization_gap"] = {
            k: spearman_bootstrap(u[k], amort, bootstrap, seed) for k in ("tr_f", "tr_h", "total")}
        summary["bootstrap"] = bootstrap
    return rows, summary, u


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run_uncertainty(args) -> dict:
    from .checkpoint import PNG, OutputKind, check_output_file
    from .devices import resolve_device
    from .errors import OutputError
    from .rundir import load_run, read_config, run_test_split

    device = resolve_device(args.device)
    read_config(args.run_dir)
    csv_path = check_output_file(args.csv or Path(args.run_dir) / "uncertainty.csv", "--csv",
                                 OutputKind.csv("an uncertainty CSV", "index,tr_f,tr_h,total"))
    if args.png:
        check_output_file(args.png, "--png", PNG)
        if Path(args.png).suffix.lower() != ".png":
            raise OutputError(f"--png {args.png}: the figure is a PNG image; name a .png file")
    gap_csv = getattr(args, "gap_csv", None)
    gap = None
    if gap_csv:
        from .gap import check_gap_source, read_gap_csv

        gap = read_gap_csv(gap_csv)
        check_gap_source(gap, args.checkpoint, gap_csv, args.run_dir)
    model, cfg = load_run(args.run_dir, args.checkpoint, device)
    if not model.supports_uncertainty():
        raise UnsupportedError(f"{args.run_dir} holds a {cfg.model!r} model, which has no "
                               "per-instance uncertainty; uncertainty needs a GPVAE run "
                               "(train with --model gpvae)")
    test = run_test_split(cfg, args.data_dir, args.limit_test)
    if gap is not None:
        from .gap import check_gap_matches

        check_gap_matches(gap, len(test), gap_csv, args.run_dir)
    rows, summary, u = uncertainty_report(
        model, test, device=device, gap_samples=args.gap_samples, seed=args.seed,
        progress=not args.no_progress,
        amortization_gap=None if gap is None else gap["amortization_gap"],
        bootstrap=getattr(args, "bootstrap", 2000))
    if gap is not None:
        summary["gap_csv"] = str(gap_csv)
    atomic_write_text(csv_path, rows_to_csv(rows))
    summary["csv"] = str(csv_path)
    if args.png:
        from .plots import uncertainty_extremes

        order = torch.argsort(u["total"])
        k = min(8, len(order) // 2) or 1
        summary["png"] = str(uncertainty_extremes(
            model, test, order[:k], order[-k:], args.png,
            gaps=None if gap is None else gap["amortization_gap"]))
    if args.json:
        print(json_text(summary))
    else:
        print(f"GPVAE uncertainty on {summary['n']} {cfg.dataset} test images ({args.run_dir})")
        print(f"{'':<22}{'mean':>11}{'median':>11}{'p05':>11}{'p95':>11}")
        for key, label in (("tr_f", "Tr V(f(x)|D)"), ("tr_h", "Tr V(h(x)|D)"),
                           ("total", "sum"), ("gap", "IWAE - ELBO gap")):
            if key in summary:
                s = summary[key]
                print(f"{label:<22}{s['mean']:>11.4g}{s['median']:>11.4g}{s['p05']:>11.4g}"
                      f"{s['p95']:>11.4g}")
        if "amortization_gap" in summary:
            s = summary["amortization_gap"]
            print(f"{'amortization gap':<22}{s['mean']:>11.4g}{s['median']:>11.4g}"
                  f"{s['p05']:>11.4g}{s['p95']:>11.4g}")
        if "spearman_total_vs_gap" in summary:
            print(f"Spearman correlation(uncertainty, gap) = {summary['spearman_total_vs_gap']:.3f}")
        for key, label in (("tr_f", "Tr V(f(x)|D)"), ("tr_h", "Tr V(h(x)|D)"), ("total", "sum")):
            if "spearman_vs_amortization_gap" in summary:
                c = summary["spearman_vs_amortization_gap"][key]
                print(f"Spearman correlation({label}, amortization gap) = {c['rho']:.3f} "
                      f"(95% bootstrap interval {c['ci_low']:.3f} to {c['ci_high']:.3f}, "
                      f"{summary['bootstrap']} resamples)")
        print(f"per-instance values: {csv_path}")
        if "png" in summary:
            print(f"least / most uncertain images: {summary['png']}")
    return summary
