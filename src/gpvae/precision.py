"""Numerical precision of training and evaluation: ``--precision fp32 | tf32 | bf16``.

The policy
----------
* ``fp32`` (the default): float32 everywhere.  On CUDA the TF32 tensor-core modes are
  switched off for the duration (PyTorch's own default lets cuDNN convolutions use TF32),
  so fp32 means FP32 on every device.  On CPU nothing is switched: the computation is the
  one without any policy, bit for bit.
* ``tf32`` (CUDA; on any other device it changes nothing): float32 tensors, but matrix
  products and convolutions may round their inputs to TF32 (10-bit mantissa) on tensor
  cores, accumulating in float32 (``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32`` on for the duration, then restored).
* ``bf16``: ``torch.autocast(dtype=torch.bfloat16)`` around the forward passes: the
  networks' matrix products and convolutions run in bfloat16 (8-bit mantissa) from float32
  master weights, which the optimizer updates in float32 (no ``.half()`` of the model, no
  loss scaling: bfloat16 has float32's exponent range).  Backward passes run outside
  autocast.  What leaves a network is cast back to float32 (:func:`upcast`) before any
  probability is computed from it -- the FP32 islands:

  - the Gaussian encoder's head output, before the softplus of its standard deviation
    (:meth:`gpvae.networks.GaussianEncoder.split_head`), and the decoder's output
    (:meth:`gpvae.models.base.LatentVariableModel.decode`), so likelihood log-probs,
    samples, log q(z|x) and the KLs are float32;
  - GPVAE: everything after its three networks -- eq. (13)'s means and variances, the
    quadratic forms psi^T Sigma_j psi from the Cholesky factors of q(W, U), eq. (16)'s
    E[log X^2], KL(q(W, U) || p) -- runs with autocast off (:func:`fp32_function`, also on
    the quadratic forms of :mod:`gpvae.cholesky` and on :mod:`gpvae.special`, forward and
    backward); CMVAE: its A psi^m, C psi^s likewise;
  - IAF: the MADE outputs (gates and log-determinants); HF: the Householder vectors (so
    the reflections stay orthogonal and the log-determinant 0); ME / RME: the mixture
    logits; VLAE: the starting mean, the decoder Jacobian, the Gauss-Newton products (with
    autocast off) and so the Cholesky factors and solves, which autocast leaves in the
    dtype of their float32 operands;
  - evaluation: the log importance weights are float32 and their logsumexp and means are
    taken in float64 outside autocast (:func:`gpvae.evaluation.estimate`); training: the
    per-example ELBO is cast to float32 before its batch mean is taken.

  On CPU, bfloat16 autocast works on any processor, but is fast only where the processor
  has bfloat16 instructions (AMX / AVX512-BF16); elsewhere it can be slower than fp32.

Global state: :func:`precision_context` restores every flag it sets when the block ends
(however it ends), so a library call never leaves the process in another precision.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from .errors import ConfigError

#: the values of ``--precision``
PRECISIONS = ("fp32", "tf32", "bf16")
#: what ``--help`` says of them
PRECISION_HELP = ("fp32 (default): float32 throughout (on CUDA with TF32 off); tf32: float32 "
                  "with TF32 tensor-core matrix products and convolutions, CUDA only (on a "
                  "CPU it changes nothing); bf16: bfloat16 autocast for the networks' forward "
                  "passes, float32 weights, with log-densities, KLs, the GPVAE's Cholesky "
                  "factors and quadratic forms and the IWAE log weights kept in float32 (their "
                  "logsumexp in float64); on a CPU without bfloat16 instructions it can be "
                  "slower")
_LOW = (torch.float16, torch.bfloat16)


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def check_precision(precision, device=None) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` and ``device`` (a device or its
    name; None: only the name is checked) can run it; else a one-line
    :class:`~gpvae.errors.ConfigError`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                          f"{precision!r}")
    if device is None or precision != "bf16":
        return precision
    device = _device(device)
    if device.type == "cuda":
        try:
            ok = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no including_emulation
            ok = torch.cuda.is_bf16_supported()
        if not ok:
            raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no "
                              "bfloat16 support; use --precision fp32 or tf32")
    elif not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"--precision bf16: autocast is not available on {device.type}; "
                          "use --precision fp32")
    return precision


def _tf32_state():
    b = torch.backends
    legacy = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    # torch >= 2.9 keeps per-backend strings too, which the legacy setters rewrite
    new = tuple(getattr(obj, "fp32_precision", None)
                for obj in (b.cuda.matmul, getattr(b.cudnn, "conv", None)))
    return legacy, new


def _set_tf32_state(state) -> None:
    b = torch.backends
    (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32), new = state
    for obj, value in zip((b.cuda.matmul, getattr(b.cudnn, "conv", None)), new):
        if value is not None:
            obj.fp32_precision = value


@contextlib.contextmanager
def cuda_tf32(enabled: bool):
    """TF32 matrix products and cuDNN convolutions on CUDA on (``enabled``) or off for the
    ``with`` block; the flags are restored afterwards, also after an exception."""
    saved = _tf32_state()
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        _set_tf32_state(saved)


def autocast_context(precision: str, device):
    """The forward-pass part of the policy: bfloat16 autocast on ``device`` for ``bf16``,
    nothing otherwise."""
    if precision == "bf16":
        return torch.autocast(_device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def precision_context(precision: str, device, *, autocast: bool = True):
    """Run the ``with`` block in ``precision`` (:data:`PRECISIONS`) on ``device``.

    On CUDA the TF32 flags are set for the block (on for ``tf32``, off otherwise) and
    restored after it; elsewhere no flag is touched.  With ``autocast`` (default) a
    ``bf16`` block also runs under bfloat16 autocast; training passes ``autocast=False``
    and wraps only each forward pass in :func:`autocast_context`, so that backward passes
    and optimizer steps run outside autocast but under the same TF32 flags.
    Validates first (:func:`check_precision`)."""
    device = _device(device)
    check_precision(precision, device)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(cuda_tf32(precision == "tf32"))
        if autocast:
            stack.enter_context(autocast_context(precision, device))
        yield


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is float16 / bfloat16 (a network's output under autocast),
    else ``t`` itself (no copy: under fp32 this is the identity)."""
    return t.float() if t.dtype in _LOW else t


def _upcast_arg(a):
    if isinstance(a, torch.Tensor):
        return upcast(a)
    if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
        return type(a)(_upcast_arg(t) for t in a)
    return a


def _first_tensor(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            found = _first_tensor(a)
            if found is not None:
                return found
    return None


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for a type autocast does not know)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):
        return False


def fp32_function(fn):
    """Decorator: when autocast is on for the device of ``fn``'s first tensor argument,
    run ``fn`` with autocast off and its float16 / bfloat16 tensor arguments (also inside
    lists and tuples) cast to float32 -- an FP32 island, e.g. Cholesky factors and
    quadratic forms.  Otherwise ``fn`` runs as it is (the fp32 policy: unchanged)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ref = _first_tensor(args) if args else None
        if ref is None:
            ref = _first_tensor(list(kwargs.values()))
        if ref is None or not autocast_enabled(ref.device.type):
            return fn(*args, **kwargs)
        with torch.autocast(ref.device.type, enabled=False):
            return fn(*(_upcast_arg(a) for a in args),
                      **{k: _upcast_arg(v) for k, v in kwargs.items()})

    return wrapper


__all__ = ["PRECISIONS", "PRECISION_HELP", "autocast_context", "autocast_enabled",
           "check_precision", "cuda_tf32", "fp32_function", "precision_context", "upcast"]
