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

import gpvae.onednn as onednn_module
from gpvae.errors import ConfigError
from gpvae.evaluation import estimate
from gpvae.flops import forward_flops
from gpvae.likelihoods import GaussianLikelihood
from gpvae.models import sa as sa_module
from gpvae.models.sa import SA, SAConfig
from gpvae.models.vae import VAE, VAEConfig
from helpers import CountFlops, TanhDecoder, images
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


# --- the test-time gradient: closed forms and the decoder's backward pass written out ---------
def autograd_elbo_gradient(model, x, mu, logvar, eps):
    """grad_lambda f by autograd through instance_elbo: the straightforward reference."""
    with torch.enable_grad():
        mu, logvar = mu.detach().requires_grad_(), logvar.detach().requires_grad_()
        f = model.instance_elbo(x, mu, logvar, eps)
        return torch.autograd.grad(f.sum(), (mu, logvar))


def reference_refine_autograd(model, x, mu, logvar, noise):
    """k steps with autograd through instance_elbo (the update of Kim et al., written out)."""
    cfg = model.config
    v_mu = v_lv = 0
    for eps in noise:
        g_mu, g_lv = autograd_elbo_gradient(model, x, mu, logvar, eps)
        if cfg.sa_clip > 0:
            g_mu, g_lv = (g * torch.clamp(cfg.sa_clip / g.norm(dim=-1, keepdim=True), max=1)
                          for g in (g_mu, g_lv))
        v_mu, v_lv = cfg.sa_momentum * v_mu + g_mu, cfg.sa_momentum * v_lv + g_lv
        mu, logvar = mu + cfg.sa_lr * v_mu, logvar + cfg.sa_lr * v_lv
    return mu.detach(), logvar.detach()


class ClippedGaussian(GaussianLikelihood):
    """A likelihood sa.py has no closed-form gradient for (the autograd branch)."""

    def log_prob(self, x, out):
        return super().log_prob(x, torch.tanh(out))


def sa_model(decoder="conv", likelihood="gaussian", d=3, seed=0, **options):
    torch.manual_seed(seed)
    model = SA(SAConfig(latent_dim=d, decoder=decoder, likelihood=likelihood, sigma_x=0.3,
                        **options), SHAPE).double().eval()
    if likelihood == "gaussian-learned":
        with torch.no_grad():
            model.likelihood.log_sigma.fill_(math.log(0.2))
    return model


def lambdas(n, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            -1 + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("decoder, likelihood", [
    ("conv", "gaussian"), ("fc", "gaussian-learned"), ("conv", "bernoulli"), ("fc", "clipped"),
])
def test_test_time_gradient_equals_autograd_through_the_elbo(decoder, likelihood):
    """elbo_gradient without a graph (closed-form likelihood and KL derivatives, the paper
    decoders' backward pass written out) = autograd through instance_elbo (float64), with
    ReLUs active and inactive in every layer."""
    model = sa_model(decoder, "gaussian" if likelihood == "clipped" else likelihood)
    if likelihood == "clipped":
        model.likelihood = ClippedGaussian(0.3).double()
    assert sa_module.relu_chain(model.decoder) is not None
    x = images(4)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    mu, lv, eps = lambdas(4, 3)
    with torch.no_grad():
        got = model.elbo_gradient(x, mu, lv, eps)
    want = autograd_elbo_gradient(model, x, mu, lv, eps)
    for a, b in zip(got, want):
        assert a.grad_fn is None
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o))
             for m in model.decoder.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model.decode(mu + torch.exp(0.5 * lv) * eps)
    for h in hooks:
        h.remove()
    assert all((a > 0).any() and (a == 0).any() for a in acts)


@pytest.mark.parametrize("decoder", ["conv", "fc"])
def test_test_time_q_equals_k_autograd_steps(decoder):
    """q(z|x) of SA(3) at test time = three steps with autograd through instance_elbo."""
    model = sa_model(decoder, sa_steps=3, sa_lr=0.05, sa_clip=50.0)
    x = images(3)
    with torch.no_grad():
        mean, std = model.encoder(x)
    noise = torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mu, lv = model.refine(x, mean, 2 * std.log(), noise=noise)
    mu_ref, lv_ref = reference_refine_autograd(model, x, mean, 2 * std.log(), noise)
    torch.testing.assert_close(mu, mu_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lv, lv_ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(mu, mean, atol=1e-3)


def test_written_out_backward_follows_a_blocked_decoder_pass():
    """A decoder that runs its layers on blocks of z's (cache blocking in evaluation) gets
    its backward pass block by block: the same gradient as autograd's."""
    model = sa_model("conv")
    if not hasattr(model.decoder, "eval_block"):
        pytest.skip("this decoder has no evaluation blocks")
    x = images(7)
    mu, lv, eps = lambdas(7, 3)
    runs = []
    model.decoder.register_forward_hook(lambda *a: runs.append(1))
    model.decoder.fc[1].register_forward_hook(lambda m, i, o: runs.append(o.shape[0]))
    blocks = model.decoder.eval_block
    model.decoder.eval_block = lambda z: None if blocks(z) is None else 3  # 3 z's a block
    with torch.no_grad():
        got = model.elbo_gradient(x, mu, lv, eps)
    assert runs[-1] == 1 and len(runs) > 3 and sum(runs[:-1]) == 7  # blocks, one pass
    want = autograd_elbo_gradient(model, x, mu, lv, eps)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_other_decoders_and_autocast_take_autograd(monkeypatch):
    assert sa_module.relu_chain(linear_sa().decoder) is None
    model = sa_model("fc")
    model.decoder.net[1] = nn.Tanh()
    assert sa_module.relu_chain(model.decoder) is None
    mu, lv, eps = lambdas(2, 3)
    x = images(2)
    with torch.no_grad():
        got = model.elbo_gradient(x, mu, lv, eps)
    for a, b in zip(got, autograd_elbo_gradient(model, x, mu, lv, eps)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    model = sa_model("conv").float()
    xf, zf = images(2, dtype=torch.float32), mu.float()
    written = sa_module.decoder_log_likelihood_grad(model, xf, zf)
    calls = []
    vjp = sa_module._relu_chain_vjp
    monkeypatch.setattr(sa_module, "_relu_chain_vjp", lambda *a: calls.append(1) or vjp(*a))
    sa_module.decoder_log_likelihood_grad(model, xf, zf)
    assert calls  # once per block of the decoder's pass
    n = len(calls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sa_module.decoder_log_likelihood_grad(model, xf, zf)
    assert len(calls) == n and low.dtype == torch.float32  # autograd ran, float32 out
    torch.testing.assert_close(low, written, rtol=0.1, atol=0.1 * written.abs().max().item())


def test_test_time_posterior_forms_no_weight_gradient():
    """Eval-mode q(z|x), also under enable_grad: no parameter gets a .grad, requires_grad
    flags are unchanged, and what it multiplies is counted by the flop test below."""
    model = sa_model("conv", sa_steps=2)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.enable_grad():
        q = model.posterior(images(3))
    assert q.base_dist.loc.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


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
    """Everything the posterior multiplies = encoder forward + k decoder forwards (the
    decoder's own pass without gradients, counted as it runs: the sub-pixel form of a
    transposed convolution multiplies a few border windows more than the layer's
    multiply-adds) + extra_posterior_flops (k backward passes to z, each exactly the
    decoder's multiply-adds); so no weight gradients are formed at test time."""
    k, b, d = 2, 3, 4
    model = SA(SAConfig(latent_dim=d, sa_steps=k, decoder=decoder), SHAPE).eval()
    x = torch.rand(b, *SHAPE)
    with CountFlops() as counter:
        model.posterior(x)
    with CountFlops() as decoder_pass, torch.no_grad():
        model.decoder(torch.zeros(b, d))
    layers = forward_flops(model.decoder, torch.zeros(b, d))  # the layers' multiply-adds
    assert model.extra_posterior_flops(b) == k * layers
    plain = forward_flops(model.encoder, x) + k * decoder_pass.total
    assert counter.total == plain + model.extra_posterior_flops(b)
    # the backward pass's Linear adjoints ran on oneDNN (where available)
    assert (counter.onednn > decoder_pass.onednn) == (onednn_module._ONEDNN_LINEAR is not None)
    # the base class's generic count: the layers' forward passes plus the extra
    assert model.posterior_flops(b) == (forward_flops(model.encoder, x) + k * layers
                                        + model.extra_posterior_flops(b))
    assert SA(SAConfig(latent_dim=d, sa_steps=0), SHAPE).extra_posterior_flops(b) == 0
