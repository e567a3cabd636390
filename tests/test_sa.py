"""SA(k), the semi-amortized VAE (gpvae.models.sa), against the VAE, closed forms, a
hand-written reference of the update and finite differences.

Most checks use a linear-Gaussian decoder g(z) = A z + c (D = 784 pixels, float64), where
the ELBO of a diagonal Gaussian q and its gradients are known in closed form:

    E_q log p(x|z) = -(||x - A mu - c||^2 + sum_j sigma_j^2 ||A_j||^2) / (2 s^2)
                     - D log(s sqrt(2 pi)),
    KL(q || N(0, I)) = 1/2 sum_j (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2).
"""
import math

import pytest
import torch
from torch import nn

from gpvae.errors import ConfigError
from gpvae.evaluation import estimate
from gpvae.flops import forward_flops
from gpvae.models.sa import SA, SAConfig
from gpvae.models.vae import VAE, VAEConfig
from helpers import CountFlops, TanhDecoder
from helpers import TrainableLinearDecoder as LinearDecoder

SHAPE = (1, 28, 28)
D = 784
SIGMA = 0.5


def linear_sa(d=3, scale=0.05, seed=0, **options):
    """SA in float64 with a fixed linear-Gaussian decoder, and data drawn from it."""
    options = {"latent_dim": d, "sigma_x": SIGMA, "decoder": "fc", **options}
    torch.manual_seed(seed)
    model = SA(SAConfig(**options), SHAPE).double()
    g = torch.Generator().manual_seed(seed + 1)
    A = scale * torch.randn(D, d, generator=g, dtype=torch.float64)
    c = 0.5 + 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    model.decoder = LinearDecoder(A, c)
    return model


def sample_x(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        mean = model.decode(z)
    return mean + SIGMA * torch.randn(mean.shape, generator=g, dtype=torch.float64)


def exact_elbo(model, x, mu, logvar):
    """Closed-form ELBO of N(mu, diag exp(logvar)) under the linear-Gaussian decoder."""
    A, c, s = model.decoder.A, model.decoder.b, sigma_x(model)
    resid = x.flatten(1) - mu @ A.T - c
    rec = -(resid.square().sum(-1) + logvar.exp() @ A.square().sum(0)) / (2 * s**2)
    rec = rec - D * (math.log(s) + 0.5 * math.log(2 * math.pi))
    kl = 0.5 * (logvar.exp() + mu.square() - 1 - logvar).sum(-1)
    return (rec - kl).detach()


def sigma_x(model):
    """The model's sigma_x (stored as float32 log sigma, so not exactly SIGMA)."""
    return model.likelihood.log_sigma.exp().item()


def start(model, x):
    with torch.no_grad():
        mean, std = model.encoder(x)
    return mean, 2 * std.log()


def reference_refine(model, x, mu, logvar, noise, lr, momentum, clip):
    """The update written out by hand, with the linear-Gaussian ELBO's analytic gradient:
    z = mu + sigma eps, r = A^T (x - c - A z) / s^2,
    df/dmu = r - mu,  df/dlogvar = r * sigma * eps / 2 - (sigma^2 - 1) / 2."""
    A, c = model.decoder.A.detach(), model.decoder.b.detach()
    v_mu = torch.zeros_like(mu)
    v_lv = torch.zeros_like(logvar)
    for eps in noise:
        sigma = torch.exp(0.5 * logvar)
        z = mu + sigma * eps
        r = (x.flatten(1) - c - z @ A.T) @ A / sigma_x(model)**2
        grads = [r - mu, r * sigma * eps / 2 - (sigma.square() - 1) / 2]
        if clip > 0:
            grads = [g * torch.clamp(clip / g.norm(dim=-1, keepdim=True), max=1) for g in grads]
        v_mu, v_lv = momentum * v_mu + grads[0], momentum * v_lv + grads[1]
        mu, logvar = mu + lr * v_mu, logvar + lr * v_lv
    return mu, logvar


# --- k = 0 is the VAE ---------------------------------------------------------------------
def test_zero_steps_is_the_vae_bit_for_bit():
    torch.manual_seed(3)
    vae = VAE(VAEConfig(latent_dim=4), SHAPE)
    torch.manual_seed(3)
    sa = SA(SAConfig(latent_dim=4, sa_steps=0), SHAPE)
    # same initialization from the same seed, interchangeable state dicts
    assert list(vae.state_dict()) == list(sa.state_dict())
    for (name, a), b in zip(vae.state_dict().items(), sa.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(0))
    qv, qs = vae.posterior(x), sa.posterior(x)
    assert torch.equal(qv.base_dist.loc, qs.base_dist.loc)
    assert torch.equal(qv.base_dist.scale, qs.base_dist.scale)
    torch.manual_seed(7)
    ov, _ = vae.training_objective(x, 100)
    torch.manual_seed(7)
    os_, _ = sa.training_objective(x, 100)
    assert torch.equal(ov, os_)
    ov.sum().backward()
    os_.sum().backward()
    for (name, p), q in zip(vae.named_parameters(), sa.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_sa_has_the_vaes_parameters_for_every_k():
    vae_keys = list(VAE(VAEConfig(latent_dim=4), SHAPE).state_dict())
    assert list(SA(SAConfig(latent_dim=4, sa_steps=3), SHAPE).state_dict()) == vae_keys


# --- the update -----------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [0.0, 5.0, 0.3])
def test_refine_matches_the_hand_written_update(clip):
    """Ascent, momentum, per-instance Euclidean-norm clipping of each block, the noise."""
    lr, momentum, k = 0.03, 0.5, 3
    model = linear_sa(sa_steps=k, sa_lr=lr, sa_momentum=momentum, sa_clip=clip)
    x = sample_x(model, 6)
    mu0, lv0 = start(model, x)
    noise = torch.randn(k, *mu0.shape, generator=torch.Generator().manual_seed(5),
                        dtype=torch.float64)
    mu, lv = model.refine(x, mu0, lv0, noise=noise)
    mu_ref, lv_ref = reference_refine(model, x, mu0, lv0, noise, lr, momentum, clip)
    torch.testing.assert_close(mu, mu_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lv, lv_ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(mu, mu0)


def test_clipped_first_step_has_length_lr_times_clip():
    """With clipping active, step 1 moves each block by exactly alpha * c (norm, not norm^2)."""
    lr, clip = 0.01, 0.2
    model = linear_sa(sa_steps=1, sa_lr=lr, sa_clip=clip)
    x = sample_x(model, 5)
    mu0, lv0 = start(model, x)
    mu, lv = model.refine(x, mu0, lv0)
    torch.testing.assert_close((mu - mu0).norm(dim=-1), torch.full((5,), lr * clip,
                                                                   dtype=torch.float64))


def test_steps_are_per_instance_whatever_the_batch():
    """An instance's refined lambda is the same alone or in a batch (no batch mean, no
    batch-wide clipping), with clipping active for some instances and not others."""
    k = 4
    model = linear_sa(sa_steps=k, sa_lr=0.05, sa_clip=8.0)
    x = sample_x(model, 7)
    mu0, lv0 = start(model, x)
    mu0 = mu0 * torch.linspace(0.0, 3.0, 7, dtype=torch.float64)[:, None]  # varied gradients
    noise = torch.randn(k, *mu0.shape, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    mu, lv = model.refine(x, mu0, lv0, noise=noise)
    for b in range(7):
        s = slice(b, b + 1)
        mu_b, lv_b = model.refine(x[s], mu0[s], lv0[s], noise=noise[:, s])
        torch.testing.assert_close(mu_b, mu[s], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lv_b, lv[s], rtol=1e-12, atol=1e-12)


def test_refined_elbo_is_higher_than_the_amortized_one():
    """Ascent raises the exact ELBO from the encoder's start for almost every image, and
    on average closes more than half of the gap to the best diagonal Gaussian (mean: the
    exact posterior mean m; variances 1 / P_jj, P = I + A^T A / s^2)."""
    model = linear_sa(sa_steps=8, sa_lr=0.03)
    x = sample_x(model, 64)
    mu0, lv0 = start(model, x)
    before = exact_elbo(model, x, mu0, lv0)
    model.eval()
    torch.manual_seed(0)
    q = model.posterior(x)
    after = exact_elbo(model, x, q.base_dist.loc, 2 * q.base_dist.scale.log())
    A, c = model.decoder.A.detach(), model.decoder.b.detach()
    prec = torch.eye(3, dtype=torch.float64) + A.T @ A / sigma_x(model)**2
    m = (x.flatten(1) - c) @ A @ torch.linalg.inv(prec) / sigma_x(model)**2
    best = exact_elbo(model, x, m, -torch.log(torch.diagonal(prec)).expand_as(m))
    assert (after <= best + 1e-9).all()
    assert (after > before).float().mean() > 0.95
    assert (after - before).mean() > 0.5 * (best - before).mean() > 1.0


def test_noise_is_fresh_per_step_or_shared():
    k = 3
    for mode in ("fresh", "shared"):
        model = linear_sa(sa_steps=k, sa_lr=0.03, sa_noise=mode)
        x = sample_x(model, 4)
        mu0, lv0 = start(model, x)
        torch.manual_seed(11)
        drawn = [torch.randn_like(mu0) for _ in range(k)]
        noise = torch.stack(drawn if mode == "fresh" else [drawn[0]] * k)
        expected = model.refine(x, mu0, lv0, noise=noise)
        torch.manual_seed(11)
        got = model.refine(x, mu0, lv0)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- gradients through the unrolled steps -------------------------------------------------
def test_gradient_through_the_unrolled_steps_matches_finite_differences():
    """d (ELBO after k steps) / d (lambda_0, decoder weights), with the Hessian terms of
    every step, against central differences (float64, fixed noise, clipping active)."""
    k, d = 3, 2
    torch.manual_seed(0)
    model = SA(SAConfig(latent_dim=d, sigma_x=SIGMA, decoder="fc", sa_steps=k, sa_lr=0.05,
                        sa_clip=2.0), SHAPE).double()
    model.decoder = TanhDecoder(d)
    model.train()
    x = sample_x(model, 2)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(k, 2, d, generator=g, dtype=torch.float64)
    eps = torch.randn(2, d, generator=g, dtype=torch.float64)
    mu0 = 0.3 * torch.randn(2, d, generator=g, dtype=torch.float64)
    lv0 = -0.5 + 0.2 * torch.randn(2, d, generator=g, dtype=torch.float64)
    w1 = model.decoder.w1.detach().clone()

    class FinalElbo(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, mu, lv):
            mu_k, lv_k = model.refine(x, mu, lv, noise=noise, create_graph=True)
            return model.instance_elbo(x, mu_k, lv_k, eps), mu_k

    def final_elbo(mu, lv, w):
        return torch.func.functional_call(FinalElbo(), {"model.decoder.w1": w}, (mu, lv))

    # clipping must be active in the checked region for the check to cover it
    with torch.enable_grad():
        mu_r = mu0.clone().requires_grad_()
        f0 = model.instance_elbo(x, mu_r, lv0, noise[0])
        (gm,) = torch.autograd.grad(f0.sum(), mu_r)
    assert (gm.norm(dim=-1) > 2.0).any()
    inputs = tuple(t.clone().requires_grad_() for t in (mu0, lv0, w1))
    assert torch.autograd.gradcheck(final_elbo, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_training_objective_reaches_every_parameter_through_the_steps():
    torch.manual_seed(0)
    model = SA(SAConfig(latent_dim=4, sa_steps=2), SHAPE)
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    obj, diag = model.training_objective(x, 100)
    assert obj.shape == (3,) and torch.isfinite(obj).all()
    obj.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# --- test time ------------------------------------------------------------------------------
def test_posterior_at_test_time_is_detached_and_works_without_grad():
    model = linear_sa(sa_steps=2, sa_lr=0.03)
    x = sample_x(model, 4)
    model.eval()
    results = []
    for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        torch.manual_seed(0)
        with ctx():
            q = model.posterior(x)
        loc, scale = q.base_dist.loc, q.base_dist.scale
        assert loc.grad_fn is None and scale.grad_fn is None and not loc.requires_grad
        results.append((loc, scale))
    for loc, scale in results[1:]:
        assert torch.equal(loc, results[0][0]) and torch.equal(scale, results[0][1])
    model.train()
    torch.manual_seed(0)
    q = model.posterior(x)
    assert q.base_dist.loc.grad_fn is not None
    torch.testing.assert_close(q.base_dist.loc, results[0][0], rtol=0, atol=0)


def test_estimate_runs_under_inference_mode_and_iwae_is_above_the_elbo():
    model = linear_sa(sa_steps=2, sa_lr=0.03)
    x = sample_x(model, 6)

    class Data:
        def __len__(self):
            return len(x)

        def batch(self, idx, device=None):
            return x[idx]

    est = estimate(model, Data(), samples=20, progress=False)
    assert torch.isfinite(est.iwae).all() and (est.iwae >= est.elbo - 1e-9).all()


# --- options and cost -----------------------------------------------------------------------
@pytest.mark.parametrize("option, value, flag", [
    ("sa_steps", -1, "--sa-steps"), ("sa_steps", 1.5, "--sa-steps"),
    ("sa_lr", 0.0, "--sa-lr"), ("sa_lr", float("nan"), "--sa-lr"),
    ("sa_momentum", 1.0, "--sa-momentum"), ("sa_momentum", -0.1, "--sa-momentum"),
    ("sa_clip", -1.0, "--sa-clip"), ("sa_noise", "sometimes", "--sa-noise"),
])
def test_bad_options_name_their_flag(option, value, flag):
    with pytest.raises(ConfigError, match=flag):
        SA(SAConfig(latent_dim=2, **{option: value}), SHAPE)


def test_size_option_is_the_number_of_steps():
    assert SAConfig.size_option == "sa_steps"
    assert SA.posterior_needs_grad is True


@pytest.mark.parametrize("decoder", ["conv", "fc"])
def test_extra_posterior_flops_is_the_decoder_backward_of_each_step(decoder):
    """Everything the posterior multiplies = encoder forward + k decoder forwards (plain
    module passes) + extra_posterior_flops; so no weight gradients are formed at test time."""
    k, b, d = 2, 3, 4
    model = SA(SAConfig(latent_dim=d, sa_steps=k, decoder=decoder), SHAPE).eval()
    x = torch.rand(b, *SHAPE)
    with CountFlops() as counter:
        model.posterior(x)
    plain = forward_flops(model.encoder, x) + k * forward_flops(model.decoder, torch.zeros(b, d))
    assert model.extra_posterior_flops(b) == k * forward_flops(model.decoder, torch.zeros(b, d))
    assert counter.total == plain + model.extra_posterior_flops(b)
    if hasattr(model, "posterior_flops"):  # the base class's generic count sees the rest
        assert model.posterior_flops(b) == counter.total
    assert SA(SAConfig(latent_dim=d, sa_steps=0), SHAPE).extra_posterior_flops(b) == 0
