"""The GPVAE of Kim & Pavlovic (ICML 2021): the amortized encoder as a Bayesian random
function (Sec. 3).

Model (Sec. 3.1)
----------------
The encoder's mean and standard-deviation functions are random, f = b + W psi^m,
h = c + U psi^s, with linear-deep-kernel GPs f_j = w_j^T psi^m(x), h_j = u_j^T psi^s(x):

    q(z|x, W, U) = N(b(x) + W psi^m(x), Diag(c(x) + U psi^s(x))^2)                   (9)

* b(x), c(x): a :class:`~gpvae.networks.GaussianEncoder` -- exactly the VAE's encoder, kept
  under the same attribute name ``encoder`` so a trained VAE's weights load into it;
* psi^m, psi^s: two :class:`~gpvae.networks.EncoderTrunk` s (the encoder without its last
  FC layer, Sec. 5 "Network architectures"), p = h = ``arch.hidden`` features;
* the variational GP posterior (eq. 11)

      q(W, U) = prod_j N(w_j; mu_j, Sigma_j) N(u_j; eta_j, Gamma_j),

  with mu, eta (d, p) and Sigma_j = L_j L_j^T, Gamma_j = M_j M_j^T given by Cholesky factors
  (Sec. 5: "lower triangle matrix with strictly positive diagonals").  Each factor is
  stored as its strictly-lower part, packed (d, p(p-1)/2), and the log of its diagonal
  (d, p): diag = exp(log_diag) > 0, log det Sigma_j = 2 sum(log_diag_j), and no unused
  upper-triangle parameters are counted or optimised.

Initialization (the paper is silent): "start as the VAE" -- mu = eta = 0, strictly-lower
parts 0, diagonals ``gp_init_std`` (default 1e-3), i.e. Sigma_j = Gamma_j = 1e-6 I, so the
marginal q(z|x) of eq. (13) starts as the VAE's N(b, c^2) up to O(1e-6 |psi|^2) variance.

Inference (Sec. 3.2)
--------------------
Moment matching the W, U-mixture of eq. (12) gives q(z|x) = N(m(x), Diag(v(x))) with

    m_j = b_j + mu_j^T psi^m,
    v_j = (c_j + eta_j^T psi^s)^2 + psi^m^T Sigma_j psi^m + psi^s^T Gamma_j psi^s      (13)

(eq. 13's c^2 + 2 eta^T psi c + psi^T (eta eta^T + Gamma) psi regrouped).  This is what
:meth:`GPVAE.posterior` returns, so IWAE evaluation is the VAE's.  The d quadratic forms
of a batch are one matmul: psi^T Sigma_j psi = ||L_j^T psi||^2 with all L_j^T psi from a
single (B, p) @ (p, d p) product (:func:`cholesky_quadratic_form`); the factors are
stored so that this operand is a free view.  Without gradients (evaluation) the factors
are cached until a q(W, U) parameter changes.  The symmetric packed form
(:func:`symmetric_packed`, :func:`packed_quadratic_form`) needs half the multiply-adds;
``marginal_moments(x, form="packed")`` uses it with Sigma_j precomputed (cached) -- on CPU
it is nevertheless slower than the Cholesky form (the p(p+1)/2 products psi_k psi_l are a
memory-bound gather), so "chol" is the default everywhere.  :meth:`GPVAE.fused_encoder`
snapshots x -> (m, v) as a standalone module with all x-independent operands precomputed
(used by :mod:`gpvae.export`).

Learning (Sec. 3.3)
-------------------
The per-example objective is the ELBO of eq. (15) (= eq. 18 of the supplement):

    E_{q(z|x)}[log p(x|z)] - E_{q(W,U)}[KL(q(z|x,W,U) || p(z))] - KL(q(W,U) || N(0,I)) / N

* the first term with one reparameterised sample from the moment-matched q(z|x) (13);
* the Gaussian-averaged KL (16),
  1/2 sum_j (v_j + m_j^2 - 1 - E_{u_j}[log (c_j + u_j^T psi^s)^2]), where
  c_j + u_j^T psi^s ~ N(c_j + eta_j^T psi^s, psi^s^T Gamma_j psi^s), so the expectation is
  :func:`gpvae.special.expected_log_square` -- in closed form (``kl_expectation="exact"``,
  default) or by the paper's reparameterised Monte Carlo (``"mc"``, ``kl_mc_samples``);
* the global KL in closed form from the Cholesky factors (:func:`kl_to_standard_normal`).

Uncertainty (Sec. 3.3 step 3, Sec. 5.3): Tr V(f(x)|D) = psi^m^T (sum_j Sigma_j) psi^m and
Tr V(h(x)|D) = psi^s^T (sum_j Gamma_j) psi^s (:meth:`GPVAE.uncertainty`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributions import Independent, Normal

from ..errors import ConfigError
from ..networks import EncoderTrunk, GaussianEncoder
from ..special import expected_log_square
from .base import LatentVariableModel, ModelConfig, check_config_type

KL_EXPECTATIONS = ("exact", "mc")
QUADRATIC_FORMS = ("chol", "packed")


@dataclass
class GPVAEConfig(ModelConfig):
    """Options of the GPVAE beyond the generative model's."""

    gp_init_std: float = field(default=1e-3, metadata={
        "help": "initial diagonal of the Cholesky factors of Sigma_j, Gamma_j in q(W,U) "
                "(eq. 11); mu = eta = 0, so training starts as a VAE"})
    kl_expectation: str = field(default="exact", metadata={
        "help": "E[log (c_j + u_j^T psi^s)^2] in the averaged KL (eq. 16): exact closed form "
                "or the paper's reparameterised Monte Carlo",
        "choices": KL_EXPECTATIONS})
    kl_mc_samples: int = field(default=1, metadata={
        "help": "Monte Carlo samples of u_j per example for --kl-expectation mc"})

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.gp_init_std, (int, float)) and math.isfinite(self.gp_init_std)
                and self.gp_init_std > 0):
            raise ConfigError(f"--gp-init-std must be a positive number, got {self.gp_init_std}")
        if self.kl_expectation not in KL_EXPECTATIONS:
            raise ConfigError(f"unknown --kl-expectation {self.kl_expectation!r}; choose from "
                              f"{', '.join(KL_EXPECTATIONS)}")
        if not isinstance(self.kl_mc_samples, int) or self.kl_mc_samples < 1:
            raise ConfigError(f"--kl-mc-samples must be a positive integer, got "
                              f"{self.kl_mc_samples}")


# --------------------------------------------------------------------------------------
# Batched quadratic forms psi^T Sigma_j psi, j = 1..d (no loop over j)
# --------------------------------------------------------------------------------------
def cholesky_quadratic_form(psi: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """psi^T (L_j L_j^T) psi = ||L_j^T psi||^2 for every j, as one matmul.

    Args:
        psi: features (..., p).
        chol: Cholesky factors L (d, p, p) (any square matrices work).
    Returns:
        (..., d).  Cost: one (n, p) @ (p, d p) product, n = psi.numel() / p.
    """
    d, p, _ = chol.shape
    # stacked[l, j p + k] = L_j[l, k], so (psi @ stacked)[j p + k] = (L_j^T psi)_k
    stacked = chol.transpose(0, 1).reshape(p, d * p)
    proj = psi @ stacked
    return proj.view(*psi.shape[:-1], d, p).square().sum(-1)


PACK_BLOCK = 32  # block size of the symmetric packed form (see block_size)
# The packed form pays a fixed cost (forming the block outer products of psi) that only the
# saved d-fold arithmetic repays: measured on 2 CPU cores with p = 256 and a batch of 128,
# one quadratic form took 8.3 ms (Cholesky) vs 5.6 ms (packed) at d = 50, but 1.8 vs 4.5 ms
# at d = 10 (docs/benchmarks.md).  Inference uses the packed form from this d on.
PACKED_MIN_LATENT = 32


def inference_form(latent_dim: int) -> str:
    """The faster quadratic form for gradient-free inference at this latent dimension."""
    return "packed" if latent_dim >= PACKED_MIN_LATENT else "chol"


def block_size(p: int, preferred: int = PACK_BLOCK) -> int:
    """The largest divisor of p that is <= ``preferred`` (p itself when p is smaller)."""
    b = min(p, preferred)
    while p % b:
        b -= 1
    return b


_PAIR_CACHE: dict = {}


def _block_pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block indices (I, J), I <= J, of the upper block triangle of an n x n block grid."""
    key = (n, device)
    if key not in _PAIR_CACHE:
        _PAIR_CACHE[key] = tuple(torch.triu_indices(n, n, device=device))
    return _PAIR_CACHE[key]


def symmetric_packed(chol: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The blocks on and above the diagonal of Sigma_j = L_j L_j^T, off-diagonal blocks
    doubled, flattened: (d, n(n+1)/2 * b^2) with b = ``block``, n = p / b.

    psi^T Sigma psi = sum_{I<=J} sum_{k in I, l in J} packed_{IJ,kl} psi_k psi_l, because
    Sigma is symmetric: the strictly-lower blocks are folded onto the upper ones.  With
    b = 32 and p = 256 this keeps 56% of the p^2 entries (the exact half, p(p+1)/2, would
    need an element-wise gather that is slower than the saved arithmetic); the products
    psi_k psi_l of a block pair are contiguous outer products (:func:`packed_quadratic_form`).
    Costs d p^3 multiply-adds: precompute it once for inference.
    """
    d, p, _ = chol.shape
    b = block or block_size(p)
    n = p // b
    sigma = chol @ chol.transpose(-1, -2)
    rows, cols = _block_pairs(n, chol.device)
    blocks = sigma.view(d, n, b, n, b).permute(0, 1, 3, 2, 4)[:, rows, cols]  # (d, P, b, b)
    blocks = torch.where((rows == cols).view(1, -1, 1, 1), blocks, 2.0 * blocks)
    return blocks.reshape(d, -1)


def packed_outer(psi: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The block-pair outer products psi_I psi_J^T, I <= J, flattened: (..., P b^2)."""
    p = psi.shape[-1]
    b = block or block_size(p)
    n = p // b
    rows, cols = _block_pairs(n, psi.device)
    pb = psi.reshape(*psi.shape[:-1], n, b)
    outer = pb[..., rows, :].unsqueeze(-1) * pb[..., cols, :].unsqueeze(-2)
    return outer.flatten(-3)


def packed_quadratic_form(psi: torch.Tensor, packed: torch.Tensor,
                          block: int | None = None) -> torch.Tensor:
    """psi^T Sigma_j psi for every j from :func:`symmetric_packed` factors: the block
    outer products of psi once, then one (n, P b^2) @ (P b^2, d) product for all j --
    about half the multiply-adds of :func:`cholesky_quadratic_form`.  (..., p) -> (..., d).
    """
    return packed_outer(psi, block) @ packed.transpose(0, 1)


def kl_to_standard_normal(mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """sum_j KL(N(mean_j, L_j L_j^T) || N(0, I_p)) in closed form (last term of eq. 15).

    = 1/2 sum_j (tr Sigma_j + mean_j^T mean_j - p - log det Sigma_j), with
    tr Sigma_j = ||L_j||_F^2 and log det Sigma_j = 2 sum_k log L_j[k, k].
    mean (d, p), chol (d, p, p) lower triangular with positive diagonal -> scalar.
    """
    p = mean.shape[-1]
    trace = chol.square().sum()
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum()
    return 0.5 * (trace + mean.square().sum() - p * mean.shape[0] - logdet)


# --------------------------------------------------------------------------------------
class GPVAE(LatentVariableModel):
    """GP-prior random-function encoder (eqs. 9, 11, 13) trained by the ELBO (15)-(16)."""

    config_class = GPVAEConfig

    def __init__(self, config: GPVAEConfig, image_shape):
        check_config_type(config, GPVAEConfig)
        super().__init__(config, image_shape)
        d, p = config.latent_dim, self.arch.hidden
        self.feature_dim = p
        self.encoder = GaussianEncoder(self.arch, d)  # b(x), c(x): the VAE's encoder
        self.psi_m = EncoderTrunk(self.arch)          # psi^m(x) (mean kernel features)
        self.psi_s = EncoderTrunk(self.arch)          # psi^s(x) (std kernel features)
        # q(W, U) of eq. (11)
        log_std = math.log(config.gp_init_std)
        n_off = p * (p - 1) // 2
        self.mu = nn.Parameter(torch.zeros(d, p))
        self.eta = nn.Parameter(torch.zeros(d, p))
        self.sigma_offdiag = nn.Parameter(torch.zeros(d, n_off))
        self.sigma_log_diag = nn.Parameter(torch.full((d, p), log_std))
        self.gamma_offdiag = nn.Parameter(torch.zeros(d, n_off))
        self.gamma_log_diag = nn.Parameter(torch.full((d, p), log_std))
        rows, cols = torch.tril_indices(p, p, offset=-1)  # packing order of *_offdiag
        self.register_buffer("_tril_rows", rows, persistent=False)
        self.register_buffer("_tril_cols", cols, persistent=False)
        self.register_buffer("_diag", torch.arange(p), persistent=False)
        self._factor_cache: dict = {}  # see _factors

    # --- q(W, U) --------------------------------------------------------------------------
    def _factor(self, offdiag: torch.Tensor, log_diag: torch.Tensor) -> torch.Tensor:
        """Lower-triangular factors (d, p, p) from their packed parameters.

        The storage is laid out as (p, d, p) -- entry [l, j, k] = L_j[l, k] -- and the
        returned (d, p, p) tensor is a permuted view of it, so that
        :func:`cholesky_quadratic_form`'s (p, d p) operand is a free reshape.  Written in
        place into fresh zeros (one scatter of the strictly-lower entries, one of the
        diagonal): no full-size clones on the forward pass.
        """
        d, p = log_diag.shape
        stacked = offdiag.new_zeros(p, d, p)
        stacked[self._tril_rows, :, self._tril_cols] = offdiag.T
        stacked[self._diag, :, self._diag] = torch.exp(log_diag).T
        return stacked.permute(1, 0, 2)

    def cholesky_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, M): lower-triangular Cholesky factors of Sigma_j and Gamma_j, each (d, p, p)
        (strictly-lower part as stored, diagonal exp(log_diag) > 0)."""
        return (self._factor(self.sigma_offdiag, self.sigma_log_diag),
                self._factor(self.gamma_offdiag, self.gamma_log_diag))

    @staticmethod
    def _kl_from_parameters(mean, offdiag, log_diag) -> torch.Tensor:
        # = kl_to_standard_normal(mean, L) without forming L: ||L||_F^2 from the stored
        # entries, log det from log_diag exactly.
        trace = offdiag.square().sum() + torch.exp(2.0 * log_diag).sum()
        return 0.5 * (trace + mean.square().sum() - mean.numel() - 2.0 * log_diag.sum())

    def kl_wu(self) -> torch.Tensor:
        """KL(q(W, U) || N(0, I)), the last term of eq. (15) before dividing by N: scalar.

        Closed form from the stored factor parameters; equals
        ``kl_to_standard_normal(mu, L) + kl_to_standard_normal(eta, M)``.
        """
        return (self._kl_from_parameters(self.mu, self.sigma_offdiag, self.sigma_log_diag)
                + self._kl_from_parameters(self.eta, self.gamma_offdiag, self.gamma_log_diag))

    def _factors(self, form: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (Sigma, Gamma) operands of the quadratic forms: Cholesky factors (form
        "chol") or :func:`symmetric_packed` (form "packed").

        When no gradient is needed (``torch.no_grad()``, evaluation) they are cached and
        rebuilt only when a factor parameter changes (keyed on storage, in-place version,
        dtype and device, so optimizer steps, ``load_state_dict`` and ``.to()`` invalidate
        it); with gradients they are rebuilt on every call.
        """
        params = (self.sigma_offdiag, self.sigma_log_diag, self.gamma_offdiag,
                  self.gamma_log_diag)

        def build():
            chol_sigma, chol_gamma = self.cholesky_factors()
            if form == "chol":
                return chol_sigma, chol_gamma
            return symmetric_packed(chol_sigma), symmetric_packed(chol_gamma)

        if torch.is_grad_enabled() and any(q.requires_grad for q in params):
            return build()
        key = tuple((q.data_ptr(), q._version, q.dtype, q.device) for q in params)
        hit = self._factor_cache.get(form)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, build())
            self._factor_cache[form] = hit
        return hit[1]

    # --- q(z|x) ---------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """b(x), c(x) (B, d) and psi^m(x), psi^s(x) (B, p)."""
        b, c = self.encoder(x)
        return {"b": b, "c": c, "psi_m": self.psi_m(x), "psi_s": self.psi_s(x)}

    def moments(self, x: torch.Tensor, form: str = "chol") -> dict[str, torch.Tensor]:
        """Everything eqs. (13) and (16) need, each (B, d):

        * ``m``: b + mu psi^m; ``v``: the variance of eq. (13);
        * ``a`` = c + eta psi^s and ``s2`` = psi^s^T Gamma_j psi^s: mean and variance of
          the random standard deviation h_j(x) = c_j + u_j^T psi^s under q(U);
        * ``qm`` = psi^m^T Sigma_j psi^m: the variance of f_j(x) under q(W).

        ``form``: "chol" (:func:`cholesky_quadratic_form`, for training) or "packed"
        (:func:`packed_quadratic_form` with cached Sigma_j, for inference).
        """
        if form not in QUADRATIC_FORMS:
            raise ValueError(f"unknown form {form!r}; choose from {', '.join(QUADRATIC_FORMS)}")
        feats = self.features(x)
        psi_m, psi_s = feats["psi_m"], feats["psi_s"]
        m = feats["b"] + psi_m @ self.mu.T
        a = feats["c"] + psi_s @ self.eta.T
        sigma, gamma = self._factors(form)
        quadratic = cholesky_quadratic_form if form == "chol" else packed_quadratic_form
        qm, s2 = quadratic(psi_m, sigma), quadratic(psi_s, gamma)
        v = a.square() + qm + s2
        return {"m": m, "v": v, "a": a, "s2": s2, "qm": qm}

    def marginal_moments(self, x: torch.Tensor, form: str = "chol"):
        """(m, v) of the moment-matched marginal q(z|x) = N(m, Diag(v)), eq. (13)."""
        mom = self.moments(x, form)
        return mom["m"], mom["v"]

    def posterior(self, x: torch.Tensor) -> Independent:
        """q(z|x) = N(m(x), Diag(v(x))) of eq. (13), batch_shape (B,), event_shape (d,).

        With gradients the quadratic forms use the Cholesky form; without (evaluation) the
        faster of the cached Cholesky factors and the cached symmetric packed covariances
        (about half the arithmetic; :func:`inference_form`)."""
        form = "chol" if torch.is_grad_enabled() else inference_form(self.latent_dim)
        m, v = self.marginal_moments(x, form)
        return Independent(Normal(m, v.sqrt()), 1)

    # --- the objective ----------------------------------------------------------------------
    def averaged_kl(self, mom: dict[str, torch.Tensor], method: str | None = None,
                    n_samples: int | None = None) -> torch.Tensor:
        """E_{q(W,U)}[KL(q(z|x,W,U) || N(0,I))], eq. (16), per example (B,).

        = 1/2 sum_j (v_j + m_j^2 - 1 - E[log h_j^2]), h_j ~ N(a_j, s2_j) (see
        :meth:`moments`); ``method``/``n_samples`` default to the config's
        ``kl_expectation``/``kl_mc_samples``.
        """
        method = method or self.config.kl_expectation
        n_samples = n_samples or self.config.kl_mc_samples
        e_log_h2 = expected_log_square(mom["a"], mom["s2"], method=method, n_samples=n_samples)
        return 0.5 * (mom["v"] + mom["m"].square() - 1.0 - e_log_h2).sum(-1)

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three terms of eq. (15): ``rec`` (B,) -- log p(x|z) at one reparameterised
        z ~ q(z|x) (13); ``kl`` (B,) -- the averaged KL (16); ``kl_wu`` () --
        KL(q(W,U) || N(0,I)) (not yet divided by N)."""
        mom = self.moments(x, "chol")
        z = Independent(Normal(mom["m"], mom["v"].sqrt()), 1).rsample()
        return {"rec": self.log_likelihood(x, z), "kl": self.averaged_kl(mom),
                "kl_wu": self.kl_wu()}

    def training_objective(self, x: torch.Tensor, n_train: int) -> tuple[torch.Tensor, dict]:
        """Per-example ELBO of eq. (15), rec - kl - kl_wu / N with N = ``n_train``.

        Summed over the N training examples this is the negative of eq. (14)'s
        KL(q(W,U) || p(W,U|D)) up to a constant.  Diagnostics: batch means of ``rec`` and
        ``kl`` (eq. 16), and ``kl_wu`` (the global KL, undivided).
        """
        if not n_train >= 1:
            raise ValueError(f"n_train (the training-set size N) must be >= 1, got {n_train!r}")
        terms = self.elbo_terms(x)
        objective = terms["rec"] - terms["kl"] - terms["kl_wu"] / n_train
        return objective, {"rec": terms["rec"].mean().detach(),
                           "kl": terms["kl"].mean().detach(),
                           "kl_wu": terms["kl_wu"].detach()}

    # --- uncertainty (Sec. 3.3 step 3, Sec. 5.3) ---------------------------------------------
    def uncertainty(self, x: torch.Tensor, form: str = "chol") -> dict[str, torch.Tensor]:
        """Tr V(f(x)|D) = psi^m^T (sum_j Sigma_j) psi^m and Tr V(h(x)|D) =
        psi^s^T (sum_j Gamma_j) psi^s, each (B,); Fig. 1 plots their sum."""
        mom = self.moments(x, form)
        return {"tr_f": mom["qm"].sum(-1), "tr_h": mom["s2"].sum(-1)}

    # --- fused inference (for gpvae.export) -----------------------------------------------
    def fused_encoder(self) -> nn.Module:
        """A standalone module x -> (m(x), v(x)) of eq. (13) (mean and *variance*, each
        (B, d)) with everything that does not depend on x precomputed as buffers: mu^T,
        eta^T and the symmetric packed Sigma_j, Gamma_j stacked so that both quadratic
        forms of eq. (13) are one matrix product.  The networks are copied, so the module
        is independent of later training of this model."""
        return _FusedMarginalEncoder(self)


class _FusedMarginalEncoder(nn.Module):
    """See :meth:`GPVAE.fused_encoder`: eq. (13) with x-independent parts folded in.

    Both quadratic forms of eq. (13) are one matrix product against a precomputed operand:
    the symmetric packed Sigma_j, Gamma_j stacked along the contraction ((2 P b^2, d)) when
    :func:`inference_form` picks "packed", else the stacked Cholesky factors
    ([L_j; M_j] as (2 p, d p), squared and summed over p)."""

    def __init__(self, model: GPVAE):
        super().__init__()
        self.form = inference_form(model.latent_dim)
        self.latent_dim, self.feature_dim = model.latent_dim, model.feature_dim
        self.block = block_size(model.feature_dim)
        self.encoder = copy.deepcopy(model.encoder)
        self.psi_m = copy.deepcopy(model.psi_m)
        self.psi_s = copy.deepcopy(model.psi_s)
        d, p = self.latent_dim, self.feature_dim
        with torch.no_grad():
            chol_sigma, chol_gamma = model.cholesky_factors()
            if self.form == "packed":
                op = torch.cat([symmetric_packed(chol_sigma, self.block),
                                symmetric_packed(chol_gamma, self.block)], 1).T
            else:  # stacked[l, j p + k] = L_j[l, k], as in cholesky_quadratic_form
                op = torch.cat([chol_sigma.transpose(0, 1).reshape(p, d * p),
                                chol_gamma.transpose(0, 1).reshape(p, d * p)], 0)
            self.register_buffer("quad_op", op.contiguous().clone())
            self.register_buffer("mu_t", model.mu.detach().T.contiguous().clone())
            self.register_buffer("eta_t", model.eta.detach().T.contiguous().clone())
            n = p // self.block
            rows, cols = torch.triu_indices(n, n, device=op.device)
            self.register_buffer("rows", rows)
            self.register_buffer("cols", cols)

    def _outer(self, psi: torch.Tensor) -> torch.Tensor:
        pb = psi.reshape(psi.shape[0], -1, self.block)
        outer = pb[:, self.rows, :].unsqueeze(-1) * pb[:, self.cols, :].unsqueeze(-2)
        return outer.flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = self.encoder(x)
        psi_m, psi_s = self.psi_m(x), self.psi_s(x)
        m = b + psi_m @ self.mu_t
        a = c + psi_s @ self.eta_t
        if self.form == "packed":
            quad = torch.cat([self._outer(psi_m), self._outer(psi_s)], 1) @ self.quad_op
        else:
            p, d = self.feature_dim, self.latent_dim
            proj = psi_m @ self.quad_op[:p]
            proj_s = psi_s @ self.quad_op[p:]
            quad = (proj.view(-1, d, p).square().sum(-1)
                    + proj_s.view(-1, d, p).square().sum(-1))
        return m, a.square() + quad
