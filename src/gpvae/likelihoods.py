"""Observation models p(x|z) for pixels in [0, 1].

* ``gaussian``: N(x; g(z), sigma_x^2 I) with a fixed sigma_x (paper eq. 1 and footnote 2).
  The paper fixes sigma_x but never states its value.  The default 0.1 is this project's
  choice, not the paper's: at 0.1 the log-likelihood of a D-pixel image is at most
  D (-ln 0.1 - ln(2 pi) / 2), 1084.8 nats for MNIST's 784 pixels, below the paper's MNIST
  figures at d = 50 (1185.7 for the VAE, 1212.9 for the GPVAE), which need sigma_x <= 0.088
  and <= 0.085.  Only methods run with the same sigma_x are comparable, with each other,
  not with the paper's tables (docs/results.md).
* ``gaussian-learned``: the same with a learned scalar sigma_x (initialised at ``sigma_x``),
  as in the code the paper's baselines most likely came from.
* ``bernoulli``: Bernoulli(x; sigmoid(g(z))) on binarized pixels; training images are
  dynamically binarized (a fresh Bernoulli draw per batch), validation and test images
  once, with a fixed seed (:data:`EVAL_BINARIZATION_SEED`), so every model, every seed of
  an evaluation and every command (evaluate, gap, uncertainty, a run's validation ELBO)
  scores the same binary images.

Each likelihood reduces over the pixel dimensions and broadcasts over any leading sample
dimensions: ``log_prob(x (B,C,H,W), out (K,B,C,H,W)) -> (K,B)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError

_LOG_2PI = math.log(2 * math.pi)


class Likelihood(nn.Module):
    binary = False

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The image E[x|z] for display."""
        return out.clamp(0, 1)

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Map [0,1] images to the likelihood's support (identity except for Bernoulli)."""
        return x


class GaussianLikelihood(Likelihood):
    def __init__(self, sigma_x: float = 0.1, learn: bool = False):
        super().__init__()
        if not sigma_x > 0:
            raise ConfigError(f"--sigma-x must be positive, got {sigma_x}")
        log_sigma = torch.tensor(math.log(sigma_x))
        if learn:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def log_prob(self, x, out):
        n = x[0].numel()
        sq = (out - x).square().flatten(-3).sum(-1)
        return -0.5 * sq * torch.exp(-2 * self.log_sigma) - n * (self.log_sigma + 0.5 * _LOG_2PI)


class BernoulliLikelihood(Likelihood):
    binary = True

    def log_prob(self, x, out):
        x = x.expand_as(out)
        return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(-3).sum(-1)

    def mean(self, out):
        return torch.sigmoid(out)

    def prepare(self, x, generator=None):
        return torch.bernoulli(x, generator=generator)


LIKELIHOODS = ("gaussian", "gaussian-learned", "bernoulli")

#: the seed of the one binarization of the images a binary likelihood is evaluated on (a
#: run's validation images, the test images): the seed of an evaluation draws its z's only
EVAL_BINARIZATION_SEED = 0


def eval_binarization() -> torch.Generator:
    """A fresh CPU generator at :data:`EVAL_BINARIZATION_SEED`: passed to ``prepare`` batch
    after batch (consecutive images of a data set, from the first), it binarizes every
    image the same way in every evaluation."""
    return torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)


def make_likelihood(name: str, sigma_x: float = 0.1) -> Likelihood:
    if name == "gaussian":
        return GaussianLikelihood(sigma_x)
    if name == "gaussian-learned":
        return GaussianLikelihood(sigma_x, learn=True)
    if name == "bernoulli":
        return BernoulliLikelihood()
    raise ConfigError(f"unknown likelihood {name!r}; choose from {', '.join(LIKELIHOODS)}")
