"""IAF(k): the VAE with an inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen,
Sutskever, Welling, "Improving Variational Inference with Inverse Autoregressive Flow",
NIPS 2016, arXiv:1606.04934; the GPVAE paper's baseline "IAF", Sec. 5).

The encoder (the VAE's trunk and head) gives mu(x), sigma(x) and, from the same trunk
features, a context vector c(x) = Linear(trunk(x)) of size ``iaf_context`` (Kingma et al.'s
"h", an extra encoder output; no nonlinearity).  Then

    z_0 = mu + sigma * eps,                       eps ~ N(0, I)
    [m_t, s_t] = MADE_t(z_{t-1}, c(x)),           t = 1..k
    sigma_t = sigmoid(s_t + 2)
    z_t = sigma_t * z_{t-1} + (1 - sigma_t) * m_t
    log q(z_k|x) = log N(z_0; mu, Diag(sigma^2)) - sum_t sum_i log sigma_t,i

(Kingma et al.'s Algorithm 1: their numerically stable, LSTM-like gated update).  Each MADE_t
is autoregressive in its own variable order: output i of step t depends on the inputs that
come before i in that order, so dz_t/dz_{t-1} is triangular with diagonal sigma_t and the
log-det is the sum of log sigma_t.  The orders alternate: identity for t = 1, 3, ...,
reversed for t = 2, 4, ... -- Kingma et al.'s "reverse the ordering of the variables after
each step", written as a reversed MADE order instead of a permutation of z (the same family
of maps up to renaming the coordinates of z_k; a permutation has log-det 0).

The context feeds every hidden unit of every MADE (only the z inputs are masked).  The
public VLAE reference code (yookoon/VLAE), the likely source of the GPVAE paper's IAF
numbers, masks the context out entirely (docs: shared/design/baselines.md); tests/test_iaf.py
checks that perturbing c(x) moves every hidden pre-activation of every step.

Library.  The MADE and the gated step are Pyro's (pyro-ppl >= 1.9)
``ConditionalAutoRegressiveNN(d, iaf_context, [iaf_hidden], permutation=order)`` (one ReLU
hidden layer; Pyro gives context inputs degree 0, so every hidden unit sees all of them) and
``ConditionalAffineAutoregressive(..., stable=True)`` (Pyro's ``sigmoid_bias`` = 2 is the
"+2" above: at initialisation sigma_t ~ sigmoid(2) = 0.88, the flow starts close to the
identity, as Kingma et al. recommend -- a forget-gate bias of 1 or 2).  Why Pyro over zuko,
nflows and normflows: README, "Dependencies and why".

How q is represented.  :class:`IAFPosterior` is a ``TransformedDistribution`` of
N(mu, Diag(sigma^2)) by the k MADE steps conditioned on c(x).

* ``rsample`` / ``sample``: one MADE pass per step, computed from the MADE layers' masked
  weights directly (once per q: the masked weights, and the context's part of every step's
  first layer as one product), not through Pyro's transform objects -- the same values to
  rounding, at a fraction of the Python overhead; without autograd the products run on
  oneDNN where it applies (:func:`gpvae.onednn.linear_kernel`).  q keeps the last
  drawn tensor and its log density, so ``log_prob`` of the tensor just drawn (what
  :func:`gpvae.evaluation.log_weights` and the training ELBO do) costs no further MADE pass.
* ``log_prob`` of any other z inverts the flow through Pyro's transforms (conditioned on
  c(x) when first needed): the inverse of an autoregressive step is
  sequential, d MADE passes per step (k d in all), so it is exact but slow; it is never
  needed for training or IWAE.  The cache is keyed by tensor identity, so a z that merely
  equals a drawn one (e.g. a copy) takes the inverse and gets the same value.  Far outside
  q's typical set the inverse of a flow with nearly closed gates (sigma_t ~ 0) can overflow
  (z_0 = inf), and ``log_prob`` is then NaN rather than a very negative number (Pyro's
  inverse; left as is: such points have density ~0, and training and IWAE never score them).
* ``mean``: there is no closed-form mean.  ``mean`` returns the flow applied to mu,
  f_k(...f_1(mu)), the latent that reconstructions in the figures decode (:mod:`gpvae.plots`
  decodes ``q.mean``): the image of the base Gaussian's mode, **not** E_q[z_k].  It never
  disturbs the cache of a drawn sample.
  ``stddev`` / ``variance`` are not defined (``NotImplementedError``).

Training: the base class's single-sample ELBO; KL(q || N(0, I)) has no closed form and is
the one-sample estimate log q(z_k|x) - log p(z_k) at the drawn z_k (cached log-det).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.distributions import Independent, Normal, TransformedDistribution
from torch.distributions.utils import lazy_property
from torch.nn import functional as F

from ..errors import ConfigError
from ..networks import GaussianEncoder
from ..precision import autocast_enabled, upcast
from .base import LatentVariableModel, ModelConfig, check_config_type
from ..onednn import linear_kernel


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class IAFConfig(ModelConfig):
    """Options of IAF(k) beyond the generative model's."""

    # The GPVAE paper picks the number of flows from {1, 2, 4, 8} (Sec. 5, Tab. 5).
    iaf_flows: int = field(default=1, metadata={
        "help": "number k of IAF steps (MADEs) of IAF(k) (the paper's number of flows, from "
                "{1, 2, 4, 8})"})
    # Neither paper gives the widths for this encoder.  One hidden layer of 256 = the MNIST
    # trunk's width (>= d for every latent size the paper uses), and a 64-dim context: a
    # bottleneck of the trunk's 256/512 features that keeps each MADE's cost
    # ((64 + d) * 256 + 256 * 2d multiply-adds per image) small next to the encoder's.
    iaf_hidden: int = field(default=256, metadata={
        "help": "hidden units of each IAF step's MADE (one hidden layer; at least "
                "--latent-dim)"})
    iaf_context: int = field(default=64, metadata={
        "help": "size of the IAF context c(x) = Linear(encoder features), fed to every "
                "hidden unit of every MADE"})

    #: the field a size in the paper's notation sets (``iaf:2`` -> iaf_flows = 2)
    size_option: ClassVar[str | None] = "iaf_flows"

    def validate(self) -> None:
        super().validate()
        if not _positive_int(self.iaf_flows):
            raise ConfigError(f"--iaf-flows must be a positive integer, got {self.iaf_flows!r}")
        if not _positive_int(self.iaf_context):
            raise ConfigError(
                f"--iaf-context must be a positive integer, got {self.iaf_context!r}")
        if not _positive_int(self.iaf_hidden) or self.iaf_hidden < self.latent_dim:
            raise ConfigError(f"--iaf-hidden must be an integer >= --latent-dim "
                              f"({self.latent_dim}), got {self.iaf_hidden!r}")


def _float32_outputs(module, args, output):
    """Forward hook of each MADE: its outputs (m_t, s_t) in float32 under bfloat16 autocast
    (:mod:`gpvae.precision`), so the gates sigma_t and log-determinants are float32."""
    return tuple(upcast(t) for t in output) if isinstance(output, (tuple, list)) else upcast(output)


def flow_order(d: int, t: int) -> torch.Tensor:
    """The variable order of step t (0-based): identity for even t, reversed for odd t."""
    order = torch.arange(d)
    return order if t % 2 == 0 else order.flip(0)


class IAFPosterior(TransformedDistribution):
    """q(z_k|x) of IAF(k): N(mu, Diag(sigma^2)) pushed through the k gated MADE steps
    conditioned on the context.

    Args:
        loc, scale: mu and sigma, (..., d).
        context: c(x), (..., c).
        flows: the k ``ConditionalAffineAutoregressive`` modules (unconditioned).
    """

    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, context: torch.Tensor,
                 flows: Sequence[ConditionalAffineAutoregressive], validate_args=None,
                 weights: MadeWeights | None = None):
        self.loc, self.scale, self.context = loc, scale, context
        self.flows = tuple(flows)
        self._weights = weights  # the flows' masked weights (made_weights), if precomputed
        base = Independent(Normal(loc, scale, validate_args=validate_args), 1,
                           validate_args=validate_args)
        # the conditioned Pyro transforms are built when first used (:attr:`transforms`);
        # the steps are shape-preserving, so the shapes are the base's either way
        self._transforms = None
        self._lazy = False
        super().__init__(base, [], validate_args=validate_args)
        self._lazy = True
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None  # (z_k, log q(z_k|x))
        self._steps: tuple[bool, list] | None = None

    @property
    def transforms(self) -> list:
        """The k steps as Pyro transforms conditioned on the context (``AffineAutoregressive``,
        stable form), built on first use: the inverse in :meth:`log_prob` of a point that
        was not just drawn runs through them."""
        if self._transforms is None:
            if not self._lazy:  # inside TransformedDistribution.__init__
                return []
            self._transforms = [f.condition(self.context) for f in self.flows]
        return self._transforms

    @transforms.setter
    def transforms(self, value: list) -> None:  # TransformedDistribution.__init__: []
        self._transforms = list(value) or None

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        d, c = self.event_shape[0], self.context.shape[-1]
        return IAFPosterior(self.loc.expand(batch_shape + (d,)),
                            self.scale.expand(batch_shape + (d,)),
                            self.context.expand(batch_shape + (c,)), self.flows,
                            validate_args=self._validate_args)

    # --- the forward flow, fused -----------------------------------------------------------
    def _made_steps(self, linear) -> list:
        """Per step: (the z-part of the first MADE layer's masked weight (H, d), the context
        part of its pre-activation for these contexts, c W_c^T + b_1 (..., H), the second
        layer's masked weight (2d, H), its bias with the gate's bias folded into the s half).
        Computed once per q; the k context parts as one product."""
        if self._steps is None or self._steps[0] != torch.is_grad_enabled():
            weights = self._weights
            if weights is None or torch.is_grad_enabled():
                weights = made_weights(self.flows)
            parts = linear(self.context, weights.context_weight, weights.context_bias)
            steps = [(w_z, part, w_out, b_out) for (w_z, w_out, b_out), part
                     in zip(weights.steps, parts.split(weights.hidden, dim=-1))]
            self._steps = (torch.is_grad_enabled(), steps)  # with a graph, or without
        return self._steps[1]

    def _flow(self, z: torch.Tensor, log_det: bool = True):
        """(z_k, sum_t sum_i log sigma_t,i) for z_0 = ``z`` (..., d): the k gated steps of the
        module docstring, from the MADEs' masked weights directly (not through Pyro's
        transform objects; tests/test_iaf.py checks them against those), with the gate as
        ``lerp(m, z, sigma) = m + sigma (z - m)``.  Plain differentiable operations
        (training); without autograd the products run on oneDNN where it applies
        (:func:`gpvae.onednn.linear_kernel`)."""
        first = self.flows[0].nn.layers
        linear = linear_kernel(z, self.context, first[0].weight, first[1].weight)
        low = autocast_enabled(z.device.type)
        logits = []
        for w_z, part, w_out, b_out in self._made_steps(linear):
            hidden = torch.add(linear(z, w_z), part).relu_()
            out = linear(hidden, w_out, b_out)
            if low:
                out = upcast(out)  # FP32 gates and log-determinants under bf16 autocast
            m, s = out.chunk(2, dim=-1)  # s: the gate's logit, its bias included
            z = torch.lerp(m, z, torch.sigmoid(s))
            logits.append(s)
        if not log_det:
            return z, None
        return z, F.logsigmoid(torch.stack(logits)).sum((0, -1))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """z_k = f_k(...f_1(z_0)), z_0 = mu + sigma eps: one MADE pass per step; its log
        density is kept for :meth:`log_prob` of this very tensor."""
        z0 = self.base_dist.rsample(sample_shape)
        return self._push(z0)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            z0 = self.base_dist.sample(sample_shape)
            return self._push(z0)

    def _push(self, z0: torch.Tensor) -> torch.Tensor:
        z, log_det = self._flow(z0)
        self._drawn = (z, self.base_dist.log_prob(z0) - log_det)
        return z

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(z_k|x): from the kept log-dets for the tensor just drawn (no MADE pass),
        else by Pyro's exact inverse (d MADE passes per step)."""
        if self._drawn is not None and value is self._drawn[0]:
            return self._drawn[1]
        return super().log_prob(value)

    @lazy_property
    def mean(self) -> torch.Tensor:
        """The flow applied to mu (NOT E_q[z_k], which has no closed form): the latent that
        reconstructions decode.  The sample cache is kept."""
        return self._flow(self.loc, log_det=False)[0]


@dataclass
class MadeWeights:
    """The k MADEs' masked weights as :class:`IAFPosterior`'s fused steps use them
    (:func:`made_weights`)."""

    context_weight: torch.Tensor  # (k H, c): every step's first-layer context columns
    context_bias: torch.Tensor  # (k H,): every step's first-layer bias
    hidden: list  # [H] * k
    steps: list  # per step: (W_z (H, d) contiguous, W_out (2d, H), b_out with the gate bias)


def made_weights(flows: Sequence[ConditionalAffineAutoregressive]) -> MadeWeights:
    """The masked weights of the k MADEs (weight * mask, Pyro's input order [c(x), z]),
    split for the fused steps; differentiable (training)."""
    firsts = [flow.nn.layers[0] for flow in flows]
    c = firsts[0].in_features - flows[0].nn.input_dim
    masked = [layer.weight * layer.mask for layer in firsts]  # (H, c + d)
    steps = []
    for flow, w in zip(flows, masked):
        last = flow.nn.layers[1]
        d = last.out_features // 2
        bias = torch.cat([last.bias[:d], last.bias[d:] + _sigmoid_bias(flow)])
        steps.append((w[:, c:].contiguous(), last.weight * last.mask, bias))
    return MadeWeights(torch.cat([w[:, :c] for w in masked]),
                       torch.cat([layer.bias for layer in firsts]),
                       [w.shape[0] for w in masked], steps)


def _sigmoid_bias(flow: ConditionalAffineAutoregressive) -> float:
    """The "+2" of sigma_t = sigmoid(s_t + 2): Pyro's ``sigmoid_bias`` of a stable step."""
    if not flow.kwargs.get("stable", False):
        raise ValueError("IAF steps must be Pyro's stable (gated) affine autoregressive form")
    return float(flow.kwargs.get("sigmoid_bias", 2.0))


class IAF(LatentVariableModel):
    """IAF(k): the Tab. 6-8 encoder (trunk + head: mu, sigma), a context layer on the
    trunk's features and k Pyro MADE steps; q(z|x) is an :class:`IAFPosterior`.

    Parameters are created encoder first, as in the VAE, so with the same seed an IAF and a
    VAE start from the same encoder and decoder weights.
    """

    config_class = IAFConfig
    #: q(z|x) is computed without autograd (no per-instance optimisation)
    posterior_needs_grad: ClassVar[bool] = False

    def __init__(self, config: IAFConfig, image_shape):
        check_config_type(config, IAFConfig)
        super().__init__(config, image_shape)
        d = config.latent_dim
        self.encoder = GaussianEncoder(self.arch, d)
        self.context = nn.Linear(self.arch.hidden, config.iaf_context)
        flows = []
        for t in range(config.iaf_flows):
            with warnings.catch_warnings():  # d = 1: Pyro suggests an affine map instead
                warnings.filterwarnings("ignore", message=".*input_dim = 1")
                made = ConditionalAutoRegressiveNN(
                    d, config.iaf_context, [config.iaf_hidden], permutation=flow_order(d, t),
                    nonlinearity=nn.ReLU())
            made.register_forward_hook(_float32_outputs)  # bf16 autocast: FP32 gates, log-dets
            flows.append(ConditionalAffineAutoregressive(made, stable=True))
        self.flows = nn.ModuleList(flows)

    @property
    def num_flows(self) -> int:
        return len(self.flows)

    def variational_family(self) -> str:
        return "inverse autoregressive flow of a diagonal Gaussian"

    def posterior(self, x: torch.Tensor) -> IAFPosterior:
        features = self.encoder.trunk(x)
        mean, std = self.encoder.split_head(self.encoder.head(features))
        return IAFPosterior(mean, std, self.context(features), self.flows, validate_args=False,
                            weights=self.made_weights())

    def made_weights(self) -> MadeWeights | None:
        """The MADEs' masked weights for :class:`IAFPosterior` without autograd (evaluation),
        formed once per q(z|x) for all k steps.  Not cached across calls: a cache keyed on
        the parameters' version counters goes stale under the fused Adam, which does not
        bump them (issue 7).  None with autograd on (training: each q forms them in its
        graph)."""
        if torch.is_grad_enabled():
            return None
        return made_weights(self.flows)

    def compute_posterior(self, x: torch.Tensor) -> IAFPosterior:
        """q(z|x) and what a user of a flow needs from it: one z ~ q(z|x) (k MADE passes)
        and its log density (from the cached log-dets: no further pass)."""
        q = self.posterior(x)
        q.log_prob(q.rsample())
        return q

    def extra_posterior_flops(self, batch_size: int = 1) -> int:
        """FLOPs of :meth:`compute_posterior` that the Linear-layer count does not see, for
        ``batch_size`` images:

        * the MADEs: the steps multiply by the masked weights directly (not through the
          ``MaskedLinear`` modules, which the layer count would see and charge as dense);
          a masked weight is a known zero, so the floor counts only the weights each mask
          keeps, 2 FLOPs per kept weight per image and step (the products ``weight *
          mask``, once per q, not per image, are not counted);
        * z_0 = mu + sigma eps: 2d; each step's gate sigma z + (1 - sigma) m: 4d, its
          log-det sum: d; log N(z_0; mu, sigma^2): 6d (difference, division, square, log
          sigma, sums).

        Elementwise nonlinearities (softplus, sigmoid, ReLU) and biases are not counted, as
        for the VAE.
        """
        d, k = self.latent_dim, self.num_flows
        kept = sum(int((layer.mask != 0).sum()) for flow in self.flows
                   for layer in flow.nn.layers)
        per_image = 2 * d + 5 * d * k + 6 * d + 2 * kept
        return batch_size * per_image


__all__ = ["IAF", "IAFConfig", "IAFPosterior", "flow_order"]
