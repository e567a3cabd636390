"""ME(M): the mixture encoder, a baseline of the GPVAE paper (Kim & Pavlovic 2021, Sec. 5):

    q(z|x) = sum_{m=1..M} alpha(m|x) q_m(z|x),    q_m(z|x) = N(mu_m(x), Diag(sigma_m(x)^2)),

"where q_m(z|x) are amortized inference models (e.g., having the same network architectures
as the VAE's encoder network), and alpha(m|x) are mixing proportions, dependent on the input
x, which can be modeled by a single neural network"; trained "to maximize the lower bound of
log p(x) similarly as the VAE".

Networks.  One Tab. 6-8 trunk h(x) (the encoder minus its last layer) is shared; on it sit M
Gaussian heads -- each q_m is exactly a VAE encoder's architecture, sharing all but its last
layer with the others -- and one softmax head, alpha(x) = softmax(Linear(h(x))).  Why shared:
(i) the inference cost stays about the VAE's (one trunk pass, M small heads), as for the
other single-trunk baselines (HF, IAF), so Tab. 5 compares inference schemes, not network
counts; (ii) ME(1) *is* the VAE: component 1's head is the VAE's ``encoder.head``, created in
the VAE's order, so with the same seed ME(1) and the VAE have identical parameters (same
names, same values) and ME(1)'s q(z|x), objective and IWAE equal the VAE's bit for bit (for
M = 1 there is no alpha head: a softmax over one logit has no parameters worth learning).
M separate trunks (the paper's wording also allows that reading) would cost M times the
VAE's encoder at test time.

Training: the stratified ELBO.  The mixture's z cannot be reparameterized through the
discrete choice of m, so instead of sampling m the bound is written per component,

    ELBO = E_q[log p(x, z) - log q(z|x)]
         = sum_m alpha_m(x) E_{q_m}[log p(x|z) + log p(z) - log q(z|x)],

and estimated with one reparameterized sample z_m ~ q_m per component, scored with the
*full mixture* log q(z_m|x) (with a component's own log q_m the sum is only
sum_m alpha_m ELBO(q_m), a looser bound that never rewards the components for covering
different regions).  Gradients reach alpha through the weights and through log q.  This
costs M decoder passes per image.  For M = 1 it is the VAE's objective exactly (the base
class's ELBO with the closed-form KL).

Evaluation (IWAE, :mod:`gpvae.evaluation`) uses ``q.sample``: m ~ Cat(alpha), z ~ q_m, and
weights p(x, z) / q(z|x) with the full mixture density (``MixtureSameFamily.log_prob``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from ..errors import ConfigError
from ..networks import GaussianEncoder
from ..precision import upcast
from .base import LatentVariableModel, ModelConfig, check_config_type, diagonal_normal


@dataclass
class MEConfig(ModelConfig):
    """Options of ME(M) beyond the generative model's."""

    # The paper's text picks M from {1, 2, 4, 8}; its tables show M = 2..5.  Default 2: the
    # smallest mixture that is not the VAE (each component adds a decoder pass to training).
    me_components: int = field(default=2, metadata={
        "help": "number M of Gaussian components of the mixture encoder ME(M) (1 is the VAE)"})

    #: the field a size in the paper's notation sets (``me:3`` -> me_components = 3)
    size_option: ClassVar[str | None] = "me_components"

    def validate(self) -> None:
        super().validate()
        if (not isinstance(self.me_components, int) or isinstance(self.me_components, bool)
                or self.me_components < 1):
            raise ConfigError(
                f"--me-components must be a positive integer, got {self.me_components!r}")


class GaussianMixture(MixtureSameFamily):
    """sum_m alpha_m N(loc_m, Diag(scale_m^2)): batch_shape (..., B), event_shape (d,).

    Args:
        logits: unnormalised log alpha, (..., M).
        loc, scale: (..., M, d).

    ``sample`` draws m ~ Cat(alpha) then z ~ q_m; ``log_prob`` is the full mixture density.
    There is no pathwise gradient through the discrete m, so ``has_rsample`` is False;
    ``rsample`` still draws (m ~ alpha, then z = mu_m + sigma_m eps), with gradients reaching
    the drawn component's mu_m, sigma_m but never alpha -- for callers that only need a
    sample they can differentiate (the interface's ``rsample``), not for training.
    :meth:`component_rsample` draws one reparameterized sample from every component, for
    the stratified ELBO (:meth:`ME.training_objective`).
    """

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 validate_args=None):
        super().__init__(
            Categorical(logits=logits, validate_args=validate_args),
            Independent(Normal(loc, scale, validate_args=validate_args), 1,
                        validate_args=validate_args),
            validate_args=validate_args)

    @property
    def weights(self) -> torch.Tensor:
        """alpha, (..., M)."""
        return self.mixture_distribution.probs

    @property
    def components(self) -> int:
        return self._num_component

    def component_rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """One reparameterized sample of every component: (*sample_shape, M, ..., d), the
        component axis in front of the batch axes so that ``log_prob`` (of the mixture)
        and the decoder broadcast over it."""
        z = self.component_distribution.rsample(sample_shape)  # (*S, ..., M, d)
        return z.movedim(-2, len(sample_shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """m ~ Cat(alpha), then z = mu_m + sigma_m eps: (*sample_shape, ..., d).  Pathwise
        gradients reach mu_m and sigma_m of the drawn component only, never alpha."""
        sample_shape = torch.Size(sample_shape)
        with torch.no_grad():
            m = self.mixture_distribution.sample(sample_shape)  # (*S, ...)
        z = self.component_distribution.rsample(sample_shape)  # (*S, ..., M, d)
        index = m[..., None, None].expand(*m.shape, 1, z.shape[-1])
        return z.gather(-2, index).squeeze(-2)


class ME(LatentVariableModel):
    """ME(M): one shared trunk, M Gaussian heads, a softmax head for alpha(x)."""

    config_class = MEConfig
    #: q(z|x) is computed without autograd (no per-instance optimisation)
    posterior_needs_grad: ClassVar[bool] = False

    def __init__(self, config: MEConfig, image_shape):
        check_config_type(config, MEConfig)
        super().__init__(config, image_shape)
        d, h, m = config.latent_dim, self.arch.hidden, config.me_components
        # component 1 = the VAE's encoder (trunk + head), created first as in the VAE
        self.encoder = GaussianEncoder(self.arch, d)
        self.components = m
        if m > 1:
            # heads of components 2..M, as one layer (the same per-weight initialisation as
            # M - 1 separate Linear(h, 2d) layers: PyTorch's default depends on fan-in only)
            self.component_heads = nn.Linear(h, 2 * d * (m - 1))
            self.mixture_head = nn.Linear(h, m)  # logits of alpha(x)

    def variational_family(self) -> str:
        return "mixture of diagonal Gaussians" if self.components > 1 else "diagonal Gaussian"

    def posterior(self, x: torch.Tensor):
        """q(z|x): a :class:`GaussianMixture`; for M = 1 the VAE's ``Independent(Normal)``."""
        if self.components == 1:
            mean, std = self.encoder(x)
            return diagonal_normal(mean, std)
        features = self.encoder.trunk(x)
        raw = torch.cat([self.encoder.head(features).unsqueeze(-2),
                         self.component_heads(features).unflatten(
                             -1, (self.components - 1, 2 * self.latent_dim))], dim=-2)
        mean, std = self.encoder.split_head(raw)  # (B, M, d) each
        return GaussianMixture(upcast(self.mixture_head(features)), mean, std,  # float32 logits
                               validate_args=False)

    def training_objective(self, x: torch.Tensor, n_train: int) -> tuple[torch.Tensor, dict]:
        """The stratified ELBO (module docstring), (B,); M = 1: the VAE's ELBO.

        Diagnostics: ``rec`` = sum_m alpha_m log p(x|z_m), ``kl`` = sum_m alpha_m
        (log q(z_m|x) - log p(z_m)) (a Monte Carlo KL), batch means.
        """
        if self.components == 1:
            return super().training_objective(x, n_train)
        q = self.posterior(x)
        z = q.component_rsample()  # (M, B, d)
        alpha = q.weights.transpose(0, 1)  # (M, B)
        rec = (alpha * self.log_likelihood(x, z)).sum(0)
        kl = (alpha * (q.log_prob(z) - self.log_prior(z))).sum(0)
        return rec - kl, {"rec": rec.mean().detach(), "kl": kl.mean().detach()}

    def extra_posterior_flops(self, batch_size: int = 1) -> int:
        """FLOPs of q(z|x) outside the Linear/Conv layers, for ``batch_size`` images, as
        :mod:`gpvae.bench` times it (``posterior`` plus ``q.mean`` and ``q.stddev``): the
        softmax of the M logits (about 3M), the mixture mean sum_m alpha_m mu_m (2Md) and
        the law-of-total-variance standard deviation (sigma_m^2: Md; alpha-weighted sums of
        sigma_m^2 and of (mu_m - mean)^2: 2Md + 4Md; d adds and d square roots).  Zero for
        M = 1 (the VAE).  Elementwise nonlinearities (softplus) are not counted, as for the
        VAE.
        """
        m, d = self.components, self.latent_dim
        if m == 1:
            return 0
        return batch_size * (3 * m + 2 * m * d + 7 * m * d + 2 * d)


__all__ = ["GaussianMixture", "ME", "MEConfig"]
