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

* ``rsample`` / ``sample``: one MADE pass per step.  Each step caches its last (input,
  output) pair and its log sigma_t (Pyro's cache), so ``log_prob`` of the tensor just drawn
  (what :func:`gpvae.evaluation.log_weights` and the training ELBO do) costs no further MADE
  pass.
* ``log_prob`` of any other z inverts the flow: the inverse of an autoregressive step is
  sequential, d MADE passes per step (k d in all), so it is exact but slow; it is never
  needed for training or IWAE.  The cache is keyed by tensor identity, so a z that merely
  equals a drawn one (e.g. a copy) takes the inverse and gets the same value.  Far outside
  q's typical set the inverse of a flow with nearly closed gates (sigma_t ~ 0) can overflow
  (z_0 = inf), and ``log_prob`` is then NaN rather than a very negative number (Pyro's
  inverse; left as is: such points have density ~0, and training and IWAE never score them).
* ``mean``: there is no closed-form mean.  ``mean`` returns the flow applied to mu,
  f_k(...f_1(mu)), the latent that reconstructions in the figures decode (:mod:`gpvae.plots`
  decodes ``q.mean``): the image of the base Gaussian's mode, **not** E_q[z_k].  It runs on
  freshly conditioned steps, so it never disturbs the cache of a drawn sample.
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

from ..errors import ConfigError
from ..networks import GaussianEncoder
from .base import LatentVariableModel, ModelConfig, check_config_type


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
                 flows: Sequence[ConditionalAffineAutoregressive], validate_args=None):
        self.loc, self.scale, self.context = loc, scale, context
        self.flows = tuple(flows)
        base = Independent(Normal(loc, scale, validate_args=validate_args), 1,
                           validate_args=validate_args)
        super().__init__(base, [f.condition(context) for f in self.flows],
                         validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        d, c = self.event_shape[0], self.context.shape[-1]
        return IAFPosterior(self.loc.expand(batch_shape + (d,)),
                            self.scale.expand(batch_shape + (d,)),
                            self.context.expand(batch_shape + (c,)), self.flows,
                            validate_args=self._validate_args)

    @lazy_property
    def mean(self) -> torch.Tensor:
        """The flow applied to mu (NOT E_q[z_k], which has no closed form): the latent that
        reconstructions decode.  Freshly conditioned steps, so the sample cache is kept."""
        z = self.loc
        for flow in self.flows:
            z = flow.condition(self.context)(z)
        return z


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
        return IAFPosterior(mean, std, self.context(features), self.flows)

    def compute_posterior(self, x: torch.Tensor) -> IAFPosterior:
        """q(z|x) and what a user of a flow needs from it: one z ~ q(z|x) (k MADE passes)
        and its log density (from the cached log-dets: no further pass)."""
        q = self.posterior(x)
        q.log_prob(q.rsample())
        return q

    def extra_posterior_flops(self, batch_size: int = 1) -> int:
        """FLOPs of :meth:`compute_posterior` that the Linear-layer count does not see, or
        counts but need not be done, for ``batch_size`` images:

        * the MADE layers are ``nn.Linear`` subclasses (Pyro's ``MaskedLinear``) and the
          layer count charges them as dense; a masked weight is a known zero, so the floor
          counts only the weights each mask keeps: minus 2 FLOPs per masked-out weight per
          image and step (the product ``weight * mask``, once per call, not per image, is
          not counted);
        * z_0 = mu + sigma eps: 2d; each step's gate sigma z + (1 - sigma) m: 4d, its
          log-det sum: d; log N(z_0; mu, sigma^2): 6d (difference, division, square, log
          sigma, sums).

        Elementwise nonlinearities (softplus, sigmoid, ReLU) are not counted, as for the VAE.
        """
        d, k = self.latent_dim, self.num_flows
        masked_out = sum(int((layer.mask == 0).sum()) for flow in self.flows
                         for layer in flow.nn.layers)
        per_image = 2 * d + 5 * d * k + 6 * d - 2 * masked_out
        return batch_size * per_image


__all__ = ["IAF", "IAFConfig", "IAFPosterior", "flow_order"]
