"""oneDNN's float32 matrix product for the no-autograd CPU paths of SA, IAF, VLAE and the
GPVAE's quadratic forms.

PyTorch runs float32 ``F.linear`` / ``torch.mm`` on a CPU through its BLAS (MKL), which on
some processors (AMD EPYC: MKL does not use AVX-512 there) runs these products far below the
rate of oneDNN, the library that already runs the convolutions (docs/benchmarks.md).  Used
only where nothing is differentiated (oneDNN's op has no autograd formula; backprop through
it is made an error in the test configuration, pyproject.toml).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .precision import autocast_enabled


def _onednn_linear_op():
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()


def linear_kernel(*tensors: torch.Tensor):
    """The function ``(x, weight, bias) -> x @ weight^T + bias`` to use for products of
    these tensors: oneDNN's float32 matrix product where that applies -- all on a CPU in
    float32, PyTorch built with oneDNN and ``torch.backends.mkldnn.enabled``, no autocast,
    and nothing for autograd to record -- else ``F.linear`` (training, float64, other
    devices).  The same values to rounding (tests/test_vlae.py).

    Why: PyTorch runs float32 ``F.linear`` / ``torch.mm`` on a CPU through its BLAS (MKL),
    which on some processors (AMD EPYC: MKL does not use AVX-512 there) runs these products
    far below the rate of oneDNN, the library that already runs the convolutions
    (docs/benchmarks.md).  oneDNN's product is PyTorch's internal
    ``torch.ops.mkldnn._linear_pointwise`` (what ``torch.compile`` emits on CPUs); it has no
    autograd formula, hence the conditions.  If it is missing, or fails (e.g. its signature
    changed), ``F.linear`` is used from then on."""
    return _onednn_linear if onednn_applies(*tensors) else F.linear


def onednn_applies(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors may run on oneDNN (:func:`linear_kernel`'s
    conditions): on a CPU, float32, oneDNN enabled and its op present, no autocast, nothing
    for autograd to record, not inside torch.func transforms, and not being traced by
    ``torch.compile`` / ``torch.export`` (a traced graph keeps PyTorch's portable ops)."""
    return not (torch.compiler.is_compiling()  # first: dynamo cannot trace the checks below
                or _ONEDNN_LINEAR is None or not torch.backends.mkldnn.enabled
                or autocast_enabled("cpu")
                or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
                or any(_functorch_wrapped(t) for t in tensors))


_IS_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _functorch_wrapped(t: torch.Tensor) -> bool:
    """Inside torch.func transforms (vmap, grad: packed training) the tensors are wrappers
    whose ``requires_grad`` does not say whether a gradient is being taken: never oneDNN
    (and never where this torch cannot tell)."""
    return True if _IS_WRAPPED is None else bool(_IS_WRAPPED(t))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    global _ONEDNN_LINEAR
    op = _ONEDNN_LINEAR
    if op is not None:
        if not (weight.is_contiguous() or weight.mT.is_contiguous()):
            weight = weight.contiguous()  # oneDNN is pathologically slow on a strided slice
        try:
            return op(x, weight, bias, "none", [], "")
        except (RuntimeError, TypeError):
            _ONEDNN_LINEAR = None
    return F.linear(x, weight, bias)


def fast_linear(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by :func:`linear_kernel`'s choice for these tensors."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return linear_kernel(*tensors)(x, weight, bias)


__all__ = ["fast_linear", "linear_kernel", "onednn_applies"]
