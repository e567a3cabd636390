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
  stored as the log of its diagonal (d, p) -- diag = exp(log_diag) > 0,
  log det Sigma_j = 2 sum(log_diag_j) -- and its strictly-lower part in a *column-blocked*
  layout: the p columns are split into n blocks of b (``CHOL_BLOCK``), and column block K
  keeps only the rows l >= K b that can be non-zero, all j together: its b x b diagonal
  block D_K[r, j, c] = L_j[K b + r, K b + c] and the (p - (K + 1) b, d, b) slab below it,
  S_K[r, j, c] = L_j[(K + 1) b + r, K b + c].  One (b n (n + 1) / 2, d, b) parameter per
  factor holds D_0 .. D_{n-1} (its first p rows) and then S_0 .. S_{n-2}
  (:func:`chol_storage_rows`), so every operand of the quadratic form is a free view.  The
  entries of the D_K on and above their diagonal (r <= c) are unused: masked to zero (the
  diagonal comes from log_diag), with zero gradient, not counted in the KL --
  b (b + 1) / 2 d numbers per block, ~12% of the factor for b = 32, p = 256.

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
of a batch need no loop over j: psi^T Sigma_j psi = ||L_j^T psi||^2, and column block K
of all the L_j^T psi is psi_K @ D_K + psi[:, (K + 1) b:] @ S_K, (B, b) @ (b, d b) plus
(B, p - (K + 1) b) @ (p - (K + 1) b, d b) -- the rows above the block are zero and
skipped, so the products (one batched product for all the D_K, then a loop over the
feature blocks, not over j) do (n + 1) / (2 n) of the dense (B, p) @ (p, d p) product's
multiply-adds, forward and backward (:func:`blocked_cholesky_quadratic_form`, a custom
autograd function that reads the stored blocks in place and writes their gradient in
place: no dense factor is built while training; the same pass gives the
sum_j ||L_j||_F^2 of the global KL, whose gradient it adds to the same buffer).
:func:`cholesky_quadratic_form` is the same form for dense factors (d, p, p), which
:meth:`GPVAE.cholesky_factors` builds (for tests and the packed form).  Without gradients
both forms are computed together (:func:`stacked_blocked_quadratic_forms`).  The symmetric packed form
(:func:`symmetric_packed`, :func:`packed_quadratic_form`) with Sigma_j precomputed needs
about as many multiply-adds but was slower in every measurement (``PACK_BLOCK``);
``marginal_moments(x, form="packed")`` uses it.  :meth:`GPVAE.fused_encoder` snapshots
x -> (m, v) as a standalone module with all x-independent operands precomputed (used by
:mod:`gpvae.export`).

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
from torch.autograd.function import once_differentiable
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
# The packed form needs about the multiply-adds of the column-blocked Cholesky form below
# (~56% vs ~53% of the dense form's for b = 32, p = 256) and forms the block outer products of
# psi first, a (B, P b^2) temporary that falls out of cache.  `gpvae bench-quadratic
# --latent-dims 10,20,32,50` on 2 CPU cores (p = 256, batch 128), one form alone, ms:
# column-blocked 0.8 / 1.8 / 3.5 / 5.3, packed (b = 32) 3.6 / 3.4 / 3.7 / 5.3; within a whole
# GPVAE q(z|x) pass at d = 50 the blocked form was ~12% faster (docs/benchmarks.md).  So
# inference uses the blocked form at every d; the packed form stays available
# (``form="packed"``) for comparison.


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


# --------------------------------------------------------------------------------------
# Column-blocked Cholesky factors (the stored form of q(W, U)'s factors)
# --------------------------------------------------------------------------------------
CHOL_BLOCK = 32  # column block b of the stored factors (see chol_block_size)
# Smaller b saves multiply-adds ((n + 1) / (2 n) of the dense form's) but runs more,
# smaller products.  One-off measurements on 2 CPU cores (`gpvae bench-train` times the whole
# step for the current b), batch 128, d = 50: one quadratic form forward
# + backward at p = 256 took 12.6 / 11.9 / 12.7 ms for b = 16 / 32 / 64 (the dense
# (B, p) @ (p, d p) form with index_put-built factors: 29.5 ms); a whole training step
# (MNIST, p = 256) 85 / 79 / 87 ms, and (CIFAR-10 shape, p = 512) 164 / 165 / 170 ms.


def chol_block_size(p: int, preferred: int = CHOL_BLOCK) -> int:
    """The column block b of the stored factors: the largest divisor of p <= ``preferred``."""
    return block_size(p, preferred)


def chol_storage_rows(p: int, block: int) -> int:
    """Rows of the stored factor, b n (n + 1) / 2 with n = p / b: the p rows of the n
    diagonal blocks, then the p - (K + 1) b rows of each sub-diagonal slab K < n - 1."""
    n = p // block
    return block * n * (n + 1) // 2


def _slab_rows(p: int, block: int) -> list[int]:
    """Rows of the sub-diagonal slabs K = 0 .. n - 2 (they follow the diagonal blocks)."""
    return [p - (k + 1) * block for k in range(p // block - 1)]


def _slabs(blocks: torch.Tensor, p: int, block: int) -> tuple[torch.Tensor, ...]:
    """The n - 1 sub-diagonal slabs of column-blocked storage (or of its gradient), each a
    (p - (K + 1) b, d b) view."""
    return blocks[p:].view(-1, blocks.shape[1] * block).split(_slab_rows(p, block))


def strict_lower_mask(block: int, like: torch.Tensor) -> torch.Tensor:
    """1 below the diagonal of a b x b block, 0 on and above, shaped (1, b, 1, b) for the
    (n, b, d, b) diagonal blocks, with ``like``'s dtype and device.  The functions below
    build it per call unless given one (:class:`GPVAE` keeps it as a buffer)."""
    return torch.ones(block, block, dtype=like.dtype, device=like.device).tril_(-1).view(
        1, block, 1, block)


def _mask_for(block: int, like: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return strict_lower_mask(block, like)
    if mask.shape != (1, block, 1, block) or mask.dtype != like.dtype:
        raise ValueError(f"mask must be strict_lower_mask({block}) in {like.dtype}, got "
                         f"{tuple(mask.shape)} {mask.dtype}")
    return mask


def _check_blocked(log_diag: torch.Tensor, blocks: torch.Tensor, block: int) -> None:
    d, p = log_diag.shape
    if p % block or tuple(blocks.shape) != (chol_storage_rows(p, block), d, block):
        raise ValueError(f"blocked factors of shape {tuple(blocks.shape)} do not match "
                         f"log_diag {tuple(log_diag.shape)} with column block {block}")


def _diagonal_blocks(log_diag: torch.Tensor, blocks: torch.Tensor, block: int, mask):
    """The n triangular diagonal blocks of the L_j, (n, b, d, b) with [K, r, j, c] =
    L_j[K b + r, K b + c] (stored strictly-lower entries, exp(log_diag) on the diagonal,
    zero above), and exp(log_diag) (d, p)."""
    d, p = log_diag.shape
    n = p // block
    diag = torch.exp(log_diag)
    dg = blocks[:p].view(n, block, d, block) * mask
    dg.diagonal(dim1=1, dim2=3).copy_(diag.view(d, n, block).transpose(0, 1))
    return dg, diag


class _BlockedCholeskyQuadratic(torch.autograd.Function):
    """(q, f): q = psi^T L_j L_j^T psi (.., d) and f = sum_j ||L_j||_F^2 (scalar) for
    column-blocked factors; see :func:`blocked_cholesky_quadratic_form`.

    Forward: P[K] = psi_K @ D_K + psi[:, (K + 1) b:] @ S_K, (n, B, d b), with D_K the masked
    diagonal blocks (one batched product) and S_K the sub-diagonal slabs (accumulated in
    place), then q = the sum over K and the b columns of P^2.  Backward: G = 2 P dq;
    dpsi = [G[K] D_K^T]_K + sum_K G[K] S_K^T on psi[:, (K + 1) b:]; dD = psi_K^T G[K] (one
    batched product into the gradient's diagonal-block rows; its diagonals give
    d log_diag), dS_K = psi[:, (K + 1) b:]^T G[K] straight into the gradient's slab rows;
    then f's gradient 2 df L added in place and the unused entries zeroed.  (f rides along
    so that the KL of eq. 15 adds to the same gradient buffer instead of a second one.)
    """

    @staticmethod
    def forward(ctx, psi, log_diag, blocks, block, mask, with_frobenius):
        ctx.set_materialize_grads(False)
        d, p = log_diag.shape
        n, b = p // block, block
        lead = psi.shape[:-1]
        x = psi.reshape(-1, p).contiguous()
        rows = x.shape[0]
        dg, diag = _diagonal_blocks(log_diag, blocks, b, mask)
        proj = torch.bmm(x.view(rows, n, b).transpose(0, 1), dg.view(n, b, d * b))
        slab_part = blocks[p:].view(-1)
        for k, (out, slab) in enumerate(zip(proj.unbind(0), _slabs(blocks, p, b))):
            out.addmm_(x[:, (k + 1) * b:], slab)
        # sum of squares over the b columns (a norm: one pass, no temporary), then over the
        # n blocks
        q = torch.linalg.vector_norm(proj.view(n, rows * d, b), dim=-1).square_().sum(0)
        if with_frobenius:
            frob = dg.square().sum() + torch.dot(slab_part, slab_part)
        else:
            frob = blocks.new_zeros(())
        ctx.save_for_backward(x, diag, blocks, dg, proj, mask)
        ctx.block, ctx.lead = b, lead
        return q.view(*lead, d), frob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_frob):
        x, diag, blocks, dg, proj, mask = ctx.saved_tensors
        b = ctx.block
        d, p = diag.shape
        n, rows = p // b, x.shape[0]
        grad_psi = grad_log_diag = grad_blocks = None
        need_psi, need_log_diag, need_blocks = ctx.needs_input_grad[:3]
        if grad_q is not None:
            g = (proj.view(n, rows, d, b) * (2.0 * grad_q.reshape(1, rows, d, 1))).view(
                n, rows, d * b)
            gs = g.unbind(0)
        if need_psi:
            if grad_q is None:
                grad_psi = x.new_zeros(*ctx.lead, p)
            else:
                grad_psi = torch.bmm(g, dg.view(n, b, d * b).transpose(1, 2))  # (n, B, b)
                grad_psi = grad_psi.transpose(0, 1).reshape(rows, p)
                for k, slab in enumerate(_slabs(blocks, p, b)):
                    grad_psi[:, (k + 1) * b:].addmm_(gs[k], slab.t())
                grad_psi = grad_psi.view(*ctx.lead, p)
        if need_log_diag or need_blocks:
            if grad_q is None:
                grad_blocks = torch.zeros_like(blocks)
            else:
                grad_blocks = torch.empty_like(blocks)
                torch.bmm(x.view(rows, n, b).permute(1, 2, 0), g,
                          out=grad_blocks[:p].view(n, b, d * b))
                for k, out in enumerate(_slabs(grad_blocks, p, b)):
                    torch.mm(x[:, (k + 1) * b:].t(), gs[k], out=out)
            grad_dg = grad_blocks[:p].view(n, b, d, b)
            # the diagonal entries' gradient, before f's term touches the (unused) stored
            # diagonal; L_jkk = exp(log_diag_jk)
            grad_log_diag = grad_dg.diagonal(dim1=1, dim2=3).transpose(0, 1).reshape(d, p)
            if grad_frob is not None:  # d f / d L = 2 L
                grad2 = 2.0 * grad_frob
                grad_log_diag = grad_log_diag + grad2 * diag
                grad_blocks.addcmul_(blocks, grad2)
            grad_log_diag = grad_log_diag * diag
            grad_dg.mul_(mask)  # unused entries: no gradient
            if not need_log_diag:
                grad_log_diag = None
            if not need_blocks:
                grad_blocks = None
        return grad_psi, grad_log_diag, grad_blocks, None, None, None


def _quadratic_and_frobenius(psi, log_diag, blocks, block, mask=None, with_frobenius=True):
    """(psi^T L_j L_j^T psi (..., d), sum_j ||L_j||_F^2) from column-blocked factors (the
    second a constant 0 unless ``with_frobenius``)."""
    _check_blocked(log_diag, blocks, block)
    blocks = blocks.contiguous()  # (a no-op for the model's parameters)
    return _BlockedCholeskyQuadratic.apply(psi, log_diag, blocks, block,
                                           _mask_for(block, blocks, mask), with_frobenius)


def blocked_cholesky_quadratic_form(psi: torch.Tensor, log_diag: torch.Tensor,
                                    blocks: torch.Tensor, block: int,
                                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """psi^T (L_j L_j^T) psi = ||L_j^T psi||^2 for every j, from column-blocked factors.

    Args:
        psi: features (..., p).
        log_diag: log of the diagonals of the L_j, (d, p).
        blocks: the stored strictly-lower parts (:func:`chol_storage_rows`, d, b) in the
            column-blocked layout of the module docstring; entries on and above the
            diagonal of the diagonal blocks are ignored and get zero gradient.
        block: the column block b (a divisor of p).
        mask: optionally, :func:`strict_lower_mask` ``(block, blocks)``, precomputed.
    Returns:
        (..., d).  Cost: one batched (n, rows, b) @ (n, b, d b) product for the diagonal
        blocks and n - 1 products (rows, p - (K + 1) b) @ (p - (K + 1) b, d b), i.e.
        (n + 1) / (2 n) of :func:`cholesky_quadratic_form`'s multiply-adds, forward and
        backward; no dense factor is formed.  Not twice differentiable.
    """
    return _quadratic_and_frobenius(psi, log_diag, blocks, block, mask, False)[0]


class _BlockedFrobenius(torch.autograd.Function):
    """||L_j||_F^2 summed over j from column-blocked storage: the used (strictly-lower)
    stored entries squared plus exp(2 log_diag)."""

    @staticmethod
    def forward(ctx, log_diag, blocks, block, mask):
        d, p = log_diag.shape
        slabs = blocks[p:].reshape(-1)
        total = ((blocks[:p].view(p // block, block, d, block) * mask).square().sum()
                 + torch.dot(slabs, slabs) + torch.exp(2.0 * log_diag).sum())
        ctx.save_for_backward(log_diag, blocks, mask)
        ctx.block = block
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        log_diag, blocks, mask = ctx.saved_tensors
        d, p = log_diag.shape
        b = ctx.block
        grad2 = 2.0 * grad
        grad_blocks = blocks * grad2
        grad_blocks[:p].view(p // b, b, d, b).mul_(mask)
        return torch.exp(2.0 * log_diag) * grad2, grad_blocks, None, None


def blocked_frobenius(log_diag: torch.Tensor, blocks: torch.Tensor, block: int,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j ||L_j||_F^2 = sum_j tr Sigma_j of column-blocked factors (scalar); unused
    entries are ignored and get zero gradient."""
    _check_blocked(log_diag, blocks, block)
    blocks = blocks.contiguous()
    return _BlockedFrobenius.apply(log_diag, blocks, block, _mask_for(block, blocks, mask))


def blocked_to_dense(log_diag: torch.Tensor, blocks: torch.Tensor, block: int) -> torch.Tensor:
    """The lower-triangular factors L (d, p, p) of column-blocked storage (differentiable;
    a loop over the n column blocks -- for tests and the packed form)."""
    _check_blocked(log_diag, blocks, block)
    blocks = blocks.contiguous()
    d, p = log_diag.shape
    dg, _ = _diagonal_blocks(log_diag, blocks, block, strict_lower_mask(block, blocks))
    slabs = blocks[p:].split(_slab_rows(p, block)) + (blocks.new_zeros(0, d, block),)
    cols = [torch.cat([blocks.new_zeros(k * block, d, block), dg[k], slab], 0)
            for k, slab in enumerate(slabs)]  # column block k: zeros, diagonal block, slab
    return torch.cat(cols, -1).permute(1, 0, 2)  # (p, d, p) -> (d, p, p)


def dense_to_blocked(chol: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_diag (d, p), blocks) storing lower-triangular factors ``chol`` (d, p, p) with a
    positive diagonal: the inverse of :func:`blocked_to_dense` (unused entries zero)."""
    d, p, _ = chol.shape
    n = p // block
    stacked = chol.permute(1, 0, 2)  # [l, j, k] = L_j[l, k]
    diag_blocks = torch.stack([stacked[k * block:(k + 1) * block, :, k * block:(k + 1) * block]
                               for k in range(n)])
    diag_blocks = (diag_blocks * strict_lower_mask(block, chol)).reshape(p, d, block)
    slabs = [stacked[(k + 1) * block:, :, k * block:(k + 1) * block] for k in range(n - 1)]
    blocks = torch.cat([diag_blocks, *slabs], 0).contiguous()
    log_diag = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).contiguous()
    return log_diag, blocks


def stacked_blocked_quadratic_forms(psi_m: torch.Tensor, psi_s: torch.Tensor,
                                    diag_blocks: torch.Tensor, slabs: list[torch.Tensor],
                                    block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both quadratic forms of eq. (13), psi^m^T Sigma_j psi^m and psi^s^T Gamma_j psi^s, each
    (B, d), from column-blocked factors with their diagonal blocks precomputed: the 2n
    diagonal blocks of [L; M] (``diag_blocks``, (2n, b, d b), as :func:`_diagonal_blocks`
    gives them) in one batched product, then the 2(n - 1) sub-diagonal slabs (``slabs``: the
    n - 1 slabs of L, then those of M, each (p - (K + 1) b, d b)) added in place.  The same
    arithmetic as two :func:`blocked_cholesky_quadratic_form` calls, without autograd (for
    inference and the exported encoder)."""
    rows, p = psi_m.shape
    n = p // block
    d = diag_blocks.shape[-1] // block
    feats = torch.cat([psi_m, psi_s], 1)  # (B, 2p): 2n column blocks
    proj = torch.bmm(feats.view(rows, 2 * n, block).transpose(0, 1), diag_blocks)
    for k in range(n - 1):
        proj[k].addmm_(psi_m[:, (k + 1) * block:], slabs[k])
        proj[n + k].addmm_(psi_s[:, (k + 1) * block:], slabs[n - 1 + k])
    sq = torch.linalg.vector_norm(proj.view(2 * n, rows, d, block), dim=-1).square()
    return sq[:n].sum(0), sq[n:].sum(0)


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
        """The :func:`symmetric_packed` Sigma_j, Gamma_j of the "packed" form (the "chol"
        form reads the stored blocks in place), rebuilt on every call (d p^3 multiply-adds:
        this form is kept for comparison, not for speed)."""
        # (d, P b^2) views of (P b^2, d)-contiguous tensors: packed_quadratic_form's
        # product then reads its right operand contiguous
        return tuple(symmetric_packed(c).T.contiguous().T for c in self.cholesky_factors())

    def _inference_operands(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The operands of :func:`stacked_blocked_quadratic_forms`: the diagonal blocks of
        L_j and M_j, (2n, b, d b), and their 2(n - 1) slabs (views of the stored factors).

        Built from the parameters on every call, never cached: building them is
        element-wise work on 2 p d b numbers, small next to the (B, p) @ (p, d b) products
        of one q(z|x), and a cache keyed on parameter versions goes stale silently under optimizers that write parameters without
        bumping their version counters (the fused Adam of :func:`gpvae.training.make_adam`
        does exactly that)."""
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
        """b(x), c(x) (B, d) and psi^m(x), psi^s(x) (B, p)."""
        b, c = self.encoder(x)
        return {"b": b, "c": c, "psi_m": self.psi_m(x), "psi_s": self.psi_s(x)}

    def moments(self, x: torch.Tensor, form: str = "chol") -> dict[str, torch.Tensor]:
        """Everything eqs. (13) and (16) need, each (B, d):

        * ``m``: b + mu psi^m; ``v``: the variance of eq. (13);
        * ``a`` = c + eta psi^s and ``s2`` = psi^s^T Gamma_j psi^s: mean and variance of
          the random standard deviation h_j(x) = c_j + u_j^T psi^s under q(U);
        * ``qm`` = psi^m^T Sigma_j psi^m: the variance of f_j(x) under q(W).

        ``form``: "chol" (the stored factor blocks read in place:
        :func:`blocked_cholesky_quadratic_form` with gradients,
        :func:`stacked_blocked_quadratic_forms` without) or
        "packed" (:func:`packed_quadratic_form` with Sigma_j precomputed; slower, kept for
        comparison).
        """
        return self._moments(x, form)[0]

    def _moments(self, x: torch.Tensor, form: str, with_kl_wu: bool = False):
        """(:meth:`moments`, :meth:`kl_wu` or None): with the "chol" form the KL's
        ||L_j||_F^2 comes out of the quadratic forms' pass, sharing its gradient buffers."""
        if form not in QUADRATIC_FORMS:
            raise ValueError(f"unknown form {form!r}; choose from {', '.join(QUADRATIC_FORMS)}")
        feats = self.features(x)
        psi_m, psi_s = feats["psi_m"], feats["psi_s"]
        m = torch.addmm(feats["b"], psi_m, self.mu.T)
        a = torch.addmm(feats["c"], psi_s, self.eta.T)
        kl_wu = None
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (psi_m, psi_s, self.sigma_offdiag, self.sigma_log_diag,
                                      self.gamma_offdiag, self.gamma_log_diag))
        if form == "chol" and not with_kl_wu and not needs_grad:
            # inference: both forms in one product (the same arithmetic)
            diag_blocks, slabs = self._inference_operands()
            qm, s2 = stacked_blocked_quadratic_forms(psi_m, psi_s, diag_blocks, slabs,
                                                     self.chol_block)
        elif form == "chol":
            qm, tr_sigma = _quadratic_and_frobenius(psi_m, self.sigma_log_diag,
                                                    self.sigma_offdiag, self.chol_block,
                                                    self._chol_mask, with_kl_wu)
            s2, tr_gamma = _quadratic_and_frobenius(psi_s, self.gamma_log_diag,
                                                    self.gamma_offdiag, self.chol_block,
                                                    self._chol_mask, with_kl_wu)
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
        without gradients (faster than the packed form at every d measured; see
        ``PACK_BLOCK``)."""
        m, v = self.marginal_moments(x, "chol")
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
        mom, kl_wu = self._moments(x, "chol", with_kl_wu=True)
        z = Independent(Normal(mom["m"], mom["v"].sqrt()), 1).rsample()
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
    :func:`blocked_cholesky_quadratic_form` with its diagonal blocks precomputed (exp of the
    log-diagonal put in, the unused upper triangle zeroed) and L_j, M_j side by side: one
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
