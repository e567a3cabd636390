"""The precision policy (gpvae.precision, issue 11 item 3): fp32 unchanged, TF32 flags set
and restored, bf16 autocast for the networks with every probability in float32 -- for every
model -- and the IWAE's logsumexp in float64 of float32 log weights."""
import json
import math
from dataclasses import asdict

import pytest
import torch
from helpers import Data, cli_usage_error, images

from gpvae.cholesky import (_diagonal_blocks, _quadratic_and_frobenius, _slabs,
                            blocked_frobenius, blocked_to_dense, chol_block_size,
                            cholesky_quadratic_form, dense_to_blocked, packed_quadratic_form,
                            stacked_blocked_quadratic_forms, strict_lower_mask,
                            symmetric_packed)
from gpvae.errors import CheckpointError, ConfigError, TrainingDivergedError
from gpvae.evaluation import estimate
from gpvae.models import MODELS, VAE, build_model
from gpvae.precision import (PRECISIONS, autocast_context, check_precision, cuda_tf32,
                             precision_context, upcast)
from gpvae.rundir import CONFIG_FILE, TrainConfig, read_config
from gpvae.special import expected_log_square
from gpvae.training import model_optimizer, train

BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, (1, 28, 28), latent_dim=3)
    model.complete_schedule()  # RME: the mixture of all its components
    return model


def _x(n=4):
    return images(n, dtype=torch.float32)


# --- bf16: every model trains and evaluates, with its probabilities in float32 ----------------
def _float64_normal_log_prob(q, z):
    """log q(z) of a diagonal Gaussian recomputed in float64 from q's own parameters."""
    base = q.base_dist
    return torch.distributions.Normal(base.loc.double(), base.scale.double()).log_prob(
        z.double()).sum(-1)


def _island_checks(name, model, x, q, z):
    """The FP32 islands of each method, checked under autocast (module docstring of
    gpvae.precision): what a method computes from its networks' outputs is float32."""
    if isinstance(q, torch.distributions.Independent):  # VAE, GPVAE, CMVAE, SA, ME(1)
        assert q.base_dist.loc.dtype == q.base_dist.scale.dtype == torch.float32
        # float32 parameters: log q agrees with float64 to float32 rounding, not bf16's
        torch.testing.assert_close(q.log_prob(z).double(), _float64_normal_log_prob(q, z),
                                   rtol=1e-6, atol=1e-4)
    if name == "iaf":
        made = model.flows[0].nn
        outs = made(z, context=torch.zeros(x.shape[0], model.config.iaf_context))
        assert all(t.dtype == torch.float32 for t in outs)
    if name == "hf":
        v = model.householder_vectors(model.encoder.trunk(x))
        assert v.dtype == torch.float32
        torch.testing.assert_close(torch.linalg.vector_norm(v, dim=-1),
                                   torch.ones(v.shape[:-1]), rtol=0, atol=1e-6)
    if name in ("me", "rme"):
        assert q.mixture_distribution.logits.dtype == torch.float32
        assert q.component_distribution.base_dist.scale.dtype == torch.float32
    if name == "rme":  # log alpha from the step heads' logits, to float32 rounding
        from gpvae.models.rme import mixture_log_weights

        eps = model.parts(x, model.stage)[2]
        assert eps.dtype == torch.float32
        torch.testing.assert_close(mixture_log_weights(eps).double(),
                                   mixture_log_weights(eps.double()), rtol=1e-6, atol=1e-6)
    if name == "vlae":
        assert q.scale_tril.dtype == q.loc.dtype == torch.float32
        starts = []
        laplace = model.laplace
        model.laplace = lambda x, mu: starts.append(mu.dtype) or laplace(x, mu)
        model.posterior(x)
        assert starts == [torch.float32]  # mu_0 enters the Laplace updates in float32
        jac = torch.randn(x.shape[0], 784, 3)
        out = torch.randn(x.shape[0], 784)
        inside = model.gauss_newton(x, out, jac)
        with torch.autocast("cpu", enabled=False):
            outside = model.gauss_newton(x, out, jac)
        assert all(torch.equal(a, b) for a, b in zip(inside, outside))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_a_step_and_evaluates_under_bf16(name):
    model, x = _model(name), _x()
    decoded = []
    model.decoder.register_forward_hook(lambda m, i, out: decoded.append(out.dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = model_optimizer(model, 1e-3)
    model.train()
    with autocast_context("bf16", "cpu"):
        objective, _ = model.training_objective(x, 100)
    assert decoded and decoded[-1] == torch.bfloat16  # the networks did run in bfloat16
    assert objective.dtype == torch.float32
    (-objective.mean()).backward()
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    model.eval()
    with BF16, torch.no_grad():
        q = model.posterior(x)
        z = q.sample()
        assert z.dtype == torch.float32
        assert q.log_prob(z).dtype == torch.float32
        assert model.decode(z).dtype == torch.float32
        assert model.log_likelihood(x, z).dtype == torch.float32
        _island_checks(name, model, x, q, z)
    bf16 = estimate(model, Data(x), samples=3, batch_size=2, progress=False, precision="bf16")
    fp32 = estimate(model, Data(x), samples=3, batch_size=2, progress=False)
    assert torch.isfinite(bf16.iwae).all() and torch.isfinite(bf16.elbo).all()
    assert not torch.equal(bf16.iwae, fp32.iwae)  # the precision did reach the estimate


def test_iwae_logsumexp_is_float64_of_float32_log_weights(monkeypatch):
    """Under bf16 the log weights that reach the logsumexp are float32 (computed under
    autocast) and IWAE / ELBO are exactly their float64 logsumexp / mean."""
    import gpvae.evaluation as evaluation

    seen = []
    real = evaluation.log_weights

    def recording(model, x, samples, max_batch_samples=512):
        lw = real(model, x, samples, max_batch_samples)
        seen.append((lw.clone(), torch.is_autocast_enabled("cpu")))
        return lw

    monkeypatch.setattr(evaluation, "log_weights", recording)
    model, x, k = _model("gpvae"), _x(6), 50
    est = estimate(model, Data(x), samples=k, batch_size=3, progress=False, precision="bf16")
    lw = torch.cat([w for w, _ in seen], 1)
    assert all(on for _, on in seen) and lw.dtype == torch.float32
    assert torch.equal(est.iwae, torch.logsumexp(lw.double(), 0) - math.log(k))
    assert torch.equal(est.elbo, lw.double().mean(0))
    assert not torch.is_autocast_enabled("cpu")


# --- GPVAE: the quadratic forms and E[log X^2] are float32 under autocast ---------------------
def _factors(d=3, p=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    chol = torch.randn(d, p, p, generator=g).tril(-1) * 0.1
    chol = chol + torch.diag_embed(torch.rand(d, p, generator=g) + 0.5)
    log_diag, blocks = dense_to_blocked(chol, chol_block_size(p))
    return torch.randn(5, p, generator=g), log_diag, blocks, chol_block_size(p)


def test_gpvae_quadratic_forms_under_autocast_equal_the_fp32_ones_exactly():
    psi, log_diag, blocks, b = _factors()
    chol = blocked_to_dense(log_diag, blocks, b)
    packed = symmetric_packed(chol)

    def forms():
        leaves = [t.clone().requires_grad_() for t in (psi, log_diag, blocks)]
        q, frob = _quadratic_and_frobenius(*leaves, b)
        (q.square().sum() + frob + blocked_frobenius(leaves[1], leaves[2], b)).backward()
        with torch.no_grad():
            stacked = stacked_blocked_quadratic_forms(psi, psi, *_stacked_operands(
                log_diag, blocks, b), b)
        a, s2 = psi[:, :3] + 1.0, psi[:, 3:6].square()
        return [q, frob, *[t.grad for t in leaves], *stacked, cholesky_quadratic_form(psi, chol),
                packed_quadratic_form(psi, packed),
                expected_log_square(a, s2), expected_log_square(a, s2, "mc", 3,
                                                                torch.Generator().manual_seed(1))]

    reference = forms()
    with BF16:
        inside = forms()
    for r, i in zip(reference, inside, strict=True):
        assert i.dtype == torch.float32 and torch.equal(r, i)
    # bfloat16 inputs (a network's output under autocast) are computed in float32
    with BF16:
        low = stacked_blocked_quadratic_forms(psi.bfloat16(), psi.bfloat16(),
                                              *_stacked_operands(log_diag, blocks, b), b)
    with torch.no_grad():
        high = stacked_blocked_quadratic_forms(psi.bfloat16().float(), psi.bfloat16().float(),
                                               *_stacked_operands(log_diag, blocks, b), b)
    assert all(torch.equal(lo, hi) for lo, hi in zip(low, high))
    a, s2 = psi[:, :3].bfloat16() + 1.0, psi[:, 3:6].square().bfloat16()
    with BF16:
        low = expected_log_square(a, s2)
    assert low.dtype == torch.float32 and torch.equal(low, expected_log_square(a.float(),
                                                                               s2.float()))


def _stacked_operands(log_diag, blocks, b):
    """The inference operands of both forms (here both L: the same factors twice)."""
    p = log_diag.shape[1]
    dg, _ = _diagonal_blocks(log_diag, blocks, b, strict_lower_mask(b, blocks))
    return torch.cat([dg.view(p // b, b, -1)] * 2, 0), list(_slabs(blocks, p, b)) * 2


@pytest.mark.parametrize("grad", [False, True])
def test_gpvae_moments_from_given_features_are_fp32_exactly_under_autocast(grad):
    """Eq. (13)'s m, v, a, s2, qm from the same (float32) network features: identical
    inside and outside bf16 autocast, with and without gradients."""
    model, x = _model("gpvae"), _x()
    with torch.no_grad():
        model.mu.normal_(0, 0.1)
        model.eta.normal_(0, 0.1)
        model.sigma_offdiag.normal_(0, 0.05)
    feats = {k: v.detach() for k, v in model.features(x).items()}
    model.features = lambda x: feats
    with torch.set_grad_enabled(grad):
        reference = model.moments(x)
        with BF16:
            inside = model.moments(x)
    for key in reference:
        assert inside[key].dtype == torch.float32 and torch.equal(reference[key], inside[key])


# --- fp32: the computation without a policy, bit for bit ------------------------------------
def test_fp32_policy_is_the_computation_without_a_policy():
    t = torch.randn(3)
    assert upcast(t) is t and upcast(t.double()).dtype == torch.float64
    state = _tf32_snapshot()
    for name in ("vae", "gpvae"):
        model, x = _model(name), _x()
        torch.manual_seed(1)
        plain = model.training_objective(x, 100)[0]
        plain_grads = torch.autograd.grad(plain.sum(), list(model.parameters()))
        torch.manual_seed(1)
        with precision_context("fp32", "cpu", autocast=False):
            assert _tf32_snapshot() == state
            with autocast_context("fp32", "cpu"):
                assert not torch.is_autocast_enabled("cpu")
                policy = model.training_objective(x, 100)[0]
            policy_grads = torch.autograd.grad(policy.sum(), list(model.parameters()))
        assert torch.equal(plain, policy)
        assert all(torch.equal(a, b) for a, b in zip(plain_grads, policy_grads, strict=True))
        with torch.no_grad(), precision_context("fp32", "cpu"):
            assert not torch.is_autocast_enabled("cpu")
            q = model.posterior(x)
        with torch.no_grad():
            q0 = model.posterior(x)
        assert torch.equal(q.mean, q0.mean) and torch.equal(q.stddev, q0.stddev)


# --- TF32: global flags set for the block and restored ---------------------------------------
def _tf32_snapshot():
    b = torch.backends
    snap = [torch.get_float32_matmul_precision(), b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32]
    for obj in (b.cuda.matmul, getattr(b.cudnn, "conv", None)):
        snap.append(getattr(obj, "fp32_precision", None))
    return snap


def test_tf32_context_sets_and_restores_the_global_flags():
    before = _tf32_snapshot()
    with precision_context("tf32", "cpu"):  # a CPU: nothing is touched
        assert _tf32_snapshot() == before
    for precision, on in (("tf32", True), ("fp32", False)):
        # the CUDA branch sets only process flags: it runs without a GPU
        with precision_context(precision, torch.device("cuda")):
            assert torch.backends.cuda.matmul.allow_tf32 is on
            assert torch.backends.cudnn.allow_tf32 is on
        assert _tf32_snapshot() == before
    with pytest.raises(RuntimeError, match="boom"), cuda_tf32(True):
        raise RuntimeError("boom")
    assert _tf32_snapshot() == before


# --- bad values: one-line errors before any work ---------------------------------------------
def test_bad_precision_is_a_one_line_error_before_any_work(tmp_path, capsys, monkeypatch):
    for argv in (["train", "--out", str(tmp_path / "r"), "--precision", "fp16"],
                 ["evaluate", str(tmp_path), "--precision", "half"],
                 ["bench-train", "--precision", "bf32"]):
        err = cli_usage_error(argv, capsys)
        assert "--precision" in err and "bf16" in err, err
    cfg = TrainConfig(out=str(tmp_path / "r"), precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="--precision must be one of fp32, tf32, bf16"):
        train(cfg, progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="--precision"):
        estimate(_model("vae"), Data(_x()), samples=2, precision="float16", progress=False)
    # a GPU without bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ConfigError) as err:
        check_precision("bf16", "cuda")
    assert "Tesla T4 has no bfloat16" in str(err.value) and "\n" not in str(err.value)
    assert check_precision("tf32", "cuda") == "tf32" and set(PRECISIONS) == {"fp32", "tf32",
                                                                             "bf16"}


# --- the run: config.json, resume, evaluate, the NaN guard -----------------------------------
def _cfg(out, **kw):
    return TrainConfig(out=str(out), **{"model_options": {"latent_dim": 2}, "epochs": 1,
                                        "limit_train": 100, "batch_size": 50, "device": "cpu",
                                        "limit_test": 10, **kw})


def test_bf16_run_config_round_trip_resume_evaluate_and_old_configs(tmp_path, capsys,
                                                                     monkeypatch):
    import gpvae.training
    from gpvae.cli import _train_config, build_parser, main

    validations = []
    scored = gpvae.training.estimate
    monkeypatch.setattr(gpvae.training, "estimate", lambda *a, **kw: validations.append(
        kw["precision"]) or scored(*a, **kw))
    run = tmp_path / "run"
    args = build_parser().parse_args(["train", "--out", str(run), "--precision", "bf16"])
    assert _train_config(args).precision == "bf16"
    train(_cfg(run, precision="bf16"), progress=False, log=lambda *_: None)
    assert validations == ["bf16"]  # the validation ELBO in the run's precision
    assert json.loads((run / CONFIG_FILE).read_text())["precision"] == "bf16"
    assert read_config(run).precision == "bf16"
    # --resume without --precision keeps the run's; another precision is refused
    resumed = _train_config(build_parser().parse_args(["train", "--out", str(run), "--resume",
                                                       "--epochs", "2"]))
    assert resumed.precision == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        train(_cfg(run, precision="fp32", epochs=2), resume=True, progress=False)
    # evaluate: fp32 by default whatever the run trained with; --precision bf16 on request
    results = {}
    for extra in ([], ["--precision", "bf16"]):
        assert main(["evaluate", str(run), "--limit-test", "4", "--iwae-samples", "2",
                     "--json", "--no-progress", "--device", "cpu", *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        results[result["precision"]] = result["test_iwae"]
    assert set(results) == {"fp32", "bf16"} and results["fp32"] != results["bf16"]
    # a config.json written before precision existed loads as fp32
    old = tmp_path / "old"
    old.mkdir()
    raw = asdict(TrainConfig(out=str(old)))
    del raw["precision"]
    (old / CONFIG_FILE).write_text(json.dumps(raw))
    assert read_config(old).precision == "fp32"
    del raw["lr"]  # other fields are still required
    (old / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="no lr"):
        read_config(old)


class _DivergingBF16(VAE):
    """A VAE whose objective turns NaN at its 2nd training step, checking it runs in bf16."""

    calls = 0

    def training_objective(self, x, n_train):
        assert torch.is_autocast_enabled("cpu")
        type(self).calls += 1
        obj, diag = super().training_objective(x, n_train)
        return (obj * float("nan") if type(self).calls == 2 else obj), diag


def test_the_nan_guard_names_the_step_under_bf16(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "diverging", _DivergingBF16)
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, step 2 of 2"):
        train(_cfg(tmp_path / "r", model="diverging", precision="bf16"), progress=False)
    assert not torch.is_autocast_enabled("cpu")


def test_bench_train_and_inference_take_the_precision(capsys, monkeypatch):
    from gpvae.cli import main

    autocast = []
    posterior = VAE.posterior
    monkeypatch.setattr(VAE, "posterior", lambda self, x: autocast.append(
        torch.is_autocast_enabled("cpu")) or posterior(self, x))
    for cmd, extra in (("bench-train", ["--steps", "1"]), ("bench-inference",
                                                           ["--limit-test", "8"])):
        for precision in ("fp32", "bf16"):
            autocast.clear()
            assert main([cmd, "--models", "vae", "--latent-dim", "2", "--batch-size", "8",
                         "--repeats", "1", "--device", "cpu", "--precision", precision,
                         "--json", *extra]) == 0
            assert json.loads(capsys.readouterr().out)["precision"] == precision
            # the warm-up and the timed round (the FLOP count after them runs as it is)
            assert autocast[:2] == [precision == "bf16"] * 2 and True not in autocast[2:]


def test_bench_iwae_runs_estimator_and_baseline_in_the_precision(monkeypatch):
    """bench-iwae's estimator and its unchanged-code baseline both get --precision."""
    from types import SimpleNamespace

    from gpvae import bench

    seen = []
    real = bench.estimate
    monkeypatch.setattr(bench, "estimate", lambda *a, **kw: seen.append(kw.get("precision"))
                        or real(*a, **kw))
    args = SimpleNamespace(device="cpu", images=2, model="vae", latent_dim=2, iwae_samples=2,
                           batch_size=2, max_batch_samples=4, repeats=1, json=True,
                           compile="off", precision="bf16")
    out = bench.bench_iwae(args)
    assert out["precision"] == "bf16" and seen and set(seen) == {"bf16"}
