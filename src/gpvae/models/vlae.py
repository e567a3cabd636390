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
For the fully connected ReLU decoder of Sec. 11 (Tab. 10-11) J is formed instead by explicit
products, J = W_3 D_2 W_2 D_1 W_1 with the ReLU masks D_l of the primal pass
(:func:`mlp_jacobian`): the same J to rounding, without jacfwd's machinery, and at test time
on oneDNN's matrix product where it applies (:func:`gpvae.onednn.linear_kernel`).

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
from ..networks import (LINEARS, Architecture, ConvDecoder, EncoderTrunk, FCDecoder,
                        recorded_outputs)
from ..onednn import fast_linear
from ..precision import fp32_function, upcast
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
            mu, precision = self.laplace(x, upcast(self.encoder(x)))  # FP32 under bf16
            scale_tril = scale_tril_from_precision(precision)
        return MultivariateNormal(mu, scale_tril=scale_tril, validate_args=False)

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
        """(J, f(mu)): each instance's decoder Jacobian (B, D, d) and output (B, D) at mu.

        A fully connected ReLU decoder (:class:`~gpvae.networks.FCDecoder`) gets its
        Jacobian by explicit products (:func:`mlp_jacobian`), any other decoder by
        ``torch.func.jacfwd``; the two agree to rounding (tests/test_vlae.py).  J is
        returned as the transpose of a contiguous (B, d, D) tensor, the layout in which
        :meth:`gauss_newton`'s products J^T W J and J^T r are single batched products."""
        layers = mlp_layers(self.decoder)
        if layers is not None:
            return mlp_jacobian(self.decoder, layers, mu, self.decode)

        def shifted(u):
            out = self.decode(mu + u).flatten(1)
            return out, out

        with _contiguous_layout(self.decoder):
            jac, out = jacfwd(shifted, has_aux=True)(mu.new_zeros(mu.shape[-1]))
        return jac, out

    @fp32_function  # bf16 autocast: J^T W J and J^T r in float32 (gpvae.precision)
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
        # J^T r as a product and a sum over pixels: one pass over J, where a batched
        # matrix-vector product (jac_t @ r) runs far below the memory rate
        return precision, (jac_t * resid.unsqueeze(-2)).sum(-1)

    # --- cost ----------------------------------------------------------------------------
    def extra_posterior_flops(self, batch_size: int) -> int:
        """FLOPs of q(z|x) beyond plain forward passes of nn.Linear/Conv modules.

        Plain forwards (counted by the caller): the encoder once and the decoder k + 1
        times (the primal of each linearization).  Counted here, with B = ``batch_size``,
        D pixels, d latent dimensions, F the decoder's forward FLOPs per image, a
        multiply-add as 2 FLOPs:

        * each of the k + 1 linearizations: the d tangent passes, d (F - F_1) per image (a
          JVP through a Linear/Conv costs its forward's multiply-adds; F_1 is the decoder's
          first layer, a Linear on z for both of the paper's decoders: the tangents of the
          basis directions e_j after it are its weight's columns, no products), and
          J^T W J, 2 D d^2 (the full d x d product, as computed); Bernoulli: + D d for
          the row weighting W J;
        * each of the k updates: J^T r, 2 D d; the Cholesky factor of Lambda, d^3 / 3;
          ``cholesky_solve`` (two triangular solves), 2 d^2;
        * q's ``scale_tril``: a second Cholesky (reversed order), d^3 / 3, and a
          triangular inverse (a triangular solve with d right-hand sides), d^3.

        Elementwise O(B D) work (residuals, likelihood weights, ReLU masks) is not counted,
        as :func:`gpvae.flops.forward_flops` counts none.  Forward mode (``jacfwd``: the
        conv decoder) does more products than this: PyTorch's rules for nn.Linear and the
        convolutions also multiply the primal input by an all-zero weight tangent (one
        primal-size product per layer and linearization, F per image), and it multiplies
        the basis tangents by the first layer's weight (d F_1); neither is arithmetic the
        method needs, so neither is counted.  The fully connected decoder's explicit
        products (:func:`mlp_jacobian`) do exactly the counted ones.
        """
        k, d = self.config.vlae_steps, self.latent_dim
        D = math.prod(self.image_shape)
        p = next(self.decoder.parameters())
        z = torch.zeros(1, d, device=p.device, dtype=p.dtype)
        tangent_passes = d * (forward_flops(self.decoder, z) - _first_linear_flops(self.decoder))
        per_image = (k + 1) * (tangent_passes + 2 * D * d * d)
        if isinstance(self.likelihood, BernoulliLikelihood):
            per_image += (k + 1) * D * d
        per_image += k * (2 * D * d + d**3 // 3 + 2 * d * d)
        per_image += d**3 // 3 + d**3
        return batch_size * per_image


def _first_linear_flops(decoder: nn.Module) -> int:
    """Forward FLOPs for one z of the first layer of the paper's decoders (Tab. 6-8's FC
    layer on z, Sec. 11's first FC layer), a Linear on z; 0 for any other decoder."""
    if type(decoder) is FCDecoder:
        first = decoder.net[0]
    elif type(decoder) is ConvDecoder:
        first = decoder.fc[0]
    else:
        return 0
    return 2 * first.in_features * first.out_features if type(first) in LINEARS else 0


def mlp_layers(decoder: nn.Module) -> tuple[list[nn.Linear], list[nn.ReLU]] | None:
    """(Linear layers, ReLUs) of a fully connected ReLU decoder -- a
    :class:`~gpvae.networks.FCDecoder` (exactly that class) whose ``net`` alternates
    Linear layers (``nn.Linear`` or :class:`~gpvae.networks.FastLinear`: the same function)
    and ReLUs (``nn.ReLU`` or a subclass), starting and ending with a Linear --
    else None."""
    if type(decoder) is not FCDecoder:
        return None
    mods = list(decoder.net)
    linears, relus = mods[0::2], mods[1::2]
    if (len(mods) % 2 == 0 or any(type(m) not in LINEARS for m in linears)
            or not all(isinstance(m, nn.ReLU) for m in relus)):
        return None
    return linears, relus


def mlp_jacobian(decoder: nn.Module, layers: tuple[list[nn.Linear], list[nn.ReLU]],
                 mu: torch.Tensor, decode) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, f(mu)) of a fully connected ReLU decoder (:func:`mlp_layers`) by explicit products:
    J = W_L D_{L-1} W_{L-1} ... D_1 W_1, D_l = Diag(relu'(a_l)) at mu, for each instance.

    The primal is ``decode(mu)`` itself (the decoder's own forward; hooks on its ReLUs keep
    their outputs, whose positive entries are relu' = 1, as forward mode's rule for ReLU
    uses them).  The tangents of the d basis directions are carried as rows of a (B, d, H)
    tensor: after the first layer they are its weight's columns (no products), each further
    layer is one (B d, H) x (H, H') product and the ReLU's mask.  The same J as
    ``jacfwd`` to rounding, without its vmap machinery, without the product of every layer's
    input with its all-zero weight tangent, and with J^T (B, d, D) contiguous.  Plain
    differentiable operations: autograd (training) goes through them as through jacfwd."""
    linears, relus = layers
    with recorded_outputs(relus) as blocks:  # each ReLU's outputs, in order
        out = decode(mu).flatten(1)
    # a decoder that ran its layers on blocks of the z's: their rows, in order
    acts = [b[0] if len(b) == 1 else torch.cat(b) for b in blocks if b]
    if len(acts) != len(relus) or any(a.shape[0] != mu.shape[0] for a in acts):
        raise RuntimeError("the fully connected decoder did not run each ReLU on every z")
    tangents = linears[0].weight.mT.unsqueeze(0)  # (1, d, H_1): W_1's columns
    for i, layer in enumerate(linears):
        if i > 0:
            tangents = fast_linear(tangents, layer.weight)
        if i < len(acts):
            tangents = tangents * (acts[i] > 0).unsqueeze(-2)
    jac_t = upcast(tangents).expand(mu.shape[0], -1, -1)  # (B, d, D); expand: one layer
    return jac_t.mT, out


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
