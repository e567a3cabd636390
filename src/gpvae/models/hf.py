"""HF(k): the VAE with a Householder flow (Tomczak & Welling, "Improving Variational
Auto-Encoders using Householder Flow", NIPS 2016 Bayesian Deep Learning workshop,
arXiv:1611.09630; the GPVAE paper's baseline "HF", Sec. 5).

The encoder gives the VAE's diagonal Gaussian q0(z0|x) = N(mu(x), Diag(sigma(x)^2)) and,
from the same last hidden layer h(x) (our :class:`~gpvae.networks.EncoderTrunk`'s output),
k Householder vectors

    v_1 = Linear(h(x)),    v_{t+1} = Linear(v_t)

(the paper's "Householder flow" section; layers ``HF-v1``, ``HF-v2``, ... of their
reference code, github jmtomczak/vae_householder_flow, with no nonlinearity), each defining
a reflection

    H_t = I - 2 v_t v_t^T / ||v_t||^2,    z_t = H_t z_{t-1},   t = 1..k.

A reflection is orthogonal, |det H_t| = 1: the flow is volume preserving, so the change of
variables formula of normalizing flows, log q(z_k|x) = log q0(z0|x) - sum_t log|det dz_t /
dz_{t-1}|, reduces to

    log q(z_k|x) = log N(z0; mu, Diag(sigma^2)),    z0 = H^T z_k = H_1 ... H_k z_k,

with H = H_k ... H_1 (each H_t is its own inverse).  In closed form q(z_k|x) is the
full-covariance Gaussian N(H mu, H Diag(sigma^2) H^T) -- Tomczak & Welling's point: k
reflections give a non-diagonal covariance at O(k d) cost per sample.

How q is represented.  :class:`HouseholderNormal` is a ``TransformedDistribution`` of the
diagonal Gaussian by :class:`HouseholderTransform`: a sample costs the diagonal Gaussian's
plus 4 k d FLOPs (k dot products and k axpys), ``log_prob`` the same (the inverse is the k
reflections in reverse order).  Nothing is factorised, so it is exact to rounding and as
well conditioned as the diagonal Gaussian whatever the spread of sigma (a
``MultivariateNormal`` would need a d x d Cholesky or QR factor per image -- O(d^3) -- and
O(d^2) per sample and density; a Cholesky of H Diag(sigma^2) H^T squares the condition
number).
The transform keeps no cache: ``log_prob(z)`` always inverts, so it is a function of z alone
(two equal models give bit-equal densities whichever of them drew z).  ``mean`` (H mu),
``variance``, ``covariance_matrix`` and the closed-form KL to a diagonal Gaussian are
available; the explicit H (:meth:`HouseholderNormal.householder_matrix`, O(k d^2)) is built
only for the last three.

Training.  The single-sample reparameterized ELBO (the base class's), with the KL in closed
form: KL(q(z_k|x) || N(0, I)) = KL(N(mu, sigma^2) || N(0, I)) because N(0, I) is invariant
under orthogonal maps (registered below for any diagonal-Gaussian p).  The reference code
uses the one-sample Monte Carlo
log q0(z0|x) - log p(z_k) instead: the same expectation with more variance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torch.distributions import (
    Independent,
    Normal,
    TransformedDistribution,
    constraints,
    register_kl,
)
from torch.distributions.transforms import Transform
from torch.distributions.utils import lazy_property

from ..errors import ConfigError
from ..networks import GaussianEncoder
from ..precision import upcast
from .base import LatentVariableModel, ModelConfig, check_config_type


@dataclass
class HFConfig(ModelConfig):
    """Options of HF(k) beyond the generative model's."""

    # The GPVAE paper picks the number of flows from {1, 2, 4, 8} (Sec. 5) without saying
    # which won.  Default 1 (as in the reference code's stored runs, T = 1): the cheapest,
    # and already a full covariance (one reflection of a diagonal Gaussian is not diagonal).
    hf_flows: int = field(default=1, metadata={
        "help": "number k of Householder reflections of HF(k) (the paper's number of flows, "
                "from {1, 2, 4, 8})"})

    #: the field a size in the paper's notation sets (``hf:2`` -> hf_flows = 2)
    size_option: ClassVar[str | None] = "hf_flows"

    def validate(self) -> None:
        super().validate()
        if (not isinstance(self.hf_flows, int) or isinstance(self.hf_flows, bool)
                or self.hf_flows < 1):
            raise ConfigError(f"--hf-flows must be a positive integer, got {self.hf_flows!r}")


class HouseholderTransform(Transform):
    """z -> H_k ... H_1 z with H_t = I - 2 u_t u_t^T for unit vectors u_t.

    ``vectors`` (..., k, d) holds u_1..u_k (unit norm, or exactly zero for the identity);
    they broadcast against z (..., d) after dropping the k axis, so one set per image serves
    any number of leading sample dimensions.  Orthogonal, hence bijective with
    log|det J| = 0; the inverse applies the same reflections in reverse order.
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, vectors: torch.Tensor, cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        self.vectors = vectors

    def with_cache(self, cache_size: int = 0):
        if self._cache_size == cache_size:
            return self
        return HouseholderTransform(self.vectors, cache_size=cache_size)

    def _reflect(self, z: torch.Tensor, order) -> torch.Tensor:
        for t in order:
            u = self.vectors[..., t, :]
            # H_t z = z - 2 u (u^T z): one dot product and one axpy, 4d FLOPs
            z = z - 2 * (z * u).sum(-1, keepdim=True) * u
        return z

    def _call(self, z: torch.Tensor) -> torch.Tensor:
        return self._reflect(z, range(self.vectors.shape[-2]))

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._reflect(y, reversed(range(self.vectors.shape[-2])))

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(x.shape[:-1], self.vectors.shape[:-2])
        return x.new_zeros(shape)


class HouseholderNormal(TransformedDistribution):
    """q(z_k|x) of HF(k): N(mu, Diag(sigma^2)) pushed through k reflections, i.e. the
    Gaussian N(H mu, H Diag(sigma^2) H^T) with H = H_k ... H_1.

    Args:
        loc, scale: mu and sigma, (..., d).
        vectors: unit Householder vectors u_1..u_k, (..., k, d).
    """

    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, vectors: torch.Tensor,
                 validate_args=None):
        self.loc, self.scale, self.vectors = loc, scale, vectors
        base = Independent(Normal(loc, scale, validate_args=validate_args), 1,
                           validate_args=validate_args)
        super().__init__(base, HouseholderTransform(vectors), validate_args=validate_args)

    @property
    def flow(self) -> HouseholderTransform:
        return self.transforms[0]

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        d, k = self.event_shape[0], self.vectors.shape[-2]
        return HouseholderNormal(self.loc.expand(batch_shape + (d,)),
                                 self.scale.expand(batch_shape + (d,)),
                                 self.vectors.expand(batch_shape + (k, d)),
                                 validate_args=self._validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log N(H^T z; mu, sigma^2): the flow's log-det is exactly 0."""
        if self._validate_args:
            self._validate_sample(value)
        return self.base_dist.log_prob(self.flow.inv(value))

    def entropy(self) -> torch.Tensor:
        return self.base_dist.entropy()

    @lazy_property
    def mean(self) -> torch.Tensor:
        return self.flow._call(self.loc)

    @property
    def mode(self) -> torch.Tensor:
        return self.mean

    @lazy_property
    def _householder_matrix(self) -> torch.Tensor:
        d = self.event_shape[0]
        eye = torch.eye(d, dtype=self.loc.dtype, device=self.loc.device)
        batch = torch.broadcast_shapes(self.loc.shape[:-1], self.vectors.shape[:-2])
        # row j of the result is H e_j, i.e. column j of H: reflect the d basis vectors
        # as a leading "sample" dimension, then move it into place
        cols = self.flow._call(eye.reshape(d, *(1,) * len(batch), d))  # (d, *batch, d)
        return cols.movedim(0, -1)  # (*batch, d, d): [..., i, j] = H_ij

    def householder_matrix(self) -> torch.Tensor:
        """H = H_k ... H_1, (..., d, d): O(k d^2) per image."""
        return self._householder_matrix

    @lazy_property
    def variance(self) -> torch.Tensor:
        """diag(H D^2 H^T)_i = sum_j H_ij^2 sigma_j^2.  One reflection (HF(1)), in O(d) per
        image: H_ij = delta_ij - 2 u_i u_j, so the sum is sigma_i^2 (1 - 2 u_i^2)^2
        + 4 u_i^2 sum_{j != i} u_j^2 sigma_j^2, every term non-negative and the sum over
        j != i taken as the sums before and after i (no subtraction: exact where one
        dimension's term dominates, e.g. a reflection swapping a wide and a narrow
        dimension).  Several reflections: from H itself, O(k d^2)."""
        s2 = self.scale.square()
        if self.vectors.shape[-2] != 1:
            return (self._householder_matrix.square() * s2.unsqueeze(-2)).sum(-1)
        u2 = self.vectors[..., 0, :].square()
        a = u2 * s2  # u_j^2 sigma_j^2
        before = F.pad(torch.cumsum(a[..., :-1], -1), (1, 0))  # sum_{j < i} a_j
        after = torch.flip(F.pad(torch.cumsum(torch.flip(a[..., 1:], [-1]), -1), (1, 0)),
                           [-1])  # sum_{j > i} a_j
        return s2 * (1 - 2 * u2).square() + 4 * u2 * (before + after)

    @lazy_property
    def covariance_matrix(self) -> torch.Tensor:
        h = self._householder_matrix
        return (h * self.scale.square().unsqueeze(-2)) @ h.transpose(-1, -2)


@register_kl(HouseholderNormal, Independent)
def _kl_householder_diagonal(q: HouseholderNormal, p: Independent) -> torch.Tensor:
    """KL(N(H mu, H D^2 H^T) || N(m, Diag(s^2))) in closed form:

        1/2 sum_i (Var_q[z_i] + (E_q[z_i] - m_i)^2) / s_i^2 - d/2 + sum_i log s_i
        - sum_j log sigma_j        (log det(H D^2 H^T) = log det D^2: H is orthogonal).

    For p = N(0, I) this equals KL(N(mu, sigma^2) || N(0, I)) up to rounding.
    """
    if not isinstance(p.base_dist, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    loc_p, scale_p = p.base_dist.loc, p.base_dist.scale
    var_p = scale_p.square()
    d = q.event_shape[0]
    quad = ((q.variance + (q.mean - loc_p).square()) / var_p).sum(-1)
    return 0.5 * (quad - d) + scale_p.log().sum(-1) - q.scale.log().sum(-1)


class HF(LatentVariableModel):
    """HF(k): the Tab. 6-8 encoder (trunk + head: mu, sigma) plus k Householder-vector
    layers on the trunk's features; q(z|x) is a :class:`HouseholderNormal`.

    Parameters are created encoder first, as in the VAE, so with the same seed an HF and a
    VAE start from the same encoder and decoder weights.
    """

    config_class = HFConfig
    #: q(z|x) is computed without autograd (no per-instance optimisation)
    posterior_needs_grad: ClassVar[bool] = False

    def __init__(self, config: HFConfig, image_shape):
        check_config_type(config, HFConfig)
        super().__init__(config, image_shape)
        d, h = config.latent_dim, self.arch.hidden
        self.encoder = GaussianEncoder(self.arch, d)
        # v_1 = Linear(h(x)), v_{t+1} = Linear(v_t): no nonlinearity, as in the reference code
        self.householder = nn.ModuleList(
            [nn.Linear(h, d)] + [nn.Linear(d, d) for _ in range(config.hf_flows - 1)])

    @property
    def flows(self) -> int:
        return len(self.householder)

    def householder_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """Unit Householder vectors u_t = v_t / ||v_t||, (B, k, d), from trunk features h(x).

        A v_t that is exactly zero gives u_t = 0, the identity (still orthogonal), rather
        than NaN.
        """
        vs, v = [], features
        for layer in self.householder:
            v = layer(v)
            vs.append(v)
        v = upcast(torch.stack(vs, dim=-2))  # float32 under bf16 autocast: H_t orthogonal
        norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        return v / torch.where(norm > 0, norm, torch.ones_like(norm))

    def variational_family(self) -> str:
        return "full-covariance Gaussian (Householder flow of a diagonal Gaussian)"

    def posterior(self, x: torch.Tensor) -> HouseholderNormal:
        features = self.encoder.trunk(x)
        mean, std = self.encoder.split_head(self.encoder.head(features))
        return HouseholderNormal(mean, std, self.householder_vectors(features),
                                 validate_args=False)

    def extra_posterior_flops(self, batch_size: int = 1) -> int:
        """FLOPs of q(z|x) outside the Linear/Conv layers, for ``batch_size`` images, as
        :mod:`gpvae.bench` times it (``posterior`` plus ``q.mean`` and ``q.stddev``):

        * normalising the k vectors: 3d each (d squares, d - 1 adds, d divisions);
        * the mean H mu: 4d per reflection (dot product and axpy);
        * the standard deviations: for one reflection the O(d) form of
          :attr:`HouseholderNormal.variance` (13 d: squares, two running sums, the
          products), else H itself (the k reflections of the d basis vectors, 4 k d^2) and
          sum_j H_ij^2 sigma_j^2 (3 d^2); then d square roots.

        Drawing a sample, or evaluating log q at one, adds 4 k d per sample beyond the
        diagonal Gaussian's.  Elementwise nonlinearities (softplus) are not counted, as for
        the VAE.
        """
        d, k = self.latent_dim, self.flows
        variance = 13 * d if k == 1 else 4 * k * d * d + 3 * d * d
        per_image = 3 * d * k + 4 * d * k + variance + d
        return batch_size * per_image


__all__ = ["HF", "HFConfig", "HouseholderNormal", "HouseholderTransform"]
