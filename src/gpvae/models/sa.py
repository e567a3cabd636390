"""SA(k): the semi-amortized VAE (Kim, Wiseman, Miller, Sontag & Rush, ICML 2018).

The encoder gives the starting point lambda_0 = (mu_0, log sigma_0^2) = enc(x) (the VAE's
encoder, :class:`~gpvae.networks.GaussianEncoder`), and k steps of stochastic variational
inference (SVI) refine it on each instance's *own* ELBO (Kim et al., Algorithm 1)

    f(lambda; x) = E_{q_lambda}[log p(x|z)] - KL(q_lambda(z) || N(0, I)),

estimated with one reparameterized sample z = mu + sigma * eps and the KL in closed form,
1/2 sum_j (sigma_j^2 + mu_j^2 - 1 - log sigma_j^2).  Each step is gradient *ascent* with
momentum gamma (Algorithm 1's ascent step with the momentum and clipping of Kim et al.'s
code, harvardnlp/sa-vae ``optim_n2n.py``), the gradient clipped per instance to norm at
most c:

    g_t = clip_c(grad_lambda f(lambda_{t-1}; x)),   clip_c(g) = g * min(1, c / ||g||),
    v_t = gamma v_{t-1} + g_t   (v_0 = 0),
    lambda_t = lambda_{t-1} + alpha v_t,

and q(z|x) = N(mu_k, Diag(sigma_k^2)) is used for the ELBO and the IWAE.  Training
back-propagates through the k unrolled steps (Kim et al.'s end-to-end training: the
encoder learns a good *starting point*; the original uses finite-difference
Hessian-vector products, here autograd with ``create_graph=True``, which is exact), and the
decoder gets the gradient through the steps as well.  The same k steps run at test time,
which is why SA is slow in the GPVAE paper's Tab. 5.

Conventions (each checked by tests/test_sa.py):

* **Per instance.**  f is each image's own ELBO, summed over its pixels -- not a batch mean
  -- and the gradient of image b is taken w.r.t. image b's lambda only.  An instance's
  refined lambda does not depend on the batch it is in or on the batch size.  (The code the
  GPVAE paper's baselines most likely came from, yookoon/VLAE, differentiates a batch *mean*,
  which divides every step by the batch size, and *descends* the ELBO; see
  shared/design/baselines.md.  Neither is copied.)
* **Clipping** is by the Euclidean norm (not the squared norm), per instance and separately
  for the mu- and the log sigma^2-block (as ``optim_n2n.py`` clips the two inputs
  separately); ``--sa-clip 0`` turns it off.  It is applied to the raw gradient, before the
  momentum.
* **Noise.**  ``--sa-noise fresh`` (default; the SA-VAE code): a new eps for every step, so
  each step is an unbiased stochastic gradient of the true ELBO.  ``--sa-noise shared``: one
  eps for all k steps (common random numbers): the steps then ascend one fixed one-sample
  Monte Carlo ELBO, lower-variance but biased towards that sample.
* **k = 0** is the VAE, bit for bit: the same parameters (created in the same order, so the
  same seed gives the same initialization and the state dicts are interchangeable) and the
  same q(z|x).

Defaults and why: k = 1 (the GPVAE paper's smallest SA; ``sa:2`` etc. in ``--models``
lists set it), gamma = 0.5 and c = 5 (SA-VAE's defaults).  The step size alpha has no
portable default: SA-VAE's alpha = 1 was for a *batch-mean* Bernoulli loss, and the GPVAE
paper's 1e-3 most likely for a batch mean too (i.e. 1e-3 / 128 per instance).  Per instance
the ELBO's curvature in mu is about I + J^T J / sigma_x^2 (J the decoder's Jacobian), large
at sigma_x = 0.1, and a clipped step moves each block by at most alpha * c / (1 - gamma).
The default alpha = 0.03 comes from a sweep of alpha = 1e-3 ... 1 (c = 5 and c = 0) that
refined the test posteriors of an MNIST VAE trained at sigma_x = 0.1: with c = 5 it raised
the ELBO most at k = 4 and 8 and second most at k = 1 and 2 (alpha = 1 diverged).  Without
clipping, alpha = 1e-3 did as well, but alpha = 3e-3 already diverged on some images: too
close to the edge for a decoder that sharpens in training or a learned, smaller sigma_x, so
clipping stays on.  A Bernoulli likelihood has far smaller curvature (weights s (1 - s) <=
1/4 instead of 1 / sigma_x^2 = 100) and wants a larger ``--sa-lr``.

Test time may need autograd (``posterior_needs_grad``): :meth:`SA.posterior` switches
gradients on itself (and leaves ``torch.inference_mode`` if a caller is in it), and unless
the model is training with gradients enabled it takes each step's gradient without a graph
and detaches, so memory stays that of one decoder forward/backward whatever k is, and the
returned q(z|x) carries no graph into IWAE sampling.  Each step's gradient is
:meth:`SA.elbo_gradient`: the KL's and the reparameterization's derivatives in closed
form, and g = d log p(x|z) / dz from one decoder forward pass and one backward pass to z
(:func:`decoder_log_likelihood_grad`: for the paper's decoders at test time the backward
pass is written out, layer by layer, without autograd; else autograd w.r.t. z only, which
forms no weight gradient).  Training differentiates through the same formulas
(``create_graph``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Independent
from torch.nn import functional as F

from ..errors import ConfigError
from ..flops import forward_flops
from ..likelihoods import BernoulliLikelihood, GaussianLikelihood
from ..networks import LINEARS, ConvDecoder, FCDecoder, GaussianEncoder, recorded_outputs
from ..precision import autocast_enabled
from .base import LatentVariableModel, ModelConfig, check_config_type, diagonal_normal
from ..onednn import fast_linear

SA_NOISE = ("fresh", "shared")


@dataclass
class SAConfig(ModelConfig):
    """Options of SA(k) beyond the generative model's (prefix ``sa_``)."""

    size_option: ClassVar[str | None] = "sa_steps"

    sa_steps: int = field(default=1, metadata={
        "help": "k: SVI gradient-ascent steps on each image's own ELBO, starting from the "
                "encoder's output, in training and at test time (0 = the VAE; paper: 1, 2, 4, 8)"})
    sa_lr: float = field(default=0.03, metadata={
        "help": "alpha: SVI step size on the per-image ELBO (summed over pixels, not a batch "
                "mean; tuned for a Gaussian likelihood at sigma_x = 0.1). SA-VAE used 1 and "
                "the GPVAE paper 1e-3, both most likely for batch-mean losses"})
    sa_momentum: float = field(default=0.5, metadata={
        "help": "gamma: momentum of the SVI steps, v <- gamma v + grad, lambda <- lambda + "
                "alpha v (SA-VAE: 0.5)"})
    sa_clip: float = field(default=5.0, metadata={
        "help": "clip each image's ELBO gradient (mu and log sigma^2 blocks separately) to "
                "this Euclidean norm before the momentum; 0 = no clipping (SA-VAE: 5)"})
    sa_noise: str = field(default="fresh", metadata={
        "help": "reparameterization noise of the SVI steps: fresh (a new sample each step, as "
                "SA-VAE) or shared (one sample for all k steps)",
        "choices": SA_NOISE})

    def validate(self) -> None:
        super().validate()
        k = self.sa_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"--sa-steps must be a non-negative integer, got {k!r}")
        if not _finite_number(self.sa_lr) or not self.sa_lr > 0:
            raise ConfigError(f"--sa-lr must be a positive number, got {self.sa_lr!r}")
        if not _finite_number(self.sa_momentum) or not 0 <= self.sa_momentum < 1:
            raise ConfigError(f"--sa-momentum must be in [0, 1), got {self.sa_momentum!r}")
        if not _finite_number(self.sa_clip) or not self.sa_clip >= 0:
            raise ConfigError(f"--sa-clip must be a non-negative number (0 = no clipping), "
                              f"got {self.sa_clip!r}")
        if self.sa_noise not in SA_NOISE:
            raise ConfigError(f"unknown --sa-noise {self.sa_noise!r}; choose from "
                              f"{', '.join(SA_NOISE)}")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class SA(LatentVariableModel):
    """SA(k): the VAE's encoder gives lambda_0, k per-instance SVI ascent steps refine it."""

    config_class = SAConfig
    posterior_needs_grad: ClassVar[bool] = True

    @classmethod
    def packable(cls) -> bool:
        """No: the SVI steps switch ``requires_grad`` on fresh leaves inside the training
        step, which ``torch.func.vmap`` cannot batch (packing's probe refuses it too)."""
        return False

    def __init__(self, config: SAConfig, image_shape):
        check_config_type(config, SAConfig)
        super().__init__(config, image_shape)
        # exactly the VAE's modules, created in the same order (k = 0 is the VAE bit for bit)
        self.encoder = GaussianEncoder(self.arch, config.latent_dim)

    # --- q(z|x) ------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> Independent:
        """q(z|x) = N(mu_k, Diag(sigma_k^2)) after k SVI steps from the encoder's output.

        The result carries the autograd graph (through the unrolled steps back to the
        encoder and decoder) only when the model is training and gradients are enabled;
        otherwise it is detached and each step's graph is freed as soon as it is used.
        """
        if self.config.sa_steps == 0:
            mean, std = self.encoder(x)
            return diagonal_normal(mean, std)
        keep_graph = self.training and torch.is_grad_enabled()
        with torch.inference_mode(False), torch.enable_grad():
            if x.is_inference():
                x = x.clone()  # a normal tensor, so autograd may record ops on it
            with torch.set_grad_enabled(keep_graph):
                mean, std = self.encoder(x)
                logvar = 2 * torch.log(std)
            mu, logvar = self.refine(x, mean, logvar, create_graph=keep_graph)
        return diagonal_normal(mu, torch.exp(0.5 * logvar))

    def instance_elbo(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                      eps: torch.Tensor) -> torch.Tensor:
        """f(lambda; x) per image (B,): log p(x | mu + sigma eps) - KL(N(mu, sigma^2) || N(0, I)),
        with the Gaussian KL in closed form."""
        z = mu + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (torch.exp(logvar) + mu.square() - 1 - logvar).sum(-1)
        return self.log_likelihood(x, z) - kl

    def refine(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
               noise: torch.Tensor | None = None,
               create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """k SVI ascent steps from lambda_0 = (mu, logvar), each (B, d) -> (mu_k, logvar_k).

        ``noise`` (k, B, d): the steps' standard-normal eps (drawn here when None: a fresh
        draw per step, or one draw for all steps with ``sa_noise="shared"``).
        ``create_graph``: keep the graph through the steps (training: the result is then a
        differentiable function of mu, logvar and the decoder); else every step is detached.
        """
        k = self.config.sa_steps
        if noise is not None and noise.shape != (k, *mu.shape):
            raise ValueError(f"noise must have shape {(k, *mu.shape)}, got {tuple(noise.shape)}")
        # training: the steps' graph is kept (autograd through every step); test time: none
        grad_mode = torch.enable_grad() if create_graph else torch.no_grad()
        with grad_mode:
            mu, logvar = self._steps(x, mu, logvar, noise, create_graph)
        if not create_graph:
            mu, logvar = mu.detach(), logvar.detach()
        return mu, logvar

    def _steps(self, x, mu, logvar, noise, create_graph):
        """The k steps of :meth:`refine` (its docstring), in the caller's grad mode."""
        cfg = self.config
        k, alpha, gamma, clip = cfg.sa_steps, cfg.sa_lr, cfg.sa_momentum, cfg.sa_clip
        eps = None
        v_mu = v_lv = None
        for t in range(k):
            if noise is not None:
                eps = noise[t]
            elif eps is None or cfg.sa_noise == "fresh":
                eps = torch.randn_like(mu)
            g_mu, g_lv = self.elbo_gradient(x, mu, logvar, eps, create_graph)
            if clip > 0:
                g_mu, g_lv = _clip_rows(g_mu, clip), _clip_rows(g_lv, clip)
            v_mu = g_mu if t == 0 else gamma * v_mu + g_mu
            v_lv = g_lv if t == 0 else gamma * v_lv + g_lv
            mu, logvar = mu + alpha * v_mu, logvar + alpha * v_lv
        return mu, logvar

    def elbo_gradient(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                      eps: torch.Tensor, create_graph: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """grad_lambda f(lambda; x) at the sample z = mu + sigma eps: (df/dmu, df/dlogvar),
        each (B, d); differentiable (through mu, logvar, the decoder and a learned sigma_x)
        with ``create_graph``, else computed without a graph (test time).

        Only g = d log p(x|z) / dz needs the decoder (:func:`decoder_log_likelihood_grad`);
        the rest is in closed form, with sigma = exp(logvar / 2):

            df/dmu = g - mu,    df/dlogvar = g * sigma * eps / 2 - (sigma^2 - 1) / 2

        (the chain rule through z, and the derivatives of the closed-form KL).  The same
        values as autograd through :meth:`instance_elbo`, to rounding (tests/test_sa.py).
        Instances are independent, so each row is that instance's own gradient."""
        sigma = torch.exp(0.5 * logvar)
        z = torch.addcmul(mu, sigma, eps)
        g = decoder_log_likelihood_grad(self, x, z, create_graph)
        g_mu = g - mu
        g_lv = 0.5 * (g * sigma * eps - torch.exp(logvar) + 1)
        return g_mu, g_lv

    # --- cost ----------------------------------------------------------------------------
    def extra_posterior_flops(self, batch_size: int) -> int:
        """FLOPs of q(z|x) beyond plain forward passes of nn.Linear/Conv modules.

        A test-time SA(k) posterior runs the encoder once and the decoder k times forward
        (plain module forwards, counted by the caller), and k decoder *backward* passes to
        the decoder's input z only (no weight gradients are formed at test time: autograd
        computes only what d f / d lambda needs).  The backward of a Linear or (transposed)
        convolution w.r.t. its input costs exactly its forward's multiply-adds, so this is
        k x the decoder's forward FLOPs at this batch size.  A multiply-add counts 2 FLOPs;
        elementwise work (activations, likelihood, KL, clipping, momentum: O(B (D + d)) per
        step) is not counted, as :func:`gpvae.flops.forward_flops` counts none.
        """
        if self.config.sa_steps == 0:
            return 0
        p = next(self.decoder.parameters())
        z = torch.zeros(batch_size, self.latent_dim, device=p.device, dtype=p.dtype)
        return self.config.sa_steps * forward_flops(self.decoder, z)


def log_likelihood_grad(likelihood, x: torch.Tensor, out: torch.Tensor,
                        create_graph: bool = False) -> torch.Tensor:
    """d log p(x|f) / df at the decoder output f = ``out`` (same shape).

    Gaussian (fixed or learned sigma_x): (x - f) / sigma_x^2; Bernoulli with logits f:
    x - sigmoid(f) (the derivatives of :mod:`gpvae.likelihoods`' log-densities, recorded by
    autograd when gradients are enabled); any other likelihood: autograd through its
    ``log_prob`` (a function of ``out``'s graph with ``create_graph``)."""
    if type(likelihood) is GaussianLikelihood:  # exactly: a subclass may change log_prob
        return (x - out) * torch.exp(-2 * likelihood.log_sigma)
    if type(likelihood) is BernoulliLikelihood:
        return x - torch.sigmoid(out)
    with torch.enable_grad():
        if not create_graph:
            out = out.detach().requires_grad_()
        (g,) = torch.autograd.grad(likelihood.log_prob(x, out).sum(), out,
                                   create_graph=create_graph)
    return g


def relu_chain(decoder: nn.Module) -> list[nn.Module] | None:
    """The layers of a Tab. 6-8 (:class:`~gpvae.networks.ConvDecoder`) or Sec. 11
    (:class:`~gpvae.networks.FCDecoder`) decoder in the order its forward runs them --
    weight layers (``nn.Linear`` or :class:`~gpvae.networks.FastLinear`, ``nn.ConvTranspose2d``
    with one group and zero padding)
    alternating with ReLUs (``nn.ReLU`` or a subclass, e.g. an in-place one) -- when it is
    exactly one of those classes built of those layers; else None
    (:func:`decoder_log_likelihood_grad` then uses autograd)."""
    if type(decoder) is FCDecoder:
        layers = list(decoder.net)
    elif type(decoder) is ConvDecoder:
        layers = list(decoder.fc) + list(decoder.deconv)
    else:
        return None
    weights, relus = layers[0::2], layers[1::2]
    if len(layers) % 2 == 0 or not all(isinstance(m, nn.ReLU) for m in relus):
        return None
    for m in weights:
        if type(m) in LINEARS:
            continue
        if not (isinstance(m, nn.ConvTranspose2d) and m.groups == 1
                and m.padding_mode == "zeros"):
            return None
    return layers


def decoder_log_likelihood_grad(model, x: torch.Tensor, z: torch.Tensor,
                                create_graph: bool = False) -> torch.Tensor:
    """g = d log p(x|z) / dz (B, d), each instance's own: one decoder forward pass and one
    backward pass to z (no weight gradients), as J^T (d log p / df).

    ``create_graph`` (training): autograd with ``create_graph=True``, so g is a
    differentiable function of z, the decoder and the likelihood.  Otherwise no graph is
    kept, and for the paper's decoders (:func:`relu_chain`; not under autocast) the backward
    pass is written out: the adjoint of a Linear layer is the product with its weight, of a
    transposed convolution the ordinary convolution with the same weight, stride, padding
    and dilation (what autograd's backward computes, without its bookkeeping), of a ReLU its
    mask (``threshold_backward`` on the ReLU's output, as autograd).  The forward pass is the
    decoder's own (``model.decode``; hooks keep the ReLU outputs).  Other decoders: autograd,
    d/dz only.  Each way gives the same values to rounding (tests/test_sa.py)."""
    layers = None
    if not create_graph and not autocast_enabled(z.device.type):
        layers = relu_chain(model.decoder)
    if layers is None:
        return decoder_log_likelihood_grad_autograd(model, x, z, create_graph)
    with recorded_outputs(layers[1::2]) as acts, torch.no_grad():  # each ReLU's outputs
        out = model.decode(z)
    # a decoder may run its layers on blocks of the z's (cache blocking): the backward
    # pass then goes block by block too, over the same rows
    sizes = [a.shape[0] for a in acts[0]]
    if not sizes or any([a.shape[0] for a in block] != sizes for block in acts) \
            or sum(sizes) != out.shape[0]:
        return decoder_log_likelihood_grad_autograd(model, x, z)
    with torch.no_grad():
        g_out = log_likelihood_grad(model.likelihood, x, out)
        grads = [_relu_chain_vjp(layers, [block[b] for block in acts], g)
                 for b, g in enumerate(g_out.split(sizes))]
        g = grads[0] if len(grads) == 1 else torch.cat(grads)
    return g.reshape(z.shape)


def decoder_log_likelihood_grad_autograd(model, x: torch.Tensor, z: torch.Tensor,
                                         create_graph: bool = False) -> torch.Tensor:
    """:func:`decoder_log_likelihood_grad` by autograd (any decoder)."""
    with torch.enable_grad():
        if not (create_graph and z.requires_grad):
            z = z.detach().requires_grad_()
        out = model.decode(z)
        g_out = log_likelihood_grad(model.likelihood, x,
                                    out if create_graph else out.detach(), create_graph)
        (g,) = torch.autograd.grad(out, z, g_out, create_graph=create_graph)
    return g


def _relu_chain_vjp(layers: list[nn.Module], acts: list[torch.Tensor],
                    g: torch.Tensor) -> torch.Tensor:
    """J^T g for a :func:`relu_chain` decoder (no graph): ``acts`` are its ReLUs' outputs
    in order, ``g`` the gradient at its output; returns the gradient at its input (N, d)."""
    for i in range(len(layers) - 1, -1, -2):  # the weight layers, last to first
        layer = layers[i]
        if isinstance(layer, nn.Linear):  # g W = F.linear(g, W^T), on oneDNN where it applies
            g = fast_linear(g.reshape(-1, layer.out_features), layer.weight.mT)
        else:
            g = F.conv2d(g, layer.weight, None, layer.stride, layer.padding, layer.dilation)
        if i > 0:  # the ReLU before this layer
            act = acts[i // 2 - 1]
            g = torch.ops.aten.threshold_backward(g.reshape(act.shape), act, 0)
    return g


def _clip_rows(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each row g_b scaled to Euclidean norm at most ``max_norm`` (unchanged, bit for bit,
    when already within it): g_b * max_norm / max(||g_b||, max_norm)."""
    norm = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
    return g * (max_norm / torch.clamp(norm, min=max_norm))
