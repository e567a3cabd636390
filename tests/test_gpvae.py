"""Brute-force tests of the GPVAE (paper eqs. 9, 11, 13, 15, 16; Sec. 3.3, 5.3).

Monte Carlo comparisons use 5 standard errors (estimated from the samples themselves);
deterministic identities use float64 with rtol 1e-10 unless stated otherwise.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence
from torch.utils._python_dispatch import TorchDispatchMode

from gpvae.errors import ConfigError
from gpvae.models import MODELS, build_model
from gpvae.cholesky import (
    _quadratic_and_frobenius,
    blocked_cholesky_quadratic_form,
    blocked_to_dense,
    chol_storage_rows,
    cholesky_quadratic_form,
    dense_to_blocked,
    kl_to_standard_normal,
    block_size,
    packed_quadratic_form,
    symmetric_packed,
)
from gpvae.models.gpvae import GPVAE, GPVAEConfig
from gpvae.models.vae import VAE, VAEConfig

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


def _model(d=3, shape=MNIST, seed=0, **options) -> GPVAE:
    torch.manual_seed(seed)
    return build_model("gpvae", shape, latent_dim=d, **options)


def _randomize_gp(model: GPVAE, seed=1) -> None:
    """A non-trivial q(W, U): GP terms comparable to the base encoder's c(x).  The unused
    (masked) entries of the column-blocked *_offdiag storage are randomised too: nothing
    may depend on them."""
    g = torch.Generator().manual_seed(seed)
    p = model.feature_dim
    with torch.no_grad():
        for name in ("mu", "eta"):
            t = getattr(model, name)
            t.copy_(0.5 * torch.randn(t.shape, generator=g, dtype=t.dtype))
        for pre in ("sigma", "gamma"):
            off, logd = getattr(model, pre + "_offdiag"), getattr(model, pre + "_log_diag")
            off.copy_(0.5 / math.sqrt(p) * torch.randn(off.shape, generator=g, dtype=off.dtype))
            logd.copy_(torch.empty(logd.shape, dtype=logd.dtype).uniform_(
                math.log(0.5), math.log(2.0), generator=g))


def _inputs(b=3, shape=MNIST, dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, *shape, generator=g).to(dtype)


# ----------------------------------------------------------------------------------------
# Monte Carlo over q(W, U): eq. (13) moments and the averaged KL (16)
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wu_samples():
    """S = 20000 draws of (W, U) ~ q(W, U) (eq. 11), pushed through eq. (9) for B = 3 inputs."""
    torch.manual_seed(0)
    model = _model(d=3).double()
    _randomize_gp(model)
    x = _inputs()
    with torch.no_grad():
        feats = model.features(x)
        mom = model.moments(x)
        chol_sigma, chol_gamma = model.cholesky_factors()
        g = torch.Generator().manual_seed(5)
        S, chunk = 20_000, 2_000
        means, stds, zs = [], [], []
        for _ in range(S // chunk):
            # w_j = mu_j + L_j eps_j, u_j = eta_j + M_j eps'_j: full (S, d, p) weight matrices
            eps_w = torch.randn(chunk, *model.mu.shape, generator=g, dtype=torch.float64)
            eps_u = torch.randn(chunk, *model.eta.shape, generator=g, dtype=torch.float64)
            W = model.mu + torch.einsum("jkl,sjl->sjk", chol_sigma, eps_w)
            U = model.eta + torch.einsum("jkl,sjl->sjk", chol_gamma, eps_u)
            mean = feats["b"] + torch.einsum("sjk,bk->sbj", W, feats["psi_m"])  # eq. (9)
            std = feats["c"] + torch.einsum("sjk,bk->sbj", U, feats["psi_s"])
            xi = torch.randn(mean.shape, generator=g, dtype=torch.float64)
            means.append(mean), stds.append(std), zs.append(mean + std * xi)
    return {"model": model, "x": x, "mom": mom, "mean": torch.cat(means),
            "std": torch.cat(stds), "z": torch.cat(zs)}


def test_marginal_moments_match_monte_carlo(wu_samples):
    """Eq. (13): m, v are the mean and variance of z under q(z|x,W,U) q(W,U)."""
    z, mom = wu_samples["z"], wu_samples["mom"]
    n = z.shape[0]
    m, v = wu_samples["model"].marginal_moments(wu_samples["x"])
    torch.testing.assert_close(m, mom["m"])
    torch.testing.assert_close(v, mom["v"])
    emp_mean = z.mean(0)
    assert torch.all((emp_mean - m).abs() <= 5 * torch.sqrt(v / n))
    dev2 = (z - m) ** 2
    se_var = dev2.std(0) / math.sqrt(n)
    assert torch.all((dev2.mean(0) - v).abs() <= 5 * se_var)
    # the GP terms are a sizeable part of v, so this is not a test of c^2 alone
    c = wu_samples["model"].features(wu_samples["x"])["c"]
    assert torch.all(v > 1.1 * c**2)


def test_averaged_kl_matches_monte_carlo(wu_samples):
    """Eq. (16) = E_{q(W,U)} KL(N(b + W psi^m, (c + U psi^s)^2) || N(0, 1))."""
    model, mom = wu_samples["model"], wu_samples["mom"]
    per = kl_divergence(Normal(wu_samples["mean"], wu_samples["std"].abs()),
                        Normal(0.0, 1.0)).sum(-1)  # (S, B)
    se = per.std(0) / math.sqrt(per.shape[0])
    kl = model.averaged_kl(mom, method="exact")
    assert torch.all((per.mean(0) - kl).abs() <= 5 * se), (per.mean(0), kl, se)
    # sharper: the random std h_j = c_j + u_j^T psi^s has mean a_j and variance s2_j, the
    # arguments eq. (16)'s E[log h_j^2] is evaluated at (the heavy log tail makes the
    # KL average itself a ~0.5% test)
    h, n = wu_samples["std"], wu_samples["std"].shape[0]
    assert torch.all((h.mean(0) - mom["a"]).abs() <= 5 * torch.sqrt(mom["s2"] / n))
    dev2 = (h - mom["a"]) ** 2
    assert torch.all((dev2.mean(0) - mom["s2"]).abs() <= 5 * dev2.std(0) / math.sqrt(n))


def test_mc_kl_expectation_agrees_with_exact(wu_samples):
    """gp_kl_expectation="mc" is an unbiased estimate of the closed form, and the config
    switch (``gp_kl_expectation``, ``gp_kl_mc_samples``) selects it in the objective (15)."""
    model, mom, x = wu_samples["model"], wu_samples["mom"], wu_samples["x"]
    exact = model.averaged_kl(mom, method="exact")
    torch.manual_seed(7)
    est = torch.stack([model.averaged_kl(mom, method="mc", n_samples=2000) for _ in range(50)])
    se = est.std(0) / math.sqrt(est.shape[0])
    assert torch.all((est.mean(0) - exact).abs() <= 5 * se), (est.mean(0), exact, se)
    # the same q(W, U) configured for "mc" draws the config's sample count: under one seed
    # exactly the explicit call's numbers, under another seed different ones
    mc_model = _model(d=3, gp_kl_expectation="mc", gp_kl_mc_samples=500).double()
    mc_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.manual_seed(1)
        via_config = mc_model.averaged_kl(mom)
        torch.manual_seed(1)
        explicit = model.averaged_kl(mom, method="mc", n_samples=500)
        torch.manual_seed(2)
        other_seed = mc_model.averaged_kl(mom)
        torch.testing.assert_close(via_config, explicit, rtol=0, atol=0)
        assert torch.all((via_config - other_seed).abs() > 1e-3)  # sd of one draw ~0.07
        # ... and the objective's KL term follows it: random around the closed form for
        # "mc" (5 standard errors over 20 seeds, ~0.08 nats), deterministic for "exact"
        kls = []
        for seed in range(20):
            torch.manual_seed(seed)
            kls.append(mc_model.elbo_terms(x)["kl"])
        kls = torch.stack(kls)
        se = kls.std(0) / math.sqrt(kls.shape[0])
        assert torch.all(se > 0) and torch.all((kls.mean(0) - exact).abs() <= 5 * se), (
            kls.mean(0), exact, se)
        torch.manual_seed(0)
        exact_0 = model.elbo_terms(x)["kl"]
        torch.manual_seed(1)
        torch.testing.assert_close(model.elbo_terms(x)["kl"], exact_0, rtol=0, atol=0)
        torch.testing.assert_close(exact_0, exact, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------
# Quadratic forms, global KL, uncertainty
# ----------------------------------------------------------------------------------------
def _loop_quadratic(psi, chol):
    """The explicit loop over j the model must not use: psi^T (L_j L_j^T) psi."""
    return torch.stack([torch.einsum("bk,kl,bl->b", psi, L @ L.T, psi) for L in chol], -1)


@pytest.mark.parametrize("d,p", [(5, 16), (3, 256), (2, 36)])
def test_quadratic_forms_match_explicit_loop(d, p):
    g = torch.Generator().manual_seed(d * p)
    chol = torch.randn(d, p, p, generator=g, dtype=torch.float64).tril()
    psi = torch.randn(7, p, generator=g, dtype=torch.float64)
    ref = _loop_quadratic(psi, chol)
    torch.testing.assert_close(cholesky_quadratic_form(psi, chol), ref, rtol=1e-10, atol=1e-10)
    for block in (None, 1, 4, p):
        packed = symmetric_packed(chol, block)
        b = block or block_size(p)
        n = p // b
        assert packed.shape == (d, n * (n + 1) // 2 * b * b)
        if b == 1:  # one-element blocks: exactly the p(p+1)/2 upper triangle
            assert packed.shape == (d, p * (p + 1) // 2)
        torch.testing.assert_close(packed_quadratic_form(psi, packed, block), ref, rtol=1e-10,
                                   atol=1e-10)
    # the column-blocked training form, for several column blocks, with leading batch dims
    chol = chol.tril(-1) + torch.diag_embed(torch.rand(d, p, generator=g, dtype=torch.float64)
                                            + 0.5)  # a positive diagonal
    ref = _loop_quadratic(psi, chol)
    for block in {1, block_size(p, 4), block_size(p), p}:
        log_diag, blocks = dense_to_blocked(chol, block)
        assert blocks.shape == (chol_storage_rows(p, block), d, block)
        torch.testing.assert_close(blocked_to_dense(log_diag, blocks, block), chol, rtol=1e-15,
                                   atol=0)
        got = blocked_cholesky_quadratic_form(psi.view(7, 1, p), log_diag, blocks, block)
        assert got.shape == (7, 1, d)
        torch.testing.assert_close(got.view(7, d), ref, rtol=1e-10, atol=1e-10)


def test_model_forms_agree_and_packed_cache_tracks_parameters():
    model = _model(d=4).double()
    _randomize_gp(model)
    x = _inputs()
    model.eval()
    with torch.no_grad():
        m1, v1 = model.marginal_moments(x, form="chol")
        m2, v2 = model.marginal_moments(x, form="packed")
        torch.testing.assert_close(m1, m2, rtol=1e-12, atol=0)
        torch.testing.assert_close(v1, v2, rtol=1e-10, atol=0)
        model.sigma_log_diag.add_(0.5)  # in-place update, as an optimizer step does
        _, v3 = model.marginal_moments(x, form="chol")
        _, v4 = model.marginal_moments(x, form="packed")
        model.gamma_offdiag.mul_(1.5)  # the cached diagonal blocks come from here too
        _, v6 = model.marginal_moments(x, form="chol")
    assert not torch.allclose(v1, v3)
    assert not torch.allclose(v3, v6)
    torch.testing.assert_close(v3, v4, rtol=1e-10, atol=0)
    # the no-grad "chol" path (both forms in one product, cached operands) equals the
    # training path (the custom autograd function on the stored blocks)
    m7, v7 = model.marginal_moments(x, form="chol")
    assert v7.requires_grad
    torch.testing.assert_close(v7.detach(), v6, rtol=1e-12, atol=0)
    # with gradients the packed form is differentiable (no stale cache)
    _, v5 = model.marginal_moments(x, form="packed")
    v5.sum().backward()
    assert model.sigma_offdiag.grad is not None and torch.isfinite(model.sigma_offdiag.grad).all()


def test_float32_cpu_quadratic_forms_run_on_onednn_with_the_float64_values(monkeypatch):
    """Without gradients on a CPU in float32, q(z|x)'s quadratic forms (eq. 13) run column
    block by column block on oneDNN (gpvae.onednn); they equal the float64 computation to
    float32 rounding, the plain batched path agrees with them, and every product went
    through oneDNN (16 column blocks x 2 forms, 30 of them with a slab).  Under
    torch.compile tracing, with gradients, or in float64 the plain path runs."""
    from gpvae import cholesky, onednn
    from gpvae.cholesky import stacked_blocked_quadratic_forms

    model = _model(d=5)
    _randomize_gp(model)
    x = _inputs(dtype=torch.float32)
    calls = []
    real = onednn._onednn_linear
    monkeypatch.setattr(onednn, "_onednn_linear",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        psi_m, psi_s = model.psi_m(x), model.psi_s(x)
        operands = model._inference_operands()
        calls.clear()  # the trunks' FC layers (FastLinear) ran on oneDNN too
        qm, s2 = stacked_blocked_quadratic_forms(psi_m, psi_s, *operands, model.chol_block)
        n = model.feature_dim // model.chol_block
        assert len(calls) == 2 * n + 2 * (n - 1)
        with monkeypatch.context() as m:
            m.setattr(cholesky, "onednn_applies", lambda *tensors: False)
            plain = stacked_blocked_quadratic_forms(psi_m, psi_s, *operands, model.chol_block)
        assert len(calls) == 2 * n + 2 * (n - 1)  # the plain path: no oneDNN product
        wide = model.double()
        ops64 = wide._inference_operands()
        exact = stacked_blocked_quadratic_forms(psi_m.double(), psi_s.double(), *ops64,
                                                model.chol_block)
    for got, ref, other in zip((qm, s2), exact, plain):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(got, other, rtol=2e-5, atol=1e-6)


def test_traced_graphs_keep_the_portable_product():
    """Under torch.compile / torch.export tracing the oneDNN product is never chosen: the
    graph (read here with a recording backend) holds PyTorch's own linear, so a compiled or
    exported encoder does not depend on a CPU-only internal op."""
    from gpvae.onednn import fast_linear

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, w = torch.randn(4, 3), torch.randn(5, 3)
    with torch.no_grad():
        out = torch.compile(fast_linear, backend=backend, fullgraph=True)(x, w)
    torch.testing.assert_close(out, x @ w.T)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert targets and not any("mkldnn" in t for t in targets), targets


@pytest.mark.parametrize("d,shape", [(4, MNIST), (40, MNIST), (3, (3, 32, 32))])
def test_fused_encoder_matches_marginal_moments(d, shape):
    model = _model(d=d, shape=shape).double()
    _randomize_gp(model)
    x = _inputs(shape=shape)
    fused = model.fused_encoder().eval()
    with torch.no_grad():
        m, v = fused(x)
        m_ref, v_ref = model.marginal_moments(x)
    torch.testing.assert_close(m, m_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=0)
    # a snapshot: later changes to the model do not leak into it
    with torch.no_grad():
        model.mu.add_(1.0)
        torch.testing.assert_close(fused(x)[0], m)
    assert not any(b.requires_grad for b in fused.buffers())


def test_cholesky_factors_structure():
    model = _model(d=3)
    _randomize_gp(model)
    for chol in model.cholesky_factors():
        assert chol.shape == (3, model.feature_dim, model.feature_dim)
        assert torch.equal(chol, chol.tril())
        assert torch.all(torch.diagonal(chol, dim1=-2, dim2=-1) > 0)
    # fresh model: Sigma_j = Gamma_j = gp_init_std^2 I, mu = eta = 0
    fresh = _model(d=2, gp_init_std=1e-2)
    for chol in fresh.cholesky_factors():
        torch.testing.assert_close(chol, 1e-2 * torch.eye(fresh.feature_dim).expand(2, -1, -1))
    assert not fresh.mu.any() and not fresh.eta.any()


def test_kl_wu_matches_torch_distributions():
    model = _model(d=3).double()
    _randomize_gp(model)
    p = model.feature_dim
    std = MultivariateNormal(torch.zeros(p, dtype=torch.float64),
                             scale_tril=torch.eye(p, dtype=torch.float64))
    chol_sigma, chol_gamma = model.cholesky_factors()
    with torch.no_grad():
        ref = sum(kl_divergence(MultivariateNormal(mean[j], scale_tril=chol[j]), std)
                  for mean, chol in ((model.mu, chol_sigma), (model.eta, chol_gamma))
                  for j in range(3))
        torch.testing.assert_close(model.kl_wu(), ref, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(kl_to_standard_normal(model.mu, chol_sigma),
                                   sum(kl_divergence(MultivariateNormal(model.mu[j],
                                       scale_tril=chol_sigma[j]), std) for j in range(3)),
                                   rtol=1e-10, atol=1e-8)


def test_uncertainty_matches_explicit_sum():
    """Tr V(f(x)|D) = psi^m^T (sum_j Sigma_j) psi^m, Tr V(h(x)|D) likewise (Sec. 3.3, 5.3)."""
    model = _model(d=4).double()
    _randomize_gp(model)
    x = _inputs()
    with torch.no_grad():
        unc = model.uncertainty(x)
        feats = model.features(x)
        chol_sigma, chol_gamma = model.cholesky_factors()
        sum_sigma = sum(L @ L.T for L in chol_sigma)
        sum_gamma = sum(L @ L.T for L in chol_gamma)
        tr_f = torch.einsum("bk,kl,bl->b", feats["psi_m"], sum_sigma, feats["psi_m"])
        tr_h = torch.einsum("bk,kl,bl->b", feats["psi_s"], sum_gamma, feats["psi_s"])
        assert unc["tr_f"].shape == unc["tr_h"].shape == (3,)
        torch.testing.assert_close(unc["tr_f"], tr_f, rtol=1e-10, atol=0)
        torch.testing.assert_close(unc["tr_h"], tr_h, rtol=1e-10, atol=0)
        torch.testing.assert_close(model.uncertainty(x, form="packed")["tr_f"], tr_f,
                                   rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------------
# Reduction to the VAE (Sec. 3.2: Lambda = 0 gives the VAE's encoder)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kl_expectation", ["exact", "mc"])
def test_zero_gp_posterior_is_the_vae(dtype, kl_expectation):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_dim=5), MNIST).to(dtype)
    gp = _model(d=5, seed=1, gp_kl_expectation=kl_expectation).to(dtype)
    # VAE weights (encoder + decoder) load by name; only the GP parts are missing
    missing, unexpected = gp.load_state_dict(vae.state_dict(), strict=False)
    assert not unexpected
    assert set(missing) == {"psi_m." + k for k in gp.psi_m.state_dict()} | {
        "psi_s." + k for k in gp.psi_s.state_dict()} | {
        "mu", "eta", "sigma_offdiag", "sigma_log_diag", "gamma_offdiag", "gamma_log_diag"}
    with torch.no_grad():  # Sigma = Gamma = 0: zero off-diagonals, exp(log_diag) = 0
        gp.mu.zero_(), gp.eta.zero_()
        for pre in ("sigma", "gamma"):
            getattr(gp, pre + "_offdiag").zero_()
            getattr(gp, pre + "_log_diag").fill_(-math.inf)
    for chol in gp.cholesky_factors():
        assert not chol.any()
    x = _inputs(4, dtype=dtype)
    q_vae, q_gp = vae.posterior(x), gp.posterior(x)
    assert torch.equal(q_gp.mean, q_vae.mean) and torch.equal(q_gp.stddev, q_vae.stddev)

    torch.manual_seed(11)
    obj_vae, diag_vae = vae.training_objective(x, 1000)
    torch.manual_seed(11)
    terms = gp.elbo_terms(x)
    tol = {"rtol": 1e-12, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-6,
                                                                         "atol": 1e-3}
    torch.testing.assert_close(terms["rec"] - terms["kl"], obj_vae, **tol)
    torch.testing.assert_close(terms["rec"].mean(), diag_vae["rec"], rtol=0, atol=0)
    torch.testing.assert_close(terms["kl"].mean(), diag_vae["kl"], **tol)


def test_default_init_starts_close_to_the_vae():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_dim=5), MNIST)
    gp = _model(d=5, seed=1)
    gp.load_state_dict(vae.state_dict(), strict=False)
    x = _inputs(4, dtype=torch.float32)
    with torch.no_grad():
        q_vae, q_gp = vae.posterior(x), gp.posterior(x)
    torch.testing.assert_close(q_gp.mean, q_vae.mean, rtol=0, atol=0)
    torch.testing.assert_close(q_gp.stddev, q_vae.stddev, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------
# No Python loop over latent dimensions
# ----------------------------------------------------------------------------------------
class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _count_training_step(d):
    model = _model(d=d)
    x = _inputs(2, dtype=torch.float32)
    with _CountOps() as fwd:
        objective, _ = model.training_objective(x, 100)
    with _CountOps() as bwd:
        (-objective.mean()).backward()
    with _CountOps() as post, torch.no_grad():
        model.posterior(x).log_prob(torch.zeros(2, d))
    return fwd.ops, bwd.ops, post.ops


@pytest.mark.parametrize("onednn", [True, False], ids=["cpu-onednn", "plain"])
@pytest.mark.parametrize("d_small,d_large", [(10, 20), (40, 64)])
def test_no_python_loop_over_latent_dimensions(d_small, d_large, onednn, monkeypatch):
    """The same aten operations, the same number of times, for a small and a large d: nothing
    in the forward pass, the backward pass or posterior() scales with d in Python -- on the
    CPU's float32 path (the quadratic forms on oneDNN, one column block at a time: a loop
    over p / b blocks, not over d) and on the plain path that CUDA takes, whose forward pass
    is also short in absolute terms (kernel launches)."""
    from gpvae import cholesky

    if not onednn:
        monkeypatch.setattr(cholesky, "onednn_applies", lambda *tensors: False)
    _count_training_step(d_small)  # warm-up: one-time set-up (cached constants) is not per step
    small, large = _count_training_step(d_small), _count_training_step(d_large)
    for a, b in zip(small, large):
        assert a == b
    assert any("mkldnn" in op for op in small[0]) == onednn
    if not onednn:
        assert sum(small[0].values()) < 400


# ----------------------------------------------------------------------------------------
# The objective end to end
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,d,kl_expectation", [
    (MNIST, 10, "exact"), (MNIST, 50, "exact"), (MNIST, 10, "mc"), (CIFAR, 10, "exact"),
    (CIFAR, 50, "mc")])
def test_training_objective_finite_with_finite_gradients(shape, d, kl_expectation):
    model = _model(d=d, shape=shape, gp_kl_expectation=kl_expectation, gp_kl_mc_samples=2)
    x = _inputs(2, shape=shape, dtype=torch.float32)
    objective, diag = model.training_objective(x, 50_000)
    assert objective.shape == (2,) and torch.isfinite(objective).all()
    assert set(diag) == {"rec", "kl", "kl_wu"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in diag.values())
    # objective = rec - kl - kl_wu / N, per example
    terms_sum = diag["rec"] - diag["kl"] - diag["kl_wu"] / 50_000
    torch.testing.assert_close(objective.mean().detach(), terms_sum, rtol=1e-5, atol=1e-3)
    (-objective.mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert all(torch.isfinite(g).all() for g in grads.values())
    # q(W, U)'s parameters receive gradient from eqs. (13)/(16), not only from the KL
    assert grads["eta"].abs().sum() > 0 and grads["mu"].abs().sum() > 0
    q = model.posterior(x)
    assert q.batch_shape == (2,) and q.event_shape == (d,)
    assert torch.isfinite(q.log_prob(q.rsample((3,)))).all()


def _dense_from_storage(off, logd, block):
    """Brute force: each stored diagonal block and sub-diagonal slab placed at its rows and
    columns of a dense (d, p, p), then the strict lower triangle kept and exp(log_diag) put
    on the diagonal."""
    d, p = logd.shape
    dense = torch.zeros(d, p, p, dtype=off.dtype)
    for k in range(p // block):  # diagonal blocks: the first p stored rows
        cols = slice(k * block, (k + 1) * block)
        dense[:, cols, cols] = off[cols].transpose(0, 1)
    start = p
    for k in range(p // block - 1):  # the slab below diagonal block k
        rows = p - (k + 1) * block
        dense[:, (k + 1) * block:, k * block:(k + 1) * block] = off[start:start + rows].transpose(
            0, 1)
        start += rows
    assert start == off.shape[0]
    return dense.tril(-1) + torch.diag_embed(torch.exp(logd))


def test_factor_construction_gradients_match_dense_reference():
    """The column-blocked factor storage back-propagates like a dense tril build: through
    the training quadratic form, the dense factors and the KL; unused entries get zero
    gradient."""
    model = _model(d=3).double()
    _randomize_gp(model)
    g = torch.Generator().manual_seed(3)
    psi = torch.randn(4, model.feature_dim, generator=g, dtype=torch.float64,
                      requires_grad=True)
    weights = torch.randn(4, 3, generator=g, dtype=torch.float64)
    off, logd, mu = model.sigma_offdiag, model.sigma_log_diag, model.mu
    dense = _dense_from_storage(off, logd, model.chol_block)
    torch.testing.assert_close(model.cholesky_factors()[0], dense, rtol=0, atol=0)
    ref = torch.autograd.grad((_loop_quadratic(psi, dense) * weights).sum(), (psi, off, logd))
    blocked = blocked_cholesky_quadratic_form(psi, logd, off, model.chol_block)
    from_dense = cholesky_quadratic_form(psi, model._factor(off, logd))
    grads = [torch.autograd.grad((q * weights).sum(), (psi, off, logd))
             for q in (blocked, from_dense)]
    for got in grads:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    dense = _dense_from_storage(off, logd, model.chol_block)
    unused = torch.autograd.grad(dense.sum(), off, retain_graph=True)[0] == 0
    assert unused.any() and (grads[0][1][unused] == 0).all()
    # the global KL: its closed form from the storage vs the dense factors
    kl = model._kl_from_parameters(mu, off, logd)
    kl_ref = kl_to_standard_normal(mu, dense)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-12, atol=0)
    got = torch.autograd.grad(kl, (mu, off, logd))
    ref = torch.autograd.grad(kl_ref, (mu, off, logd), retain_graph=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert (got[1][unused] == 0).all()
    # the training pass: the quadratic form and sum_j ||L_j||_F^2 from one function that
    # writes both gradients into one buffer
    q, frob = _quadratic_and_frobenius(psi, logd, off, model.chol_block)
    torch.testing.assert_close(frob, dense.square().sum(), rtol=1e-12, atol=0)
    got = torch.autograd.grad((q * weights).sum() + 0.7 * frob, (psi, off, logd))
    ref = torch.autograd.grad((_loop_quadratic(psi, dense) * weights).sum()
                              + 0.7 * dense.square().sum(), (psi, off, logd))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (got[1][unused] == 0).all()
    # ... and the model's objective uses it: the same global KL as kl_wu()
    torch.testing.assert_close(model.elbo_terms(_inputs(2))["kl_wu"], model.kl_wu(),
                               rtol=1e-12, atol=0)


def test_float32_cpu_training_quadratic_form_and_its_gradients_on_onednn(monkeypatch):
    """The training quadratic form (with sum_j ||L_j||_F^2, as the objective calls it) in
    float32 on a CPU runs its forward and backward products on oneDNN, column block by
    column block; value and gradients (psi, the stored blocks, log_diag) equal the float64
    computation to float32 rounding, unused entries get zero gradient, and every product
    went through oneDNN (forward 2n - 1; backward 2n - 1 for psi, 2n - 1 for the blocks)."""
    from gpvae import onednn

    model = _model(d=4)
    _randomize_gp(model)
    g = torch.Generator().manual_seed(5)
    psi = torch.randn(6, model.feature_dim, generator=g)
    weights = torch.randn(6, 4, generator=g)
    n = model.feature_dim // model.chol_block
    calls = []
    real = onednn._onednn_linear
    monkeypatch.setattr(onednn, "_onednn_linear",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    results = {}
    for dtype in (torch.float32, torch.float64):
        leaves = [t.detach().to(dtype).requires_grad_() for t in
                  (psi, model.sigma_log_diag, model.sigma_offdiag)]
        q, frob = _quadratic_and_frobenius(leaves[0], leaves[1], leaves[2], model.chol_block)
        grads = torch.autograd.grad((q * weights.to(dtype)).sum() + 0.7 * frob, leaves)
        results[dtype] = (q, *grads)
        if dtype == torch.float32:
            assert len(calls) == 3 * (2 * n - 1)
    assert len(calls) == 3 * (2 * n - 1)  # float64: none
    for got, ref in zip(results[torch.float32], results[torch.float64]):
        assert got.dtype == torch.float32
        scale = ref.abs().max()
        torch.testing.assert_close(got.double() / scale, ref / scale, rtol=0, atol=2e-6)
    # the stored entries on and above the diagonal blocks' diagonals are unused
    grad_blocks = results[torch.float32][3]
    b, p = model.chol_block, model.feature_dim
    diag_rows = grad_blocks[:p].view(n, b, -1, b)
    upper = torch.ones(b, b, dtype=torch.bool).triu().view(1, b, 1, b).expand_as(diag_rows)
    assert (diag_rows[upper] == 0).all()


def test_old_packed_checkpoints_load_into_the_blocked_layout():
    """State dicts of the earlier layout (strictly-lower parts packed row by row,
    (d, p (p - 1) / 2)) load and give the same factors."""
    model = _model(d=3).double()
    _randomize_gp(model)
    p = model.feature_dim
    rows, cols = torch.tril_indices(p, p, offset=-1)
    state = model.state_dict()
    for pre, chol in zip(("sigma", "gamma"), model.cholesky_factors()):
        state[pre + "_offdiag"] = chol.detach()[:, rows, cols].clone()
    fresh = _model(d=3, seed=4).double()
    fresh.load_state_dict(state)
    for a, b in zip(fresh.cholesky_factors(), model.cholesky_factors()):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0)


GP_PARAMS = ("mu", "eta", "sigma_offdiag", "sigma_log_diag", "gamma_offdiag", "gamma_log_diag")


@pytest.mark.parametrize("kl_expectation", ["exact", "mc"])
@pytest.mark.parametrize("which,h", [("gp", 1e-5), ("all", 1e-7)])
def test_objective_gradient_matches_finite_difference(kl_expectation, which, h):
    """Directional derivative of the whole eq. (15) objective (sample fixed by the seed),
    along q(W,U)'s parameters, and along all parameters (a smaller step: the ReLU kinks of
    the networks make larger central differences inexact)."""
    model = _model(d=4, gp_kl_expectation=kl_expectation).double()
    _randomize_gp(model)
    x = _inputs(2)

    def objective():
        torch.manual_seed(123)
        return model.training_objective(x, 1000)[0].sum()

    params = [q for n, q in model.named_parameters() if which == "all" or n in GP_PARAMS]
    grads = torch.autograd.grad(objective(), params)
    g = torch.Generator().manual_seed(9)
    direction = [torch.randn(q.shape, generator=g, dtype=q.dtype) for q in params]
    analytic = sum((gr * dr).sum() for gr, dr in zip(grads, direction)).item()
    with torch.no_grad():
        for q, dr in zip(params, direction):
            q.add_(h * dr)
        plus = objective().item()
        for q, dr in zip(params, direction):
            q.sub_(2 * h * dr)
        minus = objective().item()
    assert (plus - minus) / (2 * h) == pytest.approx(analytic, rel=1e-6)


def test_registration_and_config_validation():
    assert MODELS["gpvae"] is GPVAE and GPVAE.config_class is GPVAEConfig
    cfg = GPVAEConfig()
    assert (cfg.gp_init_std, cfg.gp_kl_expectation, cfg.gp_kl_mc_samples) == (1e-3, "exact", 1)
    for bad in ({"gp_init_std": 0.0}, {"gp_init_std": -1.0}, {"gp_kl_expectation": "quad"},
                {"gp_kl_mc_samples": 0}, {"latent_dim": 0}):
        with pytest.raises(ConfigError):
            build_model("gpvae", MNIST, **bad)
    with pytest.raises(ConfigError):
        GPVAE(VAEConfig(), MNIST)
    with pytest.raises(ValueError):
        _model(d=2).training_objective(_inputs(1, dtype=torch.float32), 0)


# ----------------------------------------------------------------------------------------
# Issue 9 item 4: epoch summaries of q(W, U) and its own learning rate
# ----------------------------------------------------------------------------------------
def test_epoch_summary_matches_dense_brute_force():
    """Every summary against the dense factors (blocked_to_dense) and dense Sigma_j = L L^T;
    the unused entries of the column-blocked storage are random (nothing may read them)."""
    model = _model(d=4).double()
    _randomize_gp(model, seed=3)
    summary = model.epoch_summary()
    model.requires_grad_(False)
    L, M = (blocked_to_dense(getattr(model, pre + "_log_diag"), getattr(model, pre + "_offdiag"),
                             model.chol_block) for pre in ("sigma", "gamma"))
    sigma, gamma = L @ L.transpose(-1, -2), M @ M.transpose(-1, -2)
    expected = {
        "gp_mu_norm": float(torch.sqrt((model.mu.detach() ** 2).sum())),
        "gp_eta_norm": float(torch.sqrt((model.eta.detach() ** 2).sum())),
        "gp_sigma_trace": float(torch.diagonal(sigma, dim1=-2, dim2=-1).sum(-1).mean()),
        "gp_gamma_trace": float(torch.diagonal(gamma, dim1=-2, dim2=-1).sum(-1).mean()),
        # log det from the eigenvalues of each dense Sigma_j (one at a time: this torch
        # build's batched slogdet goes wrong with two MKL threads -- DLASWP errors)
        "gp_sigma_logdet": float(torch.stack([torch.linalg.eigvalsh(s).log().sum()
                                              for s in sigma]).mean()),
        "gp_gamma_logdet": float(torch.stack([torch.linalg.eigvalsh(g).log().sum()
                                              for g in gamma]).mean()),
    }
    assert list(summary) == list(expected)
    assert all(type(v) is float for v in summary.values())
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-10), key
    assert summary["gp_sigma_trace"] != summary["gp_gamma_trace"]


def test_epoch_summary_at_initialization():
    model = _model(d=3, gp_init_std=0.01)
    p = model.feature_dim
    s = model.epoch_summary()
    assert s["gp_mu_norm"] == s["gp_eta_norm"] == 0.0
    for pre in ("sigma", "gamma"):
        assert s[f"gp_{pre}_trace"] == pytest.approx(p * 0.01**2, rel=1e-6)
        assert s[f"gp_{pre}_logdet"] == pytest.approx(2 * p * math.log(0.01), rel=1e-6)


def test_gp_lr_option():
    assert GPVAEConfig().gp_lr is None
    for good in (0, 0.0, 1e-3):
        assert build_model("gpvae", MNIST, latent_dim=2, gp_lr=good).config.gp_lr == good
    for bad in (-1e-3, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ConfigError, match="--gp-lr"):
            build_model("gpvae", MNIST, latent_dim=2, gp_lr=bad)


# --- fused trunks (GPVAE.fuse_trunks, gpvae.models.gpvae.fused_trunk_features) ----------------
def _feature_loss(model, x, weights):
    f = model.features(x)
    return sum((f[k] * weights[k]).sum() for k in sorted(f))


@pytest.mark.parametrize("shape", [MNIST, CIFAR, (3, 64, 64)], ids=["tab6", "tab7", "tab8"])
def test_fused_trunks_equal_the_three_trunks(shape):
    """The base encoder's trunk, psi^m and psi^s run as ONE network (first convolution with
    the three filter banks concatenated, grouped convolutions, one batched FC product) give
    the three networks' b, c, psi^m, psi^s (float64: to 1e-12), in training and evaluation
    mode, channels-last as the trunks run; the gradients reaching every parameter are the
    same; the state dict (keys, order, values) and the FLOP floor are unchanged."""
    model = _model(d=3, shape=shape).double()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, *shape, generator=g, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flops = model.posterior_flops(2)
    assert model.fused_trunks is False and model.psi_m.channels_last
    for training in (True, False):
        model.train(training)
        want = model.features(x)
        got = model.fuse_trunks(True).features(x)
        model.fuse_trunks(False)
        assert list(got) == list(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)
        assert not torch.allclose(want["psi_m"], want["psi_s"])
    weights = {k: torch.randn(v.shape, generator=g, dtype=torch.float64)
               for k, v in want.items()}
    params = list(model.parameters())
    grads = {}
    for fused in (False, True):
        loss = _feature_loss(model.fuse_trunks(fused), x, weights)
        grads[fused] = torch.autograd.grad(loss, params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), grads[False], grads[True]):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
    assert model.fused_trunks is True and model.posterior_flops(2) == flops
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_fused_trunks_q_and_objective_match_and_follow_in_place_updates():
    """q(z|x) and the training objective (eq. 15) are the unfused ones; after optimizer
    steps that write the parameters in place (the fused Adam, which does not bump their
    version counters) the fused network uses the new weights: nothing is cached."""
    from gpvae.training import make_adam

    model, other = _model(d=3).double(), _model(d=3).double().fuse_trunks(True)
    x = torch.rand(4, *MNIST, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opt = make_adam(model.parameters(), 1e-2)
    opt_other = make_adam(other.parameters(), 1e-2)
    for _ in range(2):
        for m, o in ((model, opt), (other, opt_other)):
            torch.manual_seed(3)
            objective, _ = m.training_objective(x, 100)
            o.zero_grad()
            (-objective.mean()).backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12, msg=name)
    with torch.no_grad():
        q_fused, q_plain = other.posterior(x), model.posterior(x)
    torch.testing.assert_close(q_fused.mean, q_plain.mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(q_fused.stddev, q_plain.stddev, rtol=1e-9, atol=1e-12)


def test_fused_trunks_under_vmap():
    """Replicas packed as one torch.func.vmap computation (stacked parameters, NCHW, as
    gpvae.packing runs them) get each replica's own unfused features."""
    import copy

    from torch import nn
    from torch.func import functional_call, stack_module_state, vmap

    from gpvae.networks import set_channels_last

    class Features(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            f = self.model.features(x)
            return f["b"], f["c"], f["psi_m"], f["psi_s"]

    models = [set_channels_last(_model(d=2, seed=s).double(), False) for s in (0, 1)]
    params, buffers = stack_module_state([Features(m) for m in models])
    base = Features(copy.deepcopy(models[0]).fuse_trunks(True)).to("meta")
    x = torch.rand(2, 3, *MNIST, generator=torch.Generator().manual_seed(2),
                   dtype=torch.float64)
    packed = vmap(lambda p, b, xx: functional_call(base, (p, b), (xx,)))(params, buffers, x)
    for r, m in enumerate(models):
        want = Features(m)(x[r])
        for a, b in zip(packed, want):
            torch.testing.assert_close(a[r], b, rtol=1e-12, atol=1e-12)


def test_fused_trunks_is_a_base_class_capability():
    """--fused-trunks asks the model (supports_fused_trunks / fuse_trunks on the base
    class), not its type: the GPVAE (and the CMVAE, its subclass) fuse; every other method
    accepts 'off' and refuses 'on' with a one-line UnsupportedError."""
    from gpvae.errors import UnsupportedError

    fusing = {name for name, cls in MODELS.items() if cls.supports_fused_trunks()}
    assert fusing == {"gpvae"}
    vae = VAE(VAEConfig(latent_dim=2), (1, 28, 28))
    assert vae.fuse_trunks(False) is vae
    with pytest.raises(UnsupportedError, match="no encoder networks to fuse"):
        vae.fuse_trunks(True)
    gp = GPVAE(GPVAEConfig(latent_dim=2), (1, 28, 28))
    assert gp.fuse_trunks(True) is gp and gp.fused_trunks


# ----------------------------------------------------------------------------------------
# --gp-quadratic dense: the quadratic forms through dense factors (an execution choice)
# ----------------------------------------------------------------------------------------
def test_dense_quadratic_forms_equal_the_blocked_ones_with_gradients():
    """dense_quadratic_and_frobenius gives _quadratic_and_frobenius's (q, f) and the same
    gradients for psi, log_diag and the stored blocks -- zero on the unused entries, which
    are randomised here -- and the dense form is the brute-force psi^T L L^T psi."""
    from gpvae.cholesky import dense_quadratic_and_frobenius

    d, p, b = 3, 64, 16
    g = torch.Generator().manual_seed(0)
    log_diag = torch.randn(d, p, generator=g, dtype=torch.float64).mul(0.3)
    blocks = torch.randn(chol_storage_rows(p, b), d, b, generator=g, dtype=torch.float64)
    psi = torch.randn(5, p, generator=g, dtype=torch.float64)
    w_q = torch.randn(5, d, generator=g, dtype=torch.float64)
    grads = []
    for fn in (dense_quadratic_and_frobenius, _quadratic_and_frobenius):
        args = [t.clone().requires_grad_() for t in (psi, log_diag, blocks)]
        q, f = fn(*args, b, with_frobenius=True)
        ((q * w_q).sum() + 0.7 * f).backward()
        grads.append((q.detach(), f.detach(), *(a.grad for a in args)))
    for name, dense, blocked in zip(("q", "f", "psi", "log_diag", "blocks"), *grads):
        torch.testing.assert_close(dense, blocked, rtol=1e-12, atol=1e-12, msg=name)
    chol = blocked_to_dense(log_diag, blocks, b)
    brute = torch.einsum("bk,jkl,bl->bj", psi, chol @ chol.mT, psi)
    torch.testing.assert_close(grads[0][0], brute, rtol=1e-12, atol=1e-10)


def test_gpvae_with_dense_quadratic_forms_gives_the_same_q_objective_and_gradients(
        monkeypatch):
    """use_dense_quadratic_forms(True): q(z|x) (eq. 13), uncertainty and the training
    objective (eq. 15, with the KL of q(W, U)) and its gradients equal the blocked form's
    -- and the dense form is the one that runs (a spy on it)."""
    import gpvae.models.gpvae as gpvae_module

    blocked = _model(d=3).double()
    _randomize_gp(blocked)
    dense = _model(d=3).double()
    dense.load_state_dict(blocked.state_dict())
    assert dense.use_dense_quadratic_forms() is dense and dense.dense_quadratic_forms
    calls = []
    real = gpvae_module.dense_quadratic_and_frobenius
    monkeypatch.setattr(gpvae_module, "dense_quadratic_and_frobenius",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _inputs()
    with torch.no_grad():
        for a, b in ((dense.posterior(x), blocked.posterior(x)),):
            torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a.variance, b.variance, rtol=1e-12, atol=1e-12)
        u_dense = dense.uncertainty(x)
        for k, v in blocked.uncertainty(x).items():
            torch.testing.assert_close(u_dense[k], v, rtol=1e-12, atol=1e-12)
    assert len(calls) == 4  # the two forms of each call
    results = []
    for m in (dense, blocked):
        m.zero_grad()
        torch.manual_seed(5)
        objective, _ = m.training_objective(x, 100)
        objective.sum().backward()
        results.append((objective.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-10)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-9, atol=1e-11, msg=name)
    assert len(calls) == 6
    assert dense.use_dense_quadratic_forms(False).dense_quadratic_forms is False


def test_dense_quadratic_forms_are_a_base_class_capability():
    """--gp-quadratic asks the model (supports_dense_quadratic_forms on the base class): the
    GPVAE has them; every other method accepts False and refuses True in one line."""
    from gpvae.errors import UnsupportedError

    assert {n for n, c in MODELS.items() if c.supports_dense_quadratic_forms()} == {"gpvae"}
    vae = VAE(VAEConfig(latent_dim=2), MNIST)
    assert vae.use_dense_quadratic_forms(False) is vae
    with pytest.raises(UnsupportedError, match="computes no quadratic forms"):
        vae.use_dense_quadratic_forms(True)
