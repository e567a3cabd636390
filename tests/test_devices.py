"""Every path that makes a tensor for a model makes it on the model's device and dtype
(issue 11, item 1).

The bug this closes: ``bench-*`` crashed on CUDA because FLOP counting fed a tensor made on
the default device to a model on the GPU, and no test ran a model anywhere but on the default
device and dtype.  Without a GPU the same class of bug shows in two ways that fail loudly on
CPU, and both are used here:

* a model held in **float64** (``model.double()``): a tensor made with the default dtype
  (float32) meets float64 weights -- "Input type (float) and bias type (double)";
* a model on the **meta** device (shapes only, no data): a tensor made on the default device
  (CPU) meets meta weights -- "Tensor on device meta is not on the expected device cpu".
  Only where a path has no data-dependent Python control flow (FLOP counting).

Every registered method (:data:`gpvae.models.MODELS`) goes through FLOP counting, the
benchmarks' internals and commands (``bench-inference``, ``bench-train``, ``bench-iwae`` with
tiny sizes), :func:`gpvae.evaluation.estimate`, the figures, ``gap``, and, where the method
has them, export, uncertainty and packing's probe; the data are float32 images, as
:class:`gpvae.data.ImageData` gives them.
"""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch.distributions import Distribution

from gpvae import bench, evaluation, gap, plots
from gpvae.data import ImageData, Splits
from gpvae.errors import UnsupportedError
from gpvae.models import MODELS, build_model

SHAPE = (1, 28, 28)
D = 2
METHODS = sorted(MODELS)


def _model(name, dtype=torch.float64):
    """A tiny (d = 2) freshly initialised model with its schedule complete (RME: all
    components), in ``dtype``, in eval mode."""
    torch.manual_seed(0)
    model = build_model(name, SHAPE, latent_dim=D)
    model.complete_schedule()
    return model.to(dtype).eval()


def _images(n, seed=1):
    """n random uint8 images: batches come out float32, as real data sets give them."""
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8))


def _meta_or_none(fn):
    """``fn()`` on a meta-device model, with torch.distributions' argument checks off (they
    read values), or None where the path itself reads a value to Python (``.item()``: no
    data on meta).  A device mismatch is not caught: it fails the test."""
    validate = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        return fn()
    except RuntimeError as exc:
        if "cannot be called on meta tensors" in str(exc):
            return None
        raise
    finally:
        Distribution.set_default_validate_args(validate)


@pytest.mark.parametrize("name", METHODS)
def test_flop_counts_on_float64_and_meta_models(name):
    """posterior_flops, decoder_flops, iwae_flops_per_image and the training floor make
    their inputs on the model's device and dtype: the same counts for a float32, a float64
    and a meta-device model."""
    f32, f64 = _model(name, torch.float32), _model(name)
    meta = copy.deepcopy(f32).to("meta")
    counts = {}
    for label, model in (("float32", f32), ("float64", f64)):
        counts[label] = (model.posterior_flops(3), bench.decoder_flops(model),
                         bench.iwae_flops_per_image(model, 4), bench._train_floor_flops(model))
    assert counts["float64"] == counts["float32"]
    assert counts["float32"][0] > 0 and counts["float32"][1] > 0
    assert _meta_or_none(lambda: bench.decoder_flops(meta)) == counts["float32"][1]
    posterior = _meta_or_none(lambda: meta.posterior_flops(3))
    assert posterior in (None, counts["float32"][0])
    if name == "vae":  # the plain VAE runs on meta: the device check is not vacuous
        assert posterior == counts["float32"][0]


@pytest.mark.parametrize("name", METHODS)
def test_benchmark_internals_on_float64_models(name):
    """The timed q(z|x) pass (bench-inference, demo) and bench-iwae's per-image reference
    loop cast the float32 batches they are given to the model's dtype."""
    model, data = _model(name), _images(2)
    times = bench.time_posterior(model, [data.batch(slice(0, 2))], 1, torch.device("cpu"))
    assert len(times) == 1
    ref = bench.reference_per_image_iwae(model, data, 3, torch.device("cpu"))
    assert ref.shape == (2,) and ref.dtype == torch.float64 and torch.isfinite(ref).all()


@pytest.fixture
def double_benchmarks(monkeypatch):
    """The bench commands with every model they build held in float64 (the builds are
    recorded) and tiny stand-in data instead of MNIST."""
    built = []

    def build_double(*args, **kwargs):
        model = build_model(*args, **kwargs).double()
        built.append(model)
        return model

    def tiny_splits(dataset, data_dir=None, limit_train=None, limit_test=None, **kw):
        return Splits(name=dataset, shape=SHAPE, train=_images(4, 2), valid=_images(2, 3),
                      test=_images(min(limit_test or 3, 3), 4))

    monkeypatch.setattr(bench, "build_model", build_double)
    monkeypatch.setattr(bench, "load_splits", tiny_splits)
    monkeypatch.setattr("gpvae.data.load_splits", tiny_splits)
    return built


def _json_out(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_inference_and_bench_train_on_float64_models(double_benchmarks, capsys):
    """``bench-inference`` and ``bench-train`` of every method run on float64 models
    (their batches are cast to each model's dtype)."""
    specs = ",".join(METHODS)
    common = dict(dataset="mnist", data_dir=None, models=specs, latent_dim=D, batch_size=2,
                  repeats=1, device="cpu", json=True, profile=False, decoder="conv")
    out = bench.bench_inference(SimpleNamespace(**common, limit_test=3))
    assert list(out["models"]) == METHODS and _json_out(capsys) == json.loads(json.dumps(out))
    out = bench.bench_train(SimpleNamespace(**common, steps=1))
    assert list(out["models"]) == METHODS
    assert len(double_benchmarks) == 2 * len(METHODS)
    assert all(next(m.parameters()).dtype == torch.float64 for m in double_benchmarks)


@pytest.mark.parametrize("name", METHODS)
def test_bench_iwae_on_float64_models(double_benchmarks, capsys, name):
    """``bench-iwae`` (the estimator, the per-image reference and the FLOP floor) on a
    float64 model."""
    args = SimpleNamespace(device="cpu", images=2, model=name, latent_dim=D,
                           iwae_samples=3, batch_size=2, max_batch_samples=4, repeats=1,
                           json=True)
    out = bench.bench_iwae(args)
    assert out["images"] == 2 and out["images_per_s"] > 0
    assert [next(m.parameters()).dtype for m in double_benchmarks] == [torch.float64]
    capsys.readouterr()


@pytest.mark.parametrize("name", METHODS)
def test_evaluation_plots_and_gaps_on_float64_models(name, tmp_path):
    """evaluation.estimate, both figures and amortization_gaps score float32 images with a
    float64 model (noise, samples and q* made in the model's dtype)."""
    model, data = _model(name), _images(2)
    est = evaluation.estimate(model, data, samples=3, batch_size=2, progress=False)
    assert torch.isfinite(est.iwae).all() and torch.isfinite(est.elbo).all()
    x = data.batch(slice(0, 2))
    assert plots.reconstructions_and_samples({name: model}, x, tmp_path / "r.png",
                                             n_samples=2).stat().st_size > 0
    assert plots.uncertainty_extremes(model, data, [0], [1], tmp_path / "u.png").is_file()
    out = gap.amortization_gaps(model, data, elbo_samples=2, iwae_samples=2, steps=2,
                                check_every=1, mc_samples=1, eval_samples=2,
                                moment_samples=8, batch_size=2, progress=False)
    assert out["qstar_mean"].dtype == torch.float64 and out["qstar_mean"].shape == (2, D)
    assert torch.isfinite(out["log_px"]).all()


@pytest.mark.parametrize("name", [n for n in METHODS if MODELS[n].supports_fused_encoder()])
def test_export_of_a_float64_model(name, tmp_path):
    """The exported program is traced on an example of the model's dtype, and gives the
    model's q(z|x) moments in that dtype."""
    from gpvae.export import export_encoder

    model = _model(name)
    enc = torch.export.load(str(export_encoder(model, tmp_path / "e.pt2"))).module()
    x = _images(3).batch(slice(0, 3)).double()
    mean, var = enc(x)
    with torch.no_grad():
        q = model.posterior(x)
    assert mean.dtype == torch.float64
    torch.testing.assert_close(mean, q.mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(var, q.variance, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in METHODS if MODELS[n].supports_uncertainty()])
def test_uncertainty_report_of_a_float64_model(name):
    """``gpvae uncertainty``'s report (uncertainty and the IWAE - ELBO gap) on float32
    images with a float64 model."""
    from gpvae.uncertainty import uncertainty_report

    rows, summary, u = uncertainty_report(_model(name), _images(3), device="cpu",
                                          gap_samples=2, seed=0, progress=False,
                                          amortization_gap=torch.arange(3.0), bootstrap=10)
    assert len(rows) == 3 and summary["n"] == 3 and "gap" in summary
    assert u["total"].dtype == torch.float64 and torch.isfinite(u["total"]).all()


@pytest.mark.parametrize("name", [n for n in METHODS if MODELS[n].packable()])
def test_packing_probe_of_float64_models(name):
    """Packing's probe (one vmapped step of two replicas on float32 batches) ends for
    float64 models as it ends for float32 ones: passes, or refuses the method."""
    from gpvae.packing import Pack, ReplicaStreams

    x = torch.stack([_images(2, 5).batch(slice(0, 2)), _images(2, 6).batch(slice(0, 2))])

    def probe(dtype):
        models = [_model(name, dtype).train(), _model(name, dtype).train()]
        try:
            Pack(models, 1e-3, 100, ReplicaStreams([0, 1])).probe(x)
        except UnsupportedError as exc:
            return str(exc).replace("Double", "Float").replace("double", "float")
        return "ok"

    assert probe(torch.float64) == probe(torch.float32)
