"""The IWAE estimator against brute force and a model whose log p(x) is known exactly.

Linear-Gaussian model: z ~ N(0, I_d), x = A z + c + sigma eps, so
p(x) = N(c, A A^T + sigma^2 I) and p(z|x) is Gaussian in closed form.
"""
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

from gpvae.evaluation import estimate, log_weights
from gpvae.likelihoods import GaussianLikelihood

D, d, SIGMA = 6, 3, 0.5


class LinearGaussian(nn.Module):
    """Implements the inference interface; q is the exact posterior scaled by ``inflate``."""

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

    def exact_log_px(self, x):
        cov = self.A @ self.A.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
        return MultivariateNormal(self.c, cov).log_prob(x.reshape(-1, D))


class Data:
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return self.x.shape[0]

    def batch(self, idx, device=None):
        return self.x[idx]


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


def test_iwae_at_least_elbo_and_non_decreasing_in_k():
    model = LinearGaussian(inflate=3.0, shift=0.5)
    x = sample_data(model, n=300)
    means = []
    for k in (1, 5, 50, 500):
        est = estimate(model, Data(x), samples=k, seed=k, progress=False)
        assert (est.iwae >= est.elbo - 1e-12).all()  # logmeanexp >= mean, per image
        means.append(est.iwae.mean().item())
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert means[-1] <= model.exact_log_px(x).mean().item() + 0.01


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
