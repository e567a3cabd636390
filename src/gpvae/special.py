"""Special functions for the GPVAE objective.

The Gaussian-averaged KL of paper eq. (16) contains

    E_{N(u_j; eta_j, Gamma_j)}[ log (c_j(x) + u_j^T psi^s(x))^2 ] = E[log X^2],
    X ~ N(a, s2),  a = c_j + eta_j^T psi^s,  s2 = psi^s^T Gamma_j psi^s.

The paper estimates it by reparameterised Monte Carlo (below eq. 16) and notes that a
closed form exists via a confluent hypergeometric function (Lloyd et al., 2015).  This
module provides both (:func:`expected_log_square`).

Closed form
-----------
X^2 = s2 * chi'^2_1(lambda) with non-centrality lambda = a^2/s2.  A non-central chi-square
with one degree of freedom is a Poisson(lambda/2) mixture of central chi-squares with
1 + 2i degrees of freedom, and E[log chi^2_k] = log 2 + psi(k/2), so with t = lambda/2 =
a^2/(2 s2)

    E[log X^2] = log(2 s2) + G(t),    G(t) = sum_i Pois(i; t) psi(i + 1/2).          (A)

Facts used (all checked numerically in ``tests/test_special.py``):

* dG/dt = sum_i Pois(i; t) / (i + 1/2) = 2 F(r) / r,   r = sqrt(t),  F = Dawson's function.
  (E_Pois[1/(i+1/2)] = 2 int_0^1 e^{-t(1-y^2)} dy.)  At t = 0 it equals 2.
* Hence G(t) = psi(1/2) + 4 int_0^r F(rho) d rho, a smooth function of r.
* For large t, from F(y) ~ sum_n (2n-1)!! / (2^{n+1} y^{2n+1}):

      E[log X^2] = log a^2 - sum_{n>=1} c_n / t^n,  c_n = (2n-1)!! / (2^n n)
                 = log a^2 - 1/(2 r^2) - 3/(8 r^4) - 5/(8 r^6) - ...                  (B)

      t dG/dt ~ sum_{n>=0} d_n / t^n,  d_n = (2n-1)!! / 2^n.

Numerics
--------
* t < 40: the Poisson series (A) written with positive terms only,
  G(t) = psi(1/2) + sum_{i<128} Pois(i; t) H_i, H_i = psi(i+1/2) - psi(1/2) =
  sum_{k<i} 1/(k+1/2) >= 0.  The Poisson tail beyond i = 127 is < 1e-25 for t < 40.
  The weights are the running product e^{-t} prod_{k<=i} t/k (no 0 log 0 at t = 0; ~1
  ulp per factor, where exp(i log t - t - lgamma(i+1)) loses ~1e-14 at t ~ 40).
* t >= 40: the asymptotic series (B) with 30 terms; its truncation error at t = 40 is
  ~1e-18, below float64 resolution.  (B) is written through log a^2 and 1/t = 2 s2/a^2,
  so it stays finite at s2 = 0 (where E[log X^2] = log a^2 exactly) -- the case
  Sigma = Gamma = 0 that reduces the GPVAE to the VAE.
* Everything is evaluated in float64 internally (float32 on MPS, which has no float64)
  and cast back to the input dtype, so float32 inputs get float32-rounded exact values.
  Under autocast, float16 / bfloat16 inputs are cast to float32 first and autocast is off
  (:func:`gpvae.precision.fp32_function`), so the result is float32.
* Gradients come from a custom :class:`torch.autograd.Function` with the analytic
  derivatives, computed branch by branch, never through 0 * log 0 or i / t:

      dE/da  = dG/dt * a / s2           = (2/a) * t dG/dt       (finite; 0 at a = 0)
      dE/ds2 = (1 - t dG/dt) / s2       = -(2/a^2) sum_{n>=1} d_n / t^{n-1}   (large t)

  with, in the Poisson branch, 1 - t dG/dt = Pois(0; t) - sum_{i>=1} Pois(i; t)/(2i-1)
  (from t Pois(i; t) = (i+1) Pois(i+1; t)): a difference of two non-negative sums
  instead of 1 minus a number close to 1 (which cost ~1e-12 at t ~ 40).

  They are first-order only (``once_differentiable``).

Accuracy: ``tests/test_special.py`` checks the value (1e-10) and the derivatives (1e-9)
against scipy quadrature of the defining integral.  A one-off comparison with a
high-precision (mpmath) evaluation of (A) is quoted, with how it was obtained, in
docs/benchmarks.md ("Choices measured once").
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from .precision import fp32_function  # FP32 under autocast (gpvae.precision)

__all__ = ["expected_log_square", "PSI_HALF", "T_SWITCH", "N_POISSON", "N_ASYMPTOTIC"]

#: psi(1/2) = -gamma - 2 log 2
PSI_HALF = -0.5772156649015329 - 2.0 * math.log(2.0)
#: switch from the Poisson series (A) to the asymptotic series (B) at t = a^2/(2 s2) = T_SWITCH
T_SWITCH = 40.0
#: number of Poisson terms i = 0..N_POISSON-1 used for t < T_SWITCH
N_POISSON = 128
#: number of terms of the asymptotic series (B) used for t >= T_SWITCH
N_ASYMPTOTIC = 30

_TABLES: dict = {}


def _double_factorial_odd(n: int) -> float:
    """(2n-1)!! with (-1)!! = 1."""
    out = 1.0
    for k in range(1, 2 * n, 2):
        out *= k
    return out


def _tables(device: torch.device, dtype: torch.dtype) -> dict:
    """Constant tables for the two series, cached per (device, dtype)."""
    key = (device, dtype)
    if key not in _TABLES:
        i = torch.arange(N_POISSON, dtype=torch.float64)
        inv = 1.0 / (i + 0.5)
        harmonic = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(inv, 0)[:-1]])
        n = range(1, N_ASYMPTOTIC + 1)
        d = [_double_factorial_odd(k) / 2.0**k for k in n]   # d_n, n >= 1
        c = [dk / k for dk, k in zip(d, n)]                    # c_n = d_n / n
        _TABLES[key] = {
            "i": i.to(device, dtype),
            "harmonic": harmonic.to(device, dtype),  # H_i = psi(i+1/2) - psi(1/2)
            "inv": inv.to(device, dtype),            # 1/(i+1/2)
            "inv_odd": (1.0 / (2 * i[1:] - 1)).to(device, dtype),  # 1/(2i-1), i >= 1
            "c": c,
            "d": d,
        }
    return _TABLES[key]


def _horner(coeffs: list[float], u: torch.Tensor) -> torch.Tensor:
    """sum_k coeffs[k] u^k."""
    out = torch.full_like(u, coeffs[-1])
    for ck in reversed(coeffs[:-1]):
        out = out * u + ck
    return out


def _poisson_branch(a, s2, t, tab, need_grad: bool):
    """(A) and its derivatives for elements with t < T_SWITCH (same shapes as the inputs)."""
    ts = t.unsqueeze(-1)
    # Pois(i; t) = e^{-t} prod_{k<=i} t/k: a running product (no 0 * log 0 at t = 0, and
    # ~1 ulp per factor instead of the ~1e-14 of exp(i log t - t - lgamma(i+1)) at t ~ 40)
    ratios = ts / tab["i"][1:]
    w = torch.exp(-ts) * torch.cat([torch.ones_like(ts), torch.cumprod(ratios, -1)], -1)
    value = torch.log(2.0 * s2) + PSI_HALF + (w * tab["harmonic"]).sum(-1)
    if not need_grad:
        return value, None, None
    dg = (w * tab["inv"]).sum(-1)  # dG/dt
    # 1 - t dG/dt = Pois(0; t) - sum_{i>=1} Pois(i; t)/(2i-1)  (using t Pois(i) = (i+1)
    # Pois(i+1)): two non-negative terms instead of 1 minus a number close to 1.
    return value, dg * a / s2, (w[..., 0] - (w[..., 1:] * tab["inv_odd"]).sum(-1)) / s2


def _exact_with_grads(a: torch.Tensor, s2: torch.Tensor, need_grad: bool,
                      subset: bool | None = None):
    """E[log X^2] and (optionally) its partial derivatives; a, s2 same shape and dtype.

    Both series are evaluated branch-free on accelerators.  On CPU the 128-term Poisson
    series (A) is evaluated only on the elements that need it (t < T_SWITCH): in GPVAE
    training most have s2 << a^2, and skipping (A) there saves most of the work (timed
    once on CPU; the figure belongs in docs/benchmarks.md).
    ``subset`` forces one way or the other (default: subset on CPU)."""
    tab = _tables(a.device, a.dtype)
    a2 = a * a
    t = a2 / (2.0 * s2)
    big = t >= T_SWITCH

    # --- asymptotic branch, t >= T_SWITCH (B) -----------------------------------------
    u = 1.0 / torch.where(big, t, torch.full_like(t, T_SWITCH))  # 1/t (0 when s2 = 0)
    value = (2.0 * torch.log(a.abs()) - u * _horner(tab["c"], u)).contiguous()
    if need_grad:
        tail = _horner(tab["d"], u)  # sum_{n>=1} d_n u^{n-1}
        da = (2.0 * (1.0 + u * tail) / a).contiguous()
        ds2 = (-2.0 * tail / a2).contiguous()
    else:
        da = ds2 = None

    # --- Poisson branch, t < T_SWITCH (A) -------------------------------------------
    # the subset needs a data-dependent nonzero(), which a compiled graph cannot hold
    if subset if subset is not None else (a.device.type == "cpu"
                                          and not torch.compiler.is_compiling()):
        small = (~big).flatten().nonzero().squeeze(-1)
        if small.numel():
            outs = _poisson_branch(a.flatten()[small], s2.flatten()[small],
                                   t.flatten()[small], tab, need_grad)
            for full, part in zip((value, da, ds2), outs):
                if full is not None:
                    full.view(-1).index_copy_(0, small, part)
        return value, da, ds2
    ts = torch.where(big, torch.zeros_like(t), t)
    outs = _poisson_branch(a, s2, ts, tab, need_grad)
    value = torch.where(big, value, outs[0])
    if not need_grad:
        return value, None, None
    return value, torch.where(big, da, outs[1]), torch.where(big, ds2, outs[2])


class _ExpectedLogSquare(torch.autograd.Function):
    """Closed-form E[log X^2], X ~ N(a, s2), with analytic first derivatives.

    Written for torch.func (forward without ctx, :meth:`setup_context`): the derivatives,
    computed with the value when ``need_grad`` (the caller's "does any input need a
    gradient"), are extra, non-differentiable outputs that the caller drops.  Element-wise,
    so under :func:`torch.func.vmap` it runs once on the stacked operands (:meth:`vmap`)."""

    @staticmethod
    def forward(a, s2, need_grad):
        work = torch.float32 if a.device.type == "mps" else torch.float64
        value, da, ds2 = _exact_with_grads(a.to(work), s2.to(work), need_grad)
        if not need_grad:
            return value.to(a.dtype), None, None
        return value.to(a.dtype), da.to(a.dtype), ds2.to(a.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, da, ds2 = output
        ctx.set_materialize_grads(False)
        if da is not None:
            ctx.mark_non_differentiable(da, ds2)
            ctx.save_for_backward(da, ds2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, *_):
        if grad is None:
            return None, None, None
        da, ds2 = ctx.saved_tensors
        return (grad * da if ctx.needs_input_grad[0] else None,
                grad * ds2 if ctx.needs_input_grad[1] else None, None)

    @staticmethod
    def vmap(info, in_dims, a, s2, need_grad):
        """Element-wise: one call on both operands with the vmapped dimension first (one
        without it expanded).  ``need_grad`` is decided again here: a tensor batched by vmap
        reports ``requires_grad`` False, the unwrapped one its own."""
        a, s2 = (t.movedim(dim, 0) if dim is not None else t.expand(info.batch_size, *t.shape)
                 for t, dim in zip((a, s2), in_dims))
        out = _ExpectedLogSquare.apply(a, s2, _needs_grad(a, s2))
        return out, ((0, None, None) if out[1] is None else (0, 0, 0))


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """What autograd's ``needs_input_grad`` says of a Function of ``tensors``: some of them
    require a gradient and grad mode is on."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@fp32_function
def expected_log_square(
    a,
    s2,
    method: str = "exact",
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """E[log X^2] for X ~ N(a, s2), elementwise (the last term of paper eq. 16).

    Args:
        a: mean of X (tensor or number); broadcasts against ``s2``.
        s2: *variance* of X, >= 0.  s2 = 0 is allowed where a != 0 (then the value is
            log a^2, with finite gradients); at a = s2 = 0 the value is undefined (NaN).
        method: ``"exact"`` -- the closed form (A)/(B) of the module docstring,
            differentiable in a and s2 with analytic gradients; ``"mc"`` -- the paper's
            reparameterised Monte Carlo estimate (mean of log (a + sqrt(s2) eps)^2 over
            ``n_samples`` standard-normal eps, one set per element).
        n_samples: number of Monte Carlo samples for ``method="mc"``.
        generator: optional ``torch.Generator`` for the Monte Carlo noise.

    Returns:
        A tensor of the broadcast shape of ``a`` and ``s2`` and their promoted floating
        dtype.
    """
    a = torch.as_tensor(a)
    s2 = torch.as_tensor(s2, device=a.device)
    dtype = torch.promote_types(a.dtype, s2.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    a, s2 = torch.broadcast_tensors(a.to(dtype), s2.to(dtype))
    if method == "exact":
        return _ExpectedLogSquare.apply(a, s2, _needs_grad(a, s2))[0]
    if method == "mc":
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        eps = torch.randn((n_samples, *a.shape), generator=generator, dtype=dtype,
                          device=a.device)
        # clamp: d sqrt(s2)/d s2 is infinite at s2 = 0 (only reached when Gamma_j = 0)
        std = torch.sqrt(s2.clamp_min(torch.finfo(dtype).tiny))
        return (2.0 * torch.log((a + std * eps).abs())).mean(0)
    raise ValueError(f"unknown method {method!r}; choose 'exact' or 'mc'")
