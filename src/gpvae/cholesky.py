"""Column-blocked Cholesky factors and the batched quadratic forms of the GPVAE's eq. (13).

The GPVAE (:mod:`gpvae.models.gpvae`) needs, for every image and every latent dimension
j = 1..d, the quadratic forms psi^T Sigma_j psi with Sigma_j = L_j L_j^T (and the same with
Gamma_j = M_j M_j^T), and for its global KL sum_j ||L_j||_F^2.  This module computes them
without a loop over j.

Storage
-------
Each factor is stored as the log of its diagonal (d, p) -- diag = exp(log_diag) > 0,
log det Sigma_j = 2 sum(log_diag_j) -- and its strictly-lower part in a *column-blocked*
layout: the p columns are split into n blocks of b (``CHOL_BLOCK``), and column block K
keeps only the rows l >= K b that can be non-zero, all j together: its b x b diagonal
block D_K[r, j, c] = L_j[K b + r, K b + c] and the (p - (K + 1) b, d, b) slab below it,
S_K[r, j, c] = L_j[(K + 1) b + r, K b + c].  One (b n (n + 1) / 2, d, b) tensor per
factor holds D_0 .. D_{n-1} (its first p rows) and then S_0 .. S_{n-2}
(:func:`chol_storage_rows`), so every operand of the quadratic form is a free view.  The
entries of the D_K on and above their diagonal (r <= c) are unused: masked to zero (the
diagonal comes from log_diag), with zero gradient, not counted in the KL --
b (b + 1) / 2 d numbers per block, ~12% of the factor for b = 32, p = 256.

Quadratic forms
---------------
psi^T Sigma_j psi = ||L_j^T psi||^2, and column block K of all the L_j^T psi is
psi_K @ D_K + psi[:, (K + 1) b:] @ S_K, (B, b) @ (b, d b) plus
(B, p - (K + 1) b) @ (p - (K + 1) b, d b) -- the rows above the block are zero and
skipped, so the products (one batched product for all the D_K, then a loop over the
feature blocks, not over j) do (n + 1) / (2 n) of the dense (B, p) @ (p, d p) product's
multiply-adds, forward and backward (:func:`blocked_cholesky_quadratic_form`, a custom
autograd function that reads the stored blocks in place and writes their gradient in
place: no dense factor is built while training; the same pass gives the
sum_j ||L_j||_F^2 of the global KL, whose gradient it adds to the same buffer).
Under :func:`torch.func.vmap` over a leading replica dimension (packed training,
:mod:`gpvae.packing`) the same products run for all replicas at once
(:class:`_StackedBlockedCholeskyQuadratic`, the function's vmap rule).
:func:`cholesky_quadratic_form` is the same form for dense factors (d, p, p)
(:func:`blocked_to_dense`, :func:`dense_to_blocked` convert).  Without gradients both
forms of eq. (13) are computed together (:func:`stacked_blocked_quadratic_forms`).  The
symmetric packed form (:func:`symmetric_packed`, :func:`packed_quadratic_form`) with
Sigma_j precomputed needs about as many multiply-adds but is the slower one
(``PACK_BLOCK``); it is kept for comparison.

Under bfloat16 autocast (``--precision bf16``) the quadratic forms, forward and backward,
run in float32 with autocast off (:func:`gpvae.precision.fp32_function`): the same numbers
as without autocast (the rest is element-wise work and sums, which autocast leaves in the
dtype of their float32 operands).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .onednn import linear_kernel, onednn_applies
from .precision import fp32_function  # FP32 islands under autocast (gpvae.precision)


# --------------------------------------------------------------------------------------
# Batched quadratic forms psi^T Sigma_j psi, j = 1..d (no loop over j)
# --------------------------------------------------------------------------------------
@fp32_function
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
# (56% vs 53% of the dense form's for b = 32, p = 256: counted, not timed) but first forms
# the block outer products of psi, a (B, P b^2) temporary that falls out of cache.  It was
# the slower form at every d measured, alone (`gpvae bench-quadratic`) and within a whole
# q(z|x) pass (`gpvae bench-inference`): see docs/benchmarks.md.  So inference uses the
# blocked form; the packed form stays available (``form="packed"``) for comparison.


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


@fp32_function
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
# smaller products.  b = 32 was chosen from one-off CPU timings of b = 16, 32, 64 (one
# quadratic form forward + backward, and a whole training step, `gpvae bench-train`, at
# p = 256 and 512); the figures belong in docs/benchmarks.md, not here.


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

    Written for torch.func (forward without ctx, :meth:`setup_context`): the intermediates
    backward needs (exp(log_diag), the D_K, P) are extra, non-differentiable outputs that
    the caller drops.  Under :func:`torch.func.vmap` (packed training,
    :mod:`gpvae.packing`) :meth:`vmap` runs all replicas through
    :class:`_StackedBlockedCholeskyQuadratic`, the same products with a replica dimension.
    """

    @staticmethod
    def forward(psi, log_diag, blocks, block, mask, with_frobenius):
        d, p = log_diag.shape
        n, b = p // block, block
        x = psi.reshape(-1, p).contiguous()
        rows = x.shape[0]
        dg, diag = _diagonal_blocks(log_diag, blocks, b, mask)
        slab_part = blocks[p:].view(-1)
        if onednn_applies(x, dg, blocks):  # a CPU in float32: oneDNN, block by block
            proj = torch.stack(list(_column_block_projections(
                linear_kernel(x, dg), x, dg.view(n, b, d * b), _slabs(blocks, p, b), b)))
        else:
            proj = torch.bmm(x.view(rows, n, b).transpose(0, 1), dg.view(n, b, d * b))
            for k, (out, slab) in enumerate(zip(proj.unbind(0), _slabs(blocks, p, b))):
                out.addmm_(x[:, (k + 1) * b:], slab)
        # sum of squares over the b columns (a norm: one pass, no temporary), then over the
        # n blocks
        q = torch.linalg.vector_norm(proj.view(n, rows * d, b), dim=-1).square_().sum(0)
        if with_frobenius:
            frob = dg.square().sum() + torch.dot(slab_part, slab_part)
        else:
            frob = blocks.new_zeros(())
        return q.view(*psi.shape[:-1], d), frob, diag, dg, proj

    @staticmethod
    def setup_context(ctx, inputs, output):
        psi, _, blocks, block, mask, _ = inputs
        _, _, diag, dg, proj = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(diag, dg, proj)
        ctx.save_for_backward(psi, diag, blocks, dg, proj, mask)
        ctx.block = block

    @staticmethod
    @fp32_function
    @once_differentiable
    def backward(ctx, grad_q, grad_frob, *_):
        psi, diag, blocks, dg, proj, mask = ctx.saved_tensors
        b = ctx.block
        d, p = diag.shape
        lead = psi.shape[:-1]
        x = psi.reshape(-1, p).contiguous()  # as forward had it (a view, if psi is contiguous)
        n, rows = p // b, x.shape[0]
        grad_psi = grad_log_diag = grad_blocks = None
        need_psi, need_log_diag, need_blocks = ctx.needs_input_grad[:3]
        if grad_q is not None:
            g = (proj.view(n, rows, d, b) * (2.0 * grad_q.reshape(1, rows, d, 1))).view(
                n, rows, d * b)
            gs = g.unbind(0)
        onednn = grad_q is not None and onednn_applies(x, g, dg, blocks)
        linear = linear_kernel(x, g) if onednn else None
        if need_psi:
            if grad_q is None:
                grad_psi = x.new_zeros(*lead, p)
            elif onednn:  # a CPU in float32: oneDNN, block by block (as forward)
                dgv = dg.view(n, b, d * b)
                grad_psi = torch.cat([linear(gs[k], dgv[k]) for k in range(n)], 1)
                for k, slab in enumerate(_slabs(blocks, p, b)):
                    grad_psi[:, (k + 1) * b:].add_(linear(gs[k], slab))
                grad_psi = grad_psi.view(*lead, p)
            else:
                grad_psi = torch.bmm(g, dg.view(n, b, d * b).transpose(1, 2))  # (n, B, b)
                grad_psi = grad_psi.transpose(0, 1).reshape(rows, p)
                for k, slab in enumerate(_slabs(blocks, p, b)):
                    grad_psi[:, (k + 1) * b:].addmm_(gs[k], slab.t())
                grad_psi = grad_psi.view(*lead, p)
        if need_log_diag or need_blocks:
            if grad_q is None:
                grad_blocks = torch.zeros_like(blocks)
            elif onednn:  # psi_K^T G[K] and psi[:, (K + 1) b:]^T G[K], from psi^T once
                grad_blocks = torch.empty_like(blocks)
                xt = x.t().contiguous()
                for k, out in enumerate(grad_blocks[:p].view(n, b, d * b).unbind(0)):
                    out.copy_(linear(xt[k * b:(k + 1) * b], gs[k].mT))
                for k, out in enumerate(_slabs(grad_blocks, p, b)):
                    out.copy_(linear(xt[(k + 1) * b:], gs[k].mT))
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

    @staticmethod
    def vmap(info, in_dims, psi, log_diag, blocks, block, mask, with_frobenius):
        """All replicas in one :class:`_StackedBlockedCholeskyQuadratic` pass (an operand
        without the replica dimension is shared by all replicas: expanded; the mask, which
        only broadcasts, is used as given)."""
        psi, log_diag, blocks = (_replicas_first(t, dim, info.batch_size)
                                 for t, dim in zip((psi, log_diag, blocks), in_dims))
        if in_dims[4] is not None:  # e.g. the model's buffer, stacked: (R, 1, b, 1, b)
            mask = mask.movedim(in_dims[4], 0)
        out = _StackedBlockedCholeskyQuadratic.apply(psi, log_diag, blocks.contiguous(), block,
                                                     mask, with_frobenius)
        return out, (0,) * len(out)


def _replicas_first(t: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """A vmap rule's operand with the vmapped (replica) dimension first; one without it
    (``dim`` None: the same for every replica) expanded to ``size`` replicas."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _stacked_slabs(blocks: torch.Tensor, p: int, block: int) -> tuple[torch.Tensor, ...]:
    """:func:`_slabs` with a leading replica dimension: (R, p - (K + 1) b, d b) views."""
    reps, _, d, _ = blocks.shape
    return blocks[:, p:].reshape(reps, -1, d * block).split(_slab_rows(p, block), dim=1)


class _StackedBlockedCholeskyQuadratic(torch.autograd.Function):
    """:class:`_BlockedCholeskyQuadratic` for R replicas at once (its vmap rule): psi
    (R, ..., p), log_diag (R, d, p), blocks (R, rows, d, b), mask (1, b, 1, b) or one per
    replica (R, 1, b, 1, b) -> q (R, ..., d) and the R Frobenius terms (R,), plus the
    intermediates for backward.  The same products with a leading replica dimension: the
    diagonal blocks of all replicas in one batched product, each sub-diagonal slab as one
    ``baddbmm`` over replicas (forward and backward).  No vmap rule of its own: a vmap
    inside the packed step's is refused by torch.func."""

    @staticmethod
    def forward(psi, log_diag, blocks, block, mask, with_frobenius):
        reps, d, p = log_diag.shape
        n, b = p // block, block
        x = psi.reshape(reps, -1, p).contiguous()
        rows = x.shape[1]
        diag = torch.exp(log_diag)
        dg = blocks[:, :p].reshape(reps, n, b, d, b) * mask
        dg.diagonal(dim1=2, dim2=4).copy_(diag.view(reps, d, n, b).transpose(1, 2))
        xb = x.view(reps, rows, n, b).transpose(1, 2)  # (R, n, rows, b)
        proj = torch.matmul(xb, dg.view(reps, n, b, d * b))  # (R, n, rows, d b)
        for k, slab in enumerate(_stacked_slabs(blocks, p, b)):
            proj[:, k].baddbmm_(x[:, :, (k + 1) * b:], slab)
        q = torch.linalg.vector_norm(proj.view(reps, n, rows * d, b), dim=-1).square_().sum(1)
        if with_frobenius:
            slab_part = blocks[:, p:].reshape(reps, -1)
            frob = (dg.square().sum((1, 2, 3, 4))
                    + torch.linalg.vecdot(slab_part, slab_part))
        else:
            frob = blocks.new_zeros(reps)
        return q.view(*psi.shape[:-1], d), frob, diag, dg, proj

    @staticmethod
    def setup_context(ctx, inputs, output):
        _BlockedCholeskyQuadratic.setup_context(ctx, inputs, output)  # the same saved tensors

    @staticmethod
    @fp32_function
    @once_differentiable
    def backward(ctx, grad_q, grad_frob, *_):
        psi, diag, blocks, dg, proj, mask = ctx.saved_tensors
        b = ctx.block
        reps, d, p = diag.shape
        lead = psi.shape[1:-1]
        x = psi.reshape(reps, -1, p).contiguous()
        n, rows = p // b, x.shape[1]
        grad_psi = grad_log_diag = grad_blocks = None
        need_psi, need_log_diag, need_blocks = ctx.needs_input_grad[:3]
        if grad_q is not None:
            g = (proj.view(reps, n, rows, d, b)
                 * (2.0 * grad_q.reshape(reps, 1, rows, d, 1))).view(reps, n, rows, d * b)
        if need_psi:
            if grad_q is None:
                grad_psi = x.new_zeros(reps, *lead, p)
            else:
                grad_psi = torch.matmul(g, dg.view(reps, n, b, d * b).transpose(-1, -2))
                grad_psi = grad_psi.transpose(1, 2).reshape(reps, rows, p)
                for k, slab in enumerate(_stacked_slabs(blocks, p, b)):
                    grad_psi[:, :, (k + 1) * b:].baddbmm_(g[:, k], slab.transpose(1, 2))
                grad_psi = grad_psi.view(reps, *lead, p)
        if need_log_diag or need_blocks:
            if grad_q is None:
                grad_blocks = torch.zeros_like(blocks)
            else:
                grad_blocks = torch.empty_like(blocks)
                xb = x.view(reps, rows, n, b).permute(0, 2, 3, 1)  # (R, n, b, rows)
                grad_blocks[:, :p].view(reps, n, b, d * b).copy_(torch.matmul(xb, g))
                for k, out in enumerate(_stacked_slabs(grad_blocks, p, b)):
                    out.copy_(torch.bmm(x[:, :, (k + 1) * b:].transpose(1, 2), g[:, k]))
            grad_dg = grad_blocks[:, :p].view(reps, n, b, d, b)
            grad_log_diag = grad_dg.diagonal(dim1=2, dim2=4).transpose(1, 2).reshape(reps, d, p)
            if grad_frob is not None:  # d f / d L = 2 L
                grad2 = 2.0 * grad_frob
                grad_log_diag = grad_log_diag + grad2.view(reps, 1, 1) * diag
                grad_blocks.addcmul_(blocks, grad2.view(reps, 1, 1, 1))
            grad_log_diag = grad_log_diag * diag
            grad_dg.mul_(mask)  # unused entries: no gradient
            if not need_log_diag:
                grad_log_diag = None
            if not need_blocks:
                grad_blocks = None
        return grad_psi, grad_log_diag, grad_blocks, None, None, None


@fp32_function
def _quadratic_and_frobenius(psi, log_diag, blocks, block, mask=None, with_frobenius=True):
    """(psi^T L_j L_j^T psi (..., d), sum_j ||L_j||_F^2) from column-blocked factors (the
    second a constant 0 unless ``with_frobenius``)."""
    _check_blocked(log_diag, blocks, block)
    blocks = blocks.contiguous()  # (a no-op for the model's parameters)
    return _BlockedCholeskyQuadratic.apply(psi, log_diag, blocks, block,
                                           _mask_for(block, blocks, mask), with_frobenius)[:2]


@fp32_function
def dense_quadratic_and_frobenius(psi, log_diag, blocks, block, with_frobenius=True):
    """The (q, f) of :func:`_quadratic_and_frobenius` through the dense factors:
    L = :func:`blocked_to_dense` (differentiable: the gradient reaches the stored blocks, zero
    on their unused entries), q = :func:`cholesky_quadratic_form` (psi, L), one (B, p) @
    (p, d p) product (two more in the backward pass), f = sum_j ||L_j||_F^2 (a constant 0
    unless ``with_frobenius``).  About twice the blocked form's multiply-adds, in three large
    products instead of about 3n small ones, plus forming L: an execution choice for
    hardware where few large products beat many small ones (a GPU: docs/benchmarks.md, "On
    a GPU"); :meth:`gpvae.models.gpvae.GPVAE.use_dense_quadratic_forms`."""
    _check_blocked(log_diag, blocks, block)
    chol = blocked_to_dense(log_diag, blocks, block)
    q = cholesky_quadratic_form(psi, chol)
    return q, (chol.square().sum() if with_frobenius else q.new_zeros(()))


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
    stored entries squared plus exp(2 log_diag).  Under :func:`torch.func.vmap`, one call
    per replica (:meth:`vmap`)."""

    @staticmethod
    def forward(log_diag, blocks, block, mask):
        d, p = log_diag.shape
        slabs = blocks[p:].reshape(-1)
        return ((blocks[:p].view(p // block, block, d, block) * mask).square().sum()
                + torch.dot(slabs, slabs) + torch.exp(2.0 * log_diag).sum())

    @staticmethod
    def setup_context(ctx, inputs, output):
        log_diag, blocks, block, mask = inputs
        ctx.save_for_backward(log_diag, blocks, mask)
        ctx.block = block

    @staticmethod
    @fp32_function
    @once_differentiable
    def backward(ctx, grad):
        log_diag, blocks, mask = ctx.saved_tensors
        d, p = log_diag.shape
        b = ctx.block
        grad2 = 2.0 * grad
        grad_blocks = blocks * grad2
        grad_blocks[:p].view(p // b, b, d, b).mul_(mask)
        return torch.exp(2.0 * log_diag) * grad2, grad_blocks, None, None

    @staticmethod
    def vmap(info, in_dims, log_diag, blocks, block, mask):
        """Each replica's own call (a scalar per replica: a loop costs little), stacked."""
        args = (log_diag, blocks, block, mask)
        return torch.stack([
            _BlockedFrobenius.apply(*(a.select(dim, i) if dim is not None else a
                                      for a, dim in zip(args, in_dims)))
            for i in range(info.batch_size)]), 0


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


@fp32_function
def stacked_blocked_quadratic_forms(psi_m: torch.Tensor, psi_s: torch.Tensor,
                                    diag_blocks: torch.Tensor, slabs: list[torch.Tensor],
                                    block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both quadratic forms of eq. (13), psi^m^T Sigma_j psi^m and psi^s^T Gamma_j psi^s, each
    (B, d), from column-blocked factors with their diagonal blocks precomputed: the 2n
    diagonal blocks of [L; M] (``diag_blocks``, (2n, b, d b), as :func:`_diagonal_blocks`
    gives them) in one batched product, then the 2(n - 1) sub-diagonal slabs (``slabs``: the
    n - 1 slabs of L, then those of M, each (p - (K + 1) b, d b)) added in place.  The same
    arithmetic as two :func:`blocked_cholesky_quadratic_form` calls, without autograd (for
    inference and the exported encoder).

    On a CPU in float32 (:func:`gpvae.onednn.onednn_applies`) the products run on oneDNN
    instead, column block by column block (:func:`_quadratic_forms_by_column_block`): the
    same sums, another kernel (docs/benchmarks.md)."""
    rows, p = psi_m.shape
    n = p // block
    d = diag_blocks.shape[-1] // block
    if onednn_applies(psi_m, psi_s, diag_blocks, *slabs):
        return _quadratic_forms_by_column_block(psi_m, psi_s, diag_blocks, slabs, block)
    feats = torch.cat([psi_m, psi_s], 1)  # (B, 2p): 2n column blocks
    proj = torch.bmm(feats.view(rows, 2 * n, block).transpose(0, 1), diag_blocks)
    for k in range(n - 1):
        proj[k].addmm_(psi_m[:, (k + 1) * block:], slabs[k])
        proj[n + k].addmm_(psi_s[:, (k + 1) * block:], slabs[n - 1 + k])
    sq = torch.linalg.vector_norm(proj.view(2 * n, rows, d, block), dim=-1).square()
    return sq[:n].sum(0), sq[n:].sum(0)


def _quadratic_forms_by_column_block(psi_m, psi_s, diag_blocks, slabs, block):
    """:func:`stacked_blocked_quadratic_forms` one column block K at a time: P_K = psi_K D_K
    + psi[:, (K + 1) b:] S_K as two oneDNN products (the weights read transposed in place:
    D_K and S_K are contiguous), then its squared column sums added to q.  No (2n, B, d b)
    intermediate, no batched product: on the CPU MKL runs these (B, k) @ (k, d b) shapes
    well below oneDNN's rate (:mod:`gpvae.onednn`)."""
    linear = linear_kernel(psi_m, diag_blocks)
    rows, p = psi_m.shape
    n = p // block
    d = diag_blocks.shape[-1] // block
    forms = []
    for form, psi in enumerate((psi_m, psi_s)):
        total = None
        for proj in _column_block_projections(linear, psi, diag_blocks[form * n:(form + 1) * n],
                                              slabs[form * (n - 1):(form + 1) * (n - 1)], block):
            proj = proj.view(rows, d, block)
            sq = torch.linalg.vecdot(proj, proj)  # (B, d): this block's share of q
            total = sq if total is None else total.add_(sq)
        forms.append(total)
    return forms[0], forms[1]


def _column_block_projections(linear, psi, diag_blocks, slabs, block):
    """P_K = psi_K D_K + psi[:, (K + 1) b:] S_K, (B, d b), for K = 0 .. n - 1, each as two
    products ``linear(x, W) = x W^T`` with the weights read transposed in place (D_K, (b,
    d b), and S_K, (p - (K + 1) b, d b), are contiguous)."""
    n = len(diag_blocks)
    for k in range(n):
        proj = linear(psi[:, k * block:(k + 1) * block], diag_blocks[k].mT)
        if k < n - 1:
            proj.add_(linear(psi[:, (k + 1) * block:], slabs[k].mT))
        yield proj


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
