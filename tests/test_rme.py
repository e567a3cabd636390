"""RME(M), the recursive mixture encoder, against the VAE, by-hand references and the trainer.

Q_1 = q_1, Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m; stage s >= 2 trains q_s on
ELBO(q_s) + lambda KL(q_s || stopgrad Q_s) and eps_s and the decoder on ELBO(Q_s)
(src/gpvae/models/rme.py).  Deterministic identities in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from gpvae.checkpoint import load_checkpoint, save_checkpoint
from gpvae.errors import ConfigError
from gpvae.evaluation import estimate
from gpvae.models.me import GaussianMixture
from gpvae.models.rme import RME, RMEConfig, mixture_log_weights
from gpvae.models.vae import VAE, VAEConfig
from helpers import Data, assert_is_the_vae, images

SHAPE = (1, 28, 28)
LOG_2PI = math.log(2 * math.pi)


def make_model(d=2, m=3, stage=None, seed=0, spread=2.0, **options):
    """RME(m) in float64 with component means pushed apart and random eps heads, at
    ``stage`` (default m)."""
    torch.manual_seed(seed)
    model = RME(RMEConfig(latent_dim=d, rme_components=m, **options), SHAPE).double()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for enc in model._encoders():
            enc.head.bias[:d] += spread * torch.randn(d, generator=g, dtype=torch.float64)
        for head in getattr(model, "eps_heads", []):
            head.bias.add_(torch.randn(1, generator=g, dtype=torch.float64))
            head.weight.normal_(0, 0.05, generator=g)
        if m > 1:
            model.rme_stage.fill_(m if stage is None else stage)
    return model


def reference(model, x, k):
    """(eps (B, k), mu (B, k, d), sigma (B, k, d)) by hand from the layers; eps_1 = 1."""
    d = model.latent_dim
    eps, mus, sigmas = [], [], []
    for j, enc in enumerate(model._encoders()[:k]):
        h = enc.trunk(x)
        raw = h @ enc.head.weight.T + enc.head.bias
        mus.append(raw[:, :d])
        sigmas.append(F.softplus(raw[:, d:]) + enc.min_std)
        if j == 0:
            eps.append(torch.ones(x.shape[0], dtype=x.dtype))
        else:
            head = model.eps_heads[j - 1]
            eps.append(torch.sigmoid(h @ head.weight[0] + head.bias[0]))
    return torch.stack(eps, 1), torch.stack(mus, 1), torch.stack(sigmas, 1)


def log_normal(z, mu, sigma):
    return (-0.5 * ((z - mu) / sigma).square() - sigma.log() - 0.5 * LOG_2PI).sum(-1)


def recursive_log_q(eps, mu, sigma, z, k):
    """log Q_k(z) by the recursion Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m."""
    dens = log_normal(z, mu[:, 0], sigma[:, 0]).exp()
    for j in range(1, k):
        dens = (1 - eps[:, j]) * dens + eps[:, j] * log_normal(z, mu[:, j], sigma[:, j]).exp()
    return dens.log()


# --------------------------------------------------------------------------------------
def test_config_options_and_validation():
    cfg = RMEConfig()
    assert cfg.rme_components == 2 and cfg.rme_lambda == 1.0 and cfg.rme_earlier == "frozen"
    assert RMEConfig.size_option == "rme_components"
    assert RMEConfig.__dataclass_fields__["rme_earlier"].metadata["choices"] == ("frozen",
                                                                               "trained")
    bad = [("rme_components", 0), ("rme_components", True), ("rme_components", 2.0),
           ("rme_lambda", 1.01), ("rme_lambda", -0.1), ("rme_lambda", "0.5"),
           ("rme_epochs_per_stage", 0), ("rme_epochs_per_stage", math.inf),
           ("rme_earlier", "yes"), ("rme_init", "zero")]
    for name, value in bad:
        with pytest.raises(ConfigError, match="--" + name.replace("_", "-")):
            RME(RMEConfig(latent_dim=2, **{name: value}), SHAPE)


def test_one_component_is_the_vae():
    torch.manual_seed(7)
    vae = VAE(VAEConfig(latent_dim=3), SHAPE)
    torch.manual_seed(7)
    rme = RME(RMEConfig(latent_dim=3, rme_components=1), SHAPE)
    assert_is_the_vae(vae, rme, images(4, dtype=torch.float32), modes=("train", "eval"))


def test_stage_one_of_a_larger_rme_is_the_vae():
    torch.manual_seed(7)
    vae = VAE(VAEConfig(latent_dim=3), SHAPE)
    torch.manual_seed(7)
    rme = RME(RMEConfig(latent_dim=3, rme_components=3), SHAPE)
    for k, v in vae.state_dict().items():
        assert torch.equal(rme.state_dict()[k], v), k  # created first, in the VAE's order
    x = images(4, dtype=torch.float32)
    assert rme.stage == 1
    assert torch.equal(vae.posterior(x).mean, rme.posterior(x).mean)
    torch.manual_seed(3)
    ov, _ = vae.training_objective(x, n_train=100)
    torch.manual_seed(3)
    orr, diag = rme.eval().training_objective(x, n_train=100)
    assert torch.equal(ov, orr) and float(diag["stage"]) == 1


def test_weights_are_a_simplex_and_follow_the_recursion():
    g = torch.Generator().manual_seed(0)
    a = 3 * torch.randn(5, 3, generator=g, dtype=torch.float64)  # K = 4
    log_alpha = mixture_log_weights(a)
    alpha = log_alpha.exp()
    eps = torch.cat([torch.ones(5, 1, dtype=torch.float64), torch.sigmoid(a)], 1)
    expected = torch.stack([eps[:, m] * torch.prod(1 - eps[:, m + 1:], 1) for m in range(4)], 1)
    torch.testing.assert_close(alpha, expected, rtol=1e-12, atol=1e-15)
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(1), torch.ones(5, dtype=torch.float64), rtol=0,
                               atol=1e-12)
    # the posterior's density is the recursion Q_m = (1 - eps_m) Q_{m-1} + eps_m q_m
    model = make_model(d=2, m=3)
    x = images(4)
    q = model.posterior(x)
    assert isinstance(q, GaussianMixture) and q.batch_shape == (4,) and q.event_shape == (2,)
    eps, mu, sigma = reference(model, x, 3)
    z = 2 * torch.randn(20, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(q.log_prob(z), recursive_log_q(eps, mu, sigma, z, 3),
                               rtol=1e-10, atol=1e-10)
    # a stage-2 model has Q_2: two components
    model.rme_stage.fill_(2)
    q2 = model.posterior(x)
    assert q2.components == 2
    torch.testing.assert_close(q2.log_prob(z), recursive_log_q(eps, mu, sigma, z, 2),
                               rtol=1e-10, atol=1e-10)


def test_new_eps_heads_start_from_the_uniform_mixture():
    model = RME(RMEConfig(latent_dim=2, rme_components=4), SHAPE).double()
    model.rme_stage.fill_(4)
    alpha = model.posterior(images(3)).weights
    torch.testing.assert_close(alpha, torch.full((3, 4), 0.25, dtype=torch.float64))


def test_mixture_density_integrates_to_one():
    model = make_model(d=2, m=3)
    q = model.posterior(images(2))
    h = 0.02
    grid = torch.arange(-12 + h / 2, 12, h, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 1, 2)
    with torch.no_grad():
        mass = q.log_prob(zz).exp().sum(0) * h * h
    torch.testing.assert_close(mass, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", [2, 3])
def test_stage_objectives_equal_by_hand(stage):
    """J_Q = sum_m alpha_m (log p(x|z_m) + log p(z_m) - log Q_s(z_m)), z_m ~ q_m, and
    J_q = log p(x|z) - KL(q_s || p) + lambda (log q_s(z) - log Q_s(z)), z ~ q_s."""
    lam = 0.3
    model = make_model(d=2, m=3, stage=stage, rme_lambda=lam)
    x = images(3)
    torch.manual_seed(11)
    obj, diag = model.eval().training_objective(x, n_train=100)
    eps, mu, sigma = reference(model, x, stage)
    alpha = mixture_log_weights(torch.logit(eps[:, 1:])).exp()
    torch.manual_seed(11)
    noise = torch.empty(3, stage, 2, dtype=torch.float64).normal_()
    noise_new = torch.empty(3, 2, dtype=torch.float64).normal_()
    j_mix, rec = 0, 0
    for j in range(stage):
        z = mu[:, j] + sigma[:, j] * noise[:, j]
        log_lik = model.log_likelihood(x, z)
        j_mix = j_mix + alpha[:, j] * (log_lik + log_normal(z, 0 * z, 1 + 0 * z)
                                       - recursive_log_q(eps, mu, sigma, z, stage))
        rec = rec + alpha[:, j] * log_lik
    m, s = mu[:, -1], sigma[:, -1]
    z = m + s * noise_new
    kl_prior = 0.5 * (s.square() + m.square() - 1 - 2 * s.log()).sum(-1)
    elbo_new = model.log_likelihood(x, z) - kl_prior
    kl_new = log_normal(z, m, s) - recursive_log_q(eps, mu, sigma, z, stage)
    j_new = elbo_new + lam * kl_new
    torch.testing.assert_close(obj, j_mix + j_new, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(diag["rec"], rec.mean().detach(), rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(diag["rec"] - diag["kl"], j_mix.mean().detach(), rtol=1e-10,
                               atol=1e-8)
    torch.testing.assert_close(diag["kl_new"], kl_new.mean().detach(), rtol=1e-10, atol=1e-8)
    assert float(diag["stage"]) == stage


def test_the_kl_to_the_current_mixture_is_rewarded():
    """With the same noise, raising lambda raises the objective by lambda * KL-estimate, and
    that estimate is positive on average (KL >= 0): the new component is pushed *away*
    from the current mixture."""
    x = images(16)
    out = {}
    for lam in (0.0, 0.5):
        model = make_model(d=2, m=2, rme_lambda=lam)
        torch.manual_seed(4)
        out[lam] = model.eval().training_objective(x, n_train=100)
    diff = out[0.5][0] - out[0.0][0]
    kl_new = float(out[0.5][1]["kl_new"])
    assert kl_new > 0.5
    torch.testing.assert_close(diff.mean(), torch.tensor(0.5 * kl_new, dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)


def test_the_kl_to_the_mixture_is_bounded_by_the_new_weight():
    """Q_s contains q_s with weight eps_s, so the per-sample log q_s(z) - log Q_s(z) <=
    -log eps_s for every z: the repulsion cannot grow without bound (with Q_{s-1} in its
    place it can: the samples below include points where it exceeds the bound)."""
    model = make_model(d=2, m=3, stage=3, spread=4.0)
    x = images(8)
    eps, mu, sigma = reference(model, x, 3)
    z = mu[:, 2] + sigma[:, 2] * 3 * torch.randn(64, 8, 2, dtype=torch.float64)
    with torch.no_grad():
        kl_pointwise = log_normal(z, mu[:, 2], sigma[:, 2]) - model.posterior(x).log_prob(z)
    assert (kl_pointwise <= -eps[:, 2].log() + 1e-12).all()
    previous = log_normal(z, mu[:, 2], sigma[:, 2]) - recursive_log_q(eps, mu, sigma, z, 2)
    assert (previous > -eps[:, 2].log()).any()  # the bound is not vacuous here


class _ConstantDecoder(torch.nn.Module):
    """A decoder that ignores z (saturated): log p(x|z) is a constant c, so log p(x) = c."""

    def __init__(self, shape):
        super().__init__()
        self.out = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))

    def forward(self, z):
        return self.out.expand(*z.shape[:-1], *self.out.shape)


def test_the_new_component_criterion_is_bounded_with_a_saturated_decoder():
    """The RME(2) stage-2 defect that diverged on real MNIST: Q_1 narrow (std 0.05) and a
    decoder that ignores z.  Then J_q = c - KL(q_2 || p) + lambda KL(q_2 || Q) and, with
    Q = Q_1, the KL to Q_1 grows like |m|^2 / (2 * 0.05^2), faster than the KL to the prior
    falls, so ascent on J_q runs away.  With Q = Q_2 (which contains q_2) J_q <= c - lambda
    log eps_2: 200 Adam steps on q_2's mean and std stay below that bound."""
    lam = 1.0
    model = make_model(d=2, m=2, stage=2, rme_lambda=lam)
    model.decoder = _ConstantDecoder(SHAPE)
    x = images(4)
    d = 2
    with torch.no_grad():
        first = model.encoder.head
        first.weight.zero_()
        first.bias[:d] = 0.0
        first.bias[d:] = math.log(math.expm1(0.05 - first_min_std(model)))  # std 0.05
        new = model.extra_encoders[0].head
        new.weight.zero_()
        new.bias[:d] = torch.tensor([0.3, -0.2], dtype=torch.float64)
        new.bias[d:] = 0.0
    eps_2 = torch.sigmoid(model.eps_heads[0](model.extra_encoders[0].trunk(x))).squeeze(-1)
    constant = model.log_likelihood(x, torch.zeros(4, d, dtype=torch.float64))
    bound = constant - lam * eps_2.detach().log()
    opt = torch.optim.Adam([new.bias], lr=0.05)
    torch.manual_seed(0)
    model.eval()
    for _ in range(200):
        _, j_new, _ = model.stage_objectives(x)
        opt.zero_grad()
        (-j_new.mean()).backward()
        opt.step()
    torch.manual_seed(1)
    with torch.no_grad():
        values = torch.stack([model.stage_objectives(x)[1] for _ in range(200)]).mean(0)
    assert torch.isfinite(values).all()
    assert (values <= bound + 0.1).all(), (values, bound)
    assert new.bias[:d].abs().max() < 5  # the mean did not run away


def first_min_std(model):
    return model.encoder.min_std


def _grads(model, objective):
    model.zero_grad(set_to_none=True)
    (-objective.sum()).backward(retain_graph=True)
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("earlier", ["frozen", "trained"])
def test_gradients_are_routed_by_stage(earlier):
    """Stage 2 of RME(3): q_2's encoder gets exactly J_q's gradient; eps_2, the decoder and
    sigma_x exactly J_Q's; component 1 none if frozen (J_Q's if trained); component 3 and
    eps_3 none."""
    model = make_model(d=2, m=3, stage=2, rme_earlier=earlier, likelihood="gaussian-learned")
    x = images(3)
    torch.manual_seed(5)
    total = _grads(model, model.eval().training_objective(x, n_train=100)[0])
    torch.manual_seed(5)
    j_mix, j_new, _ = model.stage_objectives(x)
    g_mix, g_new = _grads(model, j_mix), _grads(model, j_new)
    for name, g in total.items():
        if name.startswith("extra_encoders.1.") or name.startswith("eps_heads.1."):
            assert g is None, name  # component 3: not yet
        elif name.startswith("encoder.") and earlier == "frozen":
            assert g is None, name
        elif name.startswith("extra_encoders.0."):  # q_2: J_q only
            assert g is not None and g.abs().sum() > 0, name
            torch.testing.assert_close(g, g_new[name], rtol=1e-10, atol=1e-12)
        else:  # eps_2, decoder, sigma_x (and component 1 if trained): J_Q only
            assert g is not None and g.abs().sum() > 0, name
            torch.testing.assert_close(g, g_mix[name], rtol=1e-10, atol=1e-12)
    # every parameter that requires grad got one (the training loop's Adam skips the rest)
    for name, p in model.named_parameters():
        assert p.requires_grad == (total[name] is not None), name


def test_stage_advances_with_training_images_and_survives_a_checkpoint(tmp_path):
    """Stage = min(M, 1 + floor(seen / (E N))); only training-mode objectives advance it."""
    model = RME(RMEConfig(latent_dim=2, rme_components=3, rme_epochs_per_stage=0.5), SHAPE)
    x = images(4, dtype=torch.float32)
    stages = []
    for _ in range(4):
        model.train().training_objective(x, n_train=8)  # a stage is 4 images
        stages.append(model.stage)
    assert stages == [1, 2, 3, 3] and int(model.rme_seen) == 16
    # evaluation, validation and eval-mode objectives do not move it
    model.eval()
    estimate(model, Data(x), samples=3, progress=False)
    model.training_objective(x, n_train=8)
    model.posterior(x)
    assert int(model.rme_seen) == 16 and model.stage == 3
    # checkpoint round trip: counter, stage and q(z|x)
    save_checkpoint(tmp_path / "m.safetensors", model, {})
    other = RME(RMEConfig(latent_dim=2, rme_components=3, rme_epochs_per_stage=0.5), SHAPE)
    assert other.stage == 1
    load_checkpoint(tmp_path / "m.safetensors", other)
    assert int(other.rme_seen) == 16 and other.stage == 3
    z = torch.randn(5, 4, 2)
    torch.testing.assert_close(other.posterior(x).log_prob(z), model.posterior(x).log_prob(z),
                               rtol=0, atol=0)
    # a fresh model counts from 0
    fresh = RME(RMEConfig(latent_dim=2, rme_components=3, rme_epochs_per_stage=0.5), SHAPE)
    fresh.train().training_objective(x, n_train=8)
    assert fresh.stage == 1 and int(fresh.rme_seen) == 4


@pytest.mark.parametrize("init", ["copy", "fresh"])
def test_a_new_stage_starts_from_a_copy_of_the_previous_component(init):
    """rme_init=copy: when stage s begins (in the training step that crosses the boundary)
    component s's encoder is set to component s - 1's, so Q_s = Q_{s-1} at the start; later
    steps of the stage do not copy again.  fresh: its own initialization is kept."""
    torch.manual_seed(0)
    model = RME(RMEConfig(latent_dim=2, rme_components=3, rme_epochs_per_stage=1.0,
                          rme_init=init), SHAPE).double().train()
    encs = model._encoders()
    before = [{k: v.clone() for k, v in e.state_dict().items()} for e in encs]
    x = images(4)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    model.training_objective(x, n_train=8)  # seen 0 -> stage 1
    model.training_objective(x, n_train=8)  # seen 4 -> stage 1
    assert model.stage == 1 and same(encs[1].state_dict(), before[1])
    model.training_objective(x, n_train=8)  # seen 8 -> stage 2 begins
    assert model.stage == 2
    assert same(encs[1].state_dict(), before[0 if init == "copy" else 1])
    with torch.no_grad():
        encs[1].head.bias.add_(1.0)  # stage 2 trains component 2
    changed = {k: v.clone() for k, v in encs[1].state_dict().items()}
    model.training_objective(x, n_train=8)  # seen 12: still stage 2, no second copy
    assert same(encs[1].state_dict(), changed)
    model.training_objective(x, n_train=8)  # seen 16 -> stage 3 begins
    assert model.stage == 3
    assert same(encs[2].state_dict(), changed if init == "copy" else before[2])
    assert same(encs[0].state_dict(), before[0])


def test_tiny_training_run_reaches_stage_two_and_evaluates(tmp_path):
    from gpvae.rundir import load_run
    from gpvae.training import TrainConfig, train

    def cfg(out, epochs):
        return TrainConfig(out=str(tmp_path / out), model="rme", epochs=epochs,
                           model_options={"latent_dim": 2, "rme_components": 2,
                                          "rme_epochs_per_stage": 1.0},
                           limit_train=200, batch_size=64, seed=3, device="cpu")

    quiet = dict(progress=False, log=lambda *_: None)
    summary = train(cfg("run", 2), **quiet)
    assert summary["epochs"] == 2
    model, _ = load_run(tmp_path / "run", "last")
    n_train = int(model.rme_seen) // 2  # the training split's size: 2 epochs seen
    assert model.stage == 2 and n_train > 100
    x = images(6, dtype=torch.float32)
    q = model.posterior(x)
    assert isinstance(q, GaussianMixture) and q.components == 2
    est = estimate(model, Data(x), samples=5, progress=False)
    assert torch.isfinite(est.iwae).all() and (est.iwae >= est.elbo - 1e-9).all()
    assert int(model.rme_seen) == 2 * n_train
    # resume is exact: 1 epoch, then resume to 2, equals the straight run
    train(cfg("split", 1), **quiet)
    after_one, _ = load_run(tmp_path / "split", "last")
    assert after_one.stage == 1 and int(after_one.rme_seen) == n_train
    train(cfg("split", 2), resume=True, **quiet)
    from gpvae.checkpoint import read_checkpoint
    a = read_checkpoint(tmp_path / "run" / "last.safetensors")[0]
    b = read_checkpoint(tmp_path / "split" / "last.safetensors")[0]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_too_short_to_reach_the_last_stage_is_warned_about(tmp_path):
    """RME(3) with 10 epochs per stage starts stage 3 after 20 epochs: --epochs 20 would end
    as a 2-component mixture labelled RME(3), so the trainer says so before training."""
    from gpvae.training import TrainConfig, train

    model = RME(RMEConfig(latent_dim=2, rme_components=3, rme_epochs_per_stage=10), SHAPE)
    assert "ends before all 3 components" in model.training_plan_warning(20)
    assert model.training_plan_warning(21) is None
    assert RME(RMEConfig(latent_dim=2, rme_components=1), SHAPE).training_plan_warning(1) is None
    logs = []
    cfg = TrainConfig(out=str(tmp_path / "r"), model="rme", epochs=1, batch_size=100,
                      model_options={"latent_dim": 2, "rme_components": 2,
                                     "rme_epochs_per_stage": 2.0}, limit_train=100,
                      device="cpu")
    train(cfg, progress=False, log=logs.append)
    assert logs[0].startswith("warning: rme:2") and "--epochs 1 ends before" in logs[0]


def test_benchmarks_time_rme_with_all_its_components():
    """A fresh RME(M) is at stage 1 (the VAE); bench-inference times it at its last stage."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    fresh = RME(RMEConfig(latent_dim=2, rme_components=3), SHAPE)
    vae_flops = VAE(VAEConfig(latent_dim=2), SHAPE).posterior_flops(1)
    assert fresh.posterior_flops(1) == vae_flops
    fresh.complete_schedule()
    assert fresh.stage == 3 and fresh.posterior_flops(1) > 2 * vae_flops
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "gpvae", "bench-inference", "--models",
                        "vae,rme:3", "--latent-dim", "2", "--limit-test", "128", "--repeats",
                        "1", "--json", "--device", "cpu"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(root / "src")), timeout=300)
    assert r.returncode == 0, r.stderr
    models = json.loads(r.stdout)["models"]
    assert models["rme:3"]["flops_per_image"] == fresh.posterior_flops(1)
