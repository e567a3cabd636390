"""VLAE(k), the variational Laplace autoencoder (gpvae.models.vlae), against closed forms,
finite differences and independently computed Jacobians and Hessians.

Linear-Gaussian decoder: p(z) = N(0, I), x|z ~ N(A z + c, s^2 I), so
p(x) = N(c, A A^T + s^2 I) and p(z|x) = N(P^{-1} A^T (x - c) / s^2, P^{-1}), P = I + A^T A / s^2:
one undamped Laplace update is exact, whatever the encoder's start.
"""
import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

import gpvae.onednn as onednn_module
from gpvae.errors import ConfigError
from gpvae.evaluation import estimate
from gpvae.flops import forward_flops
from gpvae.models import vlae as vlae_module
from gpvae.models.vlae import VLAE, VLAEConfig, scale_tril_from_precision
from helpers import CountFlops, Data, TanhDecoder
from helpers import TrainableLinearDecoder as LinearDecoder

# torch's forward-mode AD jit-scripts its JVP decompositions on first use (torch's warning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

SHAPE = (1, 28, 28)
D = 784
SIGMA = 0.5


def vlae(d=3, seed=0, replace=None, **options):
    options = {"latent_dim": d, "sigma_x": SIGMA, "decoder": "fc", **options}
    torch.manual_seed(seed)
    model = VLAE(VLAEConfig(**options), SHAPE).double()
    if replace == "linear":
        g = torch.Generator().manual_seed(seed + 1)
        A = 0.1 * torch.randn(D, d, generator=g, dtype=torch.float64)
        c = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
        model.decoder = LinearDecoder(A, c)
    elif replace == "tanh":
        model.decoder = TanhDecoder(d)
    return model


def sigma_x(model):
    return model.likelihood.log_sigma.exp().item()


def sample_x(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        mean = model.decode(z)
    return mean + SIGMA * torch.randn(mean.shape, generator=g, dtype=torch.float64)


def exact_posterior(model, x):
    A, c, s = model.decoder.A.detach(), model.decoder.b.detach(), sigma_x(model)
    prec = torch.eye(A.shape[1], dtype=torch.float64) + A.T @ A / s**2
    cov = torch.linalg.inv(prec)
    return (x.flatten(1) - c) @ A @ cov / s**2, cov


def exact_log_px(model, x):
    A, c, s = model.decoder.A.detach(), model.decoder.b.detach(), sigma_x(model)
    cov = A @ A.T + s**2 * torch.eye(D, dtype=torch.float64)
    return MultivariateNormal(c, cov).log_prob(x.flatten(1))


def jacobian_by_reverse_mode(decoder, mu):
    """Each instance's decoder Jacobian (B, D, d), by autograd (not the model's code)."""
    return torch.stack([torch.autograd.functional.jacobian(lambda z: decoder(z).flatten(), m)
                        for m in mu])


# --- exactness on the linear-Gaussian model ---------------------------------------------------
@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-learned"])
def test_one_undamped_step_is_the_exact_posterior_so_iwae_equals_elbo_equals_log_px(likelihood):
    model = vlae(replace="linear", likelihood=likelihood, vlae_steps=1, vlae_eta=1.0)
    if likelihood == "gaussian-learned":
        with torch.no_grad():
            model.likelihood.log_sigma.fill_(math.log(0.7))  # not the start value
    x = sample_x(model, 20)
    model.eval()
    q = model.posterior(x)
    mean, cov = exact_posterior(model, x)
    torch.testing.assert_close(q.mean, mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(q.covariance_matrix, cov.expand(20, -1, -1), rtol=1e-9, atol=1e-12)
    # every importance weight equals p(x): IWAE = ELBO = log p(x), through gpvae.evaluation
    # (which runs under torch.inference_mode)
    est = estimate(model, Data(x), samples=16, progress=False)
    exact = exact_log_px(model, x)
    torch.testing.assert_close(est.iwae, exact, rtol=0, atol=1e-7)
    torch.testing.assert_close(est.elbo, exact, rtol=0, atol=1e-7)


@pytest.mark.parametrize("schedule", ["harmonic", "constant"])
def test_damped_updates_follow_the_schedule(schedule):
    """Linear decoder: mu* is the exact posterior mean m at every step, so
    mu_k - m = prod_t (1 - eta_t) (mu_0 - m), eta_t = eta_0 / (t + 1) or eta_0."""
    k, eta0 = 3, 0.5
    model = vlae(replace="linear", vlae_steps=k, vlae_eta=eta0, vlae_schedule=schedule)
    x = sample_x(model, 5)
    with torch.no_grad():
        mu0 = model.encoder(x)
        mu_k, _ = model.laplace(x, mu0)
    m, _ = exact_posterior(model, x)
    etas = [eta0 / (t + 1) if schedule == "harmonic" else eta0 for t in range(k)]
    factor = math.prod(1 - e for e in etas)
    torch.testing.assert_close(mu_k - m, factor * (mu0 - m), rtol=1e-8, atol=1e-10)


# --- the Jacobian, the precision, q ----------------------------------------------------------
@pytest.mark.parametrize("decoder", ["fc", "conv"])
def test_jacobian_matches_finite_differences(decoder):
    d, b, h = 3, 2, 1e-6
    model = vlae(d=d, decoder=decoder)
    mu = torch.randn(b, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        jac, out = model.linearize(mu)
        assert jac.shape == (b, D, d) and out.shape == (b, D)
        torch.testing.assert_close(out, model.decode(mu).flatten(1), rtol=1e-12, atol=1e-12)
        for j in range(d):
            e = torch.zeros(d, dtype=torch.float64)
            e[j] = h
            fd = (model.decode(mu + e) - model.decode(mu - e)).flatten(1) / (2 * h)
            torch.testing.assert_close(jac[..., j], fd, rtol=1e-6, atol=1e-7)
    if decoder == "conv":  # the channels-last switch is put back
        assert model.decoder.channels_last is True


@pytest.mark.parametrize("likelihood", ["gaussian", "gaussian-learned", "bernoulli"])
def test_covariance_is_the_inverse_laplace_precision_at_the_final_mean(likelihood):
    """q = N(mu_k, Lambda^-1), Lambda = I + J^T W J at mu_k: W = I / s^2 (Gaussian) or
    Diag(s (1 - s)) with s = sigmoid(f(mu_k)) (Bernoulli, Gauss-Newton); J by reverse mode."""
    model = vlae(d=3, likelihood=likelihood, vlae_steps=2)
    if likelihood == "gaussian-learned":
        with torch.no_grad():
            model.likelihood.log_sigma.fill_(math.log(0.3))
    x = sample_x(model, 3).clamp(0, 1)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    model.eval()
    q = model.posterior(x)
    mu = q.mean
    with torch.no_grad():
        jac = jacobian_by_reverse_mode(model.decoder, mu)
        if likelihood == "bernoulli":
            s = torch.sigmoid(model.decode(mu).flatten(1))
            weight = (s * (1 - s)).unsqueeze(-1)
        else:
            weight = 1 / sigma_x(model) ** 2
        prec = torch.eye(3, dtype=torch.float64) + jac.transpose(1, 2) @ (weight * jac)
    cov = torch.linalg.inv(prec)
    torch.testing.assert_close(q.covariance_matrix, cov, rtol=1e-8, atol=1e-12)
    # a valid scale_tril (lower triangular, positive diagonal), and log q right
    tril = q.scale_tril
    assert torch.equal(tril, torch.tril(tril)) and (torch.diagonal(tril, 0, -2, -1) > 0).all()
    z = q.sample((4,))
    torch.testing.assert_close(q.log_prob(z), MultivariateNormal(mu, cov).log_prob(z),
                               rtol=1e-10, atol=1e-10)


def test_scale_tril_from_precision():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, 5, generator=g, dtype=torch.float64)
    prec = torch.eye(5, dtype=torch.float64) + a @ a.transpose(1, 2)
    s = scale_tril_from_precision(prec)
    assert torch.equal(s, torch.tril(s))
    torch.testing.assert_close(s @ s.transpose(1, 2), torch.linalg.inv(prec))


def test_bernoulli_gauss_newton_is_the_exact_hessian_and_newton_finds_the_mode():
    """Linear logits: J^T Diag(s(1-s)) J is the exact Hessian of -log p(x|z), so Lambda is
    the Hessian of -log p(x, z) at mu_k, and undamped updates converge to its mode."""
    model = vlae(d=3, replace="linear", likelihood="bernoulli", vlae_steps=12, vlae_eta=1.0,
                 vlae_schedule="constant")
    x = torch.bernoulli(torch.full((3, *SHAPE), 0.3, dtype=torch.float64),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, prec = model.laplace(x, model.encoder(x))

    def neg_log_joint(z):
        return -(model.log_likelihood(x[i:i + 1], z[None]) + model.log_prior(z[None])).sum()

    for i in range(3):
        hess = torch.autograd.functional.hessian(neg_log_joint, mu[i])
        torch.testing.assert_close(prec[i], hess, rtol=1e-9, atol=1e-9)
        grad = torch.autograd.functional.jacobian(neg_log_joint, mu[i])
        assert grad.abs().max() < 1e-8


def jacfwd_reference(model, mu):
    """J (B, D, d) by torch.func.jacfwd of each instance's decoder (not the model's code)."""
    return torch.stack([torch.func.jacfwd(lambda z: model.decode(z).flatten())(m) for m in mu])


def test_fc_decoder_jacobian_by_explicit_products_equals_forward_mode():
    """The FC decoder's J = W3 D2 W2 D1 W1 (mlp_jacobian) equals jacfwd's, with ReLUs both
    active and inactive in every hidden layer; J is the transpose of a contiguous J^T."""
    d = 3
    model = vlae(d=d)
    assert vlae_module.mlp_layers(model.decoder) is not None
    mu = 2 * torch.randn(4, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        jac, out = model.linearize(mu)
        pre = model.decoder.net[0](mu)
        pre2 = model.decoder.net[2](torch.relu(pre))
    assert (pre > 0).any() and (pre < 0).any() and (pre2 > 0).any() and (pre2 < 0).any()
    assert jac.shape == (4, D, d) and jac.mT.is_contiguous()
    torch.testing.assert_close(jac, jacfwd_reference(model, mu), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(out, model.decode(mu).flatten(1), rtol=0, atol=0)


def test_fc_decoder_explicit_path_gives_forward_modes_q_and_training_gradients(monkeypatch):
    """q(z|x) (eval) and the gradient of the training objective (through every update) are
    those of the jacfwd path, to rounding (float64, learned sigma_x, k = 2)."""
    model = vlae(d=3, vlae_steps=2, likelihood="gaussian-learned")
    x = sample_x(model, 3)

    def run():
        model.eval()
        q = model.posterior(x)
        model.train()
        model.zero_grad()
        torch.manual_seed(4)
        obj, _ = model.training_objective(x, 100)
        obj.sum().backward()
        return q, {n: p.grad.clone() for n, p in model.named_parameters()}

    q, grads = run()
    monkeypatch.setattr(vlae_module, "mlp_layers", lambda decoder: None)  # jacfwd
    q_ref, grads_ref = run()
    torch.testing.assert_close(q.mean, q_ref.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q.scale_tril, q_ref.scale_tril, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-9, atol=1e-11, msg=name)


def test_float32_q_with_onednn_products_is_the_blas_one(monkeypatch):
    """Eval in float32 (oneDNN's products, where available) gives F.linear's q to float32
    rounding."""
    torch.manual_seed(0)
    model = VLAE(VLAEConfig(latent_dim=4, decoder="fc", vlae_steps=2), SHAPE).eval()
    x = torch.rand(5, *SHAPE, generator=torch.Generator().manual_seed(1))
    q = model.posterior(x)
    monkeypatch.setattr(onednn_module, "_ONEDNN_LINEAR", None)
    q_ref = model.posterior(x)
    torch.testing.assert_close(q.mean, q_ref.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(q.scale_tril, q_ref.scale_tril, rtol=1e-4, atol=1e-6)


def test_explicit_products_only_for_a_plain_fc_relu_decoder():
    assert vlae_module.mlp_layers(vlae(d=3, decoder="conv").decoder) is None
    assert vlae_module.mlp_layers(vlae(d=3, replace="tanh").decoder) is None
    model = vlae(d=3)
    model.decoder.net[1] = nn.Tanh()  # no longer a ReLU network: forward mode
    assert vlae_module.mlp_layers(model.decoder) is None
    mu = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        jac, _ = model.linearize(mu)
    torch.testing.assert_close(jac, jacfwd_reference(model, mu), rtol=1e-12, atol=1e-13)


def test_fast_linear_is_f_linear_and_falls_back(monkeypatch):
    """oneDNN's product (float32, no autograd) equals F.linear to rounding; with autograd,
    float64, or a oneDNN op that fails, F.linear itself runs (a failing op is dropped)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 6, 9, generator=g), torch.randn(5, 9, generator=g)
    ref = torch.nn.functional.linear(x, w)
    with torch.no_grad():
        torch.testing.assert_close(onednn_module.fast_linear(x, w), ref, rtol=1e-5, atol=1e-5)
    wg = w.clone().requires_grad_()
    y = onednn_module.fast_linear(x, wg)
    assert y.grad_fn is not None and torch.equal(y, torch.nn.functional.linear(x, wg))
    assert torch.equal(onednn_module.fast_linear(x.double(), w.double()),
                       torch.nn.functional.linear(x.double(), w.double()))

    def broken(*args):
        raise RuntimeError("signature changed")

    monkeypatch.setattr(onednn_module, "_ONEDNN_LINEAR", broken)
    with torch.no_grad():
        assert torch.equal(onednn_module.fast_linear(x, w), ref)
    assert onednn_module._ONEDNN_LINEAR is None


def test_an_instance_gets_the_same_q_alone_or_in_a_batch():
    model = vlae(d=3, vlae_steps=2).eval()
    x = sample_x(model, 4)
    q = model.posterior(x)
    for b in range(4):
        qb = model.posterior(x[b:b + 1])
        torch.testing.assert_close(qb.mean, q.mean[b:b + 1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(qb.scale_tril, q.scale_tril[b:b + 1], rtol=1e-10, atol=1e-12)


# --- gradients through the updates -------------------------------------------------------------
def test_gradient_through_the_updates_matches_finite_differences():
    """(mu_k, Lambda_k) as functions of mu_0, a decoder weight and a learned log sigma_x."""
    d = 2
    model = vlae(d=d, replace="tanh", likelihood="gaussian-learned", vlae_steps=2)
    model.train()
    x = sample_x(model, 2)

    class Laplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, mu0):
            return model.laplace(x, mu0)

    def f(mu0, w1, log_sigma):
        return torch.func.functional_call(
            Laplace(), {"model.decoder.w1": w1, "model.likelihood.log_sigma": log_sigma}, (mu0,))

    mu0 = 0.5 * torch.randn(2, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = (mu0, model.decoder.w1.detach().clone(), model.likelihood.log_sigma.detach().clone())
    inputs = tuple(t.requires_grad_() for t in inputs)
    # fast mode: one random projection of the Jacobian (a full check costs 12 x 11 passes)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("decoder, likelihood", [
    ("fc", "gaussian-learned"), ("fc", "bernoulli"), ("conv", "gaussian"),
])
def test_trains_and_evaluates_with_fc_and_conv_decoders(decoder, likelihood):
    torch.manual_seed(0)
    model = VLAE(VLAEConfig(latent_dim=3, decoder=decoder, likelihood=likelihood,
                            vlae_steps=2), SHAPE)
    x = model.likelihood.prepare(torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0)))
    obj, _ = model.training_objective(x, 100)
    assert obj.shape == (3,) and torch.isfinite(obj).all()
    obj.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.inference_mode():
        q = model.posterior(x)
        z = q.sample((5,))
        log_q = q.log_prob(z)
    assert q.batch_shape == (3,) and q.event_shape == (3,) and z.shape == (5, 3, 3)
    assert torch.isfinite(log_q).all()
    with torch.enable_grad():  # eval mode, a caller with gradients on: no graph kept
        q_grad = model.posterior(x)
    assert q_grad.mean.grad_fn is None and q_grad.scale_tril.grad_fn is None
    with torch.no_grad():  # the same q with or without autograd
        model.train()
        torch.testing.assert_close(model.posterior(x).mean, q.mean)
    if decoder == "conv":
        assert model.decoder.channels_last is True


# --- options and cost ----------------------------------------------------------------------
@pytest.mark.parametrize("option, value, flag", [
    ("vlae_steps", 0, "--vlae-steps"), ("vlae_steps", 2.0, "--vlae-steps"),
    ("vlae_eta", 0.0, "--vlae-eta"), ("vlae_eta", 1.5, "--vlae-eta"),
    ("vlae_schedule", "cosine", "--vlae-schedule"),
])
def test_bad_options_name_their_flag(option, value, flag):
    with pytest.raises(ConfigError, match=flag):
        VLAE(VLAEConfig(latent_dim=2, **{option: value}), SHAPE)


def test_size_option_is_the_number_of_updates():
    assert VLAEConfig.size_option == "vlae_steps"
    assert VLAE.posterior_needs_grad is True


@pytest.mark.parametrize("onednn", [True, False])
def test_extra_posterior_flops_counts_the_products(onednn, monkeypatch):
    """The posterior's matrix products = encoder forward + (k + 1) decoder forwards (plain
    module passes) + the products of extra_posterior_flops, exactly: less its Cholesky and
    triangular-solve terms and J^T r (a product and a sum over pixels), which are not matrix
    products.  The FC decoder's explicit Jacobian multiplies no zero weight tangent and no
    basis tangent by the first layer (F_1), so its products are the floor's."""
    k, b, d = 2, 3, 4
    model = VLAE(VLAEConfig(latent_dim=d, vlae_steps=k, decoder="fc"), SHAPE).eval()
    x = torch.rand(b, *SHAPE)
    if not onednn:
        monkeypatch.setattr(onednn_module, "_ONEDNN_LINEAR", None)  # F.linear throughout
    with CountFlops() as counter:  # oneDNN's products included
        model.posterior(x)
    dec = forward_flops(model.decoder, torch.zeros(b, d))
    first = 2 * d * model.decoder.net[0].out_features * b
    plain = forward_flops(model.encoder, x) + (k + 1) * dec
    factorizations = b * (k * (d**3 // 3 + 2 * d * d) + d**3 // 3 + d**3)
    products = model.extra_posterior_flops(b) - factorizations - b * k * 2 * D * d
    assert products == (k + 1) * (d * (dec - first) + b * 2 * D * d * d)
    assert counter.total == plain + products
    assert (counter.onednn > 0) == (onednn and onednn_module._ONEDNN_LINEAR is not None)
    assert model.posterior_flops(b) == plain + model.extra_posterior_flops(b)
