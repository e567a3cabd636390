"""The decoders' transposed convolutions computed as ordinary convolutions: the same weights,
the same values, other kernels.

The Tab. 6/7/8 decoders (:class:`gpvae.networks.ConvDecoder`) upsample with 4x4 transposed
convolutions of stride 2 and padding 1.  Written out, output pixel ``(2m + a, 2n + b)``
(phase ``(a, b)``) of such a layer is

    y[2m + a] = sum_i x[i] w[2m + a + 1 - 2i],   so   y[2m] = x[m] w1 + x[m - 1] w3,
                                                     y[2m + 1] = x[m] w2 + x[m + 1] w0

(per dimension; the 2-D layer is the product of the two).  Index the outputs by the
``(H + 1) x (W + 1)`` windows ``(j - 1, j)`` of input rows: window ``j`` holds output row
``2j`` (phase 0, taps ``w3, w1``) and row ``2j - 1`` (phase 1, taps ``w2, w0``) -- row
``2j + s - 1`` for ``s = 1 - a``.  Interleaving the phases of all windows ("pixel shuffle")
gives output rows ``-1 .. 2H``; cropping the first row (and the last, unless
``output_padding`` asks for it: row ``2H`` is ``x[H - 1] w3``, which is what
ConvTranspose2d's output padding holds) gives exactly ``conv_transpose2d``'s output.  Two
ways to compute the windows' ``4 C_out`` phase values:

* **sub-pixel** (:func:`subpixel_conv_transpose2d`): one 2x2 convolution (padding 1) with
  ``4 C_out`` output channels, its kernel :func:`subpixel_weight` built from the stored
  ``(C_in, C_out, 4, 4)`` weight;
* **taps** (:func:`taps_conv_transpose2d`): a 1x1 convolution giving each input pixel's
  contribution through each of the 16 kernel taps (:func:`taps_weight`), then the four
  shifted sums (input row ``i`` reaches window ``i`` through tap ``k = s`` and window
  ``i + 1`` through tap ``k = 2 + s``).  For a layer with one output channel this replaces a
  convolution with 4 outputs, which oneDNN pads to 16, by one with 16.

Both are built from ordinary differentiable tensor operations, nothing cached across calls:
autograd, forward-mode AD (``torch.func.jvp`` / ``jacfwd``), ``torch.func.vmap``, any dtype
and device.  :class:`SubpixelConvTranspose2d` is an ``nn.ConvTranspose2d`` (the same
parameters and state-dict keys, so checkpoints load unchanged) whose forward picks the
native form or one of these (:func:`set_deconv_impl`).

Why: a transposed convolution with few output channels (the decoder's last layer, 1 or 3
image channels) or with output padding runs far below the machine's convolution rate in
oneDNN on a CPU.  The sub-pixel form does up to ``(1 + 1/H)(1 + 1/W)`` times the
multiply-adds (the border windows) plus one shuffle copy, so for a layer that oneDNN
already runs well (many output channels, no output padding) the native form stays.  The
measured speeds are in docs/benchmarks.md (``scripts/bench_deconv.py``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from .onednn import linear_kernel

#: the values of ``impl`` (:func:`set_deconv_impl`)
DECONV_IMPLS = ("auto", "subpixel", "taps", "native")


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The ``(4 C_out, C_in, 2, 2)`` kernel of the sub-pixel form of a 4x4, stride-2,
    padding-1 transposed convolution with ``weight`` ``(C_in, C_out, 4, 4)``.

    Output channel ``(s * 2 + t) * C_out + c`` is phase ``(a, b) = (1 - s, 1 - t)`` of
    channel ``c``; its taps for the window rows ``(j - 1, j)`` are ``(w3, w1)`` for
    ``s = 1`` (phase 0) and ``(w2, w0)`` for ``s = 0`` (phase 1), and the same per column.
    With the kernel index ``k = 2 hi + lo`` that is ``s = lo`` and tap ``1 - hi``: one view
    and one flip.  Differentiable (a view, a flip, a permutation)."""
    c_in, c_out = weight.shape[-4], weight.shape[-3]
    w6 = weight.reshape(c_in, c_out, 2, 2, 2, 2).flip(2, 4)  # (ci, co, ty, s, tx, t)
    return w6.permute(3, 5, 1, 0, 2, 4).reshape(4 * c_out, c_in, 2, 2)


def subpixel_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias of the ``4 C_out`` phase channels (each phase: the same bias)."""
    return None if bias is None else bias.repeat(4)


def taps_weight(weight: torch.Tensor) -> torch.Tensor:
    """The ``(16 C_out, C_in, 1, 1)`` kernel of the taps form: output channel
    ``(dy, dx, s, t, c)`` is input pixel ``(i, j)``'s contribution to window
    ``(i + dy, j + dx)``, phase channel ``(s, t, c)``, through kernel tap
    ``(2 dy + s, 2 dx + t)`` (one view, one permutation)."""
    c_in, c_out = weight.shape[-4], weight.shape[-3]
    w6 = weight.reshape(c_in, c_out, 2, 2, 2, 2)  # (ci, co, dy, s, dx, t)
    return w6.permute(2, 4, 3, 5, 1, 0).reshape(16 * c_out, c_in, 1, 1)


def _output_padding(x: torch.Tensor, weight: torch.Tensor, output_padding) -> tuple[int, int]:
    if tuple(weight.shape[-2:]) != (4, 4):
        raise ValueError(f"these forms are for 4x4 kernels, got {tuple(weight.shape)}")
    oph, opw = (output_padding, output_padding) if isinstance(output_padding, int) \
        else output_padding
    if not (0 <= oph <= 1 and 0 <= opw <= 1):
        raise ValueError(f"output_padding must be 0 or 1 at stride 2, got {output_padding}")
    return oph, opw


def subpixel_conv_transpose2d(x: torch.Tensor, weight: torch.Tensor,
                              bias: torch.Tensor | None = None, output_padding=(0, 0),
                              channels_last: bool = False) -> torch.Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride=2, padding=1, output_padding=...)`` for a
    4x4 ``weight`` ``(C_in, C_out, 4, 4)``, computed as a 2x2 convolution to ``4 C_out``
    channels and a pixel shuffle (module docstring).  ``x``: ``(N, C_in, H, W)`` or
    ``(C_in, H, W)``; the result ``(N, C_out, 2H + op_h, 2W + op_w)`` is equal in exact
    arithmetic (in floating point: to rounding, the sums are the same four-term-per-tap
    sums in another order).

    ``channels_last`` says which layout the shuffle copy writes (NHWC when True, NCHW when
    False; it should match the input's, for speed only: the values are the same either way).
    The result is a cropped view of the shuffled tensor (not contiguous)."""
    if x.dim() == 3:
        return subpixel_conv_transpose2d(x.unsqueeze(0), weight, bias, output_padding,
                                         channels_last).squeeze(0)
    op = _output_padding(x, weight, output_padding)
    return _subpixel(x, subpixel_weight(weight), subpixel_bias(bias), op, channels_last)


def taps_conv_transpose2d(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None, output_padding=(0, 0),
                          channels_last: bool = False) -> torch.Tensor:
    """The same as :func:`subpixel_conv_transpose2d`, with the windows' phase values
    computed by the taps form (module docstring): a 1x1 convolution to ``16 C_out``
    channels and four shifted sums."""
    if x.dim() == 3:
        return taps_conv_transpose2d(x.unsqueeze(0), weight, bias, output_padding,
                                     channels_last).squeeze(0)
    op = _output_padding(x, weight, output_padding)
    return _taps(x, taps_weight(weight), subpixel_bias(bias), op, channels_last)


def _subpixel(x, kernel, bias, output_padding, channels_last):
    """The sub-pixel form of a 4-d ``x`` from its built ``kernel`` and ``bias``."""
    y = F.conv2d(x, kernel, bias, padding=1)  # (N, (s, t, c), H + 1, W + 1)
    return _phases_to_image(y, x.shape[-2], x.shape[-1], output_padding, channels_last)


def _taps(x, kernel, bias, output_padding, channels_last):
    """The taps form of a 4-d ``x`` from its built ``kernel`` and phase ``bias``."""
    if not (torch.is_grad_enabled() and (x.requires_grad or kernel.requires_grad)) \
            and torch._C._functorch.maybe_current_level() is None:
        return _taps_by_planes(x, kernel, bias, output_padding, channels_last)
    n, _, h, w = x.shape
    c4 = kernel.shape[0] // 4  # the 4 C_out phase channels
    y = F.conv2d(x, kernel).permute(0, 2, 3, 1).reshape(n, h, w, 2, 2, c4)  # NHWC: a view
    g = None  # window (J, JJ) = sum over (dy, dx) of pixel (J - dy, JJ - dx)'s term
    for dy in (0, 1):
        for dx in (0, 1):
            term = F.pad(y[:, :, :, dy, dx], (0, 0, dx, 1 - dx, dy, 1 - dy))
            g = term if g is None else g.add_(term)
    if bias is not None:
        g = g.add_(bias)
    return _phases_to_image(g.permute(0, 3, 1, 2), h, w, output_padding, channels_last)


def _taps_by_planes(x, kernel, bias, output_padding, channels_last):
    """:func:`_taps` where nothing is differentiated (evaluation), outside ``torch.func``
    transforms: the 1x1 convolution as one product ``kernel @ pixels^T`` whose rows are
    the taps, so that each term of the four shifted sums is a plane of whole image rows
    (``(4 C_out, N, H, W)``) and the sums are added in place into one zeroed buffer of
    windows -- on a CPU far faster than the same sums over the 16 interleaved channels of
    the NHWC convolution output.  The same sums in the same order (0 + term00 + term01 +
    term10 + term11 + bias); one copy then writes the pixel shuffle."""
    n, c_in, h, w = x.shape
    c4 = kernel.shape[0] // 4  # the 4 C_out phase channels (s, t, c)
    c = c4 // 4
    pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c_in)  # a view when x is NHWC
    taps = kernel.reshape(4 * c4, c_in)
    y = linear_kernel(taps, pixels)(taps, pixels).view(2, 2, c4, n, h, w)  # (dy, dx, ...)
    g = y.new_zeros(c4, n, h + 1, w + 1)
    for dy in (0, 1):
        for dx in (0, 1):
            g[:, :, dy:dy + h, dx:dx + w].add_(y[dy, dx])
    if bias is not None:
        g.add_(bias.view(c4, 1, 1, 1))
    oph, opw = output_padding
    g = g.view(2, 2, c, n, h + 1, w + 1)  # (s, t, c, n, J, JJ): output row 2J + s - 1
    if channels_last:
        image = g.permute(3, 4, 0, 5, 1, 2).reshape(n, 2 * h + 2, 2 * w + 2, c)
        return image[:, 1:2 * h + 1 + oph, 1:2 * w + 1 + opw].permute(0, 3, 1, 2)
    image = g.permute(3, 2, 4, 0, 5, 1).reshape(n, c, 2 * h + 2, 2 * w + 2)
    return image[:, :, 1:2 * h + 1 + oph, 1:2 * w + 1 + opw]


def _phases_to_image(y, h, w, output_padding, channels_last):
    """Output rows ``2j + s - 1`` from the windows' phase values ``y`` (N, (s, t, c), H + 1,
    W + 1) (the same per column), cropped to ``conv_transpose2d``'s output."""
    oph, opw = output_padding
    n, c = y.shape[0], y.shape[1] // 4
    if channels_last:
        u = (y.permute(0, 2, 3, 1).reshape(n, h + 1, w + 1, 2, 2, c)
             .permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h + 2, 2 * w + 2, c))
        return u[:, 1:2 * h + 1 + oph, 1:2 * w + 1 + opw].permute(0, 3, 1, 2)
    u = y.reshape(n, 2, 2, c, h + 1, w + 1).permute(0, 3, 4, 1, 5, 2)
    u = u.reshape(n, c, 2 * h + 2, 2 * w + 2)
    return u[:, :, 1:2 * h + 1 + oph, 1:2 * w + 1 + opw]


def subpixel_applies(layer: nn.ConvTranspose2d) -> bool:
    """Whether ``layer``'s configuration has the forms here: a 4x4 kernel, stride 2,
    padding 1, no dilation, one group, zero padding, output padding 0 or 1."""
    return (tuple(layer.kernel_size) == (4, 4) and tuple(layer.stride) == (2, 2)
            and tuple(layer.padding) == (1, 1) and tuple(layer.dilation) == (1, 1)
            and layer.groups == 1 and layer.padding_mode == "zeros"
            and all(p in (0, 1) for p in layer.output_padding))


def fastest_form(in_channels: int, out_channels: int, output_padding) -> str:
    """The fastest form of a forward pass on a CPU, as measured per layer of Tab. 6/7/8
    (``scripts/bench_deconv.py``; docs/benchmarks.md): ``"taps"`` for a layer with one
    output channel (Tab. 6's last layer); ``"subpixel"`` for one with few output channels
    (``4 * out_channels <= in_channels``: the other decoders' last, image-channel layers)
    or with output padding (Tab. 6's first layer, 3x3 -> 7x7) -- the layers where oneDNN's
    transposed convolution is slow; ``"native"`` for the layers in between, which oneDNN
    runs well."""
    if out_channels == 1:
        return "taps"
    if 4 * out_channels <= in_channels or any(p != 0 for p in output_padding):
        return "subpixel"
    return "native"


_FORMS = {"subpixel": (_subpixel, subpixel_weight), "taps": (_taps, taps_weight)}


class SubpixelConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same parameters, state-dict keys and results) that can run
    in sub-pixel or taps form (module docstring), its kernel built from ``self.weight`` on
    every call -- nothing is cached across calls, so optimizers, ``load_state_dict``,
    ``functional_call`` and vmapped stacked weights all see the current weights; within one
    decoder call split into blocks, :func:`kernels_built_once`.

    ``impl`` (:func:`set_deconv_impl`):

    * ``"native"``: ``nn.ConvTranspose2d.forward``;
    * ``"subpixel"`` / ``"taps"``: that form on every device and in every mode (where
      :func:`subpixel_applies`; the native form otherwise);
    * ``"auto"`` (the default): on a CPU, for a forward pass that records no gradient for
      the weight (evaluation: ``torch.no_grad`` / ``inference_mode``, or a frozen weight),
      the form :func:`fastest_form` names; the native form otherwise.  So training (forward
      and backward: there the output-padding layer is faster native, and the project counts
      its FLOPs against PyTorch's counters) runs exactly as it did, and on CUDA cuDNN's
      transposed convolutions are kept (they are not the bottleneck that oneDNN's are on a
      CPU; the other forms were not timed on a GPU).

    ``channels_last``: the layout the shuffle writes (set by
    :meth:`gpvae.networks.ConvDecoder.use_channels_last`; speed only)."""

    impl = "auto"
    channels_last = False
    _built = None  # (form, kernel, bias) for the duration of one call: kernels_built_once

    def form(self) -> str:
        """The form a forward pass now (this device, this grad mode) runs: ``"native"``,
        ``"subpixel"`` or ``"taps"``."""
        if self.impl == "native" or not subpixel_applies(self):
            return "native"
        if self.impl != "auto":
            return self.impl
        weight = self.weight
        if weight.device.type != "cpu" or (torch.is_grad_enabled() and weight.requires_grad):
            return "native"
        return fastest_form(self.in_channels, self.out_channels, self.output_padding)

    def forward(self, input: torch.Tensor, output_size=None) -> torch.Tensor:
        form = self.form()
        if form == "native":
            return super().forward(input, output_size)
        output_padding = self.output_padding
        if output_size is not None:
            num_spatial_dims = 2
            output_padding = self._output_padding(
                input, output_size, self.stride, self.padding, self.kernel_size,
                num_spatial_dims, self.dilation)
            if not all(p in (0, 1) for p in output_padding):
                return super().forward(input, output_size)
        if input.dim() == 3:
            return self.forward(input.unsqueeze(0), output_size).squeeze(0)
        run, build = _FORMS[form]
        if self._built is not None and self._built[0] == form:
            kernel, bias = self._built[1:]
        else:
            kernel, bias = build(self.weight), subpixel_bias(self.bias)
        return run(input, kernel, bias, tuple(output_padding), self.channels_last)


@contextlib.contextmanager
def kernels_built_once(module: nn.Module):
    """Within the block, every :class:`SubpixelConvTranspose2d` inside ``module`` that runs
    the sub-pixel or taps form builds its kernel from its weight once, on entry, and reuses
    it: for one decoder call split into several passes (:class:`gpvae.networks.ConvDecoder`'s
    cache blocking).  Only with no gradient recorded (elsewhere it does nothing), so the
    kernels hold no graph; the weights cannot change within one call, and nothing outlives
    it."""
    layers = []
    if not torch.is_grad_enabled():
        layers = [m for m in module.modules()
                  if isinstance(m, SubpixelConvTranspose2d) and m.form() != "native"]
    try:
        for m in layers:
            form = m.form()
            m._built = (form, _FORMS[form][1](m.weight), subpixel_bias(m.bias))
        yield
    finally:
        for m in layers:
            m._built = None


def set_deconv_impl(module: nn.Module, impl: str) -> nn.Module:
    """Set ``impl`` (``"auto"``, ``"subpixel"``, ``"taps"`` or ``"native"``: see
    :class:`SubpixelConvTranspose2d`) on every :class:`SubpixelConvTranspose2d` inside
    ``module``; returns ``module``.  Only the way the transposed convolutions are computed
    changes: parameters, state dict and values (to float rounding) are the same."""
    if impl not in DECONV_IMPLS:
        raise ValueError(f"deconvolution impl must be one of {', '.join(DECONV_IMPLS)}, "
                         f"got {impl!r}")
    for m in module.modules():
        if isinstance(m, SubpixelConvTranspose2d):
            m.impl = impl
    return module
