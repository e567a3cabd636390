"""VLAE(k): the variational Laplace autoencoder (Park, Kim & Kim, ICML 2019).

The encoder gives only a starting point mu_0 = enc(x).  For a Gaussian likelihood
p(x|z) = N(x; f(z), sigma_x^2 I), linearizing the decoder at mu_t,

    f(z) ~ J z + b,    J = df/dz (mu_t)  (D x d),    b = f(mu_t) - J mu_t,

makes the posterior Gaussian, with precision and mode (Park et al.'s mode-finding update
and Laplace posterior; written as in their code, yookoon/VLAE ``models.py``, whose
equation numbers in the paper were not checked here)

    Lambda = I + J^T J / sigma_x^2,    mu* = Lambda^{-1} J^T (x - b) / sigma_x^2,

and k damped updates mu_{t+1} = (1 - eta_t) mu_t + eta_t mu* (eta_t = eta_0 / (t + 1),
eta_0 = 0.5: Park et al.'s code, yookoon/VLAE) move mu towards the posterior mode.  Then
q(z|x) = N(mu_k, Lambda_k^{-1}), a full-covariance Gaussian, with Lambda_k the precision of
the linearization *at mu_k* (as in Park et al.'s code: VLAE(k) linearizes k + 1 times).
Gradients flow through every update into the encoder, the decoder and a learned sigma_x.

**Implementation.**  The same update written as a Gauss-Newton step on log p(x, z),

    mu* = mu_t + Lambda^{-1} (J^T grad_f log p(x|f)|_{f(mu_t)} - mu_t),
    Lambda = I + J^T W J,   W = -d^2 log p(x|f) / df^2,

equals the form above for a Gaussian (W = I / sigma_x^2, grad = (x - f) / sigma_x^2; expand
J^T (x - f(mu_t) + J mu_t) / sigma_x^2 = J^T (x - f) / sigma_x^2 + (Lambda - I) mu_t), and
extends it to the **Bernoulli likelihood** (logits f, s = sigmoid(f)): W = Diag(s (1 - s)),
grad = x - s.  J^T W J is then the Gauss-Newton (generalized) Hessian, which is the *exact*
Hessian of -log p(x|z) for a linear decoder and positive semi-definite always, so Lambda >= I
and the Cholesky factorization cannot fail.  (Park et al. treat Gaussians; this Bernoulli
form is ours, and q is a valid density either way, so the IWAE stays a bound.)

J is computed by forward mode, ``torch.func.jacfwd``: d Jacobian-vector products, batched
by jacfwd's vmap over the d latent directions.  The decoder acts on each instance
separately, so the Jacobian of u -> f(mu + 1 u^T) (one shared shift u in R^d, the batch a
plain batch dimension) is each instance's own J: one primal decoder pass at batch B plus d
tangent passes, with no vmap over the batch.  Forward mode does not need autograd, so at
test time this runs under ``torch.no_grad`` (or ``torch.inference_mode``) and keeps no graph.

Solves use the Cholesky factor L of Lambda (``torch.cholesky_solve``); q's ``scale_tril``
comes from the Cholesky factor of Lambda with the coordinate order reversed (as
``torch.distributions`` does for a precision matrix): if P Lambda P = L' L'^T (P the
reversal), Lambda = U U^T with U = P L' P upper triangular, and S = U^{-T} is lower
triangular with S S^T = Lambda^{-1}.  (The inverse-transpose of L itself, L^{-T}, also
squares to Lambda^{-1}, but is *upper* triangular, so it is not a valid ``scale_tril``.)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import MultivariateNormal
from torch.func import jacfwd

from ..errors import ConfigError
from ..flops import forward_flops
from ..likelihoods import BernoulliLikelihood, GaussianLikelihood
from ..networks import Architecture, EncoderTrunk
from .base import LatentVariableModel, ModelConfig, check_config_type

VLAE_SCHEDULES = ("harmonic", "constant")


@dataclass
class VLAEConfig(ModelConfig):
    """Options of VLAE(k) beyond the generative model's (prefix ``vlae_``)."""

    size_option: ClassVar[str | None] = "vlae_steps"

    vlae_steps: int = field(default=1, metadata={
        "help": "k: damped Laplace (linearized-decoder) updates of the posterior mean, in "
                "training and at test time (paper Tab. 10-11: 1, 2, 4, 8)"})
    vlae_eta: float = field(default=0.5, metadata={
        "help": "eta_0 of the damped update mu <- (1 - eta_t) mu + eta_t mu*; 1 with "
                "--vlae-schedule constant is the undamped (Gauss-)Newton iteration "
                "(Park et al.'s code: 0.5)"})
    vlae_schedule: str = field(default="harmonic", metadata={
        "help": "damping schedule: harmonic (eta_t = eta_0 / (t + 1), Park et al.) or "
                "constant (eta_t = eta_0)",
        "choices": VLAE_SCHEDULES})

    def validate(self) -> None:
        super().validate()
        k = self.vlae_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"--vlae-steps must be a positive integer, got {k!r}")
        eta = self.vlae_eta
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 < eta <= 1:
            raise ConfigError(f"--vlae-eta must be in (0, 1], got {eta!r}")
        if self.vlae_schedule not in VLAE_SCHEDULES:
            raise ConfigError(f"unknown --vlae-schedule {self.vlae_schedule!r}; choose from "
                              f"{', '.join(VLAE_SCHEDULES)}")


class MeanEncoder(nn.Module):
    """The Tab. 6/7/8 encoder with a d-output head: x -> mu_0 (B, d)."""

    def __init__(self, arch: Architecture, latent_dim: int):
        super().__init__()
        self.trunk = EncoderTrunk(arch)
        self.head = nn.Linear(arch.hidden, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class VLAE(LatentVariableModel):
    """VLAE(k): k damped Laplace updates from the encoder's mu_0; q = N(mu_k, Lambda_k^-1)."""

    config_class = VLAEConfig
    # The updates need only forward-mode AD (which also works without autograd), but the
    # posterior is an iterative computation: callers give it the same treatment as SA's.
    posterior_needs_grad: ClassVar[bool] = True

    def __init__(self, config: VLAEConfig, image_shape):
        check_config_type(config, VLAEConfig)
        super().__init__(config, image_shape)
        if not isinstance(self.likelihood, (GaussianLikelihood, BernoulliLikelihood)):
            raise ConfigError(f"vlae supports the gaussian, gaussian-learned and bernoulli "
                              f"likelihoods, not {config.likelihood!r}")
        self.encoder = MeanEncoder(self.arch, config.latent_dim)

    # --- q(z|x) ------------------------------------------------------------------------
    def variational_family(self) -> str:
        return "full-covariance Gaussian"

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """q(z|x) = N(mu_k, Lambda_k^{-1}) (batch_shape (B,), event_shape (d,)).

        Differentiable (through all k updates) when the model is training with gradients
        enabled; otherwise computed without any autograd graph."""
        keep_graph = self.training and torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(keep_graph):
            if x.is_inference():
                x = x.clone()
            mu, precision = self.laplace(x, self.encoder(x))
            scale_tril = scale_tril_from_precision(precision)
        return MultivariateNormal(mu, scale_tril=scale_tril)

    def eta(self, t: int) -> float:
        """Damping eta_t of update t = 0, 1, ..., k - 1."""
        eta0 = float(self.config.vlae_eta)
        return eta0 / (t + 1) if self.config.vlae_schedule == "harmonic" else eta0

    def laplace(self, x: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k damped updates from mu_0 = ``mu`` (B, d) -> (mu_k (B, d), Lambda_k (B, d, d))."""
        for t in range(self.config.vlae_steps):
            jac, out = self.linearize(mu)
            precision, grad = self.gauss_newton(x, out, jac)
            chol = torch.linalg.cholesky(precision)
            step = torch.cholesky_solve((grad - mu).unsqueeze(-1), chol).squeeze(-1)
            mu = mu + self.eta(t) * step  # = (1 - eta) mu + eta mu*, mu* = mu + step
        jac, out = self.linearize(mu)
        precision, _ = self.gauss_newton(x, out, jac, need_grad=False)
        return mu, precision

    def linearize(self, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(J, f(mu)): each instance's decoder Jacobian (B, D, d) and output (B, D) at mu."""

        def shifted(u):
            out = self.decode(mu + u).flatten(1)
            return out, out

        with _contiguous_layout(self.decoder):
            jac, out = jacfwd(shifted, has_aux=True)(mu.new_zeros(mu.shape[-1]))
        return jac, out

    def gauss_newton(self, x: torch.Tensor, out: torch.Tensor, jac: torch.Tensor,
                     need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Lambda = I + J^T W J (B, d, d) and J^T grad_f log p(x|f) (B, d) at f = ``out``."""
        x = x.flatten(1)
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        jac_t = jac.transpose(-1, -2)
        if isinstance(self.likelihood, GaussianLikelihood):
            inv_var = torch.exp(-2 * self.likelihood.log_sigma)  # 1 / sigma_x^2
            precision = eye + (jac_t @ jac) * inv_var
            resid = (x - out) * inv_var
        else:  # Bernoulli with logits: W = Diag(s (1 - s)), grad = x - s
            s = torch.sigmoid(out)
            precision = eye + (jac_t * (s * (1 - s)).unsqueeze(-2)) @ jac
            resid = x - s
        if not need_grad:
            return precision, None
        return precision, (jac_t @ resid.unsqueeze(-1)).squeeze(-1)

    # --- cost ----------------------------------------------------------------------------
    def extra_posterior_flops(self, batch_size: int) -> int:
        """FLOPs of q(z|x) beyond plain forward passes of nn.Linear/Conv modules.

        Plain forwards (counted by the caller): the encoder once and the decoder k + 1
        times (the primal of each linearization).  Counted here, with B = ``batch_size``,
        D pixels, d latent dimensions, F the decoder's forward FLOPs per image, a
        multiply-add as 2 FLOPs:

        * each of the k + 1 linearizations: the d tangent passes of forward mode, d F per
          image (a JVP through a Linear/Conv costs its forward's multiply-adds), and
          J^T W J, 2 D d^2 (the full d x d product, as computed); Bernoulli: + D d for
          the row weighting W J;
        * each of the k updates: J^T r, 2 D d; the Cholesky factor of Lambda, d^3 / 3;
          ``cholesky_solve`` (two triangular solves), 2 d^2;
        * q's ``scale_tril``: a second Cholesky (reversed order), d^3 / 3, and a
          triangular inverse (a triangular solve with d right-hand sides), d^3.

        Elementwise O(B D) work (residuals, likelihood weights) is not counted, as
        :func:`gpvae.flops.forward_flops` counts none.  PyTorch's forward-mode rules for
        nn.Linear and the convolutions also multiply the primal input by an all-zero
        weight tangent (one wasted primal-size product per layer and linearization, i.e.
        measured products exceed this by F per image and linearization); that is not
        arithmetic the method needs, so it is not counted.
        """
        k, d = self.config.vlae_steps, self.latent_dim
        D = math.prod(self.image_shape)
        p = next(self.decoder.parameters())
        z = torch.zeros(1, d, device=p.device, dtype=p.dtype)
        per_image = (k + 1) * (d * forward_flops(self.decoder, z) + 2 * D * d * d)
        if isinstance(self.likelihood, BernoulliLikelihood):
            per_image += (k + 1) * D * d
        per_image += k * (2 * D * d + d**3 // 3 + 2 * d * d)
        per_image += d**3 // 3 + d**3
        return batch_size * per_image


def scale_tril_from_precision(precision: torch.Tensor) -> torch.Tensor:
    """Lower-triangular S with S S^T = precision^{-1}, batched (..., d, d).

    Cholesky of the precision with the coordinate order reversed, Lambda = U U^T with U
    upper triangular, then S = U^{-T} by one triangular solve (no explicit inverse of
    Lambda, no Cholesky of an ill-conditioned covariance)."""
    flipped = torch.flip(precision, (-2, -1))
    lower = torch.linalg.cholesky(flipped)
    u_t = torch.flip(lower, (-2, -1)).transpose(-1, -2)  # U^T: lower triangular
    eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
    return torch.linalg.solve_triangular(u_t, eye.expand_as(u_t), upper=False)


@contextlib.contextmanager
def _contiguous_layout(module: nn.Module):
    """Run ``module`` with NCHW activations: vmap (inside jacfwd) cannot convert a batched
    tensor to channels-last.  Only the activation layout changes (``_ChannelsLast``: the
    values and the weights are the same); the flags are restored on exit."""
    switched = [m for m in module.modules() if getattr(m, "channels_last", False) is True]
    for m in switched:
        m.channels_last = False
    try:
        yield
    finally:
        for m in switched:
            m.channels_last = True
