"""Compiled execution (src/gpvae/compiling.py, ``--compile``): the same numbers as eager,
a fallback that never stops a run and never hides a model's own error, and the flag wired
into train, evaluate and the benchmarks.

The mechanism is the one CUDA uses (torch.compile, one graph per unit, the eager random
numbers), run here with inductor's CPU backend.  Inductor compiles C++ for every new graph,
which takes seconds on a small machine, so the numerical tests use a VAE whose networks
are single linear layers (the VAE's own q(z|x), decoder call, ELBO and KL: the code under
test); the plumbing tests replace the compiler by a stand-in.  Tolerances: float32 results
(IWAE, ELBO, q(z|x)) agree with eager to 1e-5 relative -- inductor fuses operators and may
sum in another order, while one different random draw would change an image's IWAE by
more than 1e-3 relative; parameters after three Adam steps to 1e-5 relative (+1e-6).  The
tests use the same shapes (4 images; 1, 2 or 4 samples), so that each graph is compiled
once per test session.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gpvae import bench, compiling
from gpvae.checkpoint import read_checkpoint
from gpvae.cli import main
from gpvae.data import ImageData, Splits
from gpvae.compiling import (BENCH_COMPILE_CHOICES, COMPILE_CHOICES, TrainingStep,
                             check_compile_option, compile_enabled, inference_runner)
from gpvae.errors import ConfigError
from gpvae.evaluation import estimate
from gpvae.models import MODELS
from gpvae.models.vae import VAE, VAEConfig
from gpvae.training import make_adam
from helpers import Data, cli_usage_error, images

SHAPE = (1, 28, 28)


class _LinearEncoder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = nn.Linear(784, 2 * d)

    def forward(self, x):
        mean, pre = self.net(x.flatten(1)).chunk(2, -1)
        return mean, nn.functional.softplus(pre) + 1e-3


class _LinearDecoder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = nn.Linear(d, 784)

    def forward(self, z):
        return self.net(z).unflatten(-1, SHAPE)


class TinyVAE(VAE):
    """The VAE with one linear layer as encoder and as decoder (compiles in seconds).  Its
    training objective weighs each example by a factor drawn with ``torch.randn``, as the
    GPVAE's Monte Carlo KL (eq. 16) draws noise: a compiled step must take it from the eager
    generator too (the reparameterised sample itself is drawn by ``Tensor.normal_``)."""

    def __init__(self, config, image_shape):
        super().__init__(config, image_shape)
        self.encoder = _LinearEncoder(config.latent_dim)
        self.decoder = _LinearDecoder(config.latent_dim)

    def training_objective(self, x, n_train):
        objective, diag = super().training_objective(x, n_train)
        noise = torch.randn(objective.shape, dtype=objective.dtype)
        return objective * (1 + 0.1 * noise), diag  # each example's weight: a random draw


class RefusingVAE(TinyVAE):
    """A model whose q(z|x) raises an error of its own on a batch it refuses (one with a
    negative first pixel: bad input, say)."""

    def posterior(self, x):
        if bool((x.flatten(1)[:, 0] < 0).any()):
            raise ValueError("planted: this model refuses the batch")
        return super().posterior(x)


def _tiny(dtype=torch.float32, seed=0, cls=TinyVAE):
    torch.manual_seed(seed)
    return cls(VAEConfig(latent_dim=2), SHAPE).to(dtype)


def _identity_compile(fn, **_):
    """A stand-in for torch.compile that compiles nothing (the plumbing tests)."""
    return fn


def _raising_compile(fn, **_):
    raise RuntimeError("planted: no C++ compiler found")


def _failing_at_call_compile(fn, **_):
    """torch.compile whose compiled function fails when called, after drawing random
    numbers (as a graph that failed mid-run could have)."""
    def run(*args):
        torch.randn(7)
        raise RuntimeError("planted: the compiled graph failed")
    return run


def _warnings(err: str) -> list[str]:
    """The --compile warnings and notes of a command's stderr (not train's "compiling" note)."""
    return [ln for ln in err.splitlines()
            if "--compile" in ln and not ln.startswith("note: compiling")]


@pytest.fixture(autouse=True)
def _fresh_runners():
    """Each test starts without cached compiled units (their warm-up and failure state)."""
    compiling._RUNNERS.clear()
    yield
    compiling._RUNNERS.clear()


# --- the numbers ------------------------------------------------------------------------------
def test_compiled_iwae_and_posterior_equal_eager():
    """estimate(compile="on") -- q(z|x) once per batch, then chunks of decoder + log
    weights, all compiled -- gives eager's IWAE and ELBO (the same draws: one different
    sample would show) and runs every batch and chunk compiled; q(z|x) itself too."""
    model, data = _tiny(), Data(images(8, dtype=torch.float32))
    kw = dict(samples=5, batch_size=4, max_batch_samples=8, seed=4, progress=False)
    eager = estimate(model, data, **kw)
    fast = estimate(model, data, compile="on", **kw)
    runner = inference_runner(model, "on")
    assert runner.posterior.failure is None and runner.chunk.failure is None
    # 2 batches; chunks of 2, 2, 1 samples each
    assert (runner.posterior.compiled_calls, runner.chunk.compiled_calls) == (2, 6)
    torch.testing.assert_close(fast.iwae, eager.iwae, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast.elbo, eager.elbo, rtol=1e-5, atol=0)
    x = data.batch(slice(0, 4))
    with torch.inference_mode():
        q, want = runner.posterior(model, x), model.posterior(x)
    torch.testing.assert_close(q.mean, want.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.stddev, want.stddev, rtol=1e-5, atol=1e-6)


def _train_steps(enabled: bool, steps=3, compile_fn=None, monkeypatch=None):
    if compile_fn is not None:
        monkeypatch.setattr(torch, "compile", compile_fn)
    model = _tiny()
    optimizer = make_adam(model.parameters(), 1e-2)
    step = TrainingStep(model, optimizer, 36, enabled, "cpu")
    x = images(4, seed=2, dtype=torch.float32)
    torch.manual_seed(7)
    losses = []
    for _ in range(steps):
        loss, diag = step(x)
        losses.append((loss.item(), diag["rec"].item(), diag["kl"].item()))
        optimizer.step()
    return model, losses, step


def test_compiled_training_steps_equal_eager():
    """Three training steps (objective with its reparameterised sample, backward, Adam)
    compiled give eager's losses and parameters; every step ran compiled."""
    eager_model, eager_losses, _ = _train_steps(False)
    model, losses, step = _train_steps(True)
    assert step.runner.failure is None and step.runner.compiled_calls == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-5,
                               atol=0)
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dense", [False, True], ids=["blocked", "dense"])
def test_the_gpvae_bf16_training_step_compiles_and_equals_eager(dense):
    """Under --precision bf16 the GPVAE's compiled training step used to fail to compile
    ("self and mat2 must have the same dtype": the backward of its FP32 islands was traced
    under the autocast entered around the compiled function) and ran eagerly; a first fix
    compiled it but left the islands' plain operations differentiated in bfloat16 (their
    gradients 2e-3 off).  Autocast is now entered inside the compiled function: it
    compiles, and its loss and gradients are eager's (the islands in float32, the networks
    in bf16 both ways) -- with either form of the quadratic forms (dense: the CUDA default)
    and factors far from their initial diagonal, so that the forms carry weight."""
    from gpvae.models import build_model

    def one_step(enabled):
        torch.manual_seed(0)
        model = build_model("gpvae", SHAPE, latent_dim=3).use_dense_quadratic_forms(dense)
        with torch.no_grad():
            for p in (model.sigma_offdiag, model.gamma_offdiag):
                p.normal_(0, 0.05)
            for p in (model.mu, model.eta):
                p.normal_(0, 0.1)
        step = TrainingStep(model, make_adam(model.parameters(), 1e-3), 36, enabled, "cpu",
                            precision="bf16")
        torch.manual_seed(7)
        loss, _ = step(images(3, seed=2, dtype=torch.float32))
        return step, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    _, eager_loss, eager_grads = one_step(False)
    step, loss, grads = one_step(True)
    assert step.runner.failure is None and step.runner.compiled_calls == 1
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for name in ("mu", "eta", "sigma_offdiag", "sigma_log_diag", "gamma_offdiag",
                 "gamma_log_diag"):
        got, want = grads[name], eager_grads[name]
        assert (got - want).abs().max() <= 5e-4 * want.abs().max(), name
    for name, got in grads.items():  # the networks: bf16 both ways, rounding apart
        want = eager_grads[name]
        assert (got - want).abs().max() <= 2e-2 * want.abs().max() + 1e-6, name


# --- the fallback -----------------------------------------------------------------------------
@pytest.mark.parametrize("compile_fn", [_raising_compile, _failing_at_call_compile],
                         ids=["compile-raises", "graph-fails"])
def test_fallback_warns_once_and_gives_eager_numbers(compile_fn, monkeypatch, capsys):
    """When compilation fails (torch.compile raising; a compiled graph failing after it
    drew random numbers), evaluation and training run eagerly with exactly the eager
    numbers (random state restored), after one one-line warning per unit."""
    model, data = _tiny(), Data(images(4, dtype=torch.float32))
    kw = dict(samples=3, batch_size=2, seed=1, progress=False)
    eager = estimate(model, data, **kw)
    monkeypatch.setattr(torch, "compile", compile_fn)
    for _ in range(2):  # the second call: no new warning
        est = estimate(model, data, compile="on", **kw)
        assert torch.equal(est.iwae, eager.iwae) and torch.equal(est.elbo, eager.elbo)
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 2, warned  # q(z|x), the log weights
    assert all("runs eagerly" in w and "planted" in w for w in warned), warned

    eager_model, eager_losses, _ = _train_steps(False)
    model, losses, step = _train_steps(True, compile_fn=compile_fn, monkeypatch=monkeypatch)
    assert losses == eager_losses and step.runner.compiled_calls == 0
    for p, q in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(p, q)
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1 and "the training step of TinyVAE runs eagerly" in warned[0]


def _wrapping_compile(fn, **_):
    """torch.compile whose compiled function fails (with an error of its own) exactly
    where the model does, as a traced model's error would surface."""
    def run(*args):
        try:
            return fn(*args)
        except ValueError as exc:
            raise RuntimeError("planted: the compiled graph failed") from exc
    return run


@pytest.mark.parametrize("bad_batch", [0, 1], ids=["in-warm-up", "after-compiled-batches"])
def test_a_model_error_is_not_taken_for_a_compilation_failure(bad_batch, monkeypatch,
                                                              capsys):
    """A model's own error propagates unchanged through the compiled path -- from the
    first (warm-up) call or from a later one, where the compiled unit fails too -- with
    no fallback warning, and compilation stays on."""
    monkeypatch.setattr(torch, "compile", _wrapping_compile)
    x = images(4, dtype=torch.float32)
    x[2 * bad_batch + 1, 0, 0, 0] = -1.0
    model = _tiny(cls=RefusingVAE)
    with pytest.raises(ValueError, match="planted: this model refuses"):
        estimate(model, Data(x), samples=2, batch_size=2, progress=False, compile="on")
    runner = inference_runner(model, "on")
    assert runner.posterior.failure is None and runner.posterior.compiled_calls == bad_batch
    assert not _warnings(capsys.readouterr().err)


def test_a_failed_cuda_graph_capture_that_breaks_the_eager_rerun_says_compile_off(
        monkeypatch):
    """On an H100 a failed CUDA-graph capture left CUDA's generator unusable, so the eager
    rerun failed too ("Offset increment outside graph capture ...") and a bare CUDA error
    stopped the command.  Now that case is a one-line CompileError naming --compile off;
    without a capture failure (or on a CPU) the eager error still propagates unchanged.
    (CUDA's random-number state is not touched here: no GPU.)"""
    from gpvae.errors import CompileError

    monkeypatch.setattr(compiling, "_rng_state", lambda device: None)
    monkeypatch.setattr(compiling, "_set_rng_state", lambda state, device: None)
    broken = []

    def fast(x):
        broken.append(True)
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        except RuntimeError as inner:
            raise RuntimeError("CUDA error: operation failed due to a previous error during "
                               "capture") from inner

    def eager(x):
        if broken:
            raise RuntimeError("Offset increment outside graph capture encountered "
                               "unexpectedly.")
        return x + 1

    unit = compiling.Fallback(fast, eager, "q(z|x) of VAE", "cuda", log=lambda m: None)
    with pytest.raises(CompileError, match="rerun with --compile off") as err:
        unit(torch.zeros(1))
    assert "\n" not in str(err.value) and "q(z|x) of VAE" in str(err.value)
    assert "Offset increment" in str(err.value)

    def model_error(x):  # compiled and eager both fail with the model's own error
        raise ValueError("planted: the model's own error")

    for device in ("cuda", "cpu"):
        unit = compiling.Fallback(model_error, model_error, "q(z|x) of VAE", device,
                                  log=lambda m: None)
        with pytest.raises(ValueError, match="the model's own error"):
            unit(torch.zeros(1))
    broken.clear()
    unit = compiling.Fallback(fast, eager, "q(z|x) of VAE", "cpu", log=lambda m: None)
    with pytest.raises(RuntimeError, match="Offset increment"):  # CPU: not CUDA's capture
        unit(torch.zeros(1))


class CountingVAE(TinyVAE):
    """A method whose training step changes its own state (as RME's stage schedule does),
    and so says it cannot be packed -- nor compiled."""

    def __init__(self, config, image_shape):
        super().__init__(config, image_shape)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    @classmethod
    def packable(cls):
        return False

    def training_objective(self, x, n_train):
        self.steps_seen += 1
        return super().training_objective(x, n_train)


def test_a_step_that_changes_the_model_runs_eagerly_once(monkeypatch, capsys):
    """A training step that cannot be one graph (:meth:`packable` False) runs eagerly,
    exactly once per step (no warm-up or rerun that would advance its state twice), after a
    one-line note."""
    monkeypatch.setattr(torch, "compile", _identity_compile)
    model = _tiny(cls=CountingVAE)
    optimizer = make_adam(model.parameters(), 1e-2)
    step = TrainingStep(model, optimizer, 36, True, "cpu")
    for _ in range(2):
        step(images(4, seed=2, dtype=torch.float32))
        optimizer.step()
    assert int(model.steps_seen) == 2 and step.runner is None
    notes = _warnings(capsys.readouterr().err)
    assert len(notes) == 1 and "training step of CountingVAE" in notes[0], notes


# --- the option -------------------------------------------------------------------------------
def test_compile_option_values():
    assert COMPILE_CHOICES == ("off", "on", "auto") and "both" in BENCH_COMPILE_CHOICES
    assert [compile_enabled(v, "cpu") for v in ("off", "on", "auto")] == [False, True, False]
    assert compile_enabled(True, "cpu") and not compile_enabled(False, "cpu")
    for bad in ("yes", "both", "", None, 1):
        with pytest.raises(ConfigError, match="--compile must be one of off, on, auto") as err:
            check_compile_option(bad)
        assert "\n" not in str(err.value)
    assert check_compile_option("both", BENCH_COMPILE_CHOICES) == "both"


def test_auto_compiles_on_cuda_only_the_methods_measured_there():
    """auto: never on a CPU; on CUDA only for a class that says a GPU run measured the gain
    (the VAE and the GPVAE), not for the others (e.g. SA, ME) nor without a model."""
    from gpvae.models import build_model

    vae, gpvae, sa, me = (build_model(m, SHAPE, latent_dim=2) for m in ("vae", "gpvae", "sa",
                                                                         "me"))
    assert [type(m).compile_auto_on_cuda for m in (vae, gpvae, sa, me)] == [True, True,
                                                                           False, False]
    for m in (vae, gpvae, sa, me):
        assert not compile_enabled("auto", "cpu", m)
        assert compile_enabled("on", "cpu", m) and not compile_enabled("off", "cuda", m)
    assert compile_enabled("auto", "cuda", vae) and compile_enabled("auto", "cuda:1", gpvae)
    assert not compile_enabled("auto", "cuda", sa) and not compile_enabled("auto", "cuda", me)
    assert not compile_enabled("auto", "cuda")
    assert not MODELS["vlae"].compile_auto_on_cuda and not MODELS["rme"].compile_auto_on_cuda


def test_fused_trunks_auto_on_cuda_where_there_are_trunks_and_on_refused_without():
    from gpvae.compiling import apply_fused_trunks, fused_trunks_enabled
    from gpvae.models import build_model

    vae, gpvae = build_model("vae", SHAPE, latent_dim=2), build_model("gpvae", SHAPE, latent_dim=2)
    assert fused_trunks_enabled("auto", "cuda", gpvae)
    assert not fused_trunks_enabled("auto", "cpu", gpvae)
    assert not fused_trunks_enabled("auto", "cuda", vae)
    assert fused_trunks_enabled("on", "cpu", gpvae) and not fused_trunks_enabled("off", "cuda", gpvae)
    with pytest.raises(ConfigError, match="--fused-trunks on: VAE has no encoder trunks"):
        apply_fused_trunks(vae, "on", "cpu")
    with pytest.raises(ConfigError, match="--fused-trunks must be one of off, on, auto"):
        fused_trunks_enabled("both", "cpu", gpvae)
    x = images(3, dtype=torch.float32)
    with torch.no_grad():
        want = gpvae.posterior(x).mean
        got = apply_fused_trunks(gpvae, "on", "cpu").posterior(x).mean  # the fused network
        assert gpvae.fused_trunks is True
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert apply_fused_trunks(gpvae, "auto", "cpu").fused_trunks is False  # unfused again


def test_gp_quadratic_auto_is_dense_on_cuda_for_the_gpvae_and_dense_refused_without():
    from gpvae.compiling import apply_gp_quadratic, dense_quadratic_enabled
    from gpvae.models import build_model

    vae, gpvae = build_model("vae", SHAPE, latent_dim=2), build_model("gpvae", SHAPE, latent_dim=2)
    assert dense_quadratic_enabled("auto", "cuda", gpvae)
    assert dense_quadratic_enabled("auto", "cuda:1", gpvae)
    assert not dense_quadratic_enabled("auto", "cpu", gpvae)
    assert not dense_quadratic_enabled("auto", "cuda", vae)
    assert dense_quadratic_enabled("dense", "cpu", gpvae)
    assert not dense_quadratic_enabled("blocked", "cuda", gpvae)
    with pytest.raises(ConfigError, match="--gp-quadratic dense: VAE has no GP quadratic"):
        apply_gp_quadratic(vae, "dense", "cpu")
    with pytest.raises(ConfigError, match="--gp-quadratic must be one of blocked, dense, auto"):
        dense_quadratic_enabled("both", "cpu", gpvae)
    assert apply_gp_quadratic(vae, "auto", "cuda") is vae
    x = images(3, dtype=torch.float32)
    with torch.no_grad():
        for p in (gpvae.sigma_offdiag, gpvae.gamma_offdiag):  # forms that carry weight
            p.normal_(0, 0.1)
        want = gpvae.posterior(x).variance
        got = apply_gp_quadratic(gpvae, "dense", "cpu").posterior(x).variance
        assert gpvae.dense_quadratic_forms is True
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert apply_gp_quadratic(gpvae, "auto", "cpu").dense_quadratic_forms is False


def test_a_bad_compile_value_is_a_one_line_error_before_any_work(monkeypatch, capsys,
                                                                 tmp_path):
    calls = []
    model = _tiny()
    monkeypatch.setattr(model, "posterior", lambda x: calls.append(x))
    with pytest.raises(ConfigError, match="--compile"):
        estimate(model, Data(images(2, dtype=torch.float32)), compile="fast", progress=False)
    assert not calls
    for argv in (["train", "--out", str(tmp_path / "r"), "--compile", "fast"],
                 ["evaluate", str(tmp_path), "--compile", "fast"],
                 ["bench-inference", "--compile", "fast"]):
        err = cli_usage_error(argv, capsys)
        assert "--compile" in err and "fast" in err, err
    assert not (tmp_path / "r").exists()


# --- wiring: train, resume, evaluate ----------------------------------------------------------
def test_the_compiled_evaluation_graphs_draw_no_random_numbers(monkeypatch):
    """q(z|x) and the IWAE chunk are compiled without any random operator in their graphs:
    the draws z ~ q(z|x) are made eagerly and passed in.  (On an H100 the chunk that drew
    its own samples failed under CUDA-graph capture: ``torch.normal(mean, std)`` checks
    std >= 0 on the host, ``cudaErrorStreamCaptureUnsupported``, and the failed capture left
    the CUDA generator unusable for the eager fallback.)  The graphs are read with a
    recording backend in place of inductor."""
    from gpvae.packing import RANDOM_FUNCTIONS

    graphs = {}

    def recording_compiler(fn, device):
        def backend(gm, example_inputs):
            graphs.setdefault(fn.__name__, []).append(gm)
            return gm.forward
        return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)

    monkeypatch.setattr(compiling, "compiled", recording_compiler)
    random_names = {f.__name__ for f in RANDOM_FUNCTIONS}
    model, data = _tiny(), Data(images(8, dtype=torch.float32))
    eager = estimate(model, data, samples=3, batch_size=4, max_batch_samples=8, seed=1,
                     progress=False)
    fast = estimate(model, data, samples=3, batch_size=4, max_batch_samples=8, seed=1,
                    progress=False, compile="on")
    assert set(graphs) == {"_posterior", "_log_weights_chunk"}
    for name, gms in graphs.items():
        for gm in gms:
            drawn = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                     and (n.target in RANDOM_FUNCTIONS
                          or getattr(n.target, "__name__", n.target) in random_names)]
            assert not drawn, (name, drawn)
    assert torch.equal(fast.iwae, eager.iwae)  # the very same draws, the same arithmetic


def _train_cli(out, *extra):
    return main(["train", "--out", str(out), "--model", "tinylin", "--latent-dim", "2",
                 "--limit-train", "40", "--batch-size", "4", "--lr", "1e-2", "--seed", "3",
                 "--device", "cpu", "--no-progress", *extra])


def test_train_and_evaluate_compile_and_resume_exactly(tmp_path, monkeypatch, capsys):
    """``gpvae train --compile on`` runs its steps and its validation compiled and ends
    near the eager run; stopped after one epoch and resumed (compiled), it ends exactly
    where the uninterrupted compiled run does; ``gpvae evaluate --compile on`` gives the
    eager IWAE."""
    monkeypatch.setitem(MODELS, "tinylin", TinyVAE)
    names = []
    real = compiling.compiled
    monkeypatch.setattr(compiling, "compiled",
                        lambda fn, device: names.append(fn.__name__) or real(fn, device))
    assert _train_cli(tmp_path / "full", "--epochs", "2", "--compile", "on") == 0
    assert {"_autocast_training_loss", "_posterior", "_log_weights_chunk"} <= set(names)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert notes == ["note: compiling tinylin's training step and evaluation (--compile on); "
                     "the first steps take longer (--compile off runs eagerly)"]
    assert _train_cli(tmp_path / "part", "--epochs", "1", "--compile", "on") == 0
    assert main(["train", "--out", str(tmp_path / "part"), "--resume", "--epochs", "2",
                 "--compile", "on", "--no-progress"]) == 0
    assert _train_cli(tmp_path / "eager", "--epochs", "2") == 0
    assert not _warnings(capsys.readouterr().err)
    full, _, full_meta = read_checkpoint(tmp_path / "full" / "last.safetensors")
    part, _, part_meta = read_checkpoint(tmp_path / "part" / "last.safetensors")
    eager, _, _ = read_checkpoint(tmp_path / "eager" / "last.safetensors")
    for k in full:
        assert torch.equal(full[k], part[k]), k
        torch.testing.assert_close(full[k], eager[k], rtol=1e-4, atol=1e-6, msg=k)
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(full_meta["history"]) == strip(part_meta["history"])
    assert "compile" not in json.loads((tmp_path / "full" / "config.json").read_text())

    results = []
    for flag in ("off", "on"):
        names.clear()
        assert main(["evaluate", str(tmp_path / "full"), "--iwae-samples", "2",
                     "--limit-test", "4", "--device", "cpu", "--json", "--no-progress",
                     "--compile", flag]) == 0
        results.append(json.loads(capsys.readouterr().out))
        assert set(names) == ({"_posterior", "_log_weights_chunk"} if flag == "on" else set())
    assert results[1]["test_iwae"] == pytest.approx(results[0]["test_iwae"], rel=1e-5)


#: a tiny `gpvae train` (one epoch of 40 images on the CPU)
_TINY_TRAIN = ["--latent-dim", "2", "--limit-train", "40", "--batch-size", "8", "--epochs", "1",
               "--device", "cpu", "--no-progress"]


def _spy_on_gpvae(monkeypatch, switch: str) -> list:
    """The values each call of the GPVAE's execution switch ``switch`` (``fuse_trunks``,
    ``use_dense_quadratic_forms``) receives, in order; the switch still does its work."""
    from gpvae.models.gpvae import GPVAE

    calls = []
    real = getattr(GPVAE, switch)
    monkeypatch.setattr(GPVAE, switch,
                        lambda self, enabled=True: calls.append(enabled) or real(self, enabled))
    return calls


def test_train_and_evaluate_pass_fused_trunks_and_refuse_it_without_trunks(tmp_path, monkeypatch,
                                                                          capsys):
    """``--fused-trunks`` reaches the model in train and evaluate (auto: unfused on a CPU;
    on: fused), and ``on`` for a method without trunks is a one-line error."""
    calls = _spy_on_gpvae(monkeypatch, "fuse_trunks")
    common = _TINY_TRAIN
    assert main(["train", "--out", str(tmp_path / "g"), "--model", "gpvae", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "f"), "--model", "gpvae", *common,
                 "--fused-trunks", "on"]) == 0
    assert calls == [False, True]
    assert "note: compiling" not in capsys.readouterr().err  # auto on a CPU: eager, no note
    assert main(["evaluate", str(tmp_path / "f"), "--iwae-samples", "2", "--limit-test", "4",
                 "--device", "cpu", "--no-progress", "--fused-trunks", "on"]) == 0
    assert calls == [False, True, True]
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "v"), "--model", "vae", *common,
                 "--fused-trunks", "on"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--fused-trunks on: VAE has no encoder trunks" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "v").exists()


def test_train_and_evaluate_pass_gp_quadratic_and_refuse_dense_without_it(tmp_path, monkeypatch,
                                                                         capsys):
    """``--gp-quadratic`` reaches the model in train and evaluate (auto: blocked on a CPU;
    dense: dense), and ``dense`` for a method without the quadratic forms is a one-line
    error before any directory is made."""
    calls = _spy_on_gpvae(monkeypatch, "use_dense_quadratic_forms")
    common = _TINY_TRAIN
    assert main(["train", "--out", str(tmp_path / "g"), "--model", "gpvae", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "d"), "--model", "gpvae", *common,
                 "--gp-quadratic", "dense"]) == 0
    assert calls == [False, True]
    assert main(["evaluate", str(tmp_path / "d"), "--iwae-samples", "2", "--limit-test", "4",
                 "--device", "cpu", "--no-progress", "--gp-quadratic", "dense"]) == 0
    assert main(["evaluate", str(tmp_path / "d"), "--iwae-samples", "2", "--limit-test", "4",
                 "--device", "cpu", "--no-progress"]) == 0
    assert calls == [False, True, True, False]
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "v"), "--model", "vae", *common,
                 "--gp-quadratic", "dense"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--gp-quadratic dense: VAE has no GP quadratic forms" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "v").exists()


# --- wiring: the benchmarks -------------------------------------------------------------------
@pytest.fixture
def plain_compile(monkeypatch):
    """Compilation replaced by the identity (these tests check the rows, not the compiler),
    the bench models small (d = 2) and the data a few stand-in images."""
    monkeypatch.setattr(torch, "compile", _identity_compile)

    def tiny_splits(dataset, data_dir=None, limit_train=None, limit_test=None, **kw):
        def imgs(n, seed):
            return ImageData((images(n, seed=seed, dtype=torch.float32) * 255).to(torch.uint8))
        return Splits(name=dataset, shape=SHAPE, train=imgs(4, 2), valid=imgs(2, 3),
                      test=imgs(min(limit_test or 3, 3), 4))

    monkeypatch.setattr(bench, "load_splits", tiny_splits)
    monkeypatch.setattr("gpvae.data.load_splits", tiny_splits)


def test_bench_commands_time_eager_and_compiled_side_by_side(plain_compile, capsys,
                                                            monkeypatch):
    """--compile both (and --fused-trunks both): an eager and a compiled row per model (a
    fused GPVAE too), each ratio taken to the VAE run the same way, the FLOP floor of a
    fused GPVAE the unfused one's; bench-iwae prints the compiled rate next to eager."""
    from types import SimpleNamespace

    import gpvae.models.gpvae as gpvae_module

    compiled, fused_calls = [], []
    real_compiled, real_fused = compiling.compiled, gpvae_module.fused_trunk_features
    monkeypatch.setattr(compiling, "compiled",
                        lambda fn, device: compiled.append(fn.__name__) or real_compiled(fn,
                                                                                        device))
    monkeypatch.setattr(gpvae_module, "fused_trunk_features",
                        lambda *a: fused_calls.append(1) or real_fused(*a))

    common = dict(dataset="mnist", data_dir=None, models="gpvae", latent_dim=2, batch_size=2,
                  repeats=1, device="cpu", json=True, profile=False, decoder="conv",
                  compile="both", fused_trunks="both")
    for out in (bench.bench_inference(SimpleNamespace(**common, limit_test=3)),
                bench.bench_train(SimpleNamespace(**common, steps=1))):
        rows = out["models"]
        assert list(rows) == ["vae", "vae+compile", "gpvae", "gpvae+compile", "gpvae+fused",
                              "gpvae+fused+compile"]
        assert [r["compiled"] for r in rows.values()] == [False, True] * 3
        assert [r["fused_trunks"] for r in rows.values()] == [False] * 4 + [True] * 2
        key = "ms_per_batch" if "ms_per_batch" in rows["vae"] else "ms_per_step"
        for name, ref in (("gpvae+compile", "vae+compile"), ("gpvae+fused", "vae"),
                          ("gpvae+fused+compile", "vae+compile")):
            assert rows[name]["ratio_to_vae"] == pytest.approx(rows[name][key] / rows[ref][key])
        assert rows["gpvae+fused"]["flops_per_image"] == rows["gpvae"]["flops_per_image"]
        assert all(r["compile_fallback"] is None for r in rows.values())
    # the three compiled rows of each command ran through the compiler; fused rows fused
    assert compiled == ["_compute_posterior_of_model"] * 3 + ["_autocast_training_loss"] * 3, compiled
    assert fused_calls
    args = SimpleNamespace(device="cpu", images=2, model="vae", latent_dim=2, iwae_samples=2,
                           batch_size=2, max_batch_samples=4, repeats=1, json=True,
                           compile="both")
    compiled.clear()
    batches = []
    real_lw = compiling.CompiledInference.log_weights
    monkeypatch.setattr(compiling.CompiledInference, "log_weights",
                        lambda self, *a: batches.append(1) or real_lw(self, *a))
    out = bench.bench_iwae(args)
    assert compiled == ["_posterior", "_log_weights_chunk"]
    assert len(batches) == 3  # one batch: two warm-up rounds, one timed
    assert out["compile"] == "both" and out["compiled_images_per_s"] > 0
    assert out["compile_fallback"] is None
    assert out["compile_speedup"] == pytest.approx(out["compiled_images_per_s"]
                                                   / out["images_per_s"])
    capsys.readouterr()


def test_bench_rows_say_when_compilation_fell_back(plain_compile, monkeypatch, capsys):
    """A compiled row that ran eagerly after all says so (JSON and table), with the reason."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch, "compile", _raising_compile)
    common = dict(dataset="mnist", data_dir=None, models="vae", latent_dim=2, batch_size=2,
                  repeats=1, device="cpu", json=False, profile=False, decoder="conv",
                  compile="both")
    for run in (lambda: bench.bench_inference(SimpleNamespace(**common, limit_test=3)),
                lambda: bench.bench_train(SimpleNamespace(**common, steps=1))):
        rows = run()["models"]
        assert rows["vae"]["compile_fallback"] is None
        assert "planted: no C++ compiler" in rows["vae+compile"]["compile_fallback"]
        text = capsys.readouterr().out
        assert "(vae+compile: ran eagerly, its compilation fell back: RuntimeError: planted" in text


# --- scripts/gpu_check.py compile: what a GPU session runs --------------------------------------
def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("compile_fn", [_identity_compile, _raising_compile],
                         ids=["compiles", "falls-back"])
def test_gpu_check_compile_compares_compiled_with_eager(compile_fn, monkeypatch, capsys):
    """``gpu_check.py compile`` (run on the GPU): the compiled model against its eager copy
    on the same device, weights and seeds -- with the compiler replaced here, every error
    is exactly 0 -- and a unit that fell back is reported and fails the check."""
    monkeypatch.setattr(torch, "compile", compile_fn)
    gpu_check = _gpu_check()
    code = gpu_check.main(["compile", "--device", "cpu", "--models", "vae", "--synthetic",
                           "--images", "3", "--iwae-samples", "2", "--steps", "2",
                           "--latent-dim", "2"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = out["rows"][0]
    assert row["iwae"] == row["elbo"] == row["loss"] == row["gradient"] == 0.0
    assert row["params_after_adam"] == 0.0
    if compile_fn is _identity_compile:
        assert code == 0 and out["ok"] and row["fell_back"] == {}
    else:
        assert code == 1 and not out["ok"]
        assert set(row["fell_back"]) == {"q(z|x) of VAE", "the IWAE log-weights of VAE",
                                         "training step"}
