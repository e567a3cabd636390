"""The room every method gets from the base class (src/gpvae/models/base.py):

* a ``posterior`` that needs autograd (``posterior_needs_grad``) works in evaluation,
  benchmark timing, FLOP counting, uncertainty and plots, which all run without gradients;
* optional capabilities are base-class methods (FLOP floors, uncertainty, export);
* method options are named after their method and never collide; ``--models`` lists take
  ``NAME:SIZE``; options renamed since a run was written still load.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributions import Independent, Normal

import gpvae.models as models_pkg
from gpvae import bench, demo, experiments
from gpvae.checkpoint import save_checkpoint
from gpvae.cli import build_parser, main
from gpvae.data import ImageData
from gpvae.errors import ConfigError, UnsupportedError
from gpvae.evaluation import estimate
from gpvae.flops import forward_flops
from gpvae.models import (MODELS, LatentVariableModel, ModelConfig, build_model,
                          check_options, parse_model_list, parse_model_spec, run_dir_name)
from gpvae.models.base import posterior_without_grad
from gpvae.models.vae import VAE, VAEConfig
from gpvae.rundir import TrainConfig, load_run, read_config

SHAPE = (1, 28, 28)
SRC = Path(__file__).resolve().parents[1] / "src" / "gpvae"


class GradStepVAE(VAE):
    """One gradient step on z inside posterior(), as SA takes k of them:
    q(z|x) = N(m + 1e-3 d/dm log p(x|m), std), so posterior() needs autograd.  Its
    "uncertainty" is q's total variance and squared mean (any posterior-derived numbers)."""

    posterior_needs_grad = True

    def posterior(self, x):
        mean, std = self.encoder(x)
        (g,) = torch.autograd.grad(self.log_likelihood(x, mean).sum(), mean,
                                   create_graph=self.training)
        return Independent(Normal(mean + 1e-3 * g, std), 1)

    def uncertainty(self, x):
        q = self.posterior(x)
        return {"tr_f": q.variance.sum(-1), "tr_h": q.mean.square().sum(-1)}


def _grad_step_model(seed=0):
    torch.manual_seed(seed)
    return GradStepVAE(VAEConfig(latent_dim=2), SHAPE).eval()


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8))


# --- gradients inside posterior() ---------------------------------------------------------
def test_estimate_computes_a_grad_needing_posterior_with_gradients(monkeypatch):
    """estimate() (under inference mode) gives exactly the IWAE and ELBO computed by hand
    with gradients on; without the declaration the same model cannot be evaluated."""
    model, data = _grad_step_model(), _data(4)
    est = estimate(model, data, samples=6, batch_size=4, seed=3, progress=False)
    x = data.batch(slice(None))
    torch.manual_seed(3)
    q = model.posterior(x)
    with torch.no_grad():
        z = q.sample((6,))
        lw = (model.log_likelihood(x, z) + model.log_prior(z) - q.log_prob(z)).double()
    torch.testing.assert_close(est.iwae, torch.logsumexp(lw, 0) - math.log(6), rtol=1e-7, atol=0)
    torch.testing.assert_close(est.elbo, lw.mean(0), rtol=1e-7, atol=0)
    monkeypatch.setattr(GradStepVAE, "posterior_needs_grad", False)
    with pytest.raises(RuntimeError):
        estimate(model, data, samples=2, progress=False)


def test_posterior_without_grad_takes_inference_tensors():
    model = _grad_step_model()
    x = _data(3).batch(slice(None))
    want = model.posterior(x).mean.detach()
    with torch.inference_mode():
        x_inf = x.clone()
        q = posterior_without_grad(model, x_inf)
        assert x_inf.is_inference()
        torch.testing.assert_close(q.mean, want, rtol=0, atol=0)
        assert q.sample((2,)).shape == (2, 3, 2)


def test_bench_timing_and_flop_floor_of_a_grad_needing_posterior(monkeypatch):
    """time_posterior (what demo and bench-inference time) runs it on batches made with or
    without inference mode; its FLOP floor counts the decoder pass inside posterior()."""
    model = _grad_step_model()
    x = _data(8).batch(slice(None))
    with torch.inference_mode():
        x_inf = x.clone()
    times = bench.time_posterior(model, [x, x_inf], repeats=2, device=torch.device("cpu"))
    assert len(times) == 2 and all(t > 0 for t in times)
    vae = build_model("vae", SHAPE, latent_dim=2)
    decoder = forward_flops(model.decoder, torch.zeros(1, 2))
    assert model.posterior_flops(1) == vae.posterior_flops(1) + decoder
    assert model.posterior_flops(3) == 3 * model.posterior_flops(1)
    monkeypatch.setitem(MODELS, "gradstep", GradStepVAE)
    args = SimpleNamespace(device="cpu", models="gradstep", dataset="mnist", data_dir=None,
                           decoder="conv",
                           batch_size=8, limit_test=16, latent_dim=2, repeats=1, json=True,
                           profile=False)
    res = bench.bench_inference(args)["models"]
    assert list(res) == ["vae", "gradstep"]
    assert res["gradstep"]["flops_per_image"] == model.posterior_flops(1)
    assert res["gradstep"]["flop_ratio_to_vae"] > 1


def test_uncertainty_and_plots_of_a_grad_needing_posterior(tmp_path):
    from gpvae.plots import reconstructions_and_samples, uncertainty_extremes
    from gpvae.uncertainty import instance_uncertainty

    model, data = _grad_step_model(), _data(5)
    u = instance_uncertainty(model, data, batch_size=2, progress=False)
    want = model.uncertainty(data.batch(slice(None)))
    torch.testing.assert_close(u["tr_f"], want["tr_f"].detach().double())
    torch.testing.assert_close(u["total"], (want["tr_f"] + want["tr_h"]).detach().double())
    assert not any(v.requires_grad for v in u.values())
    x = data.batch(slice(0, 4))
    assert reconstructions_and_samples({"g": model}, x, tmp_path / "r.png").stat().st_size
    assert uncertainty_extremes(model, data, [0, 1], [3, 4], tmp_path / "u.png").stat().st_size


# --- optional capabilities ----------------------------------------------------------------
class NoExtras(LatentVariableModel):
    """A method with only the required interface."""

    def __init__(self, config, image_shape):
        super().__init__(config, image_shape)
        self.mean = torch.nn.Linear(784, config.latent_dim)

    def posterior(self, x):
        m = self.mean(x.flatten(1))
        return Independent(Normal(m, torch.ones_like(m)), 1)


def test_optional_capabilities_are_base_class_methods(tmp_path):
    from gpvae.export import export_encoder
    from gpvae.uncertainty import instance_uncertainty

    assert not VAE.supports_uncertainty() and VAE.supports_fused_encoder()
    assert MODELS["gpvae"].supports_uncertainty() and MODELS["gpvae"].supports_fused_encoder()
    assert GradStepVAE.supports_uncertainty()
    bare = NoExtras(ModelConfig(latent_dim=3), SHAPE)
    assert not bare.supports_uncertainty() and not bare.supports_fused_encoder()
    x = torch.rand(2, *SHAPE)
    for call in (lambda: bare.uncertainty(x), bare.fused_encoder,
                 lambda: export_encoder(bare, tmp_path / "e.pt2"),
                 lambda: instance_uncertainty(build_model("vae", SHAPE), _data(2))):
        with pytest.raises(UnsupportedError) as err:
            call()
        assert isinstance(err.value, NotImplementedError) and isinstance(err.value, ConfigError)
        assert "\n" not in str(err.value)
    # the generic FLOP floor: the layers posterior() runs (here one Linear)
    assert bare.posterior_flops(5) == 5 * 2 * 784 * 3
    vae = build_model("vae", SHAPE, latent_dim=4)
    assert vae.posterior_flops(1) == forward_flops(vae.encoder, torch.zeros(1, *SHAPE))
    q = vae.compute_posterior(x)
    assert q.mean.shape == q.stddev.shape == (2, 4)


def test_flop_floor_uses_the_models_own_dtype():
    """The example input follows the model's dtype (a float32 input would crash a float64
    convolution)."""
    for name in ("vae", "gpvae"):
        model = build_model(name, SHAPE, latent_dim=3)
        assert model.double().posterior_flops(2) == 2 * model.float().posterior_flops(1)
        assert model.example_input(2).dtype == torch.float32


def test_no_capability_is_probed_by_attribute_name():
    hits = [f"{p.name}:{i + 1}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines()) if "hasattr(" in line]
    assert hits == []


# --- option names ----------------------------------------------------------------------------
def test_method_options_are_prefixed_with_their_method_and_never_shared():
    """The rule the CLI relies on when it merges every method's options into one set of
    flags: each option beyond ModelConfig's starts with its method's prefix (its
    option_prefix, or else its registry name) and "_", and belongs to one method only; a
    size_option is one of the method's own integer options."""
    base = {f.name for f in fields(ModelConfig)}
    owner: dict[str, str] = {}
    for name, cls in MODELS.items():
        cfg = cls.config_class
        prefix = (cfg.option_prefix or name) + "_"
        own = {f.name: f.type for f in fields(cfg) if f.name not in base}
        for option in own:
            assert option.startswith(prefix), (name, option, prefix)
            assert option not in owner, f"{option} is an option of {owner.get(option)} and {name}"
            owner[option] = name
        if cfg.size_option is not None:
            assert own.get(cfg.size_option) in (int, "int"), (name, cfg.size_option)
        check_options(name, cls)


@dataclass
class ToyConfig(VAEConfig):
    """A throw-away sized method: ``toy:K`` sets ``toy_steps`` (0..8)."""

    size_option = "toy_steps"

    toy_steps: int = 1

    def validate(self):
        super().validate()
        if not (isinstance(self.toy_steps, int) and 0 <= self.toy_steps <= 8):
            raise ConfigError(f"--toy-steps must be an integer in 0..8, got {self.toy_steps!r}")


class Toy(VAE):
    config_class = ToyConfig


def test_register_refuses_options_that_could_collide(monkeypatch):
    monkeypatch.setattr(models_pkg, "MODELS", dict(MODELS))

    @dataclass
    class Unprefixed(VAEConfig):
        steps: int = 1

    @dataclass
    class SizeNotAnOption(VAEConfig):
        size_option = "bad_k"
        bad_lr: float = 0.1

    class Shared(VAE):
        config_class = type("SharedConfig", (ToyConfig,), {"option_prefix": "toy"})

    models_pkg.register("toy", Toy)
    assert models_pkg.MODELS["toy"] is Toy
    for name, cls, needle in (("plain", type("Plain", (VAE,), {"config_class": Unprefixed}),
                               "must start with 'plain_'"),
                              ("bad", type("Bad", (VAE,), {"config_class": SizeNotAnOption}),
                               "size_option"),
                              ("toy2", Shared, "shares option(s) toy_steps with 'toy'")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            models_pkg.register(name, cls)
        assert name not in models_pkg.MODELS


@pytest.mark.parametrize("spec,want", [
    ("vae", ("vae", {})), (" gpvae ", ("gpvae", {})), ("toy", ("toy", {})),
    ("toy:2", ("toy", {"toy_steps": 2})), (" toy : 0 ", ("toy", {"toy_steps": 0})),
    ("toy:08", ("toy", {"toy_steps": 8})),
])
def test_parse_model_spec(spec, want, monkeypatch):
    monkeypatch.setitem(MODELS, "toy", Toy)
    assert parse_model_spec(spec) == want


@pytest.mark.parametrize("spec,needle", [
    ("nope", "unknown model 'nope'"), ("nope:2", "unknown model 'nope'"),
    ("vae:2", "model 'vae' takes no size"), ("gpvae:1", "model 'gpvae' takes no size"),
    ("toy:x", "must be a non-negative integer"), ("toy:1.5", "must be a non-negative integer"),
    ("toy:-1", "must be a non-negative integer"), ("toy:", "must be a non-negative integer"),
    ("toy:2:3", "must be a non-negative integer"), ("toy:9", "--toy-steps must be an integer"),
])
def test_parse_model_spec_errors_are_one_line(spec, needle, monkeypatch):
    monkeypatch.setitem(MODELS, "toy", Toy)
    with pytest.raises(ConfigError) as err:
        parse_model_spec(spec)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_parse_model_list_and_run_dir_names(monkeypatch):
    monkeypatch.setitem(MODELS, "toy", Toy)
    specs = parse_model_list("vae, toy:2,toy:03,gpvae,")
    assert specs == {"vae": ("vae", {}), "toy:2": ("toy", {"toy_steps": 2}),
                     "toy:3": ("toy", {"toy_steps": 3}), "gpvae": ("gpvae", {})}
    assert [run_dir_name(k) for k in specs] == ["vae", "toy-2", "toy-3", "gpvae"]
    assert parse_model_list(["toy:1"]) == {"toy:1": ("toy", {"toy_steps": 1})}
    for bad, needle in (("toy:2,toy:02", "names 'toy:2' twice"), (" , ", "at least one")):
        with pytest.raises(ConfigError, match=needle):
            parse_model_list(bad)


@pytest.mark.parametrize("argv,needle", [
    (["compare", "--out", "{tmp}", "--models", "vae,vae:2"], "takes no size"),
    (["bench-inference", "--models", "toy:x"], "non-negative integer"),
    (["bench-train", "--models", "nope"], "unknown model 'nope'"),
    (["demo", "--out", "{tmp}", "--models", "vae,toy:99"], "--toy-steps"),
])
def test_bad_model_specs_are_one_line_cli_errors(argv, needle, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(MODELS, "toy", Toy)
    assert main([a.format(tmp=tmp_path / "out") for a in argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_sizes_reach_the_models_in_bench_inference_and_bench_train(monkeypatch):
    monkeypatch.setitem(MODELS, "toy", Toy)
    built = []

    def spy(name, shape, **options):
        built.append((name, options.get("toy_steps")))
        return build_model(name, shape, **options)

    monkeypatch.setattr(bench, "build_model", spy)
    args = SimpleNamespace(device="cpu", models="toy:2,toy:3", dataset="mnist", data_dir=None,
                           decoder="conv",
                           batch_size=8, limit_test=8, latent_dim=2, repeats=1, steps=1,
                           json=True, profile=False)
    assert list(bench.bench_inference(args)["models"]) == ["vae", "toy:2", "toy:3"]
    assert list(bench.bench_train(args)["models"]) == ["vae", "toy:2", "toy:3"]
    assert built == [("vae", None), ("toy", 2), ("toy", 3)] * 2


def test_compare_and_demo_name_run_directories_after_the_size(monkeypatch, tmp_path):
    """``--models vae,toy:2,toy:3``: runs OUT/vae/seed0, OUT/toy-2/seed0, OUT/toy-3/seed0,
    each with its size among its model options (training and scoring stubbed)."""
    monkeypatch.setitem(MODELS, "toy", Toy)
    trained = []
    score = {"test_iwae": 1.0, "test_iwae_se": 0.1, "test_elbo": 0.5, "test_elbo_se": 0.1,
             "n": 3}

    def run_one(run, **kw):  # the grid's train-then-score path, stubbed
        trained.append(run.cfg)
        return {"state": "done", "eval": {"estimate": dict(score)}, "error": None}

    monkeypatch.setattr(experiments, "run_one", run_one)
    res = experiments.compare(["vae", "toy:2", "toy:03"], [0], out=tmp_path / "cmp",
                              latent_dim=2, device="cpu", progress=False, log=lambda m: None)
    assert [Path(c.out) for c in trained] == [tmp_path / "cmp" / d / "seed0"
                                              for d in ("vae", "toy-2", "toy-3")]
    assert [(c.model, c.model_options) for c in trained] == [
        ("vae", {"latent_dim": 2}), ("toy", {"latent_dim": 2, "toy_steps": 2}),
        ("toy", {"latent_dim": 2, "toy_steps": 3})]
    assert list(res["models"]) == ["vae", "toy:2", "toy:3"]
    assert "| toy:3 |" in experiments.markdown_table(res)

    trained.clear()
    model = build_model("vae", SHAPE, latent_dim=2).eval()
    monkeypatch.setattr(demo, "train", lambda cfg, resume, progress: trained.append(cfg))
    monkeypatch.setattr(demo, "load_run", lambda run_dir, which, device: (model, None))
    monkeypatch.setattr(demo, "time_posterior", lambda model, batches, repeats, device: [1.0])
    monkeypatch.setattr(demo, "reconstructions_and_samples", lambda models, x, path: path)
    args = SimpleNamespace(device="cpu", out=str(tmp_path / "demo"), models="vae,toy:1",
                           epochs=1, limit_train=200, limit_test=4, iwae_samples=2,
                           latent_dim=2, seed=0, no_progress=True)
    rows = demo.run_demo(args)
    assert [r["model"] for r in rows] == ["vae", "toy:1"]
    assert [Path(c.out).name for c in trained] == ["vae", "toy-1"]
    assert trained[1].model_options == {"latent_dim": 2, "toy_steps": 1}


# --- renamed options ----------------------------------------------------------------------
def test_renamed_gpvae_options_still_load(tmp_path):
    """Runs written when the GPVAE's options were ``kl_expectation`` / ``kl_mc_samples``
    load with their current names (``gp_kl_expectation`` / ``gp_kl_mc_samples``): through
    read_config, load_run and ``train --resume``'s configuration, and as keywords."""
    from gpvae.cli import _train_config

    cfg = build_model("gpvae", SHAPE, latent_dim=2, kl_expectation="mc",
                      kl_mc_samples=3).config
    assert (cfg.gp_kl_expectation, cfg.gp_kl_mc_samples) == ("mc", 3)
    with pytest.raises(ConfigError, match="given twice"):
        build_model("gpvae", SHAPE, kl_expectation="mc", gp_kl_expectation="exact")
    run = tmp_path / "old"
    run.mkdir()
    old = asdict(TrainConfig(out=str(run), model="gpvae", epochs=1, model_options={
        "latent_dim": 2, "gp_init_std": 0.01, "kl_expectation": "mc", "kl_mc_samples": 2}))
    (run / "config.json").write_text(json.dumps(old))
    torch.manual_seed(0)
    written = build_model("gpvae", SHAPE, latent_dim=2, gp_init_std=0.01,
                          gp_kl_expectation="mc", gp_kl_mc_samples=2)
    save_checkpoint(run / "best.safetensors", written, {"epoch": 1})
    current = {"latent_dim": 2, "gp_init_std": 0.01, "gp_kl_expectation": "mc",
               "gp_kl_mc_samples": 2}
    assert read_config(run).model_options == current
    model, _ = load_run(run, "best")
    assert model.config == written.config
    resumed = _train_config(build_parser().parse_args(["train", "--out", str(run), "--resume"]))
    assert resumed.model_options == current
    # the current flags are the prefixed ones
    args = build_parser().parse_args(["train", "--out", "x", "--model", "gpvae",
                                      "--gp-kl-expectation", "mc", "--gp-kl-mc-samples", "4"])
    assert _train_config(args).model_options == {"gp_kl_expectation": "mc",
                                                  "gp_kl_mc_samples": 4}
