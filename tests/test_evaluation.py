"""The IWAE estimator against brute force and a model whose log p(x) is known exactly.

Linear-Gaussian model: z ~ N(0, I_d), x = A z + c + sigma eps, so
p(x) = N(c, A A^T + sigma^2 I) and p(z|x) is Gaussian in closed form.
"""
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from gpvae.evaluation import estimate, log_weights
from gpvae.likelihoods import GaussianLikelihood
from helpers import Data

D, d, SIGMA = 6, 3, 0.5


class LinearGaussian(nn.Module):
    """Implements the inference interface; q is the exact posterior scaled by ``inflate``."""

    posterior_needs_grad = False

    def __init__(self, inflate=1.0, shift=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.A = torch.randn(D, d, generator=g, dtype=torch.float64)
        self.c = torch.randn(D, generator=g, dtype=torch.float64)
        self.likelihood = GaussianLikelihood(SIGMA).double()
        self.latent_dim, self.inflate, self.shift = d, inflate, shift
        prec = torch.eye(d, dtype=torch.float64) + self.A.T @ self.A / SIGMA**2
        self.post_cov = torch.linalg.inv(prec)

    def posterior(self, x):
        x = x.reshape(x.shape[0], D)
        mean = (x - self.c) @ self.A @ self.post_cov.T / SIGMA**2 + self.shift
        return MultivariateNormal(mean, self.post_cov * self.inflate)

    def log_likelihood(self, x, z):
        out = (z @ self.A.T + self.c).reshape(*z.shape[:-1], 1, 1, D)
        return self.likelihood.log_prob(x, out)

    def log_prior(self, z):
        return Independent(Normal(torch.zeros_like(z), torch.ones_like(z)), 1).log_prob(z)

    def exact_posterior(self, x):
        x = x.reshape(x.shape[0], D)
        return MultivariateNormal((x - self.c) @ self.A @ self.post_cov.T / SIGMA**2,
                                  self.post_cov)

    def exact_log_px(self, x):
        cov = self.A @ self.A.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
        return MultivariateNormal(self.c, cov).log_prob(x.reshape(-1, D))


def sample_data(model, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = z @ model.A.T + model.c + SIGMA * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x.reshape(n, 1, 1, D)


def test_exact_posterior_gives_exact_log_px_with_one_sample():
    model = LinearGaussian()
    x = sample_data(model)
    est = estimate(model, Data(x), samples=1, progress=False)
    torch.testing.assert_close(est.iwae, model.exact_log_px(x), rtol=0, atol=1e-6)  # sigma_x is stored in float32
    torch.testing.assert_close(est.elbo, model.exact_log_px(x), rtol=0, atol=1e-6)  # sigma_x is stored in float32


def test_iwae_converges_to_exact_log_px_within_monte_carlo_error():
    model = LinearGaussian(inflate=2.0, shift=0.3)  # a deliberately imperfect q
    x = sample_data(model, n=100)
    exact = model.exact_log_px(x)
    est = estimate(model, Data(x), samples=5000, batch_size=50, seed=1, progress=False)
    gap = est.iwae - exact
    # Per-image MC error of IWAE_K: the bias is O(1/K) and the sd is O(1/sqrt(K)); use the
    # spread of a second independent estimate as the yardstick.
    est2 = estimate(model, Data(x), samples=5000, batch_size=50, seed=2, progress=False)
    sd = (est.iwae - est2.iwae).std() / math.sqrt(2)
    assert gap.abs().max() < 6 * sd + 1e-3
    assert abs(gap.mean()) < 4 * sd / math.sqrt(len(x)) + 2e-3
    # and the ELBO is clearly below: the gap is the KL(q || p(z|x)) > 0
    assert (est.elbo < exact - 0.05).all()


def test_elbo_matches_closed_form_and_iwae_gap_shrinks_in_k():
    """With q = N(m + shift, inflate Cov) and the exact posterior N(m, Cov):

    * ELBO(x) = log p(x) - KL(q || p(z|x)) in closed form; the K-sample estimate is a mean
      of K log-weights, so it matches that within 5 standard errors and its variance
      across images falls as 1/K;
    * log p(x) - E[IWAE_K] falls strictly from KL (K = 1) towards 0, and at K = 500 is
      near the delta-method value Var_q(w/p(x)) / (2K) = (exp D_2(p(z|x) || q) - 1) / (2K)
      (D_2: the order-2 Renyi divergence, closed form for Gaussians) -- never below 0.
    """
    inflate, shift = 3.0, 0.5
    model = LinearGaussian(inflate=inflate, shift=shift)
    x = sample_data(model, n=300)
    exact = model.exact_log_px(x)
    kl = kl_divergence(model.posterior(x), model.exact_posterior(x))
    # D_2(N(m, C) || N(m + delta, 3C)) = delta^T (5C)^-1 delta + d/2 log(9/5)
    delta = torch.full((d,), shift, dtype=torch.float64)
    sigma_2 = (2 * inflate - 1) * model.post_cov
    renyi_2 = delta @ torch.linalg.solve(sigma_2, delta) - 0.5 * (
        torch.logdet(sigma_2) + torch.logdet(model.post_cov) - 2 * torch.logdet(
            inflate * model.post_cov))
    n, gaps, ses, elbo_var = len(x), [], [], {}
    for k in (1, 5, 50, 500):
        est = estimate(model, Data(x), samples=k, seed=k, progress=False)
        err = est.elbo - (exact - kl)
        assert abs(err.mean()) <= 5 * err.std() / math.sqrt(n), (k, err.mean())
        elbo_var[k] = err.var().item()
        gap = exact - est.iwae
        gaps.append(gap.mean().item()), ses.append(gap.std().item() / math.sqrt(n))
    assert abs(gaps[0] - kl[0].item()) <= 5 * ses[0]  # IWAE_1 is a one-sample ELBO
    for k in (5, 50, 500):
        assert 0.5 < elbo_var[1] / (k * elbo_var[k]) < 2, elbo_var
    for (g0, s0), (g1, s1) in zip(zip(gaps, ses), zip(gaps[1:], ses[1:])):
        assert g0 - g1 > 3 * math.hypot(s0, s1), gaps
    delta_method = math.expm1(renyi_2.item()) / (2 * 500)  # ~0.11 nats
    assert -5 * ses[-1] < gaps[-1] < 2 * delta_method, (gaps, delta_method)


def test_chunking_does_not_change_the_result():
    # with the exact posterior every log-weight equals log p(x), whatever the chunking
    model = LinearGaussian()
    x = sample_data(model, n=10)
    for max_batch_samples in (10_000, 70, 1):
        est = estimate(model, Data(x), samples=64, batch_size=4,
                       max_batch_samples=max_batch_samples, progress=False)
        torch.testing.assert_close(est.iwae, model.exact_log_px(x), rtol=0, atol=1e-6)
    torch.manual_seed(0)
    assert log_weights(model, x, 13, max_batch_samples=20).shape == (13, 10)


def test_the_default_chunk_is_small_on_a_cpu_and_large_on_cuda(monkeypatch):
    """Unless told, estimate decodes 512 z's per call on a CPU (unchanged) and, on CUDA,
    10,000 for a 28 x 28 image, proportionally fewer for larger images (never below 512)."""
    from gpvae import evaluation

    d = evaluation.default_max_batch_samples
    assert d("cpu", (1, 28, 28)) == d("cpu", (3, 64, 64)) == 512
    assert d("cuda", (1, 28, 28)) == 10_000
    assert d("cuda", (3, 32, 32)) == 10_000 * 784 // 3072 == 2552
    assert d("cuda", (3, 64, 64)) == 638 and d(torch.device("cuda:1"), (3, 256, 256)) == 512
    seen = []
    real = evaluation.log_weights
    monkeypatch.setattr(evaluation, "log_weights",
                        lambda m, x, k, chunk: seen.append(chunk) or real(m, x, k, chunk))
    model = LinearGaussian()
    estimate(model, Data(sample_data(model, n=4)), samples=3, progress=False)
    assert seen == [512]
    with pytest.raises(Exception, match="--max-batch-samples must be >= 1"):
        estimate(model, Data(sample_data(model, n=4)), samples=3, progress=False,
                 max_batch_samples=0)


def test_summary_has_the_documented_keys():
    model = LinearGaussian()
    s = estimate(model, Data(sample_data(model, n=20)), samples=3, progress=False).summary()
    for key in ("test_iwae", "test_elbo", "iwae_samples", "n", "test_iwae_se", "test_elbo_se"):
        assert key in s
    assert s["n"] == 20 and s["iwae_samples"] == 3


def test_bad_sample_count_is_rejected():
    from gpvae.errors import ConfigError

    model = LinearGaussian()
    with pytest.raises(ConfigError):
        estimate(model, Data(sample_data(model, n=2)), samples=0, progress=False)


@pytest.mark.parametrize("name,likelihood", [("vae", "gaussian"), ("gpvae", "bernoulli")])
def test_double_model_scores_like_the_float32_model(name, likelihood):
    """estimate() casts each float32 (uint8-stored) batch to the model's dtype: a model
    converted with .double() gives the float32 model's estimates, to float32 rounding.

    The same seed gives the same z's in both dtypes only because torch's CPU normal sampler
    draws identical numbers (to rounding) for tensors under 16 elements: d = 2, one image
    per batch and 7 samples per chunk keep every draw at 14 elements."""
    import copy

    from gpvae.data import ImageData
    from gpvae.models import build_model

    torch.manual_seed(0)
    a = torch.randn(14)
    torch.manual_seed(0)
    assert torch.allclose(a.double(), torch.randn(14, dtype=torch.float64)), \
        "precondition: torch's small-tensor normal draws no longer agree across dtypes"
    model = build_model(name, (1, 28, 28), latent_dim=2, likelihood=likelihood)
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (5, 1, 28, 28), generator=g, dtype=torch.uint8))
    kw = dict(samples=20, batch_size=1, max_batch_samples=7, seed=3, progress=False)
    e32 = estimate(model, data, **kw)
    e64 = estimate(copy.deepcopy(model).double(), data, **kw)
    # a different seed moves the estimates by ~1% (0.5 - 50 nats): 1e-6 is far below that
    torch.testing.assert_close(e64.iwae, e32.iwae, rtol=1e-6, atol=0)
    torch.testing.assert_close(e64.elbo, e32.elbo, rtol=1e-6, atol=0)


def test_a_binary_likelihood_scores_one_binarization_for_every_seed_batch_and_command():
    """A Bernoulli run's test (and validation) images are binarized once: evaluate with any
    --seed or --batch-size, gap and uncertainty all see the same binary images (the seed
    draws the z's only), so two seeds or two methods are scored on the same data."""
    from gpvae.data import ImageData
    from gpvae.models import build_model
    from gpvae.uncertainty import instance_uncertainty

    model = build_model("gpvae", (1, 28, 28), latent_dim=2, likelihood="bernoulli")
    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (7, 1, 28, 28), generator=g, dtype=torch.uint8))
    seen = []
    prepare = model.likelihood.prepare

    def spy(x, generator=None):
        out = prepare(x, generator)
        seen.append(out)
        return out

    model.likelihood.prepare = spy

    def binarized(run):
        seen.clear()
        run()
        return torch.cat(seen)

    ref = binarized(lambda: estimate(model, data, samples=2, seed=0, progress=False))
    assert set(ref.unique().tolist()) == {0.0, 1.0} and ref.shape == (7, 1, 28, 28)
    for seed, batch in ((5, 100), (0, 3), (9, 2)):
        again = binarized(lambda: estimate(model, data, samples=2, seed=seed, batch_size=batch,
                                           progress=False))
        assert torch.equal(again, ref), (seed, batch)
    # the encoder's uncertainty is read on those same binary images
    inputs = []
    uncertainty = model.uncertainty

    def record(x, *args, **kwargs):
        inputs.append(x.detach().clone())
        return uncertainty(x, *args, **kwargs)

    model.uncertainty = record
    instance_uncertainty(model, data, batch_size=4, progress=False)
    assert torch.equal(torch.cat(inputs), ref)


def test_json_output_is_strict_json_with_null_for_undefined_statistics(tmp_path, capsys):
    """One test image has no standard error: `evaluate --json` and a one-seed comparison's
    results.json write null, not NaN (which strict JSON parsers reject)."""
    import json

    from gpvae.checkpoint import json_text
    from gpvae.cli import main
    from gpvae.experiments import compare

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    assert strict(json_text({"a": [1.0, float("nan")], "b": {"c": float("-inf")}})) == {
        "a": [1.0, None], "b": {"c": None}}
    compare(["vae", "gpvae"], [0], out=tmp_path / "cmp", epochs=1, latent_dim=2,
            limit_train=60, limit_test=1, iwae_samples=2, device="cpu", progress=False,
            log=lambda m: None)
    res = strict((tmp_path / "cmp" / "results.json").read_text())
    assert res["models"]["vae"]["iwae_sd"] is None and res["runs"]["vae"]["0"]["n"] == 1
    assert main(["evaluate", str(tmp_path / "cmp" / "vae" / "seed0"), "--limit-test", "1",
                 "--iwae-samples", "2", "--json", "--no-progress"]) == 0
    out = strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["test_iwae_se"] is None and math.isfinite(out["test_iwae"])
    # a rerun reuses the runs' eval.json (null included) and writes strict JSON again
    again = compare(["vae", "gpvae"], [0], out=tmp_path / "cmp", epochs=1, latent_dim=2,
                    limit_train=60, limit_test=1, iwae_samples=2, device="cpu",
                    progress=False, log=lambda m: None)
    assert again["runs"]["vae"][0]["test_iwae_se"] is None
    strict((tmp_path / "cmp" / "results.json").read_text())
