"""Inference suboptimality: the approximation and amortization gaps of a run's q(z|x).

Cremer, Li & Duvenaud, "Inference Suboptimality in Variational Autoencoders" (ICML 2018)
split the gap between log p(x) and the ELBO of an amortized posterior q(z|x) in two:

    log p(x) - L[q]  =  (log p(x) - L[q*])  +  (L[q*] - L[q])
                         approximation gap      amortization gap

where L[q] = E_q[log p(x|z) + log p(z) - log q(z|x)] is the ELBO (paper eq. 2) and q* is
the best member of a variational family for this one x, found by optimizing its parameters
for x alone (no encoder).  Here q* is fitted in the **diagonal Gaussian** family
N(m, Diag(s^2)), per instance, by Adam on the reparameterized ELBO

    f(m, s; x) = E_{eps ~ N(0, I)}[log p(x | m + s * eps)] - KL(N(m, Diag(s^2)) || N(0, I)),
    KL = 1/2 sum_j (s_j^2 + m_j^2 - 1 - 2 log s_j)          (closed form, p(z) of eq. 1),

started at the amortized q's mean and standard deviation (for a q without closed-form
moments -- a flow -- its sample moments).  All instances of a chunk are one batched problem:
one (B, d) mean and one (B, d) log-std tensor, the per-instance objectives summed (Adam is
elementwise and the instances share no parameter, so each instance follows its own Adam
trajectory).  The decoder is frozen; only ``model.log_likelihood``, ``model.log_prior`` and
``model.posterior`` are used, so every registered method is measured by the same code.

Convergence rule (:func:`fit_diagonal_gaussian`).  Fixed common random numbers eps_eval
(``eval_samples`` draws, the same at every check) give a deterministic score of each
instance, F(m, s) = mean_k log p(x | m + s * eps_k) - KL.  It is evaluated at the start
(check 0: the initial Gaussian) and every ``check_every`` steps (and at the last step), on
the average of the instance's Adam iterates (m, log s) over the window of steps just ended
(Polyak-Ruppert averaging; Adam's iterates jitter around the optimum).  An instance has
**converged** at check c when its score there improves on the previous check's by less than
``tol`` nats, F_c < F_{c-1} + tol (so while an instance runs, each score is its best so
far); it then stops (it is no longer updated or decoded).  The fit stops when every instance
has converged or after ``steps`` steps.  q* is the window average at the instance's last
check.

Estimates (:func:`amortization_gaps`), per instance, in nats:

* L[q] and L[q*]: the same S-sample Monte Carlo ELBO, mean_s(log p(x|z_s) + log p(z_s) -
  log q(z_s|x)), z_s ~ q (generic: flows, mixtures and full covariances too);
* log p^(x): the larger of two IWAE_K estimates (paper Sec. 10), each a stochastic lower
  bound on log p(x): with the run's q as proposal (through
  :func:`gpvae.evaluation.estimate`, exactly what ``gpvae evaluate --iwae-samples K --seed
  SEED`` computes -- on CUDA up to float rounding, where evaluate compiles by default) and
  with q* as proposal.  A poor q (a large amortization gap) makes a
  poor proposal; IWAE with q alone can then fall below L[q*] and give a negative
  approximation gap.  (Where both IWAEs are loose, log p^(x) may still be below L[q*]; the
  summary counts those images.)
* approximation gap = log p^(x) - L[q*], amortization gap = L[q*] - L[q].

When the method's own family is richer than a diagonal Gaussian (flows, mixtures, a full
covariance: :meth:`~gpvae.models.base.LatentVariableModel.variational_family`), L[q*] may be
below L[q] and the "amortization gap" then mixes the family's gain with amortization.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path
from typing import NamedTuple

import torch
from torch.distributions import Independent, Normal

from .checkpoint import atomic_write_text, json_text
from .devices import model_device_dtype
from .errors import ConfigError, DataError, TrainingDivergedError
from .models.base import posterior_without_grad

#: the family q* is fitted in
QSTAR_FAMILY = "diagonal Gaussian"
#: the per-instance CSV columns written by ``gpvae gap`` (and read by ``uncertainty``)
CSV_COLUMNS = ("index", "log_px", "elbo_q", "elbo_qstar", "approximation_gap",
               "amortization_gap", "qstar_converged", "iwae_q", "iwae_qstar", "split",
               "checkpoint", "checkpoint_sha256")
#: the columns every gap file has (files written before ``checkpoint_sha256`` existed too)
REQUIRED_COLUMNS = CSV_COLUMNS[:-1]
#: the per-instance quantities summarized
QUANTITIES = ("log_px", "elbo_q", "elbo_qstar", "approximation_gap", "amortization_gap")


class QStarFit(NamedTuple):
    """Result of :func:`fit_diagonal_gaussian` for B instances."""

    mean: torch.Tensor  # (B, d) of q*
    std: torch.Tensor  # (B, d) of q*
    elbo: torch.Tensor  # (B,) the common-random-number score F of q* (its last check)
    converged: torch.Tensor  # (B,) bool
    steps: torch.Tensor  # (B,) int: Adam steps taken (up to convergence, or all of them)
    history: torch.Tensor  # (checks, B): F at each check; NaN once an instance has stopped
    check_steps: list  # the step of each check (0 first)


@contextlib.contextmanager
def frozen(model):
    """The model's parameters with ``requires_grad`` off for the block (restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def kl_diagonal_to_standard(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, Diag(exp(2 log_std))) || N(0, I)) per instance: (..., d) -> (...)."""
    return 0.5 * (torch.exp(2 * log_std) + mean.square() - 1 - 2 * log_std).sum(-1)


def diagonal_elbo(model, x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
                  eps: torch.Tensor) -> torch.Tensor:
    """mean_k log p(x | mean + exp(log_std) eps_k) - KL(q || p(z)) per instance (B,), for
    eps (K, B, d): the reparameterized ELBO of a diagonal Gaussian with the KL in closed
    form (eq. 2)."""
    z = mean + torch.exp(log_std) * eps
    return model.log_likelihood(x, z).mean(0) - kl_diagonal_to_standard(mean, log_std)


def initial_diagonal_gaussian(q, samples: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (B, d), of q(z|x): its closed-form moments where the distribution
    has them (diagonal and full-covariance Gaussians, mixtures), otherwise -- a flow, whose
    ``mean`` raises NotImplementedError -- the moments of ``samples`` draws.  Without
    gradients."""
    with torch.no_grad():
        try:
            mean, std = q.mean, q.stddev
        except NotImplementedError:
            z = q.sample((samples,))
            mean, std = z.mean(0), z.std(0)
    return mean.detach().clone(), std.detach().clone()


def _diverged(step: int, lr: float) -> TrainingDivergedError:
    return TrainingDivergedError(f"the q* fit diverged at step {step} (its ELBO or gradient "
                                 f"became non-finite); try a smaller --qstar-lr (now {lr:g})")


def fit_diagonal_gaussian(model, x: torch.Tensor, init_mean: torch.Tensor,
                          init_std: torch.Tensor, *, steps: int = 5000, lr: float = 3e-2,
                          tol: float = 0.05, check_every: int = 100, mc_samples: int = 4,
                          eval_samples: int = 16, eval_noise: torch.Tensor | None = None,
                          bar=None) -> QStarFit:
    """Fit q*(z|x) = N(m, Diag(s^2)) to each instance of the batch x (B, C, H, W) by Adam
    (learning rate ``lr``) on the reparameterized ELBO with ``mc_samples`` draws per step
    and the KL to N(0, I) in closed form (:func:`diagonal_elbo`), from (``init_mean``,
    ``init_std``), each (B, d), parameterized as (m, log s).

    All instances are one batched problem (no loop over instances).  Every
    ``check_every`` steps (and at the last step) the average of each instance's iterates
    over the window just ended (Polyak-Ruppert averaging: Adam's iterates jitter around the
    optimum by about ``lr``) is scored with fixed common random numbers (``eval_noise``
    (K, B, d), default ``eval_samples`` fresh draws): F_c.  The initial Gaussian is check 0.
    An instance converges at check c when F_c < F_{c-1} + ``tol`` (it improved by less
    than ``tol`` nats over the window; while it runs, each score is its best so far) and
    is no longer updated;
    the fit stops when all have converged or after ``steps`` steps.  q* is the window
    average at an instance's last check (the initial Gaussian when ``steps`` is 0).

    Noise comes from torch's global RNG (seed it for reproducible results).  The model's
    parameters are frozen for the fit and restored after; nothing else of the model is
    changed.  Returns a :class:`QStarFit`; a non-finite ELBO or gradient (too large an
    ``lr``) stops it with a one-line :class:`~gpvae.errors.TrainingDivergedError`.
    """
    if steps < 0 or check_every < 1 or mc_samples < 1 or eval_samples < 1:
        raise ConfigError("fit_diagonal_gaussian: steps must be >= 0 and check_every, "
                          "mc_samples, eval_samples >= 1")
    if not (lr > 0 and tol > 0):
        raise ConfigError(f"fit_diagonal_gaussian: lr and tol must be positive, got {lr}, {tol}")
    with torch.inference_mode(False), frozen(model):
        if x.is_inference():
            x = x.clone()
        qstar_mean = init_mean.detach().clone()
        qstar_log_std = init_std.detach().log()
        n, d = qstar_mean.shape
        if eval_noise is None:
            eval_noise = torch.randn(eval_samples, n, d, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            elbo = diagonal_elbo(model, x, qstar_mean, qstar_log_std, eval_noise)
        history, check_steps = [elbo.clone()], [0]
        converged = torch.zeros(n, dtype=torch.bool)
        taken = torch.full((n,), steps, dtype=torch.long)
        mean = qstar_mean.clone().requires_grad_()
        log_std = qstar_log_std.clone().requires_grad_()
        opt = torch.optim.Adam([mean, log_std], lr=lr)
        sum_mean, sum_log_std, count = torch.zeros_like(qstar_mean), torch.zeros_like(qstar_mean), 0
        active = torch.arange(n, device=x.device)
        t = 0
        for t in range(1, steps + 1):
            with torch.enable_grad():
                m, ls = mean[active], log_std[active]
                eps = torch.randn(mc_samples, *m.shape, device=m.device, dtype=m.dtype)
                loss = -diagonal_elbo(model, x[active], m, ls, eps).sum()
                mean.grad, log_std.grad = torch.autograd.grad(loss, (mean, log_std))
            if not (torch.isfinite(loss) and torch.isfinite(mean.grad).all()
                    and torch.isfinite(log_std.grad).all()):
                raise _diverged(t, lr)
            opt.step()  # rows of stopped instances drift on Adam's momentum: never read again
            with torch.no_grad():
                sum_mean[active] += mean[active]
                sum_log_std[active] += log_std[active]
            count += 1
            if bar is not None:
                bar.update(1)
            if t % check_every and t != steps:
                continue
            with torch.no_grad():
                m, ls = sum_mean[active] / count, sum_log_std[active] / count
                score = diagonal_elbo(model, x[active], m, ls, eval_noise[:, active])
                if not torch.isfinite(score).all():
                    raise _diverged(t, lr)
                done = score < elbo[active] + tol
                qstar_mean[active], qstar_log_std[active], elbo[active] = m, ls, score
                row = torch.full_like(elbo, math.nan)
                row[active] = score
                history.append(row)
                check_steps.append(t)
                converged[active[done].cpu()] = True
                taken[active[done].cpu()] = t
                active = active[~done]
                sum_mean.zero_()
                sum_log_std.zero_()
                count = 0
            if active.numel() == 0:
                break
        if bar is not None and t < steps:
            bar.update(steps - t)
    return QStarFit(mean=qstar_mean, std=torch.exp(qstar_log_std), elbo=elbo,
                    converged=converged, steps=taken, history=torch.stack(history),
                    check_steps=check_steps)


def elbo_estimate(model, x: torch.Tensor, q, samples: int,
                  max_batch_samples: int = 2048) -> torch.Tensor:
    """The S-sample Monte Carlo ELBO of q for each instance (B,), float64:
    mean_s(log p(x|z_s) + log p(z_s) - log q(z_s|x)), z_s ~ q, decoding at most
    ``max_batch_samples`` z's at a time.  Without gradients."""
    per_chunk = max(1, max_batch_samples // x.shape[0])
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for start in range(0, samples, per_chunk):
            z = q.sample((min(per_chunk, samples - start),))
            lw = model.log_likelihood(x, z) + model.log_prior(z) - q.log_prob(z)
            total += lw.double().sum(0)
    return total / samples


def iwae_estimate(model, x: torch.Tensor, q, samples: int,
                  max_batch_samples: int = 2048) -> torch.Tensor:
    """IWAE_K with proposal q for each instance (B,), float64 (paper Sec. 10):
    logsumexp_k(log w_k) - log K, log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),
    z_k ~ q, accumulated chunk by chunk (at most ``max_batch_samples`` z's decoded at a
    time).  Without gradients."""
    per_chunk = max(1, max_batch_samples // x.shape[0])
    acc = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for start in range(0, samples, per_chunk):
            z = q.sample((min(per_chunk, samples - start),))
            lw = model.log_likelihood(x, z) + model.log_prior(z) - q.log_prob(z)
            acc = torch.logaddexp(acc, torch.logsumexp(lw.double(), 0))
    return acc - math.log(samples)


def amortization_gaps(model, data, *, elbo_samples: int = 1000, iwae_samples: int = 5000,
                      steps: int = 5000, lr: float = 3e-2, tol: float = 0.05,
                      check_every: int = 100, mc_samples: int = 4, eval_samples: int = 16,
                      moment_samples: int = 1000, batch_size: int = 500,
                      max_batch_samples: int = 2048, seed: int = 0, device="cpu",
                      progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-instance gaps of ``model``'s q(z|x) on every image of ``data`` (an ImageData):
    {"log_px", "iwae_q", "iwae_qstar", "elbo_q", "elbo_qstar", "approximation_gap",
    "amortization_gap"} (N,) float64, "qstar_converged" (N,) bool, "qstar_steps" (N,) int,
    "qstar_mean", "qstar_std" (N, d).  See the module docstring; ``batch_size`` images form
    one batched q* problem (chunks only bound memory).  Reproducible for a given ``seed``
    (and the same other arguments): ``iwae_q`` is :func:`gpvae.evaluation.estimate`'s IWAE
    with this seed at its command's defaults (what ``gpvae evaluate --iwae-samples K --seed
    SEED`` gives for these images), everything else draws from a stream seeded with
    ``seed + 1``.  The model is returned as it came (mode, ``requires_grad`` flags,
    weights)."""
    from .evaluation import EVAL_BATCH_SIZE, estimate, prepared_batches
    from .progress import progress_bar

    for name, value in (("--elbo-samples", elbo_samples), ("--iwae-samples", iwae_samples),
                        ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    device, dtype = model_device_dtype(model, device)
    was_training = model.training
    model.eval()
    n = len(data)
    out = {k: torch.empty(n, dtype=torch.float64) for k in ("elbo_q", "elbo_qstar",
                                                            "iwae_qstar")}
    out["qstar_converged"] = torch.zeros(n, dtype=torch.bool)
    out["qstar_steps"] = torch.zeros(n, dtype=torch.long)
    means, stds = [], []
    chunks = math.ceil(n / batch_size)
    try:
        with frozen(model), torch.random.fork_rng(
                devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + 1)
            bar = progress_bar(chunks * steps, desc="q* fit", unit="step", enabled=progress)
            for lo, x in prepared_batches(model, data, batch_size, device, dtype):
                hi = lo + x.shape[0]
                with torch.no_grad():
                    q = posterior_without_grad(model, x)
                    init_mean, init_std = initial_diagonal_gaussian(q, moment_samples)
                fit = fit_diagonal_gaussian(model, x, init_mean, init_std, steps=steps, lr=lr,
                                            tol=tol, check_every=check_every,
                                            mc_samples=mc_samples, eval_samples=eval_samples,
                                            bar=bar)
                qstar = Independent(Normal(fit.mean, fit.std), 1)
                out["elbo_q"][lo:hi] = elbo_estimate(model, x, q, elbo_samples,
                                                     max_batch_samples).cpu()
                out["elbo_qstar"][lo:hi] = elbo_estimate(model, x, qstar, elbo_samples,
                                                         max_batch_samples).cpu()
                out["qstar_converged"][lo:hi] = fit.converged
                out["qstar_steps"][lo:hi] = fit.steps
                means.append(fit.mean.detach().cpu())
                stds.append(fit.std.detach().cpu())
                del q
                bar.set_postfix(converged=f"{int(out['qstar_converged'][:hi].sum())}/{hi}")
            bar.close()
            bar = progress_bar(n, desc="IWAE (q*)", unit="img", enabled=progress)
            for (lo, x), mean, std in zip(prepared_batches(model, data, batch_size, device, dtype),
                                          means, stds):
                qstar = Independent(Normal(mean.to(device), std.to(device)), 1)
                out["iwae_qstar"][lo:lo + x.shape[0]] = iwae_estimate(
                    model, x, qstar, iwae_samples, max_batch_samples).cpu()
                bar.update(x.shape[0])
            bar.close()
        # exactly `gpvae evaluate --iwae-samples K --seed SEED` (its batch size and chunks)
        est = estimate(model, data, samples=iwae_samples, batch_size=EVAL_BATCH_SIZE,
                       device=device, seed=seed, progress=progress)
    finally:
        model.train(was_training)
    out["iwae_q"] = est.iwae
    out["log_px"] = torch.maximum(out["iwae_q"], out["iwae_qstar"])
    out["approximation_gap"] = out["log_px"] - out["elbo_qstar"]
    out["amortization_gap"] = out["elbo_qstar"] - out["elbo_q"]
    out["qstar_mean"], out["qstar_std"] = torch.cat(means), torch.cat(stds)
    return out


# --------------------------------------------------------------------------------------
# Summaries and files
# --------------------------------------------------------------------------------------
def summarize(values: torch.Tensor) -> dict:
    """mean, median and standard error of the mean of per-instance values."""
    v = values.double()
    n = v.numel()
    return {"mean": float(v.mean()), "median": float(torch.quantile(v, 0.5)),
            "se": float(v.std() / math.sqrt(n)) if n > 1 else math.nan}


def checkpoint_file_digest(run_dir, checkpoint: str) -> str:
    """:func:`gpvae.checkpoint.file_digest` of the run's ``best`` or ``last`` checkpoint:
    recorded with the gaps, so ``uncertainty --gap-csv`` knows they are this run's."""
    from .checkpoint import file_digest
    from .rundir import checkpoint_path

    return file_digest(checkpoint_path(run_dir, checkpoint))


def gap_rows(gaps: dict, split: str, checkpoint: str, digest: str = "") -> list[dict]:
    """The per-instance CSV rows (:data:`CSV_COLUMNS`); ``digest``: the checkpoint file's
    (:func:`checkpoint_file_digest`)."""
    rows = []
    for i in range(int(gaps["log_px"].numel())):
        row = {"index": i}
        row.update({k: float(gaps[k][i]) for k in QUANTITIES})
        row.update(qstar_converged=int(gaps["qstar_converged"][i]),
                   iwae_q=float(gaps["iwae_q"][i]), iwae_qstar=float(gaps["iwae_qstar"][i]),
                   split=split, checkpoint=checkpoint, checkpoint_sha256=digest)
        rows.append(row)
    return rows


def rows_csv(rows: list[dict], columns) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_gap_csv(path) -> dict:
    """A CSV written by ``gpvae gap``: {"index": list of int, "amortization_gap",
    "approximation_gap": (N,) float64 tensors, "split", "checkpoint": str}.  A missing,
    unreadable or foreign file is a one-line :class:`~gpvae.errors.DataError`."""
    path = Path(path)
    how = "write it with `gpvae gap RUN_DIR --csv FILE`"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        from .errors import describe

        raise DataError(f"--gap-csv {path}: cannot read it ({describe(exc)}); {how}") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"--gap-csv {path} is not a gpvae gap file (no column "
                        f"{', '.join(missing)}); {how}")
    rows = list(reader)
    if not rows:
        raise DataError(f"--gap-csv {path} holds no rows; {how}")
    try:
        index = [int(r["index"]) for r in rows]
        amort = torch.tensor([float(r["amortization_gap"]) for r in rows], dtype=torch.float64)
        approx = torch.tensor([float(r["approximation_gap"]) for r in rows],
                              dtype=torch.float64)
    except (TypeError, ValueError):
        raise DataError(f"--gap-csv {path}: a row holds a non-number; {how}") from None
    if not torch.isfinite(amort).all():
        raise DataError(f"--gap-csv {path}: an amortization gap is not finite")
    splits = {r["split"] for r in rows}
    checkpoints = {(r["checkpoint"], r.get("checkpoint_sha256") or "") for r in rows}
    if len(splits) != 1 or len(checkpoints) != 1:
        raise DataError(f"--gap-csv {path} mixes splits or checkpoints; {how}")
    checkpoint, digest = checkpoints.pop()
    return {"index": index, "amortization_gap": amort, "approximation_gap": approx,
            "split": splits.pop(), "checkpoint": checkpoint, "checkpoint_sha256": digest}


def _index_range(index: list) -> str:
    if index == list(range(len(index))):
        return f"indices 0..{len(index) - 1}"
    return "indices " + ", ".join(map(str, index[:3])) + (", ..." if len(index) > 3 else "")


def check_gap_source(gap: dict, checkpoint: str, path, run_dir) -> None:
    """Refuse (one-line :class:`~gpvae.errors.ConfigError`) a gap file not made on the test
    split with checkpoint ``checkpoint`` of this run (the checkpoint file's digest, where
    the file records one: files written before it did cannot be checked), saying how to
    make them match."""
    if gap["split"] != "test":
        raise ConfigError(f"--gap-csv {path} holds gaps of the {gap['split']} split, but "
                          f"uncertainty scores test images: rerun `gpvae gap {run_dir} "
                          f"--split test --checkpoint {checkpoint}` with its --limit-test")
    if gap["checkpoint"] != checkpoint:
        raise ConfigError(f"--gap-csv {path} was made with --checkpoint {gap['checkpoint']}, "
                          f"uncertainty uses {checkpoint}: pass --checkpoint "
                          f"{gap['checkpoint']} here or rerun `gpvae gap {run_dir} "
                          f"--checkpoint {checkpoint}`")
    digest = gap.get("checkpoint_sha256")
    if digest and digest != checkpoint_file_digest(run_dir, checkpoint):
        raise ConfigError(f"--gap-csv {path} was made from another checkpoint than {run_dir}'s "
                          f"{checkpoint} one (another run, or this run before it trained "
                          f"on): rerun `gpvae gap {run_dir} --checkpoint {checkpoint}` with "
                          "its --limit-test")


def check_gap_matches(gap: dict, n: int, path, run_dir) -> None:
    """Refuse (one-line :class:`~gpvae.errors.ConfigError`) a gap file that does not score
    exactly the first ``n`` test images, saying how to make them match (its split and
    checkpoint: :func:`check_gap_source`, checked first)."""
    if gap["index"] != list(range(n)):
        raise ConfigError(f"--gap-csv {path} holds {len(gap['index'])} test images "
                          f"({_index_range(gap['index'])}) but uncertainty scores {n} "
                          f"(indices 0..{n - 1}): pass --limit-test {len(gap['index'])} here "
                          f"or rerun `gpvae gap {run_dir} --limit-test {n}` (the same "
                          "--limit-test for both)")


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------
def _split_data(cfg, split: str, data_dir, limit: int | None):
    """The first ``limit`` images of the run's own ``split`` (test: its test split, as
    ``evaluate`` and ``uncertainty`` use it; train: the images it trained on)."""
    from .data import ImageData, load_splits
    from .rundir import run_test_split

    if split == "test":
        return run_test_split(cfg, data_dir, limit)
    if split != "train":
        raise ConfigError(f"--split must be train or test, got {split!r}")
    train = load_splits(cfg.dataset, data_dir or cfg.data_dir, split_seed=cfg.split_seed,
                        limit_train=cfg.limit_train, limit_test=1).train
    return train if limit is None or limit >= len(train) else ImageData(train.images[:limit])


def run_gap(args) -> dict:
    """``gpvae gap RUN_DIR``: per-instance gaps to CSV, the summary to stdout."""
    from .checkpoint import OutputKind, check_output_file
    from .devices import resolve_device
    from .rundir import load_run, read_config

    device = resolve_device(args.device)
    read_config(args.run_dir)
    if args.split not in ("train", "test"):
        raise ConfigError(f"--split must be train or test, got {args.split!r}")
    csv_path = check_output_file(args.csv or Path(args.run_dir) / "gap.csv", "--csv",
                                 OutputKind.csv("a gap CSV", ",".join(REQUIRED_COLUMNS)))
    digest = checkpoint_file_digest(args.run_dir, args.checkpoint)  # the file loaded next
    model, cfg = load_run(args.run_dir, args.checkpoint, device)
    data = _split_data(cfg, args.split, args.data_dir, args.limit_test)
    gaps = amortization_gaps(model, data, elbo_samples=args.elbo_samples,
                             iwae_samples=args.iwae_samples, steps=args.qstar_steps,
                             lr=args.qstar_lr, tol=args.qstar_tol,
                             check_every=args.qstar_window, mc_samples=args.qstar_samples,
                             batch_size=args.batch_size, seed=args.seed, device=device,
                             progress=not args.no_progress)
    atomic_write_text(csv_path, rows_csv(gap_rows(gaps, args.split, args.checkpoint, digest),
                                         CSV_COLUMNS))
    family = model.variational_family()
    summary = {"run_dir": str(args.run_dir), "model": cfg.model, "dataset": cfg.dataset,
               "split": args.split, "checkpoint": args.checkpoint, "n": len(data),
               "qstar_family": QSTAR_FAMILY, "model_family": family,
               "qstar_converged": int(gaps["qstar_converged"].sum()),
               "qstar_steps": args.qstar_steps, "qstar_lr": args.qstar_lr,
               "qstar_tol": args.qstar_tol, "qstar_window": args.qstar_window,
               "qstar_samples": args.qstar_samples, "elbo_samples": args.elbo_samples,
               "iwae_samples": args.iwae_samples, "seed": args.seed,
               "log_px_from_qstar": int((gaps["iwae_qstar"] > gaps["iwae_q"]).sum()),
               "negative_approximation_gaps": int((gaps["approximation_gap"] < 0).sum())}
    summary.update({k: summarize(gaps[k]) for k in QUANTITIES})
    if family != QSTAR_FAMILY:
        summary["note"] = (f"q(z|x) of {cfg.model} is a {family}, richer than the "
                           f"{QSTAR_FAMILY} q*: L[q*] may be below L[q], and the amortization "
                           "gap then mixes the family's gain with amortization")
    summary["csv"] = str(csv_path)
    if args.json:
        print(json_text(summary))
        return summary
    print(f"inference gaps of {cfg.model} ({args.run_dir}, {args.checkpoint} checkpoint) on "
          f"{summary['n']} {cfg.dataset} {args.split} images, nats per image")
    print(f"q*: {QSTAR_FAMILY} per instance (Adam, lr {args.qstar_lr}, at most "
          f"{args.qstar_steps} steps): {summary['qstar_converged']}/{summary['n']} converged "
          f"(improvement < {args.qstar_tol} nats per {args.qstar_window} steps)")
    if "note" in summary:
        print(f"note: {summary['note']}")
    print(f"log p(x): the larger IWAE-{args.iwae_samples} of proposals q and q* (q* for "
          f"{summary['log_px_from_qstar']}/{summary['n']} images)")
    if summary["negative_approximation_gaps"]:
        print(f"note: for {summary['negative_approximation_gaps']} images L[q*] > log p(x) "
              "estimate (the IWAE is not tight there): raise --iwae-samples")
    labels = {"log_px": "log p(x)",
              "elbo_q": f"L[q] (S={args.elbo_samples})",
              "elbo_qstar": f"L[q*] (S={args.elbo_samples})",
              "approximation_gap": "approximation gap", "amortization_gap": "amortization gap"}
    print(f"{'':<24}{'mean':>12}{'median':>12}{'se':>10}")
    for key in QUANTITIES:
        s = summary[key]
        print(f"{labels[key]:<24}{s['mean']:>12.3f}{s['median']:>12.3f}{s['se']:>10.3f}")
    print(f"per-instance values: {csv_path}")
    return summary
