"""The capacity-matched VAE (src/gpvae/models/cmvae.py): the GPVAE's eq. (9) with q(W, U) a
point mass -- checked against the VAE (at initialization, bit for bit) and against the
GPVAE's own code path (eq. 13 with Sigma = Gamma = 0).  The registry contract is
tests/test_contract.py's (``-k cmvae``)."""
from __future__ import annotations

import math

import pytest
import torch

from gpvae.errors import ConfigError
from gpvae.evaluation import estimate
from gpvae.export import export_encoder
from gpvae.flops import forward_flops
from gpvae.models import MODELS, build_model
from gpvae.models.cmvae import CMVAE, CMVAEConfig, STD_FLOOR, floored_abs
from gpvae.models.gpvae import GPVAE
from gpvae.models.vae import VAE, VAEConfig
from helpers import Data, images

MNIST = (1, 28, 28)
FACTORS = ("sigma_offdiag", "sigma_log_diag", "gamma_offdiag", "gamma_log_diag")


def _build(name, d=3, seed=0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    return build_model(name, MNIST, latent_dim=d, **options).to(dtype)


def _randomize_means(model, seed=1, scale=0.5):
    """Non-zero A = mu, C = eta: large enough that c + C psi^s changes sign somewhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("mu", "eta"):
            t = getattr(model, name)
            t.copy_(scale * torch.randn(t.shape, generator=g, dtype=t.dtype))


# --- at initialization: the VAE ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_initial_posterior_and_objective_are_the_vaes_bit_for_bit(dtype):
    vae = _build("vae", d=5, seed=0, dtype=dtype)
    cm = _build("cmvae", d=5, seed=1, dtype=dtype)
    missing, unexpected = cm.load_state_dict(vae.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {"psi_m." + k for k in cm.psi_m.state_dict()} | {
        "psi_s." + k for k in cm.psi_s.state_dict()} | {"mu", "eta"}
    x = images(6, dtype=dtype)
    qv, qc = vae.posterior(x), cm.posterior(x)
    assert type(qv) is type(qc)
    assert torch.equal(qc.mean, qv.mean) and torch.equal(qc.stddev, qv.stddev)
    for mode in ("train", "eval"):
        getattr(vae, mode)(), getattr(cm, mode)()
        torch.manual_seed(3)
        ov, dv = vae.training_objective(x, n_train=100)
        torch.manual_seed(3)
        oc, dc = cm.training_objective(x, n_train=100)
        assert torch.equal(oc, ov) and dc.keys() == dv.keys()
        assert all(torch.equal(dc[k], dv[k]) for k in dv)
    ev = estimate(vae, Data(x), samples=10, progress=False)
    ec = estimate(cm, Data(x), samples=10, progress=False)
    assert torch.equal(ec.iwae, ev.iwae) and torch.equal(ec.elbo, ev.elbo)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_initial_posterior_is_the_vaes_even_at_the_encoders_std_floor(dtype):
    """c(x) at the encoder's own floor 1e-4 (its std head at -40): the CMVAE's smooth floor
    F leaves it untouched (|a| >= 40 F)."""
    vae = _build("vae", d=3, seed=0, dtype=dtype)
    with torch.no_grad():
        vae.encoder.head.weight[3:].zero_()
        vae.encoder.head.bias[3:].fill_(-40.0)
    cm = _build("cmvae", d=3, seed=0, dtype=dtype)
    cm.load_state_dict(vae.state_dict(), strict=False)
    x = images(4, dtype=dtype)
    qv, qc = vae.posterior(x), cm.posterior(x)
    assert (qv.stddev < 1.001e-4).all()
    assert torch.equal(qc.mean, qv.mean) and torch.equal(qc.stddev, qv.stddev)


def test_built_after_the_same_seed_it_has_the_vaes_and_the_gpvaes_networks():
    vae, cm, gp = (_build(n, seed=4, dtype=torch.float32) for n in ("vae", "cmvae", "gpvae"))
    sv, sc, sg = vae.state_dict(), cm.state_dict(), gp.state_dict()
    assert all(torch.equal(sc[k], sv[k]) for k in sv)  # decoder, encoder
    assert all(torch.equal(sc[k], sg[k]) for k in sc)  # and psi_m, psi_s, mu = eta = 0
    x = images(4, dtype=torch.float32)
    assert torch.equal(cm.posterior(x).stddev, vae.posterior(x).stddev)


# --- against the GPVAE's code path ---------------------------------------------------------
def test_posterior_is_the_gpvaes_moment_matched_posterior_with_a_point_mass_q_wu():
    """Eq. (13) with Sigma_j = Gamma_j = 0 exactly (log-diagonals -inf), mu, eta random:
    the GPVAE's q(z|x) is the CMVAE's with A, C = mu, eta."""
    gp = _build("gpvae", d=4, seed=0)
    _randomize_means(gp, scale=3.0)
    with torch.no_grad():
        for pre in ("sigma", "gamma"):
            getattr(gp, pre + "_offdiag").zero_()
            getattr(gp, pre + "_log_diag").fill_(-math.inf)
    cm = _build("cmvae", d=4, seed=1)
    missing, unexpected = cm.load_state_dict(gp.state_dict(), strict=False)
    assert not missing and set(unexpected) == set(FACTORS)
    x = images(8)
    mom = gp.moments(x)
    assert not mom["qm"].any() and not mom["s2"].any()
    assert (mom["a"] < 0).any() and (mom["a"] > 0).any()  # the std is |a|, not a
    q_gp, q_cm = gp.posterior(x), cm.posterior(x)
    torch.testing.assert_close(q_cm.mean, q_gp.mean, rtol=0, atol=0)
    torch.testing.assert_close(q_cm.stddev, q_gp.stddev, rtol=1e-15, atol=0)
    m, a = cm.mean_and_scale(x)
    torch.testing.assert_close(a, mom["a"], rtol=0, atol=0)


def test_posterior_is_the_gpvaes_up_to_its_initial_covariance_term():
    """With the GPVAE's default factors (Sigma_j = Gamma_j = 1e-6 I) the two variances
    differ by exactly eq. (13)'s psi^T Sigma_j psi + psi^T Gamma_j psi = 1e-6 |psi|^2."""
    gp = _build("gpvae", d=4, seed=0)
    _randomize_means(gp)
    cm = _build("cmvae", d=4, seed=1)
    cm.load_state_dict(gp.state_dict(), strict=False)
    x = images(8)
    feats = gp.features(x)
    init = gp.config.gp_init_std ** 2 * (feats["psi_m"].square().sum(-1)
                                          + feats["psi_s"].square().sum(-1))
    q_gp, q_cm = gp.posterior(x), cm.posterior(x)
    torch.testing.assert_close(q_cm.mean, q_gp.mean, rtol=0, atol=0)
    torch.testing.assert_close(q_cm.variance + init[:, None], q_gp.variance, rtol=1e-12, atol=0)
    assert (init > 0).all() and ((q_gp.variance - q_cm.variance) > 0).all()


def test_state_dict_and_parameter_count_are_the_gpvaes_without_the_factors():
    for d in (2, 5):
        gp, cm = _build("gpvae", d=d), _build("cmvae", d=d)
        gp_state, cm_state = gp.state_dict(), cm.state_dict()
        assert list(cm_state) == [k for k in gp_state if k not in FACTORS]
        assert all(cm_state[k].shape == gp_state[k].shape for k in cm_state)
        n_gp = sum(p.numel() for p in gp.parameters())
        n_cm = sum(p.numel() for p in cm.parameters())
        factors = sum(getattr(gp, k).numel() for k in FACTORS)
        assert n_cm == n_gp - factors
        # the docstring's count of the stored factors: d (p (p + b) / 2 + p) each
        p, b = gp.feature_dim, gp.chol_block
        assert factors == 2 * d * (p * (p + b) // 2 + p)
        # what the CMVAE adds to the VAE: two trunks and A, C
        vae = _build("vae", d=d)
        trunk = sum(t.numel() for t in cm.psi_m.parameters())
        assert n_cm == sum(t.numel() for t in vae.parameters()) + 2 * trunk + 2 * d * p


# --- the standard-deviation floor ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_floored_abs_is_abs_above_40_floors_and_at_least_the_floor_below(dtype):
    g = torch.Generator().manual_seed(0)
    r = torch.exp(torch.empty(20000, dtype=torch.float64).uniform_(
        math.log(40 * STD_FLOOR), math.log(1e3), generator=g)).to(dtype)
    r = r[r >= 40 * STD_FLOOR]
    for a in (r, -r):
        assert torch.equal(floored_abs(a), a.abs())
    small = torch.linspace(-39, 39, 781, dtype=dtype) * STD_FLOOR
    f = floored_abs(small)
    expected = small.double().abs() + STD_FLOOR * torch.exp(-small.double().abs() / STD_FLOOR)
    torch.testing.assert_close(f.double(), expected, rtol=1e-6, atol=0)
    assert (f >= STD_FLOOR * (1 - 1e-6)).all() and (f >= small.abs()).all()
    assert (f[small.abs() <= 10 * STD_FLOOR] > small.abs()[small.abs() <= 10 * STD_FLOOR]).all()
    assert floored_abs(torch.zeros((), dtype=dtype)) == torch.tensor(STD_FLOOR, dtype=dtype)
    # a continuous gradient: 0 at a = 0, sign(a) (1 - exp(-|a| / F)) elsewhere
    a = torch.tensor([0.0, STD_FLOOR, -2 * STD_FLOOR], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(floored_abs(a).sum(), a)
    torch.testing.assert_close(grad, torch.tensor([0.0, 1 - math.exp(-1), -(1 - math.exp(-2))],
                                                  dtype=torch.float64), rtol=1e-12, atol=0)


def test_a_zero_standard_deviation_is_floored_not_degenerate():
    """c(x) = 0 exactly (the encoder's own floor removed, its std head at -inf) and C = 0:
    the std is the floor F, and q(z|x), the objective and its gradients stay finite."""
    cm = _build("cmvae", d=3)
    cm.encoder.min_std = 0.0
    with torch.no_grad():
        cm.encoder.head.weight[3:].zero_()
        cm.encoder.head.bias[3:].fill_(-math.inf)
    x = images(4)
    q = cm.posterior(x)
    assert torch.equal(q.stddev, torch.full_like(q.stddev, STD_FLOOR))
    with torch.no_grad():
        assert torch.equal(cm.fused_encoder()(x)[1], q.variance)
    objective, diag = cm.training_objective(x, 100)
    assert torch.isfinite(objective).all()
    objective.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in cm.parameters() if p.grad is not None)


# --- the objective, export, registration ---------------------------------------------------
def test_training_objective_is_the_single_sample_elbo_with_analytic_kl():
    cm = _build("cmvae", d=4)
    _randomize_means(cm)
    x = images(5)
    torch.manual_seed(7)
    objective, diag = cm.training_objective(x, n_train=10)
    m, a = cm.mean_and_scale(x)
    v = floored_abs(a).square()
    torch.manual_seed(7)
    z = m + v.sqrt() * torch.randn_like(m)
    rec = cm.log_likelihood(x, z)
    kl = 0.5 * (v + m.square() - 1.0 - v.log()).sum(-1)  # KL(N(m, v) || N(0, I))
    torch.testing.assert_close(objective, rec - kl, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(diag["kl"], kl.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(diag["rec"], rec.mean(), rtol=1e-12, atol=0)


def test_fused_encoder_and_export_match_the_posterior(tmp_path):
    cm = _build("cmvae", d=3, dtype=torch.float32)
    _randomize_means(cm, scale=0.2)
    x = images(6, dtype=torch.float32)
    fused = cm.fused_encoder()
    with torch.no_grad():
        q = cm.posterior(x)
        m, v = fused(x)
        torch.testing.assert_close(m, q.mean, rtol=0, atol=0)
        torch.testing.assert_close(v, q.variance, rtol=0, atol=0)
        cm.eta.add_(1.0)  # a snapshot: later training does not reach it
        assert torch.equal(fused(x)[1], v)
        cm.eta.sub_(1.0)
    enc = torch.export.load(str(export_encoder(cm, tmp_path / "cm.pt2"))).module()
    m2, v2 = enc(x)
    torch.testing.assert_close(m2, q.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v2, q.variance, rtol=1e-5, atol=1e-9)


def test_flop_floor_is_the_gpvaes_networks_plus_the_two_mean_products():
    cm, gp = _build("cmvae", d=3, dtype=torch.float32), _build("gpvae", d=3,
                                                                 dtype=torch.float32)
    d, p = 3, cm.feature_dim
    assert cm.extra_posterior_flops(5) == 5 * 4 * d * p
    nets = sum(forward_flops(net, torch.zeros(1, *MNIST)) for net in (cm.encoder, cm.psi_m,
                                                                       cm.psi_s))
    assert cm.posterior_flops(1) == nets + 4 * d * p
    assert (cm.posterior_flops(2) - cm.extra_posterior_flops(2)
            == gp.posterior_flops(2) - gp.extra_posterior_flops(2))


def test_registration_and_capabilities():
    assert MODELS["cmvae"] is CMVAE and CMVAE.config_class is CMVAEConfig
    assert CMVAE.supports_fused_encoder() and not CMVAE.supports_uncertainty()
    cm = _build("cmvae", d=2)
    assert cm.epoch_summary() == {}
    assert [g["params"] for g in cm.param_groups(0.1)] == [list(cm.parameters())]
    with pytest.raises(ConfigError):
        CMVAE(VAEConfig(), MNIST)
    with pytest.raises(ConfigError):
        build_model("cmvae", MNIST, gp_lr=0.1)
    assert isinstance(cm, CMVAE) and not isinstance(cm, (VAE, GPVAE))
