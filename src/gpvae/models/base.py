"""The one interface every inference method implements.

A model couples the generative model of paper eq. (1),

    p(z) = N(0, I),    p(x|z) = likelihood(x; g_theta(z)),

with an inference method that maps a batch x (B, C, H, W) to q(z|x): a
``torch.distributions.Distribution`` with ``batch_shape == (B,)`` and
``event_shape == (d,)``, supporting ``rsample(sample_shape)`` and ``log_prob(z)``.

Everything downstream -- the ELBO, the IWAE estimate, timing, plots -- is written once
against :meth:`LatentVariableModel.posterior`, :meth:`log_prior` and :meth:`log_likelihood`
(see :mod:`gpvae.evaluation`).  How each coming method fits:

* VAE, GPVAE (moment-matched eq. 13): a diagonal Gaussian, ``Independent(Normal)``.
* SA(k): ``posterior`` runs k SVI steps from the encoder's output (under
  ``torch.enable_grad``) and returns the refined Gaussian.
* IAF / Householder flows: a ``TransformedDistribution`` of the encoder's Gaussian.
* ME / RME: a ``MixtureSameFamily`` of Gaussians.
* VLAE: a ``MultivariateNormal`` with the Laplace (full) covariance.

Methods whose *training* objective is not the plain single-sample ELBO (e.g. the GPVAE's
eq. 15) override :meth:`training_objective`; evaluation never depends on it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from ..errors import ConfigError
from ..likelihoods import LIKELIHOODS, make_likelihood
from ..networks import DECODERS, architecture_for, make_decoder


@dataclass
class ModelConfig:
    """Options shared by every method (the generative model)."""

    latent_dim: int = 10
    likelihood: str = "gaussian"
    sigma_x: float = 0.1
    decoder: str = "conv"

    def validate(self) -> None:
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ConfigError(f"--latent-dim must be a positive integer, got {self.latent_dim}")
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(
                f"unknown likelihood {self.likelihood!r}; choose from {', '.join(LIKELIHOODS)}"
            )
        if not self.sigma_x > 0:
            raise ConfigError(f"--sigma-x must be positive, got {self.sigma_x}")
        if self.decoder not in DECODERS:
            raise ConfigError(f"unknown decoder {self.decoder!r}; choose from {', '.join(DECODERS)}")

    def to_dict(self) -> dict:
        return asdict(self)


class LatentVariableModel(nn.Module):
    """Base class: the generative model plus an abstract inference method."""

    config_class = ModelConfig

    def __init__(self, config: ModelConfig, image_shape: tuple[int, int, int]):
        super().__init__()
        config.validate()
        self.config = config
        self.image_shape = tuple(image_shape)
        self.arch = architecture_for(image_shape)
        self.latent_dim = config.latent_dim
        self.decoder = make_decoder(config.decoder, self.arch, config.latent_dim)
        self.likelihood = make_likelihood(config.likelihood, config.sigma_x)

    # --- the inference interface -------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for a batch x (B, C, H, W): batch_shape (B,), event_shape (d,)."""
        raise NotImplementedError

    # --- the generative model ----------------------------------------------------------
    def prior(self, like: torch.Tensor) -> Distribution:
        """p(z) = N(0, I) (eq. 1), on the device/dtype of ``like``."""
        zeros = like.new_zeros(self.latent_dim)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) summed over the last dimension."""
        return self.prior(z).log_prob(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """g_theta(z): (..., d) -> (..., C, H, W) (means, or logits for Bernoulli)."""
        return self.decoder(z)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z): x (B, C, H, W), z (..., B, d) -> (..., B)."""
        return self.likelihood.log_prob(x, self.decode(z))

    # --- training ----------------------------------------------------------------------
    def training_objective(self, x: torch.Tensor, n_train: int) -> tuple[torch.Tensor, dict]:
        """Per-example objective to *maximise* (B,), and a dict of scalar diagnostics.

        Default: the single-sample reparameterized ELBO of eq. (2), with the KL term in
        closed form when torch.distributions knows it, by Monte Carlo otherwise.
        ``n_train`` (the training-set size N) is unused here; the GPVAE needs it (eq. 15).
        """
        q = self.posterior(x)
        z = q.rsample()
        rec = self.log_likelihood(x, z)
        kl = kl_to_prior(q, self.prior(z), z)
        return rec - kl, {"rec": rec.mean().detach(), "kl": kl.mean().detach()}


def kl_to_prior(q: Distribution, p: Distribution, z: torch.Tensor) -> torch.Tensor:
    """KL(q || p): closed form if registered with torch.distributions, else 1-sample MC at z."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return q.log_prob(z) - p.log_prob(z)


def check_config_type(config, cls) -> None:
    if not isinstance(config, cls):
        raise ConfigError(f"expected a {cls.__name__}, got {type(config).__name__}")
