"""Encoder and decoder networks of the paper's supplement (Sec. 8, Tab. 6-8) and Sec. 11.

* Tab. 6 (28x28x1, MNIST/OMNIGLOT): three 4x4 stride-2 convolutions (32, 32, 64 channels,
  LeakyReLU(0.01)), FC h=256 (LeakyReLU(0.01)), FC 2d.  Decoder: FC 256, FC 3*3*64 (ReLU),
  transposed convolutions 32, 32, 1 (4x4, stride 2; ReLU between).
* Tab. 7 (32x32x3, CIFAR10/SVHN): the same with h=512 and a 4*4*64 decoder seed.
* Tab. 8 (64x64x3, CelebA): four convolutions (32, 32, 64, 64), h=512; decoder
  FC 512, FC 4*4*64, transposed convolutions 64, 32, 32, 3.

"The paddings are properly adjusted to match the input/output dimensions" (Tab. 6 caption):
we use padding 1 everywhere, and output_padding 1 in the first transposed convolution of
Tab. 6 (3 -> 7).  The decoder's last layer has no activation (the table lists none): it
outputs the Gaussian mean, or the Bernoulli logits.

The encoder is split into a *trunk* (all but the last FC layer, output dimension h) and a
*head* (the last FC layer, 2d outputs).  The GPVAE's feature networks psi^m, psi^s (Sec. 5,
"Network architectures") are exactly a trunk: :class:`EncoderTrunk`.

Sec. 11's fully-connected decoder has two hidden layers whose width is solved so that its
parameter count equals the convolutional decoder's (:func:`fc_decoder_width`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .onednn import fast_linear
from .precision import upcast
from .subpixel import (SubpixelConvTranspose2d, kernels_built_once,
                       set_deconv_impl)  # noqa: F401 (set_deconv_impl: re-export)


@dataclass(frozen=True)
class Architecture:
    """One row of Tab. 6/7/8: everything that depends on the image shape."""

    image_shape: tuple[int, int, int]
    enc_channels: tuple[int, ...]
    hidden: int  # h
    dec_seed: tuple[int, int, int]  # (channels, height, width) after the decoder's FC layers
    dec_channels: tuple[int, ...]  # transposed-conv output channels, the last = image channels
    dec_output_padding: tuple[int, ...]


ARCHITECTURES: dict[tuple[int, int, int], Architecture] = {
    (1, 28, 28): Architecture((1, 28, 28), (32, 32, 64), 256, (64, 3, 3), (32, 32, 1), (1, 0, 0)),
    (3, 32, 32): Architecture((3, 32, 32), (32, 32, 64), 512, (64, 4, 4), (32, 32, 3), (0, 0, 0)),
    (3, 64, 64): Architecture(
        (3, 64, 64), (32, 32, 64, 64), 512, (64, 4, 4), (64, 32, 32, 3), (0, 0, 0, 0)
    ),
}


def architecture_for(image_shape) -> Architecture:
    """The Tab. 6/7/8 architecture for an image shape (C, H, W)."""
    key = tuple(int(s) for s in image_shape)
    if key not in ARCHITECTURES:
        known = ", ".join("x".join(map(str, k)) for k in ARCHITECTURES)
        raise ConfigError(f"no network architecture for images of shape {key}; known: {known}")
    return ARCHITECTURES[key]


def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.01)


class _ChannelsLast:
    """``use_channels_last``: NHWC (the default, faster: the layout oneDNN's and cuDNN's fast
    convolution kernels want) or NCHW for a module's (transposed) convolutions.  Only the
    memory layout changes: the values, the state dict and the outputs are the same."""

    channels_last = False

    def use_channels_last(self, enabled: bool = True):
        self.channels_last = enabled
        # only 4-d tensors (the convolution weights) change layout
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        return self


def set_channels_last(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every network inside ``module`` to NHWC (``enabled``) or NCHW; returns it."""
    for m in module.modules():
        if isinstance(m, _ChannelsLast):
            m.use_channels_last(enabled)
    return module


class FastLinear(nn.Linear):
    """``nn.Linear`` (the same parameters, state-dict keys and values to rounding) whose
    product runs on oneDNN where nothing is differentiated on a CPU in float32
    (:func:`gpvae.onednn.fast_linear`: evaluation, SA's and VLAE's test-time passes, the
    IWAE's decoder), and as ``F.linear`` everywhere else -- training, other dtypes and
    devices, ``torch.func`` transforms, compiled or exported graphs.  ``fast = False``
    always uses ``F.linear`` (:func:`set_plain_decoding`: the code as it was)."""

    fast = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.fast and input.is_cpu):  # (on a GPU: no checks added to the launch path)
            return super().forward(input)
        return fast_linear(input, self.weight, self.bias)


#: the Linear classes whose forward is exactly ``x W^T + b`` (what SA's and VLAE's written-out
#: decoder derivatives assume of a layer)
LINEARS = (nn.Linear, FastLinear)


class EncoderTrunk(_ChannelsLast, nn.Module):
    """Convolutions + the first FC layer of the encoder: x (B,C,H,W) -> features (B, h).

    Used as the VAE encoder's body and, unchanged, as the GPVAE's feature networks psi(x).
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = arch.image_shape[0], arch.image_shape[1]
        for c_out in arch.enc_channels:
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), _leaky()]
            c_in, size = c_out, (size + 2 - 4) // 2 + 1
        layers += [nn.Flatten(), FastLinear(c_in * size * size, arch.hidden), _leaky()]
        self.net = nn.Sequential(*layers)
        self.out_features = arch.hidden
        self.use_channels_last(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC: oneDNN's fast convolution kernels (see ConvDecoder.forward); the first,
        # one-input-channel convolution of Tab. 6 gains most (docs/benchmarks.md)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)


class GaussianEncoder(nn.Module):
    """Tab. 6/7/8 encoder: x -> (mean, std) of a diagonal Gaussian, each (B, d).

    The last FC layer outputs 2d numbers; the second half is mapped to a positive
    standard deviation with softplus (plus a small floor for numerical safety).
    """

    def __init__(self, arch: Architecture, latent_dim: int, min_std: float = 1e-4):
        super().__init__()
        self.trunk = EncoderTrunk(arch)
        self.head = FastLinear(arch.hidden, 2 * latent_dim)
        self.latent_dim = latent_dim
        self.min_std = min_std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_head(self.head(self.trunk(x)))

    def split_head(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) from raw head outputs (..., 2d): this encoder's parametrisation, for
        methods that put more heads on the trunk's features (HF, ME).  In float32 under
        bfloat16 autocast (:func:`gpvae.precision.upcast`: the softplus too)."""
        mean, pre_std = upcast(out).chunk(2, dim=-1)
        return mean, nn.functional.softplus(pre_std) + self.min_std


class DecoderReLU(nn.ReLU):
    """``nn.ReLU`` that, when ``inplace``, runs in place only outside ``torch.func``
    transforms: under ``vmap`` / ``jacfwd`` (VLAE's decoder Jacobian, packed training) an
    in-place update of a batched or dual tensor costs more than the buffer it saves."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        inplace = self.inplace and torch._C._functorch.maybe_current_level() is None
        return nn.functional.relu(input, inplace=inplace)


class ConvDecoder(_ChannelsLast, nn.Module):
    """Tab. 6/7/8 decoder: z (..., d) -> image-shaped output (..., C, H, W).

    Any number of leading batch dimensions is accepted (they are flattened for the
    convolutions), so K importance samples x B images decode in one call.

    The transposed convolutions are :class:`~gpvae.subpixel.SubpixelConvTranspose2d`
    (``nn.ConvTranspose2d``: the same parameters and state-dict keys); how they are
    computed -- natively or as ordinary convolutions plus a pixel shuffle, the same values
    -- is :func:`set_deconv_impl` (default ``"auto"``: in evaluation on a CPU the fastest
    form of each layer, :func:`gpvae.subpixel.fastest_form`; native when training and on
    CUDA).

    The ReLUs run in place (:class:`DecoderReLU`: no second buffer per activation; none of
    the layers before them needs its output for its backward pass, and autograd checks
    that), except under ``torch.func`` transforms; :func:`set_inplace_relu` switches that
    off, e.g. to time the code as it was.

    Cache blocking: on a CPU, a pass that records no gradient (evaluation) and decodes many
    z's goes through the convolutions in equal blocks of z's whose largest activation takes
    at most ``eval_block_bytes`` (default :data:`EVAL_BLOCK_BYTES`) per thread, so each
    block's activations stay in the processor's caches between layers instead of going out
    to memory; the outputs are concatenated.  Each z is decoded by the same operations
    either way.  :func:`set_eval_block_bytes` changes it (None: one pass).
    """

    #: default largest activation of one evaluation block on a CPU, per thread (bytes)
    EVAL_BLOCK_BYTES = 1 << 22

    def __init__(self, arch: Architecture, latent_dim: int):
        super().__init__()
        seed = arch.dec_seed
        self.seed_shape = seed
        self.fc = nn.Sequential(
            FastLinear(latent_dim, arch.hidden),
            DecoderReLU(inplace=True),
            FastLinear(arch.hidden, seed[0] * seed[1] * seed[2]),
            DecoderReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        c_in = seed[0]
        n = len(arch.dec_channels)
        for i, (c_out, op) in enumerate(zip(arch.dec_channels, arch.dec_output_padding)):
            layers.append(SubpixelConvTranspose2d(c_in, c_out, 4, stride=2, padding=1,
                                                  output_padding=op))
            if i < n - 1:
                layers.append(DecoderReLU(inplace=True))
            c_in = c_out
        self.deconv = nn.Sequential(*layers)
        self.image_shape = arch.image_shape
        # elements of the largest activation of one z (a transposed convolution's output)
        size, largest = seed[1], 0
        for c_out, op in zip(arch.dec_channels, arch.dec_output_padding):
            size = 2 * size + op
            largest = max(largest, c_out * size * size)
        self.largest_activation = largest
        self.eval_block_bytes: int | None = self.EVAL_BLOCK_BYTES
        self.use_channels_last(True)

    def use_channels_last(self, enabled: bool = True):
        super().use_channels_last(enabled)
        for m in self.deconv:  # the layout the sub-pixel shuffle writes
            if isinstance(m, SubpixelConvTranspose2d):
                m.channels_last = enabled
        return self

    def eval_block(self, z: torch.Tensor) -> int | None:
        """The largest number of z's per pass for decoding ``z`` (..., d) now: None (one
        pass) unless on a CPU with no gradient recorded (cache blocking, class docstring),
        and not inside ``torch.compile`` (which plans the memory of its graph itself)."""
        if (not self.eval_block_bytes or torch.is_grad_enabled() or z.device.type != "cpu"
                or z.dim() < 2 or torch.compiler.is_compiling()):
            return None
        budget = self.eval_block_bytes * torch.get_num_threads()
        return max(1, budget // (self.largest_activation * z.element_size()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        z = z.reshape(-1, z.shape[-1])
        block = self.eval_block(z)
        if block is not None and z.shape[0] > block:
            blocks = -(-z.shape[0] // block)  # equal blocks of at most `block` z's
            with kernels_built_once(self.deconv):  # once per call, not once per block
                out = torch.cat([self._decode(part) for part in z.tensor_split(blocks)])
        else:
            out = self._decode(z)
        return out.reshape(*lead, *self.image_shape)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, *self.seed_shape)
        # channels-last (NHWC) is the layout oneDNN's (and cuDNN's) fast kernels want: the
        # decoder's throughput in each layout is in docs/benchmarks.md
        # (scripts/bench_layout.py).
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        return self.deconv(h)


@contextlib.contextmanager
def recorded_outputs(modules):
    """Within the block, the outputs of each of ``modules`` as they run: one list per module,
    in call order (several entries when a decoder runs its layers on blocks of z's).  The
    hooks are removed when the block ends, however it ends.  For the written-out decoder
    derivatives (SA's backward pass, VLAE's Jacobian), which need the ReLUs' outputs."""
    outputs: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda mod, args, out, j=j: outputs[j].append(out))
               for j, m in enumerate(modules)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def set_plain_decoding(module: nn.Module, plain: bool = True) -> nn.Module:
    """Every :class:`ConvDecoder` inside ``module`` decoding as it did before its speed-ups
    (``plain``: native transposed convolutions, out-of-place ReLUs, one pass per call,
    ``F.linear`` products (:class:`FastLinear`) -- the
    baseline ``gpvae bench-iwae`` times) or with them (the defaults: :func:`set_deconv_impl`
    ``"auto"``, :func:`set_inplace_relu`, :func:`set_eval_block_bytes` of
    :attr:`ConvDecoder.EVAL_BLOCK_BYTES`); returns ``module``.  The values are the same to
    float rounding."""
    for dec in module.modules():
        if isinstance(dec, ConvDecoder):
            set_deconv_impl(dec, "native" if plain else "auto")
            set_inplace_relu(dec, not plain)
            set_eval_block_bytes(dec, None if plain else ConvDecoder.EVAL_BLOCK_BYTES)
            for m in dec.modules():
                if isinstance(m, FastLinear):
                    m.fast = not plain
    return module


def set_eval_block_bytes(module: nn.Module, block_bytes: int | None) -> nn.Module:
    """Set the cache blocking of every :class:`ConvDecoder` inside ``module`` (the largest
    activation of one evaluation block on a CPU, in bytes; None: no blocking); returns it."""
    if block_bytes is not None and (isinstance(block_bytes, bool)
                                    or not isinstance(block_bytes, int) or block_bytes < 1):
        raise ValueError(f"block_bytes must be a positive integer or None, got {block_bytes!r}")
    for m in module.modules():
        if isinstance(m, ConvDecoder):
            m.eval_block_bytes = block_bytes
    return module


def set_inplace_relu(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Run the ReLUs of every :class:`ConvDecoder` inside ``module`` in place (``enabled``,
    the default) or out of place (as before: one more buffer per activation); returns it.
    The values are the same."""
    for dec in module.modules():
        if isinstance(dec, ConvDecoder):
            for m in dec.modules():
                if isinstance(m, nn.ReLU):
                    m.inplace = enabled
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fc_decoder_width(arch: Architecture, latent_dim: int) -> int:
    """Hidden width H of Sec. 11's two-hidden-layer FC decoder with the conv decoder's size.

    Solves (d+1)H + (H+1)H + (H+1)D = P_conv for H, D = number of pixels.
    """
    target = count_parameters(ConvDecoder(arch, latent_dim))
    d, out = latent_dim, math.prod(arch.image_shape)
    # H^2 + (d + 2 + D) H + (D - target) = 0
    b, c = d + 2 + out, out - target
    return max(1, round((-b + math.sqrt(b * b - 4 * c)) / 2))


class FCDecoder(nn.Module):
    """Sec. 11's fully-connected decoder: z -> FC H, ReLU -> FC H, ReLU -> FC C*H*W."""

    def __init__(self, arch: Architecture, latent_dim: int, width: int | None = None):
        super().__init__()
        width = width or fc_decoder_width(arch, latent_dim)
        self.net = nn.Sequential(
            FastLinear(latent_dim, width),
            nn.ReLU(),
            FastLinear(width, width),
            nn.ReLU(),
            FastLinear(width, math.prod(arch.image_shape)),
        )
        self.image_shape = arch.image_shape
        self.width = width

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(*z.shape[:-1], *self.image_shape)


DECODERS = {"conv": ConvDecoder, "fc": FCDecoder}


def make_decoder(kind: str, arch: Architecture, latent_dim: int) -> nn.Module:
    if kind not in DECODERS:
        raise ConfigError(f"unknown decoder {kind!r}; choose from {', '.join(DECODERS)}")
    return DECODERS[kind](arch, latent_dim)
