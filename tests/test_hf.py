"""HF(k), the Householder flow (Tomczak & Welling 2016), against closed forms.

q(z_k|x) must be the Gaussian N(H mu, H Diag(sigma^2) H^T), H = H_k ... H_1 with
H_t = I - 2 v_t v_t^T / ||v_t||^2, v_1 = Linear(h(x)), v_{t+1} = Linear(v_t).  Every
reference below is built from the layers' weights by hand, not through gpvae.models.hf.
Deterministic identities in float64 (rtol 1e-10); Monte Carlo checks within 5 standard
errors estimated from the samples.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from gpvae.errors import ConfigError
from gpvae.evaluation import estimate, log_weights
from gpvae.models.hf import HF, HFConfig, HouseholderNormal
from gpvae.networks import GaussianEncoder
from helpers import Data, LinearDecoder, images

SHAPE = (1, 28, 28)


def make_model(d=4, k=3, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = HF(HFConfig(latent_dim=d, hf_flows=k), SHAPE).to(dtype)
    # larger Householder-layer weights, so that the reflections are far from each other
    with torch.no_grad():
        for layer in model.householder:
            layer.weight.mul_(3.0)
            layer.bias.normal_()
    return model


def reference(model, x):
    """(mu, sigma, H) from the layers' weights, by hand: H = H_k ... H_1."""
    mean, std = GaussianEncoder.forward(model.encoder, x)
    v = model.encoder.trunk(x)
    d = model.latent_dim
    H = torch.eye(d, dtype=x.dtype).expand(x.shape[0], d, d)
    for layer in model.householder:
        v = v @ layer.weight.T + layer.bias
        outer = v.unsqueeze(-1) * v.unsqueeze(-2)
        Ht = torch.eye(d, dtype=x.dtype) - 2 * outer / (v * v).sum(-1)[:, None, None]
        H = Ht @ H
    return mean, std, H


def closed_form(model, x):
    mean, std, H = reference(model, x)
    cov = H @ torch.diag_embed(std.square()) @ H.transpose(-1, -2)
    return MultivariateNormal((H @ mean.unsqueeze(-1)).squeeze(-1), cov)


# --------------------------------------------------------------------------------------
def test_config_options_and_validation():
    cfg = HFConfig()
    assert cfg.hf_flows == 1
    assert HFConfig.size_option == "hf_flows"
    assert "help" in HFConfig.__dataclass_fields__["hf_flows"].metadata
    assert HF.posterior_needs_grad is False
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="--hf-flows"):
            HF(HFConfig(latent_dim=2, hf_flows=bad), SHAPE)
    assert len(HF(HFConfig(latent_dim=2, hf_flows=3), SHAPE).householder) == 3


def test_flow_is_orthogonal_and_matches_the_product_of_reflections():
    model = make_model(d=5, k=4)
    x = images(3)
    q = model.posterior(x)
    H = q.householder_matrix()
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(H.transpose(-1, -2) @ H, eye.expand_as(H), rtol=0, atol=1e-13)
    torch.testing.assert_close(H, reference(model, x)[2], rtol=0, atol=1e-13)
    # the transform applied to points is that matrix; its inverse undoes it; log-det 0
    z0 = torch.randn(7, 3, 5, dtype=torch.float64)
    zk = q.flow(z0)
    torch.testing.assert_close(zk, (H @ z0.unsqueeze(-1)).squeeze(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(q.flow.inv(zk.clone()), z0, rtol=0, atol=1e-12)
    assert torch.equal(q.flow.log_abs_det_jacobian(z0, zk), torch.zeros(7, 3, dtype=torch.float64))
    # and the autograd Jacobian of one image's flow is H, with |det| = 1
    jac = torch.autograd.functional.jacobian(lambda z: q.flow._call(z)[1], z0[0])[:, 1]
    torch.testing.assert_close(jac, H[1], rtol=0, atol=1e-12)
    assert abs(abs(float(torch.linalg.det(jac))) - 1) < 1e-12


def test_zero_householder_vector_is_the_identity_not_nan():
    model = make_model(d=3, k=1)
    with torch.no_grad():
        model.householder[0].weight.zero_()
        model.householder[0].bias.zero_()
    q = model.posterior(images(2))
    z = q.rsample((4,))
    assert torch.isfinite(q.log_prob(z)).all()
    torch.testing.assert_close(q.mean, q.loc)


def test_one_reflection_variance_is_exact_where_one_dimension_dominates():
    """HF(1)'s variance in O(d) (sums before and after i, no subtraction) equals the
    brute-force diag(H D^2 H^T) to float32 rounding even for a reflection that swaps a wide
    and a narrow dimension: Var_0 = sigma_1^2 = 1e-8, which 'sum over all j minus j = i'
    would round to 0 in float32."""
    u = torch.tensor([[[1.0, 1.0, 0.0]]]) / 2 ** 0.5  # (B=1, k=1, d=3)
    sigma = torch.tensor([[1.0, 1e-4, 0.3]])
    q = HouseholderNormal(torch.zeros(1, 3), sigma, u)
    H = torch.eye(3) - 2 * u[0, 0][:, None] * u[0, 0][None, :]
    exact = (H.double().square() * sigma.double().square()).sum(-1, keepdim=True).T
    torch.testing.assert_close(q.variance.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.stddev[0, 0], torch.tensor(1e-4), rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_q_equals_the_closed_form_gaussian(k):
    model = make_model(d=4, k=k)
    x = images(3)
    q = model.posterior(x)
    ref = closed_form(model, x)
    torch.testing.assert_close(q.mean, ref.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.covariance_matrix, ref.covariance_matrix, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.variance, ref.variance, rtol=1e-10, atol=1e-12)
    # densities at points that were not sampled from q
    z = 2 * torch.randn(50, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), ref.log_prob(z), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(q.entropy(), ref.entropy(), rtol=1e-10, atol=1e-12)


def test_rsamples_have_the_closed_form_moments_and_finite_density():
    model = make_model(d=3, k=2)
    x = images(2)
    q, ref = model.posterior(x), closed_form(model, x)
    n = 20000
    torch.manual_seed(3)
    z = q.rsample((n,))
    assert z.shape == (n, 2, 3) and q.batch_shape == (2,) and q.event_shape == (3,)
    lp = q.log_prob(z)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, ref.log_prob(z), rtol=1e-10, atol=1e-10)
    # log q(z_k) is log q0 at the z0 the sample came from: the inverse undoes the forward
    torch.manual_seed(3)
    z0 = q.base_dist.rsample((n,))
    torch.testing.assert_close(lp, q.base_dist.log_prob(z0), rtol=1e-10, atol=1e-10)
    cov = ref.covariance_matrix
    se_mean = (torch.diagonal(cov, dim1=-2, dim2=-1) / n).sqrt()
    assert ((z.mean(0) - ref.mean).abs() < 5 * se_mean).all()
    zc = z - ref.mean
    emp = torch.einsum("nbi,nbj->bij", zc, zc) / n
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    se_cov = ((var.unsqueeze(-1) * var.unsqueeze(-2) + cov.square()) / n).sqrt()
    assert ((emp - cov).abs() < 5 * se_cov).all()
    # the sample is reparameterized through the flow: gradients reach the v layers
    z = q.rsample()
    (z * torch.randn_like(z)).sum().backward()
    for layer in model.householder:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_kl_is_the_closed_form_and_the_objective_is_the_elbo():
    model = make_model(d=4, k=3)
    x = images(3)
    q, ref = model.posterior(x), closed_form(model, x)
    mean, std, _ = reference(model, x)
    prior = model.prior(x)
    kl = kl_divergence(q, prior)
    std_normal = MultivariateNormal(torch.zeros(4, dtype=torch.float64),
                                    torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(kl, kl_divergence(ref, std_normal), rtol=1e-10, atol=1e-12)
    # N(0, I) is rotation invariant: the base Gaussian's KL
    torch.testing.assert_close(kl, kl_divergence(Independent(Normal(mean, std), 1), prior),
                               rtol=1e-10, atol=1e-12)
    # any diagonal Gaussian p
    loc_p = torch.randn(4, dtype=torch.float64)
    scale_p = torch.rand(4, dtype=torch.float64) + 0.5
    p = Independent(Normal(loc_p, scale_p), 1)
    torch.testing.assert_close(
        kl_divergence(q, p),
        kl_divergence(ref, MultivariateNormal(loc_p, torch.diag(scale_p.square()))),
        rtol=1e-10, atol=1e-12)
    # Monte Carlo: E_q[log q - log p] within 5 standard errors
    torch.manual_seed(4)
    z = q.rsample((20000,))
    mc = q.log_prob(z) - p.log_prob(z)
    se = mc.std(0) / math.sqrt(z.shape[0])
    assert ((mc.mean(0) - kl_divergence(q, p)).abs() < 5 * se).all()
    # the training objective is log p(x|z) - KL at one reparameterized z ~ q(z|x)
    torch.manual_seed(5)
    obj, diag = model.training_objective(x, n_train=100)
    torch.manual_seed(5)
    z = Independent(Normal(mean, std), 1).rsample()
    z = (reference(model, x)[2] @ z.unsqueeze(-1)).squeeze(-1)
    expected = model.log_likelihood(x, z) - kl_divergence(ref, std_normal)
    torch.testing.assert_close(obj, expected, rtol=1e-10, atol=1e-8)
    assert set(diag) >= {"rec", "kl"}


# --- IWAE -------------------------------------------------------------------------------
def test_iwae_runs_through_evaluation_and_is_above_the_elbo():
    torch.manual_seed(0)
    model = HF(HFConfig(latent_dim=3, hf_flows=2), SHAPE)
    est = estimate(model, Data(images(6, dtype=torch.float32)), samples=8, progress=False)
    assert torch.isfinite(est.iwae).all() and torch.isfinite(est.elbo).all()
    assert (est.iwae >= est.elbo - 1e-9).all()


def test_exact_posterior_gives_equal_weights_and_the_exact_log_px():
    """Linear-Gaussian model, d = 2: p(z|x) = N(m, C).  With H = Q S (C = Q Lambda Q^T,
    det H = +1) written as two reflections H = H_2 H_1, mu = H^T m and sigma^2 = Lambda,
    HF(2)'s q is the exact posterior: every importance weight equals p(x), so IWAE = ELBO =
    log p(x) exactly.  Any error in the flow's direction, order or density breaks it."""
    d, sigma = 2, 0.5
    torch.manual_seed(0)
    model = HF(HFConfig(latent_dim=d, hf_flows=2, sigma_x=sigma), SHAPE).double()
    g = torch.Generator().manual_seed(2)
    A = 0.1 * torch.randn(784, d, generator=g, dtype=torch.float64)
    b = 0.5 + 0.1 * torch.randn(784, generator=g, dtype=torch.float64)
    model.decoder = LinearDecoder(A, b)
    model.likelihood.log_sigma.fill_(math.log(sigma))
    x = (A @ torch.randn(d, generator=g, dtype=torch.float64) + b
         + sigma * torch.randn(784, generator=g, dtype=torch.float64)).reshape(1, *SHAPE)
    C = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + A.T @ A / sigma**2)
    m = C @ A.T @ (x.flatten() - b) / sigma**2
    lam, Q = torch.linalg.eigh(C)
    if torch.linalg.det(Q) < 0:
        Q = Q * torch.tensor([1.0, -1.0], dtype=torch.float64)
    u1 = torch.tensor([math.cos(0.3), math.sin(0.3)], dtype=torch.float64)
    H1 = torch.eye(d, dtype=torch.float64) - 2 * torch.outer(u1, u1)
    H2 = Q @ H1  # a reflection: orthogonal, symmetric, det -1
    ev, vecs = torch.linalg.eigh(H2)
    assert abs(float(ev[0]) + 1) < 1e-12
    u2 = vecs[:, 0]
    mu, std = Q.T @ m, lam.sqrt()
    with torch.no_grad():
        model.encoder.head.weight.zero_()
        model.encoder.head.bias.copy_(torch.cat([mu, torch.log(torch.expm1(std - 1e-4))]))
        for layer, u in zip(model.householder, (u1, u2)):
            layer.weight.zero_()
            layer.bias.copy_(3 * u)
    exact = float(LowRankMultivariateNormal(b, A, torch.full((784,), sigma**2,
                                            dtype=torch.float64)).log_prob(x.flatten()))
    with torch.inference_mode():
        lw = log_weights(model, x, samples=64)
    torch.testing.assert_close(lw, torch.full_like(lw, exact), rtol=0, atol=1e-8)
    est = estimate(model, Data(x), samples=16, progress=False)
    assert abs(float(est.iwae[0]) - exact) < 1e-8 and abs(float(est.elbo[0]) - exact) < 1e-8


def test_extra_posterior_flops():
    model = HF(HFConfig(latent_dim=5, hf_flows=3), SHAPE)
    d, k = 5, 3
    assert model.extra_posterior_flops(2) == 2 * (7 * d * k + 4 * k * d * d + 3 * d * d + d)
    one = HF(HFConfig(latent_dim=5, hf_flows=1), SHAPE)  # HF(1): the O(d) variance
    assert one.extra_posterior_flops(2) == 2 * (7 * d + 13 * d + d)
