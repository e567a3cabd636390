"""The capacity-matched VAE (CMVAE): the GPVAE's encoder networks without its GP treatment.

What it is
----------
The GPVAE (:mod:`gpvae.models.gpvae`) gives the VAE's encoder b(x), c(x) two more feature
networks psi^m, psi^s (p = ``arch.hidden`` features each) and puts a Gaussian q(W, U)
(eq. 11) on the weights that map them into the latent mean and standard deviation
(eq. 9).  The CMVAE keeps the networks and makes q(W, U) a point mass at (A, C),
q(W, U) = delta(W - A) delta(U - C), so that eq. (9) -- equivalently eq. (13) with
Sigma_j = Gamma_j = 0 -- becomes the deterministic encoder

    q(z|x) = N(b(x) + A psi^m(x), Diag(c(x) + C psi^s(x))^2),

with A, C (d, p) ordinary learned weights.  It is trained like the VAE: the single-sample
reparameterised ELBO of eq. (2) with the KL in closed form (the base class's objective);
with a point mass there is no averaged KL (16) and no global KL(q(W,U) || p(W,U)).

Why
---
The GPVAE has roughly three times the VAE's encoder.  Comparing the GPVAE with the VAE
alone cannot tell whether a gain comes from the extra networks feeding the mean and
standard deviation or from the GP treatment of their weights (the posterior variance
terms psi^T Sigma_j psi, the KL's E[log h_j^2] and the KL(q(W,U)) regulariser of eq. 15).
The CMVAE has exactly the extra networks and none of the GP treatment.

Parameters and initialization
-----------------------------
Attribute names follow the GPVAE's: ``encoder`` (b, c: the VAE's GaussianEncoder),
``psi_m``, ``psi_s`` (EncoderTrunk s) and A, C stored as ``mu`` and ``eta`` (they are the
point-mass locations, the GPVAE's means of W and U).  The CMVAE's state dict is therefore
the GPVAE's without the four factor parameters ``sigma_offdiag``, ``sigma_log_diag``,
``gamma_offdiag``, ``gamma_log_diag``, key for key and in the same order: a GPVAE's
weights load into it (``strict=False``), giving the encoder of its posterior-mean weights;
a VAE's load into its ``encoder`` and ``decoder``.  Its parameter count is the GPVAE's
minus those factors, which the GPVAE stores column-blocked (:mod:`gpvae.cholesky`,
block b): d (p (p + b) / 2 + p) numbers each for Sigma and Gamma, of which
d p (p + 1) / 2 each are free.  A = C = 0 at initialization, and the networks are built
in the GPVAE's order (decoder, encoder, psi^m, psi^s) from the same RNG stream, so a
CMVAE built after the same seed as a VAE starts as that VAE's q(z|x) bit for bit (and as
the same seed's GPVAE's networks).

The standard deviation and its floor
------------------------------------
The standard deviation is |a| with a = c + C psi^s, eq. (13)'s sqrt(v) with
Sigma = Gamma = 0.  c >= the encoder's floor (1e-4), but a = c + C psi^s can reach zero,
where the Gaussian is degenerate (log q and the KL infinite; torch.distributions refuses
a zero scale).  The CMVAE therefore uses the smooth floor (:func:`floored_abs`)

    std = |a| + F exp(-|a| / F),    F = :data:`STD_FLOOR` = 1e-6,

which is >= F everywhere, has a continuous gradient (0 at a = 0, so the KL's -log std
keeps pushing away from the floor instead of being cut off as by a clamp), and equals
|a| to the last bit wherever |a| >= 40 F: the added term is below half a unit in the
last place there, in float64 and float32.  In particular it is |a| whenever C psi^s is
small next to c >= 1e-4 = 100 F, so the initial q(z|x) is the VAE's exactly.  F is the
scale of the standard deviations the GPVAE's initial 1e-6 |psi|^2 variance term adds.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Independent

from ..networks import EncoderTrunk, GaussianEncoder
from ..precision import fp32_function
from .base import LatentVariableModel, ModelConfig, check_config_type, diagonal_normal

#: ``torch.addmm`` in float32 under bf16 autocast, as the GPVAE's eq. (13) (gpvae.precision)
_fp32_addmm = fp32_function(torch.addmm)
#: F of the smooth standard-deviation floor |a| + F exp(-|a| / F) (module docstring)
STD_FLOOR = 1e-6


def floored_abs(a: torch.Tensor, floor: float = STD_FLOOR) -> torch.Tensor:
    """|a| + floor exp(-|a| / floor): >= floor, smooth, and |a| exactly (in floating point)
    where |a| >= 40 floor (the CMVAE's standard deviation; module docstring)."""
    r = a.abs()
    return r + floor * torch.exp(-r / floor)


@dataclass
class CMVAEConfig(ModelConfig):
    """The CMVAE has no options beyond the generative model's."""


class CMVAE(LatentVariableModel):
    """q(z|x) = N(b + A psi^m, Diag(c + C psi^s)^2): the GPVAE's eq. (9) with q(W, U) a
    point mass at (A, C) = (``mu``, ``eta``); see the module docstring."""

    config_class = CMVAEConfig

    def __init__(self, config: CMVAEConfig, image_shape):
        check_config_type(config, CMVAEConfig)
        super().__init__(config, image_shape)
        d, p = config.latent_dim, self.arch.hidden
        self.feature_dim = p
        self.encoder = GaussianEncoder(self.arch, d)  # b(x), c(x): the VAE's encoder
        self.psi_m = EncoderTrunk(self.arch)          # psi^m(x)
        self.psi_s = EncoderTrunk(self.arch)          # psi^s(x)
        self.mu = nn.Parameter(torch.zeros(d, p))     # A
        self.eta = nn.Parameter(torch.zeros(d, p))    # C

    def mean_and_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b + A psi^m, c + C psi^s), each (B, d): the mean and the signed standard
        deviation a (before :func:`floored_abs`)."""
        b, c = self.encoder(x)
        m = _fp32_addmm(b, self.psi_m(x), self.mu.T)
        a = _fp32_addmm(c, self.psi_s(x), self.eta.T)
        return m, a

    def posterior(self, x: torch.Tensor) -> Independent:
        """q(z|x) = N(m, Diag(std^2)), std = :func:`floored_abs` (c + C psi^s)."""
        m, a = self.mean_and_scale(x)
        return diagonal_normal(m, floored_abs(a))

    def extra_posterior_flops(self, batch_size: int = 1) -> int:
        """The two products A psi^m, C psi^s (2 x 2dp per image); the networks are counted
        by :meth:`posterior_flops`'s layer count."""
        return batch_size * 2 * 2 * self.latent_dim * self.feature_dim

    def fused_encoder(self) -> nn.Module:
        """x -> (mean, variance) of q(z|x), each (B, d), for :mod:`gpvae.export`: copies of
        the networks and of A, C (independent of later training of this model)."""
        return _FusedCMVAEEncoder(self)


class _FusedCMVAEEncoder(nn.Module):
    def __init__(self, model: CMVAE):
        super().__init__()
        self.encoder = copy.deepcopy(model.encoder)
        self.psi_m = copy.deepcopy(model.psi_m)
        self.psi_s = copy.deepcopy(model.psi_s)
        # A, C as stored (d, p), used transposed as the model does: the same products
        self.register_buffer("mu", model.mu.detach().clone())
        self.register_buffer("eta", model.eta.detach().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = self.encoder(x)
        m = torch.addmm(b, self.psi_m(x), self.mu.T)
        a = torch.addmm(c, self.psi_s(x), self.eta.T)
        return m, floored_abs(a).square()
