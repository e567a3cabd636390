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
  (Sec. 5: "lower triangle matrix with strictly positive diagonals"), each stored as the
  log of its diagonal and its strictly-lower part in the column-blocked layout of
  :mod:`gpvae.cholesky`.

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
psi^T Sigma_j psi = ||L_j^T psi||^2 of a batch need no loop over j: they are batched
products over the stored factor blocks (:func:`~gpvae.cholesky.blocked_cholesky_quadratic_form`
with gradients, :func:`~gpvae.cholesky.stacked_blocked_quadratic_forms` without; the
packed form, ``form="packed"``, is kept for comparison).  :meth:`GPVAE.fused_encoder`
snapshots x -> (m, v) as a standalone module with all x-independent operands precomputed
(used by :mod:`gpvae.export`).  :meth:`GPVAE.fuse_trunks` (an execution switch, off by
default) runs the base encoder's trunk and psi^m, psi^s -- three networks on the same x --
as one (:func:`fused_trunk_features`): the same features from the same parameters, with
fewer, larger kernels.

Learning (Sec. 3.3)
-------------------
The per-example objective is the ELBO of eq. (15) (= eq. 18 of the supplement):

    E_{q(z|x)}[log p(x|z)] - E_{q(W,U)}[KL(q(z|x,W,U) || p(z))] - KL(q(W,U) || N(0,I)) / N

* the first term with one reparameterised sample from the moment-matched q(z|x) (13);
* the Gaussian-averaged KL (16),
  1/2 sum_j (v_j + m_j^2 - 1 - E_{u_j}[log (c_j + u_j^T psi^s)^2]), where
  c_j + u_j^T psi^s ~ N(c_j + eta_j^T psi^s, psi^s^T Gamma_j psi^s), so the expectation is
  :func:`gpvae.special.expected_log_square` -- in closed form
  (``gp_kl_expectation="exact"``, default) or by the paper's reparameterised Monte Carlo
  (``"mc"``, ``gp_kl_mc_samples``);
* the global KL in closed form from the Cholesky factors
  (:func:`~gpvae.cholesky.kl_to_standard_normal`; while training, its sum_j ||L_j||_F^2
  comes out of the quadratic forms' pass).

q(W,U) may learn at its own rate: ``gp_lr`` (``--gp-lr``; default None, the networks'
``--lr``) puts mu, eta and the four factor parameters in a second optimizer group
(:meth:`GPVAE.param_groups`; 0 holds q(W,U) at its initialization).  How far q(W,U) has
moved is logged every epoch (:meth:`GPVAE.epoch_summary`: ||mu||_F, ||eta||_F, the mean
traces and log-determinants of Sigma_j, Gamma_j).

Uncertainty (Sec. 3.3 step 3, Sec. 5.3): Tr V(f(x)|D) = psi^m^T (sum_j Sigma_j) psi^m and
Tr V(h(x)|D) = psi^s^T (sum_j Gamma_j) psi^s (:meth:`GPVAE.uncertainty`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributions import Independent

from ..cholesky import (_diagonal_blocks, _quadratic_and_frobenius, _slabs,
                        blocked_frobenius, blocked_to_dense, chol_block_size,
                        dense_quadratic_and_frobenius,
                        chol_storage_rows, dense_to_blocked, packed_quadratic_form,
                        stacked_blocked_quadratic_forms, strict_lower_mask, symmetric_packed)
from ..errors import ConfigError
from ..networks import EncoderTrunk, GaussianEncoder
from ..precision import fp32_function
from ..special import expected_log_square
from .base import LatentVariableModel, ModelConfig, check_config_type, diagonal_normal

KL_EXPECTATIONS = ("exact", "mc")
QUADRATIC_FORMS = ("chol", "packed")


@dataclass
class GPVAEConfig(ModelConfig):
    """Options of the GPVAE beyond the generative model's (prefix ``gp_``)."""

    option_prefix = "gp"
    renamed_options = {"kl_expectation": "gp_kl_expectation",
                       "kl_mc_samples": "gp_kl_mc_samples"}

    gp_init_std: float = field(default=1e-3, metadata={
        "help": "initial diagonal of the Cholesky factors of Sigma_j, Gamma_j in q(W,U) "
                "(eq. 11); mu = eta = 0, so training starts as a VAE"})
    gp_kl_expectation: str = field(default="exact", metadata={
        "help": "E[log (c_j + u_j^T psi^s)^2] in the averaged KL (eq. 16): exact closed form "
                "or the paper's reparameterised Monte Carlo",
        "choices": KL_EXPECTATIONS})
    gp_kl_mc_samples: int = field(default=1, metadata={
        "help": "Monte Carlo samples of u_j per example for --gp-kl-expectation mc"})
    gp_lr: float | None = field(default=None, metadata={
        "help": "Adam learning rate of q(W,U)'s parameters (mu, eta and the Cholesky factors "
                "of Sigma_j, Gamma_j, eq. 11), in an optimizer group of their own; left out "
                "(None): the same as --lr; 0 holds q(W,U) at its initialization"})

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.gp_init_std, (int, float)) and math.isfinite(self.gp_init_std)
                and self.gp_init_std > 0):
            raise ConfigError(f"--gp-init-std must be a positive number, got {self.gp_init_std}")
        if self.gp_kl_expectation not in KL_EXPECTATIONS:
            raise ConfigError(f"unknown --gp-kl-expectation {self.gp_kl_expectation!r}; choose "
                              f"from {', '.join(KL_EXPECTATIONS)}")
        if not isinstance(self.gp_kl_mc_samples, int) or self.gp_kl_mc_samples < 1:
            raise ConfigError(f"--gp-kl-mc-samples must be a positive integer, got "
                              f"{self.gp_kl_mc_samples}")
        if self.gp_lr is not None and not (
                isinstance(self.gp_lr, (int, float)) and not isinstance(self.gp_lr, bool)
                and math.isfinite(self.gp_lr) and self.gp_lr >= 0):
            raise ConfigError(f"--gp-lr must be a non-negative number (or left out: the same "
                              f"as --lr), got {self.gp_lr!r}")


class GPVAE(LatentVariableModel):
    """GP-prior random-function encoder (eqs. 9, 11, 13) trained by the ELBO (15)-(16)."""

    #: measured on an H100: compiled, q(z|x) and the training step run several times
    #: faster (docs/benchmarks.md, "On a GPU"), so ``--compile auto`` compiles it on CUDA
    compile_auto_on_cuda = True

    config_class = GPVAEConfig

    def __init__(self, config: GPVAEConfig, image_shape):
        check_config_type(config, GPVAEConfig)
        super().__init__(config, image_shape)
        d, p = config.latent_dim, self.arch.hidden
        self.feature_dim = p
        self.encoder = GaussianEncoder(self.arch, d)  # b(x), c(x): the VAE's encoder
        self.psi_m = EncoderTrunk(self.arch)          # psi^m(x) (mean kernel features)
        self.psi_s = EncoderTrunk(self.arch)          # psi^s(x) (std kernel features)
        # q(W, U) of eq. (11); *_offdiag in the column-blocked layout of the module docstring
        log_std = math.log(config.gp_init_std)
        self.chol_block = chol_block_size(p)
        rows = chol_storage_rows(p, self.chol_block)
        self.mu = nn.Parameter(torch.zeros(d, p))
        self.eta = nn.Parameter(torch.zeros(d, p))
        self.sigma_offdiag = nn.Parameter(torch.zeros(rows, d, self.chol_block))
        self.sigma_log_diag = nn.Parameter(torch.full((d, p), log_std))
        self.gamma_offdiag = nn.Parameter(torch.zeros(rows, d, self.chol_block))
        self.gamma_log_diag = nn.Parameter(torch.full((d, p), log_std))
        self.register_buffer("_chol_mask", strict_lower_mask(self.chol_block, self.mu),
                             persistent=False)
        #: run the three trunks as one network (:meth:`fuse_trunks`): an execution switch,
        #: not an option of the model (no effect on its state dict or its numbers)
        self.fused_trunks = False
        #: the quadratic forms through dense factors (:meth:`use_dense_quadratic_forms`):
        #: an execution switch like ``fused_trunks``
        self.dense_quadratic_forms = False

    # --- q(W, U) --------------------------------------------------------------------------
    def _factor(self, offdiag: torch.Tensor, log_diag: torch.Tensor) -> torch.Tensor:
        """Dense lower-triangular factors (d, p, p) from the column-blocked parameters
        (differentiable; not used by training, which reads the blocks in place)."""
        return blocked_to_dense(log_diag, offdiag, self.chol_block)

    def cholesky_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, M): lower-triangular Cholesky factors of Sigma_j and Gamma_j, each (d, p, p)
        (strictly-lower part as stored, diagonal exp(log_diag) > 0)."""
        return (self._factor(self.sigma_offdiag, self.sigma_log_diag),
                self._factor(self.gamma_offdiag, self.gamma_log_diag))

    def _kl_from_parameters(self, mean, offdiag, log_diag, trace=None) -> torch.Tensor:
        # = kl_to_standard_normal(mean, L) without forming L: ||L||_F^2 (``trace``, when
        # already computed) from the used stored entries, log det from log_diag exactly.
        if trace is None:
            trace = blocked_frobenius(log_diag, offdiag, self.chol_block, self._chol_mask)
        return 0.5 * (trace + mean.square().sum() - mean.numel() - 2.0 * log_diag.sum())

    def kl_wu(self) -> torch.Tensor:
        """KL(q(W, U) || N(0, I)), the last term of eq. (15) before dividing by N: scalar.

        Closed form from the stored factor parameters; equals
        ``kl_to_standard_normal(mu, L) + kl_to_standard_normal(eta, M)``.
        """
        return (self._kl_from_parameters(self.mu, self.sigma_offdiag, self.sigma_log_diag)
                + self._kl_from_parameters(self.eta, self.gamma_offdiag, self.gamma_log_diag))

    #: the parameters of q(W, U) (eq. 11), in the order of their optimizer group
    GP_PARAMETERS = ("mu", "eta", "sigma_offdiag", "sigma_log_diag", "gamma_offdiag",
                     "gamma_log_diag")

    def param_groups(self, lr: float) -> list[dict]:
        """With ``gp_lr`` None: one group of all parameters at ``lr`` (the base class's;
        runs written before ``gp_lr`` existed resume unchanged).  Otherwise two: the
        networks (decoder, b/c encoder, psi^m, psi^s, a learned sigma_x) at ``lr``, then
        q(W, U)'s :data:`GP_PARAMETERS` at ``gp_lr``."""
        if self.config.gp_lr is None:
            return super().param_groups(lr)
        gp = [getattr(self, name) for name in self.GP_PARAMETERS]
        ids = {id(p) for p in gp}
        nets = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": nets, "lr": lr}, {"params": gp, "lr": self.config.gp_lr}]

    def epoch_summary(self) -> dict[str, float]:
        """How far q(W, U) (eq. 11) has moved, for the trainer's per-epoch metrics:
        ``gp_mu_norm`` = ||mu||_F, ``gp_eta_norm`` = ||eta||_F, ``gp_sigma_trace`` = the mean
        over j of tr Sigma_j = ||L_j||_F^2, ``gp_gamma_trace`` likewise for Gamma_j, and
        ``gp_sigma_logdet``, ``gp_gamma_logdet``: the mean over j of log det Sigma_j =
        2 sum_k log L_j[k, k] (from the stored log-diagonals).  At initialization the traces
        are p ``gp_init_std``^2 and the log-determinants 2 p log ``gp_init_std``."""
        d = self.latent_dim
        with torch.no_grad():
            values = {
                "gp_mu_norm": torch.linalg.vector_norm(self.mu),
                "gp_eta_norm": torch.linalg.vector_norm(self.eta),
                "gp_sigma_trace": blocked_frobenius(self.sigma_log_diag, self.sigma_offdiag,
                                                    self.chol_block, self._chol_mask) / d,
                "gp_gamma_trace": blocked_frobenius(self.gamma_log_diag, self.gamma_offdiag,
                                                    self.chol_block, self._chol_mask) / d,
                "gp_sigma_logdet": 2.0 * self.sigma_log_diag.sum() / d,
                "gp_gamma_logdet": 2.0 * self.gamma_log_diag.sum() / d,
            }
            return dict(zip(values, torch.stack(list(values.values())).tolist()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the column-blocked layout stored each strictly-lower
        # part packed row by row, (d, p (p - 1) / 2): convert them on load
        d, p = self.latent_dim, self.feature_dim
        for pre in ("sigma", "gamma"):
            off, logd = state_dict.get(f"{prefix}{pre}_offdiag"), state_dict.get(
                f"{prefix}{pre}_log_diag")
            if (off is not None and logd is not None and off.dim() == 2
                    and tuple(off.shape) == (d, p * (p - 1) // 2)):
                dense = off.new_zeros(d, p, p)
                rows, cols = torch.tril_indices(p, p, offset=-1, device=off.device)
                dense[:, rows, cols] = off
                dense.diagonal(dim1=-2, dim2=-1).copy_(torch.exp(logd))
                state_dict[f"{prefix}{pre}_offdiag"] = dense_to_blocked(dense,
                                                                        self.chol_block)[1]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _packed_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The :func:`~gpvae.cholesky.symmetric_packed` Sigma_j, Gamma_j of the "packed"
        form (the "chol" form reads the stored blocks in place), rebuilt on every call
        (d p^3 multiply-adds: this form is kept for comparison, not for speed)."""
        # (d, P b^2) views of (P b^2, d)-contiguous tensors: packed_quadratic_form's
        # product then reads its right operand contiguous
        return tuple(symmetric_packed(c).T.contiguous().T for c in self.cholesky_factors())

    def _inference_operands(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The operands of :func:`~gpvae.cholesky.stacked_blocked_quadratic_forms`: the
        diagonal blocks of L_j and M_j, (2n, b, d b), and their 2(n - 1) slabs (views of
        the stored factors).

        Built from the parameters on every call, never cached: building them is
        element-wise work on 2 p d b numbers, small next to the (B, p) @ (p, d b) products
        of one q(z|x), and a cache keyed on parameter versions goes stale silently under
        optimizers that write parameters without bumping their version counters (the fused
        Adam of :func:`gpvae.training.make_adam` does exactly that)."""
        d, p, b = self.latent_dim, self.feature_dim, self.chol_block
        diag, slabs = [], []
        for log_diag, blocks in ((self.sigma_log_diag, self.sigma_offdiag),
                                 (self.gamma_log_diag, self.gamma_offdiag)):
            dg, _ = _diagonal_blocks(log_diag, blocks, b, self._chol_mask)
            diag.append(dg.view(p // b, b, d * b))
            slabs += _slabs(blocks, p, b)
        return torch.cat(diag, 0), slabs

    # --- q(z|x) ---------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """b(x), c(x) (B, d) and psi^m(x), psi^s(x) (B, p); with :meth:`fuse_trunks` on,
        the three trunks run as one network (:func:`fused_trunk_features`)."""
        if self.fused_trunks:
            h, psi_m, psi_s = fused_trunk_features((self.encoder.trunk, self.psi_m, self.psi_s),
                                                   x)
            b, c = self.encoder.split_head(self.encoder.head(h))
            return {"b": b, "c": c, "psi_m": psi_m, "psi_s": psi_s}
        b, c = self.encoder(x)
        return {"b": b, "c": c, "psi_m": self.psi_m(x), "psi_s": self.psi_s(x)}

    def fuse_trunks(self, enabled: bool = True) -> "GPVAE":
        """Run the base encoder's trunk and psi^m, psi^s as one network
        (:func:`fused_trunk_features`: the same features to float rounding, from the same
        parameters; the state dict, checkpoints and gradients are unchanged) or as three
        (``enabled`` False, the default).  An execution choice: fewer, larger kernels, which
        pays where launches dominate (a GPU at small batches); returns the model."""
        self.fused_trunks = bool(enabled)
        return self

    def use_dense_quadratic_forms(self, enabled: bool = True) -> "GPVAE":
        """Compute the quadratic forms of eqs. (13) and (15) from the dense factors L_j, M_j,
        formed from the stored blocks on every call (:func:`~gpvae.cholesky.
        dense_quadratic_and_frobenius`: a few large products, about twice the multiply-adds
        of the blocked form's many small ones), or from the blocks in place (``enabled``
        False, the default).  The same values to float rounding, the same parameters and
        gradients; an execution choice for a GPU, where the blocked form's small products
        ran slower (docs/benchmarks.md, "On a GPU").  The "packed" form and the exported
        encoder are unaffected.  Returns the model."""
        self.dense_quadratic_forms = bool(enabled)
        return self

    def posterior_flops(self, batch_size: int = 1) -> int:
        """The base class's count, always taken on the three trunks run separately: the
        fused network does the same arithmetic (:meth:`fuse_trunks`), but in functional
        calls that the layer count's hooks do not see."""
        fused, self.fused_trunks = self.fused_trunks, False
        try:
            return super().posterior_flops(batch_size)
        finally:
            self.fused_trunks = fused

    def moments(self, x: torch.Tensor, form: str = "chol") -> dict[str, torch.Tensor]:
        """Everything eqs. (13) and (16) need, each (B, d):

        * ``m``: b + mu psi^m; ``v``: the variance of eq. (13);
        * ``a`` = c + eta psi^s and ``s2`` = psi^s^T Gamma_j psi^s: mean and variance of
          the random standard deviation h_j(x) = c_j + u_j^T psi^s under q(U);
        * ``qm`` = psi^m^T Sigma_j psi^m: the variance of f_j(x) under q(W).

        ``form``: "chol" (the stored factor blocks read in place:
        :func:`~gpvae.cholesky.blocked_cholesky_quadratic_form` with gradients,
        :func:`~gpvae.cholesky.stacked_blocked_quadratic_forms` without) or
        "packed" (:func:`~gpvae.cholesky.packed_quadratic_form` with Sigma_j precomputed;
        slower, kept for comparison).
        """
        return self._moments(x, form)[0]

    def _moments(self, x: torch.Tensor, form: str, with_kl_wu: bool = False):
        """(:meth:`moments`, :meth:`kl_wu` or None): with the "chol" form the KL's
        ||L_j||_F^2 comes out of the quadratic forms' pass, sharing its gradient buffers."""
        if form not in QUADRATIC_FORMS:
            raise ValueError(f"unknown form {form!r}; choose from {', '.join(QUADRATIC_FORMS)}")
        feats = self.features(x)
        return self._moments_from_features(feats["b"], feats["c"], feats["psi_m"],
                                           feats["psi_s"], form, with_kl_wu)

    @fp32_function  # under bf16 autocast: float32, autocast off (gpvae.precision)
    def _moments_from_features(self, b, c, psi_m, psi_s, form: str, with_kl_wu: bool):
        m = torch.addmm(b, psi_m, self.mu.T)
        a = torch.addmm(c, psi_s, self.eta.T)
        kl_wu = None
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (psi_m, psi_s, self.sigma_offdiag, self.sigma_log_diag,
                                      self.gamma_offdiag, self.gamma_log_diag))
        dense = self.dense_quadratic_forms
        if form == "chol" and not with_kl_wu and not needs_grad and not dense:
            # inference: both forms in one product (the same arithmetic)
            diag_blocks, slabs = self._inference_operands()
            qm, s2 = stacked_blocked_quadratic_forms(psi_m, psi_s, diag_blocks, slabs,
                                                     self.chol_block)
        elif form == "chol":
            def quadratic(psi, log_diag, offdiag):
                if dense:
                    return dense_quadratic_and_frobenius(psi, log_diag, offdiag,
                                                         self.chol_block, with_kl_wu)
                return _quadratic_and_frobenius(psi, log_diag, offdiag, self.chol_block,
                                                self._chol_mask, with_kl_wu)

            qm, tr_sigma = quadratic(psi_m, self.sigma_log_diag, self.sigma_offdiag)
            s2, tr_gamma = quadratic(psi_s, self.gamma_log_diag, self.gamma_offdiag)
            if with_kl_wu:
                kl_wu = (self._kl_from_parameters(self.mu, self.sigma_offdiag,
                                                  self.sigma_log_diag, tr_sigma)
                         + self._kl_from_parameters(self.eta, self.gamma_offdiag,
                                                    self.gamma_log_diag, tr_gamma))
        else:
            sigma, gamma = self._packed_factors()
            qm, s2 = packed_quadratic_form(psi_m, sigma), packed_quadratic_form(psi_s, gamma)
        if with_kl_wu and kl_wu is None:
            kl_wu = self.kl_wu()
        v = a.square() + qm + s2
        return {"m": m, "v": v, "a": a, "s2": s2, "qm": qm}, kl_wu

    def marginal_moments(self, x: torch.Tensor, form: str = "chol"):
        """(m, v) of the moment-matched marginal q(z|x) = N(m, Diag(v)), eq. (13)."""
        mom = self.moments(x, form)
        return mom["m"], mom["v"]

    def posterior(self, x: torch.Tensor) -> Independent:
        """q(z|x) = N(m(x), Diag(v(x))) of eq. (13), batch_shape (B,), event_shape (d,).

        The quadratic forms use the column-blocked Cholesky factors in place, with or
        without gradients (the faster form: :data:`gpvae.cholesky.PACK_BLOCK`)."""
        m, v = self.marginal_moments(x, "chol")
        return diagonal_normal(m, v.sqrt())  # v > 0 by construction

    def extra_posterior_flops(self, batch_size: int = 1) -> int:
        """Eq. (13)'s arithmetic besides the three networks (which :meth:`posterior_flops`
        counts): the two mean terms mu_j^T psi^m, eta_j^T psi^s (2 x 2dp) and the 2d
        quadratic forms counted in the symmetric form, 2 x (2d + 1) p (p + 1) / 2 (the
        p (p + 1) / 2 products psi_k psi_l once, then d dot products of that length)."""
        d, p = self.latent_dim, self.feature_dim
        return batch_size * (2 * 2 * d * p + 2 * (2 * d + 1) * (p * (p + 1) // 2))

    # --- the objective ----------------------------------------------------------------------
    def averaged_kl(self, mom: dict[str, torch.Tensor], method: str | None = None,
                    n_samples: int | None = None) -> torch.Tensor:
        """E_{q(W,U)}[KL(q(z|x,W,U) || N(0,I))], eq. (16), per example (B,).

        = 1/2 sum_j (v_j + m_j^2 - 1 - E[log h_j^2]), h_j ~ N(a_j, s2_j) (see
        :meth:`moments`); ``method``/``n_samples`` default to the config's
        ``gp_kl_expectation``/``gp_kl_mc_samples``.
        """
        method = method or self.config.gp_kl_expectation
        n_samples = n_samples or self.config.gp_kl_mc_samples
        e_log_h2 = expected_log_square(mom["a"], mom["s2"], method=method, n_samples=n_samples)
        return 0.5 * (mom["v"] + mom["m"].square() - 1.0 - e_log_h2).sum(-1)

    def elbo_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three terms of eq. (15): ``rec`` (B,) -- log p(x|z) at one reparameterised
        z ~ q(z|x) (13); ``kl`` (B,) -- the averaged KL (16); ``kl_wu`` () --
        KL(q(W,U) || N(0,I)) (not yet divided by N)."""
        mom, kl_wu = self._moments(x, "chol", with_kl_wu=True)
        z = diagonal_normal(mom["m"], mom["v"].sqrt()).rsample()
        return {"rec": self.log_likelihood(x, z), "kl": self.averaged_kl(mom), "kl_wu": kl_wu}

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
        eta^T and the diagonal blocks and slabs of the column-blocked L_j, M_j, stacked so
        that both quadratic forms of eq. (13) share one batched product.  The networks are
        copied, so the module is independent of later training of this model."""
        return _FusedMarginalEncoder(self)


class _FusedMarginalEncoder(nn.Module):
    """See :meth:`GPVAE.fused_encoder`: eq. (13) with x-independent parts folded in.

    Both quadratic forms of eq. (13) use the column-blocked Cholesky form of
    :func:`~gpvae.cholesky.blocked_cholesky_quadratic_form` with its diagonal blocks
    precomputed (exp of the log-diagonal put in, the unused upper triangle zeroed) and
    L_j, M_j side by side: one
    batched product over the 2n diagonal blocks of [psi^m, psi^s], then the 2(n - 1)
    sub-diagonal slabs, then one sum of squares, since v needs only qm + s2."""

    def __init__(self, model: GPVAE):
        super().__init__()
        self.latent_dim, self.feature_dim = model.latent_dim, model.feature_dim
        self.block = model.chol_block
        self.encoder = copy.deepcopy(model.encoder)
        self.psi_m = copy.deepcopy(model.psi_m)
        self.psi_s = copy.deepcopy(model.psi_s)
        self.n_slabs = self.feature_dim // self.block - 1
        with torch.no_grad():
            diag_blocks, slabs = model._inference_operands()
            self.register_buffer("diag_blocks", diag_blocks.clone())
            for k, slab in enumerate(slabs):  # L's n - 1 slabs, then M's
                self.register_buffer(f"slab{k}", slab.contiguous().clone())
            self.register_buffer("mu_t", model.mu.detach().T.contiguous().clone())
            self.register_buffer("eta_t", model.eta.detach().T.contiguous().clone())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c = self.encoder(x)
        psi_m, psi_s = self.psi_m(x), self.psi_s(x)
        m = torch.addmm(b, psi_m, self.mu_t)
        a = torch.addmm(c, psi_s, self.eta_t)
        slabs = [getattr(self, f"slab{k}") for k in range(2 * self.n_slabs)]
        qm, s2 = stacked_blocked_quadratic_forms(psi_m, psi_s, self.diag_blocks, slabs,
                                                 self.block)
        return m, a.square() + qm + s2


def fused_trunk_features(trunks, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The features of G :class:`~gpvae.networks.EncoderTrunk` s of one architecture on the
    same x, computed as ONE network: ``tuple(t(x) for t in trunks)`` to float rounding.

    The G trunks' layers run side by side: the first convolution with the G filter banks
    concatenated (C -> G C_1 channels), each later one as a grouped convolution
    (``groups=G``: group g sees only trunk g's channels), the activations on all channels
    at once, and the FC layers as one batched product (G, B, F) x (G, F, h).  The stacked
    weights are built from the trunks' own parameters on every call (``torch.cat``: the
    gradients flow back to them; nothing is cached, so no cache can go stale under an
    optimizer that writes parameters in place), so the state dict is untouched.  Runs in
    the trunks' memory layout (channels-last when they are) and under ``torch.func.vmap``.
    """
    trunks = tuple(trunks)
    groups = len(trunks)
    nets = [t.net for t in trunks]
    if len({len(n) for n in nets}) != 1 or len({t.channels_last for t in trunks}) != 1:
        raise ValueError("fused_trunk_features needs trunks of one architecture and layout")
    if trunks[0].channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    h, grouped = x, False  # grouped: h holds the G trunks' channels side by side
    for layers in zip(*nets):
        first = layers[0]
        if len({type(m) for m in layers}) != 1:
            raise ValueError("fused_trunk_features needs trunks of one architecture")
        if isinstance(first, nn.Conv2d):
            weight = torch.cat([m.weight for m in layers], 0)
            bias = torch.cat([m.bias for m in layers], 0)
            h = nn.functional.conv2d(h, weight, bias, first.stride, first.padding,
                                     first.dilation, groups if grouped else 1)
            grouped = True
        elif isinstance(first, nn.LeakyReLU):
            h = nn.functional.leaky_relu(h, first.negative_slope)
        elif isinstance(first, nn.Flatten):  # each group flattened as its trunk does (C, H, W)
            h = h.reshape(h.shape[0], groups, -1).transpose(0, 1)
        elif isinstance(first, nn.Linear):  # (G, B, F) -> (G, B, h)
            weight = torch.stack([m.weight for m in layers], 0)
            bias = torch.stack([m.bias for m in layers], 0)
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        else:
            raise TypeError(f"fused_trunk_features cannot fuse a {type(first).__name__} layer")
    return tuple(h.unbind(0))
