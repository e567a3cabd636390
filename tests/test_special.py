"""Tests of gpvae.special.expected_log_square: E[log X^2], X ~ N(a, s2) (paper eq. 16).

References used (all independent of the implementation's series):
* scipy.integrate.quad of log(x^2) N(x; a, s2) over x (the definition), and of the
  score-function forms of its derivatives (stated tolerance 1e-9 abs + rel);
* Monte Carlo with 1e6 samples (tolerance 5 standard errors);
* scipy.special.dawsn for the identity dG/dt = 2 F(sqrt t)/sqrt t;
* central finite differences and torch.autograd.gradcheck in float64.
"""
from __future__ import annotations

import math

import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, special

from gpvae.special import T_SWITCH, expected_log_square

RATIOS = [0.0, 1e-6, 0.1, 1.0, 3.0, 10.0, 100.0, 1e3]  # a / s
SCALES = [1e-2, 1.0, 30.0]                              # s
GRID = [(r * s, s * s) for r in RATIOS for s in SCALES]   # (a, s2)


def _quad_expectation(a: float, s2: float, g) -> float:
    """E[g(X)], X ~ N(a, s2), by quadrature in y = (x - a)/s with a break at x = 0."""
    s = math.sqrt(s2)
    y0 = -a / s
    phi = lambda y: math.exp(-0.5 * y * y) / math.sqrt(2 * math.pi)  # noqa: E731
    f = lambda y: g(a + s * y, y) * phi(y)  # noqa: E731
    lo, hi = -40.0, 40.0
    pieces = [lo, y0, hi] if lo < y0 < hi else [lo, hi]
    total = 0.0
    for left, right in zip(pieces[:-1], pieces[1:]):
        # a second break at the Gaussian bulk keeps quad from missing it
        inner = [p for p in (-8.0, 0.0, 8.0) if left < p < right]
        with warnings.catch_warnings():  # roundoff warnings at the 1e-13 level requested
            warnings.simplefilter("ignore", integrate.IntegrationWarning)
            val, _ = integrate.quad(f, left, right, points=inner or None, limit=500,
                                    epsabs=1e-14, epsrel=1e-13)
        total += val
    return total


def _ref_value(a, s2):
    return _quad_expectation(a, s2, lambda x, y: math.log(x * x))


def _ref_grads(a, s2):
    """dE/da = E[log X^2 * y / s], dE/ds2 = E[log X^2 * (y^2 - 1) / (2 s2)] (score function)."""
    s = math.sqrt(s2)
    da = _quad_expectation(a, s2, lambda x, y: math.log(x * x) * y / s)
    ds2 = _quad_expectation(a, s2, lambda x, y: math.log(x * x) * (y * y - 1) / (2 * s2))
    return da, ds2


def _close(x, ref, tol):
    return abs(x - ref) <= tol * (1.0 + abs(ref))


@pytest.mark.parametrize("a,s2", GRID + [(8.9, 1.0), (9.0, 1.0)])
def test_value_matches_quadrature(a, s2):
    got = expected_log_square(torch.tensor(a, dtype=torch.float64),
                              torch.tensor(s2, dtype=torch.float64)).item()
    ref = _ref_value(a, s2)
    assert _close(got, ref, 1e-10), (a, s2, got, ref)


def test_value_matches_monte_carlo_1e6():
    """1e6 samples per grid point; tolerance 5 Monte Carlo standard errors."""
    gen = np.random.default_rng(0)
    for a, s2 in GRID:
        x = a + math.sqrt(s2) * gen.standard_normal(1_000_000)
        logs = np.log(x * x)
        se = logs.std() / math.sqrt(logs.size)
        got = expected_log_square(torch.tensor(a, dtype=torch.float64),
                                  torch.tensor(s2, dtype=torch.float64)).item()
        assert abs(got - logs.mean()) <= 5 * se + 1e-12, (a, s2, got, logs.mean(), se)


@pytest.mark.parametrize("s2", [0.25, 4.0])
def test_mc_method_matches_exact_1e6(s2):
    """The paper's reparameterised estimator (method="mc") is unbiased for the closed form.

    s2 != 1, so a variance used as a standard deviation (or sqrt taken twice) moves
    E[log X^2] at a = 0 by |log s2| (|log s2| / 2) >= 0.69 -- hundreds of standard errors."""
    a = torch.tensor([0.0, 0.1, 1.0, 3.0, 10.0], dtype=torch.float64)
    s2 = torch.full_like(a, s2)
    gen = torch.Generator().manual_seed(1)
    n = 1_000_000
    est = expected_log_square(a, s2, method="mc", n_samples=n, generator=gen)
    # per-sample standard deviation from a fresh batch
    eps = torch.randn(n, a.numel(), generator=gen, dtype=torch.float64)
    se = torch.log((a + s2.sqrt() * eps) ** 2).std(0) / math.sqrt(n)
    exact = expected_log_square(a, s2)
    assert torch.all((est - exact).abs() <= 5 * se), (est, exact, se)


def test_known_values():
    # a = 0: E[log chi^2_1] + log s2 = psi(1/2) + log 2 + log s2
    for s2 in (1e-30, 1.0, 4.0, 1e8):
        got = expected_log_square(torch.tensor(0.0, dtype=torch.float64),
                                  torch.tensor(s2, dtype=torch.float64)).item()
        assert got == pytest.approx(special.digamma(0.5) + math.log(2 * s2), rel=1e-14, abs=1e-14)
    # s2 = 0: X = a exactly
    a = torch.tensor([0.3, -2.0, 1e3], dtype=torch.float64)
    got = expected_log_square(a, torch.zeros_like(a))
    torch.testing.assert_close(got, torch.log(a * a), rtol=1e-15, atol=0)


@pytest.mark.parametrize("a,s2", [(r, 1.0) for r in (0.05, 0.7, 1.5, 4.0, 8.0, 9.5, 30.0)])
def test_dawson_identity(a, s2):
    """dG/dt = sum_i Pois(i;t)/(i+1/2) = 2 F(r)/r, t = a^2/(2 s2), r = sqrt t (module doc)."""
    A = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    expected_log_square(A, torch.tensor(s2, dtype=torch.float64)).backward()
    r = math.sqrt(a * a / (2 * s2))
    dg_dt = A.grad.item() * s2 / a  # dE/da = dG/dt * a / s2
    assert dg_dt == pytest.approx(2 * special.dawsn(r) / r, rel=1e-13)


def test_asymptotic_series_leading_terms():
    """E = log a^2 - 1/(2 r^2) - 3/(8 r^4) - 5/(8 r^6) - ... for large r."""
    s2 = torch.tensor(1.0, dtype=torch.float64)
    for r in (30.0, 100.0):
        a = math.sqrt(2) * r
        got = expected_log_square(torch.tensor(a, dtype=torch.float64), s2).item()
        approx = math.log(a * a) - 1 / (2 * r**2) - 3 / (8 * r**4) - 5 / (8 * r**6)
        assert got == pytest.approx(approx, abs=10 / r**8 + 1e-14)


def test_continuous_across_switch():
    s2 = torch.ones(2, dtype=torch.float64)
    a_sw = math.sqrt(2 * T_SWITCH)
    a = torch.tensor([a_sw * (1 - 1e-12), a_sw * (1 + 1e-12)], dtype=torch.float64,
                     requires_grad=True)
    s2 = s2.clone().requires_grad_(True)
    v = expected_log_square(a, s2)
    v.sum().backward()
    # the two sides (Poisson series / asymptotic series) agree to first order in the step
    step = (a[1] - a[0]).item()
    assert abs((v[1] - v[0]).item() - a.grad[0].item() * step) < 1e-14
    # (the derivatives themselves move by ~ d2E/da2 * step ~ 5e-13 over this step)
    assert abs(a.grad[0] - a.grad[1]).item() < 2e-12
    assert abs(s2.grad[0] - s2.grad[1]).item() < 2e-12


@pytest.mark.parametrize("a,s2", [(r * s, s * s) for r in RATIOS + [8.9, 9.0] for s in (0.5, 2.0)])
def test_gradients_match_quadrature(a, s2):
    A = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    S = torch.tensor(s2, dtype=torch.float64, requires_grad=True)
    expected_log_square(A, S).backward()
    da, ds2 = _ref_grads(a, s2)
    assert _close(A.grad.item(), da, 1e-9), (a, s2, A.grad.item(), da)
    assert _close(S.grad.item(), ds2, 1e-9), (a, s2, S.grad.item(), ds2)


def test_gradients_match_finite_differences_and_gradcheck():
    a = torch.tensor([0.0, 1e-6, 0.1, 1.0, 3.0, 8.9, 9.0, 10.0, 100.0, 1e3, -2.0],
                     dtype=torch.float64, requires_grad=True)
    s2 = torch.tensor([1.0, 1.0, 2.0, 0.5, 1.0, 1.0, 1.0, 3.0, 1.0, 4.0, 0.7],
                      dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(expected_log_square, (a, s2), eps=1e-6, atol=1e-7)
    v = expected_log_square(a, s2)
    ga, gs = torch.autograd.grad(v.sum(), (a, s2))
    h = 1e-5
    with torch.no_grad():
        fa = (expected_log_square(a + h, s2) - expected_log_square(a - h, s2)) / (2 * h)
        hs = h * s2
        fs = (expected_log_square(a, s2 + hs) - expected_log_square(a, s2 - hs)) / (2 * hs)
    torch.testing.assert_close(ga, fa, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gs, fs, rtol=1e-7, atol=1e-9)


def test_gradients_finite_at_zero_mean_and_zero_variance():
    for dtype in (torch.float32, torch.float64):
        a = torch.tensor([0.0, 0.0, 1e-30, 2.0], dtype=dtype, requires_grad=True)
        s2 = torch.tensor([1.0, 1e-30, 1.0, 0.0], dtype=dtype, requires_grad=True)
        v = expected_log_square(a, s2)
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(a.grad).all()
        assert torch.isfinite(s2.grad).all()
        assert a.grad[0].item() == 0.0 and s2.grad[0].item() == pytest.approx(1.0)
        # s2 = 0: E = log a^2, dE/da = 2/a, dE/ds2 = -1/a^2
        assert a.grad[3].item() == pytest.approx(1.0) and s2.grad[3].item() == pytest.approx(-0.25)


def test_float32_finite_and_accurate():
    r = torch.tensor([0.0] + list(np.logspace(-8, 4, 97)), dtype=torch.float64)
    for s in (1e-6, 1.0, 1e3):
        a64, s64 = r * s, torch.full_like(r, s * s)
        a32 = a64.float().requires_grad_(True)
        s32 = s64.float().requires_grad_(True)
        v32 = expected_log_square(a32, s32)
        v32.sum().backward()
        assert v32.dtype == torch.float32
        assert torch.isfinite(v32).all() and torch.isfinite(a32.grad).all()
        assert torch.isfinite(s32.grad).all()
        v64 = expected_log_square(a32.detach().double(), s32.detach().double())
        torch.testing.assert_close(v32.double(), v64, rtol=1e-6, atol=1e-6)


def test_broadcasting_and_gradient_shapes():
    a = torch.linspace(0, 5, 3, dtype=torch.float64).view(3, 1).requires_grad_(True)
    s2 = torch.linspace(0.5, 2, 4, dtype=torch.float64).requires_grad_(True)
    v = expected_log_square(a, s2)
    assert v.shape == (3, 4)
    v.sum().backward()
    assert a.grad.shape == a.shape and s2.grad.shape == s2.shape
    ref = torch.stack([expected_log_square(a[i, 0].detach(), s2.detach()) for i in range(3)])
    torch.testing.assert_close(v.detach(), ref, rtol=0, atol=0)
    assert expected_log_square(1.0, 2.0).dtype == torch.get_default_dtype()
    m = expected_log_square(a, s2, method="mc", n_samples=3)
    assert m.shape == (3, 4)


def test_bad_method():
    with pytest.raises(ValueError):
        expected_log_square(torch.ones(1), torch.ones(1), method="quadrature")
    with pytest.raises(ValueError):
        expected_log_square(torch.ones(1), torch.ones(1), method="mc", n_samples=0)


def test_cpu_subset_path_equals_branch_free_path():
    """On CPU the Poisson series is evaluated only where t < T_SWITCH; accelerators use the
    branch-free form.  Both must give the same values and derivatives, for a mix of
    elements on both sides of the switch (including s2 = 0) and non-contiguous input."""
    from gpvae.special import _exact_with_grads

    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 40, generator=g, dtype=torch.float64) * 3
    s2 = torch.rand(7, 40, generator=g, dtype=torch.float64) * torch.logspace(-6, 1, 40,
                                                                           dtype=torch.float64)
    s2[0, :5] = 0.0
    t = a * a / (2 * s2)
    assert (t < T_SWITCH).any() and (t >= T_SWITCH).any()
    for aa, ss in ((a, s2), (a.T, s2.T)):  # the transpose: non-contiguous
        for need in (False, True):
            sub = _exact_with_grads(aa, ss, need, subset=True)
            full = _exact_with_grads(aa, ss, need, subset=False)
            for x, y in zip(sub, full):
                if y is None:
                    assert x is None
                else:
                    torch.testing.assert_close(x, y, rtol=0, atol=0)
