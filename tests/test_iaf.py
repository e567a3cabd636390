"""IAF(k), the inverse autoregressive flow (Kingma et al. 2016), against brute force.

z_0 = mu + sigma eps; [m_t, s_t] = MADE_t(z_{t-1}, c(x)); sigma_t = sigmoid(s_t + 2);
z_t = sigma_t z_{t-1} + (1 - sigma_t) m_t; orders alternate (identity, reversed, ...);
log q(z_k|x) = log N(z_0; mu, sigma^2) - log|det dz_k/dz_0|.  The reference flow below is
written from the layers' weights and masks by hand (not through Pyro's transform), and the
log-det comes from the autograd Jacobian, not from the flow's own sum of log sigma_t.
Deterministic identities in float64 (rtol 1e-10).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import gpvae.onednn as onednn_module
from gpvae.errors import ConfigError
from gpvae.evaluation import estimate
from gpvae.models import MODELS, parse_model_spec
from gpvae.models.iaf import IAF, IAFConfig, IAFPosterior
from gpvae.models.vae import VAE, VAEConfig
from helpers import CountFlops, images

SHAPE = (1, 28, 28)
F64 = torch.float64


def make_model(d=4, k=2, ctx=3, hidden=8, seed=0, dtype=F64):
    """IAF(k) with its MADE weights scaled up and random biases, so that the steps are far
    from the identity (sigma_t far from sigmoid(2), m_t far from 0)."""
    torch.manual_seed(seed)
    model = IAF(IAFConfig(latent_dim=d, iaf_flows=k, iaf_context=ctx, iaf_hidden=hidden),
                SHAPE).to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for flow in model.flows:
            for layer in flow.nn.layers:
                layer.weight.mul_(3.0)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=dtype))
        model.context.bias.copy_(torch.randn(ctx, generator=g, dtype=dtype))
    return model


def parts(model, x):
    """(mu, sigma, c) from the encoder's layers."""
    features = model.encoder.trunk(x)
    mean, std = model.encoder.split_head(model.encoder.head(features))
    return mean, std, model.context(features)


def made(flow, z, c):
    """One MADE by hand: the hidden pre-activations and (m, s)."""
    first, last = flow.nn.layers
    c = c.expand(*z.shape[:-1], c.shape[-1])
    pre = torch.cat([c, z], -1) @ (first.weight * first.mask).T + first.bias
    out = F.relu(pre) @ (last.weight * last.mask).T + last.bias
    d = z.shape[-1]
    return pre, out[..., :d], out[..., d:]


def step(flow, z, c):
    _, m, s = made(flow, z, c)
    gate = torch.sigmoid(s + 2.0)
    return gate * z + (1 - gate) * m


def reference_flow(model, z0, c):
    z = z0
    for flow in model.flows:
        z = step(flow, z, c)
    return z


def brute_force_log_q(model, z0, mean, std, c):
    """log N(z0; mu, sigma^2) - log|det dz_k/dz_0| for one image (z0, mean, std, c: 1-D)."""
    jac = torch.autograd.functional.jacobian(lambda z: reference_flow(model, z, c), z0)
    log_det = torch.linalg.slogdet(jac)[1]
    base = torch.distributions.Normal(mean, std).log_prob(z0).sum()
    return base - log_det


# --------------------------------------------------------------------------------------
def test_config_options_and_validation():
    cfg = IAFConfig()
    assert (cfg.iaf_flows, cfg.iaf_hidden, cfg.iaf_context) == (1, 256, 64)
    assert MODELS["iaf"] is IAF
    assert parse_model_spec("iaf:4") == ("iaf", {"iaf_flows": 4})
    for bad in ({"iaf_flows": 0}, {"iaf_flows": True}, {"iaf_context": 0},
                {"iaf_hidden": 3, "latent_dim": 4}, {"iaf_hidden": 2.5}):
        with pytest.raises(ConfigError):
            IAFConfig(**bad).validate()
    IAFConfig(latent_dim=4, iaf_hidden=4).validate()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_log_prob_equals_the_autograd_jacobian_change_of_variables(k):
    """Fresh z_k (pushed through the hand-written flow, never seen by q: the inverse runs)
    and just-drawn z_k (the cached log-dets) both match log q0(z0) - log|det J|."""
    model = make_model(k=k)
    x = images(3)
    with torch.no_grad():
        mean, std, c = parts(model, x)
    q = model.posterior(x)
    z0 = mean + std * torch.randn(3, model.latent_dim, dtype=F64,
                                  generator=torch.Generator().manual_seed(3))
    expected = torch.stack([brute_force_log_q(model, z0[i], mean[i], std[i], c[i])
                            for i in range(3)])
    with torch.no_grad():
        zk = reference_flow(model, z0, c)
        torch.testing.assert_close(q.log_prob(zk), expected, rtol=1e-10, atol=1e-10)
        # the drawn sample: q's own forward equals the reference, its cached density too
        torch.manual_seed(4)
        drawn = q.rsample()
        torch.manual_seed(4)
        z0_drawn = q.base_dist.rsample()
        torch.testing.assert_close(drawn, reference_flow(model, z0_drawn, c), rtol=1e-10,
                                   atol=1e-12)
        cached = q.log_prob(drawn)
    expected = torch.stack([brute_force_log_q(model, z0_drawn[i], mean[i], std[i], c[i])
                            for i in range(3)])
    torch.testing.assert_close(cached, expected, rtol=1e-10, atol=1e-10)


def test_log_prob_of_arbitrary_points_matches_brute_force():
    """z not drawn from q at all (q.mean + N(0, 0.25 I) points, with a sample dimension): the
    sequential inverse, checked by pushing the recovered z0 forward again and against the
    Jacobian formula.  Also: a copy of a drawn z, and a drawn z whose cache a later draw
    evicted, get the same density as the drawn z itself."""
    model = make_model(k=2)
    x = images(2)
    q = model.posterior(x)
    with torch.no_grad():
        mean, std, c = parts(model, x)
        z = q.mean + 0.5 * torch.randn(5, 2, model.latent_dim, dtype=F64,
                                       generator=torch.Generator().manual_seed(8))
        z0 = z
        for flow in reversed(q.transforms):
            z0 = flow.inv(z0)
        torch.testing.assert_close(reference_flow(model, z0, c), z, rtol=1e-9, atol=1e-10)
        lp = q.log_prob(z)
    assert lp.shape == (5, 2)
    expected = torch.tensor([[brute_force_log_q(model, z0[s, i], mean[i], std[i], c[i])
                              for i in range(2)] for s in range(5)], dtype=F64)
    torch.testing.assert_close(lp, expected, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        drawn = q.sample((3,))
        cached = q.log_prob(drawn)
        torch.testing.assert_close(q.log_prob(drawn.clone()), cached, rtol=1e-10, atol=1e-10)
        q.sample((3,))  # evicts the cache of `drawn`
        torch.testing.assert_close(q.log_prob(drawn), cached, rtol=1e-10, atol=1e-10)


def test_just_drawn_samples_need_no_inverse_pass():
    """log_prob of what q just drew (IWAE, the training ELBO) runs no further MADE pass (no
    further product at all); a fresh z runs d passes per step (the sequential inverse)."""
    d, k, ctx, hidden = 4, 2, 3, 8
    model = make_model(d=d, k=k, ctx=ctx, hidden=hidden)
    calls = []
    for flow in model.flows:
        flow.nn.layers[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        q = model.posterior(images(2))
        with CountFlops() as drawing:
            z = q.sample((3,))
        assert drawing.total > 0
        with CountFlops() as cached:
            q.log_prob(z)
        assert cached.total == 0 and not calls
        with CountFlops() as inverse:
            q.log_prob(z.clone())
        assert len(calls) == k * d
        made_pass = 2 * 6 * ((d + ctx) * hidden + hidden * 2 * d)  # dense, 3 x 2 rows
        assert inverse.total == k * d * made_pass


def test_each_step_is_triangular_in_its_order_and_the_orders_alternate():
    """dz_t/dz_{t-1} is lower triangular for t = 1, 3, ... and upper triangular (lower in
    the reversed order) for t = 2, 4, ..., with diagonal sigma_t; so two steps are not
    triangular in any one of those orders."""
    d = 5
    model = make_model(d=d, k=2, hidden=12)
    x = images(1)
    with torch.no_grad():
        mean, _, c = parts(model, x)
    z = mean[0] + 0.3
    lower = torch.tril(torch.ones(d, d, dtype=torch.bool))
    jacs = []
    for t, flow in enumerate(model.flows):
        jac = torch.autograd.functional.jacobian(lambda v, f=flow: step(f, v, c[0]), z)
        jacs.append(jac)
        tri = lower if t % 2 == 0 else lower.T
        assert (jac[~tri] == 0).all(), (t, jac)
        assert (jac[tri & ~torch.eye(d, dtype=torch.bool)] != 0).any()
        _, _, s = made(flow, z, c[0])
        torch.testing.assert_close(torch.diagonal(jac), torch.sigmoid(s + 2.0))
        z = step(flow, z, c[0]).detach()
    both = jacs[1] @ jacs[0]
    assert (both[~lower] != 0).any() and (both[~lower.T] != 0).any()
    # the module's own transforms agree with the hand-written steps (same masks, orders)
    q = model.posterior(x)
    for t, flow in enumerate(q.transforms):
        assert flow.arn.permutation.tolist() == (list(range(d)) if t % 2 == 0
                                                 else list(range(d))[::-1])


def test_the_context_reaches_every_hidden_unit_and_changes_the_output():
    """Perturbing c(x) moves every hidden pre-activation of every MADE (the reference code's
    bug masked the context out) and moves z_k for the same z_0; mu and sigma do not move."""
    model = make_model(d=4, k=2, hidden=16)
    x = images(2)
    with torch.no_grad():
        mean, std, c = parts(model, x)
        z = mean
        c2 = c + 0.5 * torch.randn(c.shape, dtype=F64, generator=torch.Generator().manual_seed(9))
        for flow in model.flows:
            captured = []
            handle = flow.nn.layers[0].register_forward_hook(
                lambda mod, args, out: captured.append(out))
            flow.condition(c)(z)
            flow.condition(c2)(z)
            handle.remove()
            assert (captured[0] != captured[1]).all(), (captured[0] - captured[1])
            z = flow.condition(c)(z)
        q = model.posterior(x)
        with torch.no_grad():
            model.context.bias.add_(0.5)
        q2 = model.posterior(x)
        torch.testing.assert_close(q2.base_dist.mean, q.base_dist.mean, rtol=0, atol=0)
        torch.manual_seed(1)
        a = q.sample()
        torch.manual_seed(1)
        b = q2.sample()
        assert ((a - b).abs() > 1e-6).all()
        assert ((q.mean - q2.mean).abs() > 1e-6).all()


def test_mean_is_the_flow_of_mu_and_leaves_the_sample_cache_intact():
    model = make_model(k=3)
    x = images(2)
    q = model.posterior(x)
    with torch.no_grad():
        mean, std, c = parts(model, x)
        torch.manual_seed(2)
        z = q.rsample()
        torch.manual_seed(2)
        z0 = q.base_dist.rsample()
        torch.testing.assert_close(q.mean, reference_flow(model, mean, c), rtol=1e-10,
                                   atol=1e-12)
        lp = q.log_prob(z)  # after q.mean: still the density of z
    expected = torch.stack([brute_force_log_q(model, z0[i], mean[i], std[i], c[i])
                            for i in range(2)])
    torch.testing.assert_close(lp, expected, rtol=1e-10, atol=1e-10)
    assert isinstance(q, IAFPosterior) and q.expand((2,)).batch_shape == (2,)


def pyro_reference(model, x):
    """q(z|x) as a plain TransformedDistribution of Pyro's conditioned transforms (what
    IAFPosterior computed before its fused steps)."""
    from torch.distributions import Independent, Normal, TransformedDistribution

    mean, std, c = parts(model, x)
    return TransformedDistribution(Independent(Normal(mean, std), 1),
                                   [flow.condition(c) for flow in model.flows])


def test_fused_steps_give_pyros_samples_densities_and_training_gradients():
    """rsample + log_prob of the drawn z (the training ELBO's path) = Pyro's transforms,
    in value and in the gradient w.r.t. every parameter (float64, same noise)."""
    model = make_model(k=3)
    x = images(3)

    def objective(q):
        torch.manual_seed(5)
        z = q.rsample((2,))
        return z, q.log_prob(z)

    z, lq = objective(model.posterior(x))
    (lq.sum() + z.square().sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    z_ref, lq_ref = objective(pyro_reference(model, x))
    (lq_ref.sum() + z_ref.square().sum()).backward()
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lq, lq_ref, rtol=1e-12, atol=1e-12)
    made_names = [n for n, _ in model.named_parameters() if n.startswith(("flows.", "context."))]
    assert made_names and set(made_names) <= set(grads)
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_steps_made_without_gradients_are_not_reused_for_training():
    """q.sample (no gradients) first, then rsample with gradients: the MADE weights still
    get their gradient."""
    model = make_model(k=2)
    q = model.posterior(images(2))
    q.sample()
    z = q.rsample()
    q.log_prob(z).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for flow in model.flows for p in flow.parameters())
    model.zero_grad()
    with torch.no_grad():  # q made in evaluation (reused weights), then sampled with autograd
        q = model.posterior(images(2))
    z = q.rsample()
    q.log_prob(z).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for flow in model.flows for p in flow.parameters())


def test_q_builds_pyros_transforms_only_for_the_inverse(monkeypatch):
    from pyro.distributions.transforms import ConditionalAffineAutoregressive

    built = []
    condition = ConditionalAffineAutoregressive.condition
    monkeypatch.setattr(ConditionalAffineAutoregressive, "condition",
                        lambda self, c: built.append(1) or condition(self, c))
    model = make_model(k=2)
    with torch.no_grad():
        q = model.posterior(images(2))
        z = q.sample((3,))
        q.log_prob(z)
        q.mean  # noqa: B018
        assert q.batch_shape == (2,) and q.event_shape == (model.latent_dim,) and not built
        q.log_prob(z.clone())
    assert len(built) == 2 and len(q.transforms) == 2


def test_evaluation_sees_every_weight_update_even_without_a_version_bump():
    """Without autograd the masked weights are formed per q(z|x) (shared by its k steps),
    never reused across calls: an update that does not bump the parameters' version
    counters (the fused Adam's, here ``.data``) is seen by the next q; with autograd
    (training) they are formed in the graph."""
    model = make_model(k=2)
    x = images(2)

    def drawn():
        with torch.no_grad():
            q = model.posterior(x)
            torch.manual_seed(0)
            return q.sample()

    z1 = drawn()
    weight = model.flows[1].nn.layers[1].weight
    version = weight._version
    weight.data.mul_(1.5)
    assert weight._version == version  # no bump, like the fused Adam step
    z2 = drawn()
    assert not torch.equal(z2, z1)
    torch.manual_seed(0)
    fresh = pyro_reference(model, x)
    with torch.no_grad():
        torch.manual_seed(0)
        torch.testing.assert_close(z2, fresh.sample(), rtol=1e-10, atol=1e-12)
    assert model.posterior(x)._weights is None  # autograd on: formed in the graph


def test_float32_q_with_onednn_products_is_the_blas_one(monkeypatch):
    model = make_model(d=6, k=3, ctx=5, hidden=16, dtype=torch.float32)
    x = images(4, dtype=torch.float32)

    def draw():
        with torch.no_grad():
            q = model.posterior(x)
            torch.manual_seed(1)
            z = q.sample((2,))
            return z, q.log_prob(z), q.mean

    fast = draw()
    monkeypatch.setattr(onednn_module, "_ONEDNN_LINEAR", None)
    for a, b in zip(fast, draw()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_starts_from_the_vae_encoder_and_near_the_identity():
    """Same seed: the IAF's encoder and decoder start as the VAE's; at initialisation every
    gate is sigmoid(2 + s) with s small, so z_k stays close to z_0."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_dim=4), SHAPE)
    torch.manual_seed(0)
    iaf = IAF(IAFConfig(latent_dim=4, iaf_flows=2), SHAPE)
    vae_params = dict(vae.named_parameters())
    for name, p in iaf.named_parameters():
        if name.startswith(("encoder.", "decoder.")):
            torch.testing.assert_close(p, vae_params[name], rtol=0, atol=0)
    x = images(4, dtype=torch.float32)
    with torch.no_grad():
        mean, _, c = parts(iaf, x)
        gates = []
        z = mean
        for flow in iaf.flows:
            _, _, s = made(flow, z, c)
            gates.append(torch.sigmoid(s + 2.0))
            z = step(flow, z, c)
    gates = torch.stack(gates)
    assert (gates > 0.75).all() and (gates < 0.95).all(), gates


def test_posterior_flops_counts_the_kept_made_weights():
    """The floor: encoder layers + context layer + each MADE's *unmasked* weights + the
    documented elementwise work, for a batch of B."""
    from gpvae.flops import forward_flops

    d, k, ctx, hidden, b = 4, 2, 3, 8, 5
    model = make_model(d=d, k=k, ctx=ctx, hidden=hidden, dtype=torch.float32)
    x = torch.zeros(b, *SHAPE)
    encoder = forward_flops(model.encoder, x)
    context = 2 * b * model.arch.hidden * ctx
    kept = sum(int(layer.mask.sum()) for flow in model.flows for layer in flow.nn.layers)
    made_flops = 2 * b * kept  # biases are not counted (as for every nn.Linear)
    elementwise = b * (2 * d + 5 * d * k + 6 * d)
    assert model.posterior_flops(b) == encoder + context + made_flops + elementwise


def test_trains_on_real_mnist_and_evaluates(tmp_path):
    from gpvae.data import load_splits
    from gpvae.rundir import TrainConfig, load_run
    from gpvae.training import train

    cfg = TrainConfig(out=str(tmp_path / "iaf"), model="iaf",
                      model_options={"latent_dim": 2, "iaf_flows": 2}, epochs=1,
                      limit_train=100, limit_test=20, batch_size=50, device="cpu")
    summary = train(cfg, progress=False, log=lambda *a, **k: None)
    assert summary["best_epoch"] == 1 and math.isfinite(summary["best_valid_elbo"])
    model, _ = load_run(tmp_path / "iaf")
    assert isinstance(model, IAF) and model.num_flows == 2
    test = load_splits("mnist", None, limit_train=100, limit_test=20).test
    est = estimate(model, test, samples=8, batch_size=10, progress=False)
    assert est.iwae.shape == (20,) and torch.isfinite(est.iwae).all()
    assert (est.iwae >= est.elbo - 1e-9).all()
