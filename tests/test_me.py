"""ME(M), the mixture encoder, against the VAE, brute force and closed forms.

q(z|x) = sum_m alpha_m(x) N(mu_m(x), sigma_m(x)^2); the training objective is the stratified
ELBO sum_m alpha_m E_{q_m}[log p(x, z) - log q(z|x)] with the full mixture log q.  Every
reference is computed by hand from the layers' weights.  Deterministic identities in float64
(rtol 1e-10); Monte Carlo checks within 5 standard errors estimated from the samples.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import LowRankMultivariateNormal
from torch.nn import functional as F

from gpvae.errors import ConfigError
from gpvae.evaluation import estimate
from gpvae.models.me import ME, GaussianMixture, MEConfig
from gpvae.models.vae import VAE, VAEConfig
from helpers import Data, LinearDecoder, assert_is_the_vae, images

SHAPE = (1, 28, 28)
LOG_2PI = math.log(2 * math.pi)


def make_model(d=2, m=3, seed=0, dtype=torch.float64, spread=2.0):
    """ME(m) with the component means pushed apart (bias offsets), so that the mixture is
    far from any one of its components."""
    torch.manual_seed(seed)
    model = ME(MEConfig(latent_dim=d, me_components=m), SHAPE).to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.encoder.head.bias[:d] += spread * torch.randn(d, generator=g, dtype=dtype)
        bias = model.component_heads.bias.view(m - 1, 2, d)
        bias[:, 0] += spread * torch.randn(m - 1, d, generator=g, dtype=dtype)
        model.mixture_head.bias.copy_(torch.randn(m, generator=g, dtype=dtype))
    return model


def reference_parts(model, x):
    """(alpha (B, M), mu (B, M, d), sigma (B, M, d)) from the layers' weights, by hand."""
    d, m = model.latent_dim, model.components
    h = model.encoder.trunk(x)
    outs = [h @ model.encoder.head.weight.T + model.encoder.head.bias]
    w = model.component_heads.weight.view(m - 1, 2 * d, -1)
    bias = model.component_heads.bias.view(m - 1, 2 * d)
    outs += [h @ w[j].T + bias[j] for j in range(m - 1)]
    raw = torch.stack(outs, dim=1)
    mu, sigma = raw[..., :d], F.softplus(raw[..., d:]) + model.encoder.min_std
    alpha = torch.softmax(h @ model.mixture_head.weight.T + model.mixture_head.bias, -1)
    return alpha, mu, sigma


def reference_log_q(alpha, mu, sigma, z):
    """log sum_m alpha_m prod_i N(z_i; mu_mi, sigma_mi) for z (..., B, d), summed by hand."""
    dens = 0
    for j in range(alpha.shape[-1]):
        mj, sj = mu[:, j], sigma[:, j]
        log_nj = (-0.5 * ((z - mj) / sj).square() - sj.log() - 0.5 * LOG_2PI).sum(-1)
        dens = dens + alpha[:, j] * log_nj.exp()
    return dens.log()


# --------------------------------------------------------------------------------------
def test_config_options_and_validation():
    assert MEConfig().me_components == 2
    assert MEConfig.size_option == "me_components"
    assert "help" in MEConfig.__dataclass_fields__["me_components"].metadata
    assert ME.posterior_needs_grad is False
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ConfigError, match="--me-components"):
            ME(MEConfig(latent_dim=2, me_components=bad), SHAPE)


def test_one_component_is_the_vae():
    torch.manual_seed(7)
    vae = VAE(VAEConfig(latent_dim=3), SHAPE)
    torch.manual_seed(7)
    me = ME(MEConfig(latent_dim=3, me_components=1), SHAPE)
    assert_is_the_vae(vae, me, images(4, dtype=torch.float32))


def test_posterior_is_the_mixture():
    model = make_model(d=3, m=4)
    x = images(5)
    q = model.posterior(x)
    assert isinstance(q, GaussianMixture)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    alpha, mu, sigma = reference_parts(model, x)
    torch.testing.assert_close(q.weights, alpha, rtol=1e-10, atol=1e-12)
    z = 2 * torch.randn(30, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), reference_log_q(alpha, mu, sigma, z),
                               rtol=1e-10, atol=1e-10)
    s = q.sample((6,))
    assert s.shape == (6, 5, 3) and torch.isfinite(q.log_prob(s)).all()
    # rsample: a sample that carries gradients to the drawn component, never to alpha
    assert not q.has_rsample
    r = q.rsample((6,))
    assert r.shape == (6, 5, 3) and torch.isfinite(q.log_prob(r)).all()
    model.zero_grad()
    r.sum().backward()
    assert model.mixture_head.weight.grad is None
    assert model.encoder.head.weight.grad.abs().sum() > 0
    torch.testing.assert_close(q.mean, (alpha.unsqueeze(-1) * mu).sum(1), rtol=1e-10, atol=1e-12)


def test_sample_and_rsample_draw_components_with_probability_alpha():
    """m ~ Cat(alpha), z ~ q_m: with far-apart components each sample's component is the
    nearest mean; the frequencies match alpha within 5 standard errors."""
    model = make_model(d=2, m=3, spread=30.0)
    x = images(1)
    q = model.posterior(x)
    n = 20000
    alpha = q.weights[0].detach()
    for draw in (q.sample, q.rsample):
        torch.manual_seed(0)
        z = draw((n,))[:, 0].detach()  # (n, d)
        nearest = (z.unsqueeze(1) - q.component_distribution.mean[0]).norm(dim=-1).argmin(1)
        freq = torch.bincount(nearest, minlength=3).double() / n
        assert ((freq - alpha).abs() < 5 * (alpha * (1 - alpha) / n).sqrt()).all(), draw
        # and within its component, z is that component's Gaussian (standardised moments)
        comp = q.component_distribution
        eps = (z - comp.mean[0][nearest]) / comp.stddev[0][nearest].detach()
        assert (eps.mean(0).abs() < 5 / math.sqrt(n)).all()
        assert ((eps.var(0) - 1).abs() < 5 * math.sqrt(2 / n)).all()


def test_mixture_density_integrates_to_one():
    model = make_model(d=2, m=3)
    x = images(2)
    q = model.posterior(x)
    h = 0.02
    grid = torch.arange(-12 + h / 2, 12, h, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 2)
    with torch.no_grad():
        mass = q.log_prob(zz).exp().sum(0) * h * h
    torch.testing.assert_close(mass, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


def test_stratified_objective_equals_brute_force():
    model = make_model(d=2, m=3)
    x = images(3)
    torch.manual_seed(11)
    obj, diag = model.training_objective(x, n_train=100)
    # by hand: one reparameterized sample per component, weighted by alpha, scored with the
    # full mixture density
    alpha, mu, sigma = reference_parts(model, x)
    torch.manual_seed(11)
    eps = torch.empty(3, 3, 2, dtype=torch.float64).normal_()  # (B, M, d), as Normal.rsample
    expected, rec = 0, 0
    for j in range(3):
        z = mu[:, j] + sigma[:, j] * eps[:, j]  # (B, d)
        log_lik = model.log_likelihood(x, z)
        log_prior = (-0.5 * z.square() - 0.5 * LOG_2PI).sum(-1)
        log_q = reference_log_q(alpha, mu, sigma, z)
        expected = expected + alpha[:, j] * (log_lik + log_prior - log_q)
        rec = rec + alpha[:, j] * log_lik
    torch.testing.assert_close(obj, expected, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(diag["rec"], rec.mean().detach(), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(diag["kl"], (rec - expected).mean().detach(), rtol=1e-10,
                               atol=1e-8)


def test_gradient_reaches_alpha_and_matches_finite_differences():
    """d objective / d (alpha head's bias) by autograd equals central differences with the
    same noise: the weights alpha_m and the alpha inside log q both carry gradient."""
    model = make_model(d=2, m=3)
    x = images(2)

    def objective():
        torch.manual_seed(5)
        return model.training_objective(x, n_train=10)[0].sum()

    model.zero_grad()
    objective().backward()
    grad = model.mixture_head.bias.grad.clone()
    assert grad.abs().max() > 1e-3 and model.mixture_head.weight.grad.abs().sum() > 0
    fd = torch.empty_like(grad)
    step = 1e-6
    with torch.no_grad():
        for i in range(3):
            model.mixture_head.bias[i] += step
            up = objective()
            model.mixture_head.bias[i] -= 2 * step
            down = objective()
            model.mixture_head.bias[i] += step
            fd[i] = (up - down) / (2 * step)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-5)
    # every parameter of the inference network gets a gradient
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- linear-Gaussian model: log p(x) and ELBO(q) known --------------------------------
SIGMA = 1.0


def linear_gaussian_me(n_images):
    """ME(2), d = 2, on z ~ N(0, I), x = A z + b + SIGMA eps (784 pixels); the encoder's
    weights zeroed so q = 0.3 N((-1.5, 0), 0.8^2) + 0.7 N((1.5, 0.5), 0.9^2) for every x."""
    torch.manual_seed(0)
    model = ME(MEConfig(latent_dim=2, me_components=2, sigma_x=SIGMA), SHAPE).double()
    g = torch.Generator().manual_seed(3)
    A = 0.02 * torch.randn(784, 2, generator=g, dtype=torch.float64)
    b = 0.5 + 0.1 * torch.randn(784, generator=g, dtype=torch.float64)
    model.decoder = LinearDecoder(A, b)
    model.likelihood.log_sigma.fill_(math.log(SIGMA))

    def pre_std(s):
        return math.log(math.expm1(s - 1e-4))

    with torch.no_grad():
        for layer in (model.encoder.head, model.component_heads, model.mixture_head):
            layer.weight.zero_()
        model.encoder.head.bias.copy_(torch.tensor([-1.5, 0.0, pre_std(0.8), pre_std(0.8)]))
        model.component_heads.bias.copy_(torch.tensor([1.5, 0.5, pre_std(0.9), pre_std(0.9)]))
        model.mixture_head.bias.copy_(torch.tensor([math.log(0.3), math.log(0.7)]))
    z = torch.randn(n_images, 2, generator=g, dtype=torch.float64)
    x = (z @ A.T + b + SIGMA * torch.randn(n_images, 784, generator=g, dtype=torch.float64))
    exact = LowRankMultivariateNormal(b, A, torch.full((784,), SIGMA**2, dtype=torch.float64))
    return model, x.reshape(n_images, *SHAPE), exact.log_prob(x), A, b


def exact_elbo(model, x, A, b):
    """ELBO(q) = E_q[log p(x|z)] + E_q[log p(z)] + H(q): the first two in closed form from
    q's mean and covariance (the decoder is linear), the entropy on a grid (d = 2)."""
    q = model.posterior(x[:1])
    alpha = q.weights[0]
    mu, sd = q.component_distribution.mean[0], q.component_distribution.stddev[0]
    mean = (alpha[:, None] * mu).sum(0)
    second = (alpha[:, None, None] * (torch.diag_embed(sd.square())
                                      + mu.unsqueeze(-1) * mu.unsqueeze(-2))).sum(0)
    cov = second - torch.outer(mean, mean)
    r = x.flatten(1) - b - A @ mean
    e_log_lik = (-0.5 * (r.square().sum(-1) + torch.trace(A @ cov @ A.T)) / SIGMA**2
                 - 784 * (math.log(SIGMA) + 0.5 * LOG_2PI))
    e_log_prior = -0.5 * torch.trace(second) - LOG_2PI
    h = 0.02
    grid = torch.arange(-8 + h / 2, 8, h, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 2)
    lq = q.log_prob(zz)[:, 0]
    entropy = -(lq.exp() * lq).sum() * h * h
    return (e_log_lik + e_log_prior + entropy).detach()


def test_iwae_converges_to_exact_log_px_and_elbo_is_below():
    model, x, log_px, _, _ = linear_gaussian_me(10)
    est = estimate(model, Data(x), samples=3000, seed=1, progress=False, max_batch_samples=30000)
    est2 = estimate(model, Data(x), samples=3000, seed=2, progress=False, max_batch_samples=30000)
    sd = (est.iwae - est2.iwae).std() / math.sqrt(2)  # per-image MC spread of IWAE
    gap = est.iwae - log_px
    assert gap.abs().max() < 6 * sd + 1e-3
    assert abs(float(gap.mean())) < 4 * sd / math.sqrt(len(x)) + 2e-3
    assert (est.elbo < log_px - 0.05).all()


def test_stratified_objective_is_unbiased_for_the_exact_elbo():
    """The mean of the stratified objective over many draws equals ELBO(q) (computed
    exactly); with a component's log q_m in place of the mixture's it would fall short by
    the mutual information I(m; z), here about 0.5 nats."""
    model, x, _, A, b = linear_gaussian_me(400)
    target = exact_elbo(model, x, A, b)
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([model.training_objective(x, n_train=1)[0] for _ in range(3)])
    err = (draws - target).flatten()
    se = err.std() / math.sqrt(err.numel())
    assert abs(float(err.mean())) < 5 * se, (float(err.mean()), float(se))
    assert se < 0.05


def test_extra_posterior_flops():
    model = ME(MEConfig(latent_dim=5, me_components=3), SHAPE)
    assert model.extra_posterior_flops(2) == 2 * (9 * 3 * 5 + 3 * 3 + 2 * 5)
