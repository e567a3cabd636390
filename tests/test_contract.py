"""The contract every registered inference method meets (src/gpvae/models/base.py).

Parametrised over ``gpvae.models.MODELS`` when the tests are collected, so a method
registered there is checked without touching this file; a method whose config has a
``size_option`` is checked at sizes 1 and 2.  For every method (and size):

* q(z|x) has batch_shape (B,) and event_shape (d,); ``log_prob`` of its own ``rsample`` s
  (``sample`` s where ``q.has_rsample`` is False) is finite;
* the training objective is finite, with a finite gradient reaching every parameter
  (likelihood ``gaussian-learned``, so the learned sigma_x is one of them);
* a checkpoint round trip (save_checkpoint / load_checkpoint) gives the same q(z|x), bit
  for bit (given the same RNG state, for methods whose q(z|x) draws noise);
* ``estimate`` runs, IWAE >= ELBO image by image;
* with the decoder swapped for a linear one -- p(z) = N(0, I), x|z ~ N(Az + b, sigma^2 I),
  so p(x) = N(b, A A^T + sigma^2 I) -- IWAE with K = 2000 is within Monte Carlo error of
  the exact log p(x) and the ELBO is not above it.  This catches an invalid density (a
  log_prob off by a constant, a mixture weighted with its components' log densities, a
  flow with a wrong log-det) in any method.  Methods must therefore reach the decoder
  only through ``decode`` / ``log_likelihood``.

``test_the_contract_catches_planted_bugs`` runs the checks on throw-away methods with one
planted bug each and requires every plant to be caught.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.distributions import (AffineTransform, Categorical, Independent,
                                 MixtureSameFamily, MultivariateNormal, Normal,
                                 TransformedDistribution)

from gpvae.checkpoint import load_checkpoint, save_checkpoint
from gpvae.data import ImageData
from gpvae.evaluation import estimate, log_weights
from gpvae.models import MODELS, build_model
from gpvae.models.vae import VAE
from helpers import LinearDecoder

SHAPE = (1, 28, 28)
PIXELS = 784
D = 2


def _cases():
    out = []
    for name, cls in sorted(MODELS.items()):
        option = cls.config_class.size_option
        if option is None:
            out.append(pytest.param(name, {}, id=name))
        else:
            out += [pytest.param(name, {option: k}, id=f"{name}:{k}") for k in (1, 2)]
    return out


CASES = _cases()


def _make(name, options, seed=0, **extra):
    torch.manual_seed(seed)
    return build_model(name, SHAPE, latent_dim=D, **options, **extra)


def _images(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g).to(dtype)


# --- the checks ---------------------------------------------------------------------------
def check_shapes_and_log_prob(name, options):
    model = _make(name, options).eval()
    x = _images(3)
    q = model.posterior(x)
    assert tuple(q.batch_shape) == (3,) and tuple(q.event_shape) == (D,), (q.batch_shape,
                                                                            q.event_shape)
    # rsample where q has one (a mixture's discrete component has none: such a method
    # trains with its own objective)
    z = q.rsample((5,)) if q.has_rsample else q.sample((5,))
    assert z.shape == (5, 3, D)
    log_q = q.log_prob(z)
    assert log_q.shape == (5, 3) and torch.isfinite(log_q).all(), log_q


def check_objective_and_gradients(name, options):
    model = _make(name, options, likelihood="gaussian-learned").train()
    objective, diagnostics = model.training_objective(_images(4), 100)
    assert objective.shape == (4,) and torch.isfinite(objective).all(), objective
    assert all(math.isfinite(float(v)) for v in diagnostics.values()), diagnostics
    (-objective.mean()).backward()
    params = dict(model.named_parameters())
    assert "likelihood.log_sigma" in params
    for pname, p in params.items():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient reaches {pname}"
            assert torch.isfinite(p.grad).all(), f"non-finite gradient of {pname}"


def _same_posterior(a, b, x):
    """Identical q(z|x) (same RNG state for each: posterior() may draw noise, as SA's
    steps do): the same density at points neither has sampled (a transform's cache could
    hold the inverse of its own samples) and the same draws."""
    qs = []
    for model in (a, b):
        torch.manual_seed(5)
        qs.append(model.posterior(x))
    with torch.no_grad():
        z = torch.randn(4, x.shape[0], D, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(qs[1].log_prob(z), qs[0].log_prob(z), rtol=0, atol=0)
        draws = []
        for q in qs:
            torch.manual_seed(7)
            draws.append(q.sample((4,)))
        torch.testing.assert_close(draws[1], draws[0], rtol=0, atol=0)


def check_checkpoint_round_trip(name, options, tmp_path):
    a = _make(name, options, seed=0).eval()
    with torch.no_grad():  # every stored number matters, also those initialised to 0
        for p in a.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / "m.safetensors", a, {})
    b = _make(name, options, seed=1).eval()
    load_checkpoint(tmp_path / "m.safetensors", b)
    _same_posterior(a, b, _images(3))


def check_estimate_runs(name, options):
    model = _make(name, options)
    data = ImageData((_images(5) * 255).to(torch.uint8))
    est = estimate(model, data, samples=4, batch_size=2, progress=False)
    assert est.iwae.shape == est.elbo.shape == (5,)
    assert torch.isfinite(est.iwae).all() and torch.isfinite(est.elbo).all()
    assert (est.iwae >= est.elbo - 1e-9).all()  # Jensen, on the same weights


@functools.lru_cache(maxsize=None)
def linear_gaussian_case(n=10, sigma=0.3, seed=1):
    """(A, b, x, exact log p(x)) with A^T A = sigma^2 I (posterior N(u / 2, I / 2) at
    x = b + A u + e, e orthogonal to A's columns), u ~ N(0, 0.4^2 I): a posterior near
    every freshly initialised encoder's q(z|x), so K = 2000 weights are informative."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    A = torch.linalg.qr(torch.randn(PIXELS, D, generator=g, dtype=f64))[0] * sigma
    b = torch.full((PIXELS,), 0.5, dtype=f64)
    u = 0.4 * torch.randn(n, D, generator=g, dtype=f64)
    e = sigma * torch.randn(n, PIXELS, generator=g, dtype=f64)
    e = e - (e @ A) @ A.T / sigma**2
    x = b + u @ A.T + e
    cov = A @ A.T + sigma**2 * torch.eye(PIXELS, dtype=f64)
    return A, b, x.view(n, *SHAPE), MultivariateNormal(b, cov).log_prob(x)


def check_linear_gaussian(name, options, samples=2000):
    sigma = 0.3
    A, b, x, exact = linear_gaussian_case(sigma=sigma)
    model = _make(name, options, sigma_x=sigma).double().eval()
    model.decoder = LinearDecoder(A, b)
    with torch.inference_mode():
        torch.manual_seed(2)
        lw = log_weights(model, x, samples, max_batch_samples=5000)  # (K, n)
    k, n = lw.shape
    iwae = torch.logsumexp(lw, 0) - math.log(k)
    w = torch.exp(lw - iwae)  # w / mean(w): mean 1
    se = w.std(0) / math.sqrt(k)  # delta method: sd of IWAE_K per image
    bias = w.var(0) / (2 * k)  # its O(1/K) downward bias
    gap = iwae - exact
    assert torch.isfinite(lw).all()
    assert (gap.abs() <= 5 * se + bias + 1e-6).all(), (gap, se)
    se_mean = se.square().sum().sqrt() / n
    assert abs(gap.mean() + bias.mean()) <= 4 * se_mean + 1e-6, (gap.mean(), se_mean)
    elbo = lw.mean(0)
    se_elbo = (lw.var(0).sum() / k).sqrt() / n
    assert elbo.mean() <= exact.mean() + 4 * se_elbo, (elbo.mean(), exact.mean(), se_elbo)


# --- every registered method --------------------------------------------------------------
@pytest.mark.parametrize("name,options", CASES)
def test_posterior_shapes_and_finite_log_prob(name, options):
    check_shapes_and_log_prob(name, options)


@pytest.mark.parametrize("name,options", CASES)
def test_objective_finite_with_a_gradient_for_every_parameter(name, options):
    check_objective_and_gradients(name, options)


@pytest.mark.parametrize("name,options", CASES)
def test_checkpoint_round_trip_gives_the_same_posterior(name, options, tmp_path):
    check_checkpoint_round_trip(name, options, tmp_path)


@pytest.mark.parametrize("name,options", CASES)
def test_estimate_runs(name, options):
    check_estimate_runs(name, options)


@pytest.mark.parametrize("name,options", CASES)
def test_iwae_converges_to_the_exact_log_px_of_a_linear_gaussian_decoder(name, options):
    check_linear_gaussian(name, options)


def test_every_registered_method_is_checked():
    assert {c.values[0] for c in CASES} == set(MODELS) >= {"vae", "gpvae"}


# --- planted bugs: the contract must catch each -------------------------------------------
class _ShiftedNormal(Independent):
    def log_prob(self, z):
        return super().log_prob(z) + 0.1


class ShiftedLogProb(VAE):
    """log q(z|x) 0.1 nats too high: q integrates to e^0.1."""

    def posterior(self, x):
        mean, std = self.encoder(x)
        return _ShiftedNormal(Normal(mean, std), 1)


class _LogWeightedMixture(MixtureSameFamily):
    has_rsample = True

    def rsample(self, sample_shape=torch.Size()):  # a component m ~ alpha, then z ~ q_m
        m = self.mixture_distribution.sample(sample_shape)
        z = self.component_distribution.rsample(sample_shape)  # (..., B, M, d)
        return z.gather(-2, m[..., None, None].expand(*m.shape, 1, z.shape[-1])).squeeze(-2)

    def log_prob(self, z):  # sum_m alpha_m log q_m(z) instead of log sum_m alpha_m q_m(z)
        comp = self.component_distribution.log_prob(z.unsqueeze(-2))
        return (self.mixture_distribution.probs * comp).sum(-1)


class LogWeightedMixture(VAE):
    """A two-component mixture whose density weights the components' log densities."""

    def posterior(self, x):
        mean, std = self.encoder(x)
        delta = torch.tensor([-0.6, 0.6], dtype=mean.dtype).view(1, 2, 1)
        comps = Independent(Normal(mean.unsqueeze(1) + delta, std.unsqueeze(1).expand(-1, 2, -1)),
                            1)
        weights = Categorical(probs=torch.full((x.shape[0], 2), 0.5, dtype=mean.dtype))
        return _LogWeightedMixture(weights, comps)


class _NoLogDet(AffineTransform):
    def log_abs_det_jacobian(self, x, y):
        return torch.zeros_like(x).sum(-1)


class FlowWithoutLogDet(VAE):
    """z = 1.5 z0 + 0.1 with the log-det left out (as if volume-preserving)."""

    def posterior(self, x):
        mean, std = self.encoder(x)
        return TransformedDistribution(Independent(Normal(mean, std), 1),
                                       [_NoLogDet(0.1, 1.5, event_dim=1)])


class UnusedParameter(VAE):
    def __init__(self, config, image_shape):
        super().__init__(config, image_shape)
        self.temperature = nn.Parameter(torch.ones(()))  # never used: no gradient


class UnsavedState(VAE):
    """q(z|x) depends on a random buffer that checkpoints do not hold."""

    def __init__(self, config, image_shape):
        super().__init__(config, image_shape)
        self.register_buffer("shift", torch.randn(config.latent_dim), persistent=False)

    def posterior(self, x):
        mean, std = self.encoder(x)
        return Independent(Normal(mean + self.shift, std), 1)


class NoEventDim(VAE):
    def posterior(self, x):
        return Normal(*self.encoder(x))  # batch_shape (B, d), event_shape ()


class UndeclaredGrad(VAE):
    """Autograd inside posterior() without declaring posterior_needs_grad."""

    def posterior(self, x):
        mean, std = self.encoder(x)
        (g,) = torch.autograd.grad(self.log_likelihood(x, mean).sum(), mean,
                                   create_graph=self.training)
        return Independent(Normal(mean + 1e-3 * g, std), 1)


CHECKS = {"shapes": check_shapes_and_log_prob,
          "objective": check_objective_and_gradients,
          "checkpoint": check_checkpoint_round_trip,
          "estimate": check_estimate_runs,
          "linear_gaussian": check_linear_gaussian}

#: each plant, and the checks that must catch it (every other check must pass, so a catch
#: is the planted bug's, not an accident of the throw-away class)
PLANTS = [
    (ShiftedLogProb, {"linear_gaussian"}),
    (LogWeightedMixture, {"linear_gaussian"}),
    (FlowWithoutLogDet, {"linear_gaussian"}),
    (UnusedParameter, {"objective"}),
    (UnsavedState, {"checkpoint"}),
    (NoEventDim, {"shapes", "objective", "estimate", "linear_gaussian"}),
    (UndeclaredGrad, {"estimate", "linear_gaussian"}),  # both run without gradients
]


@pytest.mark.parametrize("plant,caught_by", PLANTS, ids=[p.__name__ for p, _ in PLANTS])
def test_the_contract_catches_planted_bugs(plant, caught_by, monkeypatch, tmp_path):
    monkeypatch.setitem(MODELS, "plant", plant)
    failed = set()
    for name, check in CHECKS.items():
        args = ("plant", {}, tmp_path) if name == "checkpoint" else ("plant", {})
        try:
            check(*args)
        except (AssertionError, RuntimeError):
            failed.add(name)
    assert failed == caught_by
