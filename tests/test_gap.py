"""``gpvae gap`` (src/gpvae/gap.py): approximation and amortization gaps (Cremer, Li &
Duvenaud 2018), and ``gpvae uncertainty --gap-csv``: the correlation of the GPVAE's
per-instance uncertainty with the amortization gap, with a bootstrap interval.

The gaps are checked on a linear-Gaussian decoder, x = A z + b + N(0, sigma^2 I) with A's
columns orthogonal, whose posterior p(z|x) = N(Sigma A^T (x - b) / sigma^2, Sigma),
Sigma = (I + A^T A / sigma^2)^-1, is a known diagonal Gaussian: with an encoder that returns
it both gaps vanish; with a shifted and widened one the amortization gap is
KL(q || p(z|x)) - KL(q* || p(z|x)) (torch.distributions, closed form), within Monte Carlo
error, and q* recovers p(z|x).
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import (AffineTransform, Categorical, Independent,
                                 MixtureSameFamily, MultivariateNormal, Normal,
                                 TransformedDistribution, kl_divergence)

from gpvae.cli import main
from gpvae.data import ImageData
from gpvae.evaluation import estimate, log_weights
from gpvae.gap import (CSV_COLUMNS, QSTAR_FAMILY, amortization_gaps, elbo_estimate,
                       fit_diagonal_gaussian, initial_diagonal_gaussian, iwae_estimate)
from gpvae.models import MODELS, LatentVariableModel, ModelConfig, build_model
from helpers import Data, LinearDecoder, TrainableLinearDecoder

SHAPE = (1, 28, 28)
PIXELS = 784
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (on a busy machine, more threads mostly wait on
    each other); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LinearGaussian(LatentVariableModel):
    """p(z) = N(0, I), x|z ~ N(A z + b, sigma^2 I); q(z|x) = the exact posterior with its
    mean moved by ``shift`` standard deviations and its standard deviation times ``scale``."""

    def __init__(self, A, b, sigma, shift=0.0, scale=1.0, trainable=False):
        super().__init__(ModelConfig(latent_dim=A.shape[1], sigma_x=sigma), SHAPE)
        self.decoder = (TrainableLinearDecoder if trainable else LinearDecoder)(A, b)
        self.shift, self.scale = shift, scale
        self.double()
        self.sigma = float(self.likelihood.log_sigma.exp())  # sigma as the likelihood has it

    def true_posterior(self, x):
        A, b = self.decoder.A.detach(), self.decoder.b.detach()
        var = 1 / (1 + (A * A).sum(0) / self.sigma**2)  # A^T A is diagonal
        mean = var * ((x.flatten(1) - b) @ A) / self.sigma**2
        return mean, var.sqrt().expand_as(mean)

    def posterior(self, x):
        mean, std = self.true_posterior(x)
        return Independent(Normal(mean + self.shift * std, self.scale * std), 1)


def linear_case(n=4, d=2, sigma=0.3, seed=0):
    """(A, b, x (n, 1, 28, 28) float64, exact log p(x)): A^T A = sigma^2 Diag(1, 4, ...), so
    the posterior variances are 1/2, 1/5, ..."""
    g = torch.Generator().manual_seed(seed)
    col = torch.arange(1, d + 1, dtype=F64)
    A = torch.linalg.qr(torch.randn(PIXELS, d, generator=g, dtype=F64))[0] * sigma * col
    b = torch.full((PIXELS,), 0.5, dtype=F64)
    z = torch.randn(n, d, generator=g, dtype=F64)
    x = b + z @ A.T + sigma * torch.randn(n, PIXELS, generator=g, dtype=F64)
    cov = A @ A.T + sigma**2 * torch.eye(PIXELS, dtype=F64)
    return A, b, x.view(n, *SHAPE), MultivariateNormal(b, cov).log_prob(x)


FIT = dict(steps=3000, lr=0.01, tol=1e-3, check_every=100, mc_samples=8, eval_samples=64)


def test_exact_encoder_has_no_gaps():
    """q(z|x) = p(z|x): every log weight is log p(x), so IWAE = L[q] = log p(x) exactly;
    q* (started there, or not moved at all with 0 steps) is p(z|x): both gaps are 0 (with
    q* fitted: -KL(q* || p(z|x)) and KL(q* || p(z|x)) up to Monte Carlo error)."""
    A, b, x, exact = linear_case()
    model = LinearGaussian(A, b, 0.3)
    mean, std = model.true_posterior(x)
    truth = Independent(Normal(mean, std), 1)
    S, K = 2000, 500
    for steps in (0, 1000):
        out = amortization_gaps(model, Data(x), elbo_samples=S, iwae_samples=K, **{
            **FIT, "steps": steps}, seed=1, progress=False)
        torch.testing.assert_close(out["iwae_q"], exact, rtol=0, atol=1e-6)
        torch.testing.assert_close(out["elbo_q"], exact, rtol=0, atol=1e-6)
        if steps == 0:  # nothing fitted: q* is where it started, the amortized q
            torch.testing.assert_close(out["log_px"], exact, rtol=0, atol=1e-6)
            assert torch.equal(out["qstar_mean"], mean)
            torch.testing.assert_close(out["qstar_std"], std, rtol=1e-14, atol=0)
            assert not out["qstar_converged"].any()
            assert out["amortization_gap"].abs().max() < 1e-6, out["amortization_gap"]
            assert out["approximation_gap"].abs().max() < 1e-6, out["approximation_gap"]
            continue
        # fitted from the posterior itself: q* stays at it, up to the fit's own noise, and
        # each gap is +-KL(q* || p(z|x)) (L[q*] = log p(x) - KL) within Monte Carlo error
        assert out["qstar_converged"].all()
        assert ((out["qstar_mean"] - mean) / std).abs().max() < 0.1
        torch.testing.assert_close(out["qstar_std"], std, rtol=0.05, atol=0)
        qstar = Independent(Normal(out["qstar_mean"], out["qstar_std"]), 1)
        kl_star = kl_divergence(qstar, truth)
        assert kl_star.max() < 0.01
        torch.manual_seed(0)
        z = qstar.sample((20000,))
        var = (qstar.log_prob(z) - truth.log_prob(z)).var(0)
        se, se_iwae = (var / S).sqrt(), (var / K).sqrt()  # the IWAE's weights: delta method
        assert ((out["amortization_gap"] + kl_star).abs() <= 5 * se + 1e-9).all()
        assert ((out["log_px"] - exact).abs() <= 5 * se_iwae + 1e-9).all()
        assert ((out["approximation_gap"] - kl_star).abs() <= 5 * (se + se_iwae) + 1e-9).all()


def test_perturbed_encoder_amortization_gap_is_its_kl_to_the_posterior():
    """q = N(mu + s/2, (1.5 s)^2) per dimension: q* recovers p(z|x) = N(mu, s^2); the
    amortization gap is KL(q || p(z|x)) - KL(q* || p(z|x)) within 5 Monte Carlo standard
    errors (the spread of log q - log p(z|x) under each q over S samples); the approximation
    gap is KL(q* || p(z|x)) up to the IWAE's error; log p^(x) is the larger of
    evaluation.estimate's IWAE (proposal q) and the IWAE with proposal q*."""
    A, b, x, exact = linear_case()
    model = LinearGaussian(A, b, 0.3, shift=0.5, scale=1.5)
    S, K = 4000, 1000
    out = amortization_gaps(model, Data(x), elbo_samples=S, iwae_samples=K, **FIT,
                            batch_size=3, seed=2, progress=False)
    mean, std = model.true_posterior(x)
    truth = Independent(Normal(mean, std), 1)
    q, qstar = model.posterior(x), Independent(Normal(out["qstar_mean"], out["qstar_std"]), 1)
    # q* is the posterior
    assert out["qstar_converged"].all()
    assert ((out["qstar_mean"] - mean) / std).abs().max() < 0.1
    torch.testing.assert_close(out["qstar_std"], std, rtol=0.05, atol=0)
    kl_star = kl_divergence(qstar, truth)
    assert kl_star.max() < 0.01
    # the amortization gap
    kl_q = kl_divergence(q, truth)
    assert kl_q.min() > 0.6
    torch.manual_seed(0)

    def mc_var(dist):  # variance of one log weight: log q(z) - log p(z|x), z ~ dist
        z = dist.sample((20000,))
        return (dist.log_prob(z) - truth.log_prob(z)).var(0)

    se = ((mc_var(q) + mc_var(qstar)) / S).sqrt()
    err = out["amortization_gap"] - (kl_q - kl_star)
    assert (err.abs() <= 5 * se).all(), (err, se)
    # log p^(x): the larger IWAE_K of proposals q (what `gpvae evaluate --seed 2` computes:
    # estimate at its defaults, bit for bit, whatever gap's own batch size) and q*, each
    # within Monte Carlo error of log p(x) (delta-method se and O(1/K) bias)
    est = estimate(model, Data(x), samples=K, seed=2, progress=False)
    assert torch.equal(out["iwae_q"], est.iwae)
    assert torch.equal(out["log_px"], torch.maximum(out["iwae_q"], out["iwae_qstar"]))
    tolerance = torch.zeros(len(x), dtype=F64)
    for key, proposal in (("iwae_q", model), ("iwae_qstar", None)):
        with torch.inference_mode():
            if proposal is None:
                z = qstar.sample((K,))
                lw = model.log_likelihood(x, z) + model.log_prior(z) - qstar.log_prob(z)
            else:
                lw = log_weights(model, x, K)
        w = torch.exp(lw - torch.logsumexp(lw, 0) + math.log(K))
        se_iwae, bias = w.std(0) / math.sqrt(K), w.var(0) / (2 * K)
        assert ((out[key] - exact).abs() <= 5 * se_iwae + bias).all(), key
        tolerance = torch.maximum(tolerance, 5 * se_iwae + bias)
    # the approximation gap: KL(q* || p(z|x)), up to the IWAE's error and L[q*]'s
    err = out["approximation_gap"] - kl_star
    assert (err.abs() <= tolerance + 5 * (mc_var(qstar) / S).sqrt()).all(), err


def test_elbo_and_iwae_estimates_are_those_of_the_evaluator():
    """elbo_estimate / iwae_estimate of q(z|x) are the mean and the IWAE of the log weights
    gpvae.evaluation.log_weights draws with the same noise (chunks of 2 samples here)."""
    A, b, x, _ = linear_case(n=3)
    model = LinearGaussian(A, b, 0.3, shift=1.0, scale=2.0)
    torch.manual_seed(3)
    with torch.inference_mode():
        lw = log_weights(model, x, 25, max_batch_samples=6)
    for fn, ref in ((elbo_estimate, lw.mean(0)),
                    (iwae_estimate, torch.logsumexp(lw, 0) - math.log(25))):
        torch.manual_seed(3)
        torch.testing.assert_close(fn(model, x, model.posterior(x), 25, max_batch_samples=6),
                                   ref, rtol=0, atol=1e-10)


def _brute_force_score(model, x, mean, std, eps):
    """F(m, s) = mean_k log N(x; A (m + s eps_k) + b, sigma^2 I) - KL(N(m, s^2) || N(0, I)),
    by torch.distributions."""
    A, b = model.decoder.A, model.decoder.b
    z = mean + std * eps
    lik = Independent(Normal(z @ A.T + b, model.sigma), 1).log_prob(x.flatten(1)).mean(0)
    kl = kl_divergence(Independent(Normal(mean, std), 1),
                       Independent(Normal(torch.zeros_like(mean), 1.0), 1))
    return lik - kl


def _follows_the_rule(fit, tol):
    """Replays the convergence rule on the fit's history of scores."""
    h = fit.history
    for i in range(h.shape[1]):
        stopped_at, last = None, float(h[0, i])
        for c in range(1, h.shape[0]):
            if stopped_at is not None:
                assert math.isnan(h[c, i]), (i, c)
                continue
            assert not math.isnan(h[c, i])
            if float(h[c, i]) < last + tol:
                stopped_at = fit.check_steps[c]
            last = float(h[c, i])
        assert bool(fit.converged[i]) == (stopped_at is not None)
        assert int(fit.steps[i]) == (fit.check_steps[-1] if stopped_at is None else stopped_at)
        assert float(fit.elbo[i]) == last


def test_convergence_rule():
    """Checks every E steps with fixed noise; an instance converges at the first check whose
    score F_c (of its window-averaged iterates) is below the previous one plus tol, and is no
    longer updated (NaN in the history); the fit stops when all have converged; q* is the
    window average at its last check, and its score is F there (by torch.distributions)."""
    A, b, x, _ = linear_case(n=3)
    model = LinearGaussian(A, b, 0.3)
    mean, std = model.true_posterior(x)
    init_mean = mean + torch.tensor([[0.0], [3.0], [-2.0]], dtype=F64) * std
    init_std = std * torch.tensor([[1.0], [0.3], [2.0]], dtype=F64)
    eps = torch.randn(32, 3, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    tol, E = 0.01, 50
    torch.manual_seed(0)
    fit = fit_diagonal_gaussian(model, x, init_mean, init_std, steps=3000, lr=0.02, tol=tol,
                                check_every=E, mc_samples=4, eval_noise=eps)
    assert fit.check_steps == [E * c for c in range(len(fit.check_steps))]
    assert fit.converged.all() and fit.check_steps[-1] == int(fit.steps.max()) < 3000
    assert int(fit.steps[0]) < int(fit.steps[1]), fit.steps  # [0] started at the optimum
    torch.testing.assert_close(fit.history[0],
                               _brute_force_score(model, x, init_mean, init_std, eps),
                               rtol=0, atol=1e-9)
    _follows_the_rule(fit, tol)
    torch.testing.assert_close(fit.elbo, _brute_force_score(model, x, fit.mean, fit.std, eps),
                               rtol=0, atol=1e-9)
    assert ((fit.mean - mean) / std).abs().max() < 0.1  # all three reached p(z|x)
    # a budget too small to converge: the instances away from the optimum run to the end
    torch.manual_seed(0)
    fit = fit_diagonal_gaussian(model, x, init_mean, init_std, steps=30, lr=0.02, tol=tol,
                                check_every=E, eval_noise=eps)
    assert fit.check_steps == [0, 30] and fit.steps.tolist() == [30, 30, 30]
    assert fit.converged.tolist()[1:] == [False, False]
    _follows_the_rule(fit, tol)
    # no steps: q* is the initial Gaussian
    fit = fit_diagonal_gaussian(model, x, init_mean, init_std, steps=0, eval_noise=eps)
    assert torch.equal(fit.mean, init_mean) and torch.allclose(fit.std, init_std, rtol=1e-15)
    assert not fit.converged.any() and fit.history.shape == (1, 3)


def test_fit_is_adam_on_the_elbo_averaged_over_the_window():
    """One window (no check before the last step): q* is the mean of the 25 Adam iterates
    of (m, log s) on the objective written with torch.distributions (Gaussian likelihood
    plus the closed-form KL to N(0, I)), drawing the same noise."""
    A, b, x, _ = linear_case(n=3)
    model = LinearGaussian(A, b, 0.3, shift=2.0)
    q = model.posterior(x)
    eps = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    torch.manual_seed(1)
    fit = fit_diagonal_gaussian(model, x, q.mean, q.stddev, steps=25, lr=0.05, tol=0.01,
                                check_every=100, mc_samples=3, eval_noise=eps)
    torch.manual_seed(1)
    m = q.mean.clone().requires_grad_()
    ls = q.stddev.log().requires_grad_()
    opt = torch.optim.Adam([m, ls], lr=0.05)
    iterates = []
    for _ in range(25):
        e = torch.randn(3, 3, 2, dtype=F64)
        opt.zero_grad()
        (-_brute_force_score(model, x, m, ls.exp(), e).sum()).backward()
        opt.step()
        iterates.append((m.detach().clone(), ls.detach().clone()))
    torch.testing.assert_close(fit.mean, torch.stack([i[0] for i in iterates]).mean(0),
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(fit.std, torch.stack([i[1] for i in iterates]).mean(0).exp(),
                               rtol=1e-9, atol=0)
    assert fit.steps.tolist() == [25, 25, 25] and fit.check_steps == [0, 25]


def test_fit_leaves_the_model_as_it_was():
    """The decoder is frozen during the fit (no gradient reaches it), and its parameters,
    their requires_grad flags and the model's mode are as before."""
    A, b, x, _ = linear_case(n=2)
    model = LinearGaussian(A, b, 0.3, shift=1.0, trainable=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = amortization_gaps(model, Data(x), elbo_samples=5, iwae_samples=5, steps=20,
                            check_every=5, progress=False)
    assert torch.isfinite(out["amortization_gap"]).all()
    assert model.training
    for name, p in model.named_parameters():
        assert p.requires_grad and p.grad is None, name
        assert torch.equal(p, before[name]), name


def test_initial_gaussian_is_the_moments_of_q():
    g = torch.Generator().manual_seed(0)
    m, s = torch.randn(3, 2, generator=g, dtype=F64), torch.rand(3, 2, generator=g, dtype=F64) + .1
    mean, std = initial_diagonal_gaussian(Independent(Normal(m, s), 1))
    assert torch.equal(mean, m) and torch.equal(std, s)
    L = torch.tensor([[1.0, 0.0], [0.7, 0.4]], dtype=F64)
    mean, std = initial_diagonal_gaussian(MultivariateNormal(m, scale_tril=L))
    assert torch.equal(mean, m)
    torch.testing.assert_close(std, torch.diagonal(L @ L.T).sqrt().expand(3, 2))
    # a mixture: sum_k w_k mu_k and sum_k w_k (s_k^2 + mu_k^2) - mean^2
    mu = torch.randn(3, 4, 2, generator=g, dtype=F64)
    sd = torch.rand(3, 4, 2, generator=g, dtype=F64)
    w = torch.softmax(torch.randn(3, 4, generator=g, dtype=F64), -1)
    mix = MixtureSameFamily(Categorical(probs=w), Independent(Normal(mu, sd), 1))
    mean, std = initial_diagonal_gaussian(mix)
    ref = (w[..., None] * mu).sum(1)
    torch.testing.assert_close(mean, ref)
    torch.testing.assert_close(std, ((w[..., None] * (sd**2 + mu**2)).sum(1) - ref**2).sqrt())
    # a flow (no closed-form mean): the moments of its samples
    flow = TransformedDistribution(Independent(Normal(m, s), 1),
                                   [AffineTransform(0.3, -2.0, event_dim=1)])
    torch.manual_seed(1)
    mean, std = initial_diagonal_gaussian(flow, samples=20000)
    torch.manual_seed(1)
    z = flow.sample((20000,))
    assert torch.equal(mean, z.mean(0)) and torch.equal(std, z.std(0))
    torch.testing.assert_close(mean, 0.3 - 2 * m, rtol=0, atol=5 * 2 * float(s.max()) / 141)
    torch.testing.assert_close(std, 2 * s, rtol=0.03, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_method(name):
    """Finite gaps for every method (chunked: 3 images in chunks of 2), the same numbers
    for the same seed, the model unchanged; a family richer than q*'s is named."""
    torch.manual_seed(0)
    model = build_model(name, SHAPE, latent_dim=2)
    model.complete_schedule()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = ImageData(torch.randint(0, 256, (3, *SHAPE), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8))
    kw = dict(elbo_samples=4, iwae_samples=4, steps=4, check_every=2, batch_size=2, seed=3,
              progress=False)
    a, b = amortization_gaps(model, data, **kw), amortization_gaps(model, data, **kw)
    for key in ("log_px", "elbo_q", "elbo_qstar", "amortization_gap", "approximation_gap"):
        assert a[key].shape == (3,) and torch.isfinite(a[key]).all(), key
        assert torch.equal(a[key], b[key]), key
    assert a["qstar_mean"].shape == a["qstar_std"].shape == (3, 2)
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    richer = {"hf", "iaf", "me", "rme", "vlae"}
    assert (model.variational_family() != QSTAR_FAMILY) == (name in richer), name


# --- the command line ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def gp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gap") / "gp"
    assert main(["train", "--model", "gpvae", "--latent-dim", "2", "--epochs", "1",
                 "--limit-train", "100", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    return out


GAP_ARGS = ["--elbo-samples", "6", "--iwae-samples", "7", "--qstar-steps", "12",
            "--qstar-window", "4", "--qstar-lr", "0.01", "--batch-size", "4", "--seed", "5",
            "--no-progress", "--device", "cpu"]
GAP_KW = dict(elbo_samples=6, iwae_samples=7, steps=12, check_every=4, lr=0.01, batch_size=4,
              seed=5, progress=False)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _col(rows, key):
    return torch.tensor([float(r[key]) for r in rows], dtype=F64)


def test_gap_cli_writes_what_the_python_api_computes(gp_run, capsys):
    from gpvae.data import load_splits
    from gpvae.rundir import load_run, run_test_split

    assert main(["gap", str(gp_run), "--limit-test", "6", "--json", *GAP_ARGS]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = _read_csv(gp_run / "gap.csv")
    assert list(rows[0]) == list(CSV_COLUMNS) and len(rows) == 6
    assert [int(r["index"]) for r in rows] == list(range(6))
    assert {r["split"] for r in rows} == {"test"} and {r["checkpoint"] for r in rows} == {"best"}
    model, cfg = load_run(gp_run, "best")
    ref = amortization_gaps(model, run_test_split(cfg, limit_test=6), **GAP_KW)
    for key in ("iwae_q", "iwae_qstar"):
        torch.testing.assert_close(_col(rows, key), ref[key], rtol=1e-12, atol=1e-12)
    assert summary["log_px_from_qstar"] == int((ref["iwae_qstar"] > ref["iwae_q"]).sum())
    assert summary["negative_approximation_gaps"] == int((ref["approximation_gap"] < 0).sum())
    for key in ("log_px", "elbo_q", "elbo_qstar", "approximation_gap", "amortization_gap"):
        torch.testing.assert_close(_col(rows, key), ref[key], rtol=1e-12, atol=1e-12)
        assert summary[key]["mean"] == pytest.approx(float(ref[key].mean()), rel=1e-12)
        assert summary[key]["median"] == pytest.approx(float(np.median(ref[key])), rel=1e-12)
        assert summary[key]["se"] == pytest.approx(float(ref[key].std() / math.sqrt(6)),
                                                   rel=1e-9)
    assert [int(r["qstar_converged"]) for r in rows] == ref["qstar_converged"].int().tolist()
    assert summary["qstar_converged"] == int(ref["qstar_converged"].sum())
    assert summary["n"] == 6 and summary["split"] == "test" and summary["checkpoint"] == "best"
    assert summary["qstar_family"] == summary["model_family"] == "diagonal Gaussian"
    assert "note" not in summary and summary["iwae_samples"] == 7
    # the training split, as text
    out = gp_run / "train_gap.csv"
    assert main(["gap", str(gp_run), "--split", "train", "--limit", "3", "--csv", str(out),
                 *GAP_ARGS]) == 0
    text = capsys.readouterr().out
    assert "diagonal Gaussian" in text and "amortization gap" in text and "converged" in text
    rows = _read_csv(out)
    train = load_splits("mnist", split_seed=cfg.split_seed, limit_train=cfg.limit_train).train
    ref = amortization_gaps(model, ImageData(train.images[:3]), **GAP_KW)
    assert {r["split"] for r in rows} == {"train"}
    torch.testing.assert_close(_col(rows, "amortization_gap"), ref["amortization_gap"],
                               rtol=1e-12, atol=1e-12)


def test_gap_cli_bad_input_is_one_line_before_any_work(gp_run, tmp_path, capsys):
    assert main(["gap", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a gpvae run directory" in err[0]
    assert main(["gap", str(gp_run), "--csv", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--csv" in err[0] and "is a directory" in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["gap", str(gp_run), "--split", "valid"])
    assert exc.value.code == 2 and "--split" in capsys.readouterr().err


# --- uncertainty vs the amortization gap ----------------------------------------------------
def test_spearman_bootstrap_matches_brute_force():
    """The same resamples (bootstrap_indices), rho of each by scipy, 2.5% and 97.5% quantiles."""
    from scipy import stats

    from gpvae.uncertainty import bootstrap_indices, spearman_bootstrap

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 8, (30,), generator=g).double()  # ties
    b = a + 3 * torch.randn(30, generator=g, dtype=F64)
    res = spearman_bootstrap(a, b, resamples=300, seed=7)
    rhos = [stats.spearmanr(a.numpy()[i], b.numpy()[i]).statistic
            for idx in bootstrap_indices(30, 300, 7) for i in idx]
    assert len(rhos) == 300
    lo, hi = np.quantile(rhos, [0.025, 0.975])
    assert res["ci_low"] == pytest.approx(lo, abs=1e-12)
    assert res["ci_high"] == pytest.approx(hi, abs=1e-12)
    assert res["rho"] == pytest.approx(stats.spearmanr(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert spearman_bootstrap(a, b, resamples=300, seed=7) == res  # seeded


def test_spearman_bootstrap_known_cases():
    from gpvae.uncertainty import spearman_bootstrap

    a = torch.arange(40, dtype=F64)
    res = spearman_bootstrap(a, torch.exp(a / 5), resamples=500)  # monotone: rho = 1 always
    assert res["rho"] == pytest.approx(1, abs=1e-12)
    assert res["ci_low"] == pytest.approx(1, abs=1e-12)
    assert res["ci_high"] == pytest.approx(1, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    n = 400  # independent: rho ~ N(0, 1/(n-1)), the interval ~ +-1.96/sqrt(n-1) around rho
    res = spearman_bootstrap(torch.randn(n, generator=g), torch.randn(n, generator=g))
    assert res["ci_low"] < 0 < res["ci_high"]
    width = res["ci_high"] - res["ci_low"]
    assert width == pytest.approx(2 * 1.96 / math.sqrt(n - 1), rel=0.15)


def _uncertainty_args(run, *extra):
    return ["uncertainty", str(run), "--gap-samples", "0", "--no-progress", "--device", "cpu",
            *extra]


def test_uncertainty_with_gap_csv(gp_run, tmp_path, capsys):
    """The uncertainty rows get each image's amortization gap from the gap file, and the
    summary the bootstrap correlation of each uncertainty with it (as the Python API
    computes it); the figure writes each shown image's gap under it."""
    from gpvae.rundir import load_run, run_test_split
    from gpvae.uncertainty import instance_uncertainty, spearman_bootstrap

    gap_csv = tmp_path / "g.csv"
    assert main(["gap", str(gp_run), "--limit-test", "6", "--csv", str(gap_csv), "--json",
                 *GAP_ARGS]) == 0
    capsys.readouterr()
    ucsv, png = tmp_path / "u.csv", tmp_path / "u.png"
    assert main(_uncertainty_args(gp_run, "--limit-test", "6", "--gap-csv", str(gap_csv),
                                  "--bootstrap", "50", "--seed", "2", "--csv", str(ucsv),
                                  "--png", str(png), "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    gap = _col(_read_csv(gap_csv), "amortization_gap")
    rows = _read_csv(ucsv)
    torch.testing.assert_close(_col(rows, "amortization_gap"), gap, rtol=0, atol=0)
    model, cfg = load_run(gp_run, "best")
    u = instance_uncertainty(model, run_test_split(cfg, limit_test=6), progress=False)
    assert summary["bootstrap"] == 50
    for key in ("tr_f", "tr_h", "total"):
        assert summary["spearman_vs_amortization_gap"][key] == pytest.approx(
            spearman_bootstrap(u[key], gap, 50, 2), abs=1e-12)
    assert summary["amortization_gap"]["mean"] == pytest.approx(float(gap.mean()), rel=1e-12)
    assert png.stat().st_size > 0
    # text output names the correlation and its interval
    assert main(_uncertainty_args(gp_run, "--limit-test", "6", "--gap-csv", str(gap_csv),
                                  "--bootstrap", "20", "--csv", str(ucsv))) == 0
    text = capsys.readouterr().out
    assert "amortization gap) = " in text and "95% bootstrap interval" in text


@pytest.mark.parametrize("edit,needle", [
    (None, "--limit-test 6"),
    ({"split": "train"}, "--split test"),
    ({"checkpoint": "last"}, "--checkpoint last"),
    ({"drop": "amortization_gap"}, "not a gpvae gap file"),
    ({"checkpoint_sha256": "0123456789abcdef"}, "another checkpoint than"),
])
def test_uncertainty_refuses_a_gap_csv_of_other_images(gp_run, tmp_path, capsys, edit, needle):
    """A gap file of other images (another --limit-test, split or checkpoint), or not a gap
    file, is a one-line error before any work, saying how to make them match."""
    gap_csv = tmp_path / "g.csv"
    rows = [{"index": i, "log_px": 1.0, "elbo_q": 0.5, "elbo_qstar": 0.7,
             "approximation_gap": 0.3, "amortization_gap": 0.2, "qstar_converged": 1,
             "iwae_q": 1.0, "iwae_qstar": 0.9,
             "split": "test", "checkpoint": "best"} for i in range(6)]
    columns = list(CSV_COLUMNS)
    if edit and "drop" in edit:
        columns.remove(edit["drop"])
        rows = [{k: v for k, v in r.items() if k in columns} for r in rows]
    elif edit:
        rows = [{**r, **edit} for r in rows]
    with open(gap_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    ucsv = tmp_path / "u.csv"
    assert main(_uncertainty_args(gp_run, "--limit-test", "6" if edit else "5", "--gap-csv",
                                  str(gap_csv), "--csv", str(ucsv))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "--gap-csv" in err[0], err
    assert not ucsv.exists()


def test_uncertainty_figure_writes_each_images_gap_under_it(monkeypatch, tmp_path):
    """uncertainty_extremes(gaps=...) captions each shown image with its own gap (by its
    index in the data), not its position in the figure."""
    from gpvae import plots

    torch.manual_seed(0)
    model = build_model("vae", SHAPE, latent_dim=2).eval()
    data = ImageData(torch.randint(0, 256, (6, *SHAPE), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8))
    gaps = torch.tensor([0.5, 1.25, -0.125, 12.5, 150.0, 3.0], dtype=F64)
    seen = []
    real = plots._save_bands
    monkeypatch.setattr(plots, "_save_bands", lambda bands, *a, **k: (seen.extend(bands),
                                                                     real(bands, *a, **k))[1])
    path = plots.uncertainty_extremes(model, data, [4, 2], [0, 3], tmp_path / "u.png", gaps=gaps)
    captions = [band[2] for band in seen if len(band) == 3]
    assert captions == [["150", "-0.12"], ["0.50", "12.5"]]
    from PIL import Image

    with_gaps = Image.open(path).size
    plain = Image.open(plots.uncertainty_extremes(model, data, [4, 2], [0, 3],
                                                  tmp_path / "v.png")).size
    assert with_gaps[0] == plain[0] and with_gaps[1] > plain[1]


def test_a_diverging_qstar_fit_stops_in_one_line_naming_the_step_and_qstar_lr():
    """Too large an Adam step makes q*'s ELBO non-finite: a one-line TrainingDivergedError
    that says which step and to lower --qstar-lr, not a torch.distributions traceback; the
    model is left as it came."""
    from gpvae.errors import TrainingDivergedError

    torch.manual_seed(0)
    model = build_model("vae", SHAPE, latent_dim=2)
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = model.posterior(x)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(TrainingDivergedError, match=r"q\* fit diverged at step \d+ .*"
                                                     r"smaller --qstar-lr \(now 1e\+30\)"):
        fit_diagonal_gaussian(model, x, q.mean, q.stddev, steps=50, lr=1e30, check_every=5)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_commands_refuse_to_overwrite_a_runs_checkpoint_or_a_users_file(gp_run, tmp_path,
                                                                         capsys):
    """export --out, gap --csv, uncertainty --csv/--png pointed at the run's own checkpoint
    or at a user's file of another kind: a one-line error, the file untouched; --png must
    name a .png file."""
    best = gp_run / "best.safetensors"
    before = best.read_bytes()
    mine = tmp_path / "mine.csv"
    mine.write_text("my precious notes\n")
    for argv, needle in (
            (["export", str(gp_run), "--out", str(best)], "is a file of the run"),
            (["gap", str(gp_run), "--csv", str(best), *GAP_ARGS], "is a file of the run"),
            (["gap", str(gp_run), "--csv", str(mine), *GAP_ARGS], "is not a gap CSV"),
            (_uncertainty_args(gp_run, "--csv", str(mine)), "is not an uncertainty CSV"),
            (_uncertainty_args(gp_run, "--png", str(tmp_path / "u.jpg")), "name a .png file")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert best.read_bytes() == before and mine.read_text() == "my precious notes\n"
    assert not (tmp_path / "u.jpg").exists()
