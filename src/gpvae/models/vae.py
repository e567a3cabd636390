"""The VAE (Kingma & Welling, 2014): the amortized diagonal-Gaussian encoder, eq. (3)
with deterministic f = b(x), h = c(x), i.e. q(z|x) = N(b(x), Diag(c(x))^2)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.distributions import Independent

from ..networks import GaussianEncoder
from .base import LatentVariableModel, ModelConfig, diagonal_normal


@dataclass
class VAEConfig(ModelConfig):
    """The VAE has no options beyond the generative model's."""


class VAE(LatentVariableModel):
    config_class = VAEConfig
    #: measured on an H100: compiled, q(z|x) and the training step run several times
    #: faster (docs/benchmarks.md, "On a GPU"), so ``--compile auto`` compiles it on CUDA
    compile_auto_on_cuda = True

    def __init__(self, config: VAEConfig, image_shape):
        super().__init__(config, image_shape)
        self.encoder = GaussianEncoder(self.arch, config.latent_dim)

    def posterior(self, x: torch.Tensor) -> Independent:
        mean, std = self.encoder(x)
        return diagonal_normal(mean, std)

    def fused_encoder(self) -> torch.nn.Module:
        """x -> (mean, variance) of q(z|x), for :mod:`gpvae.export` (a copy of the encoder)."""
        return _MeanVariance(copy.deepcopy(self.encoder))


class _MeanVariance(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        mean, std = self.encoder(x)
        return mean, std.square()
