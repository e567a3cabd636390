"""The sub-pixel form of the decoders' transposed convolutions (gpvae.subpixel) and the
ConvDecoder's evaluation speed-ups (in-place ReLUs, cache blocking): the same values as
nn.ConvTranspose2d / the plain decoder, in every mode the project runs them in (autograd,
forward-mode AD, vmap, float64, channels-last), and the same parameters and state dicts."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacfwd, jvp, stack_module_state, vmap
from torch.nn import functional as F

from helpers import Data, images
from gpvae.evaluation import estimate
from gpvae.models import build_model
from gpvae.networks import (ARCHITECTURES, ConvDecoder, DecoderReLU, architecture_for,
                            set_channels_last, set_deconv_impl, set_eval_block_bytes,
                            set_inplace_relu, set_plain_decoding)
from gpvae.subpixel import (SubpixelConvTranspose2d, kernels_built_once,
                            subpixel_conv_transpose2d, subpixel_weight, taps_conv_transpose2d,
                            taps_weight)

F64 = torch.float64
#: the two ways of computing a transposed convolution with ordinary convolutions
FORMS = {"subpixel": subpixel_conv_transpose2d, "taps": taps_conv_transpose2d}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer_configs():
    """(C_in, C_out, H, output_padding) of every transposed convolution of Tab. 6/7/8."""
    out = []
    for arch in ARCHITECTURES.values():
        c_in, size = arch.dec_seed[0], arch.dec_seed[1]
        for c_out, op in zip(arch.dec_channels, arch.dec_output_padding):
            out.append((c_in, c_out, size, op))
            c_in, size = c_out, 2 * size + op
    return out


def _operands(c_in, c_out, h, w, batch=(2,), seed=0, bias=True):
    g = _gen(seed)
    x = torch.randn(*batch, c_in, h, w, generator=g, dtype=F64)
    weight = torch.randn(c_in, c_out, 4, 4, generator=g, dtype=F64)
    b = torch.randn(c_out, generator=g, dtype=F64) if bias else None
    return x, weight, b


def _close(a, b, tol=1e-12):
    assert a.shape == b.shape
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale


# --- the function -------------------------------------------------------------------------
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("c_in, c_out, h, op", _layer_configs())
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_conv_transpose2d_for_every_table_layer(form, c_in, c_out, h, op, channels_last):
    x, w, b = _operands(c_in, c_out, h, h)
    ref = F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=op)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = FORMS[form](x, w, b, (op, op), channels_last=channels_last)
    _close(out, ref)
    if channels_last:  # the shuffle wrote NHWC (the crop of a channels-last tensor)
        assert out.permute(0, 2, 3, 1).stride()[-1] == 1


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("h, w", [(1, 1), (2, 5), (3, 3), (4, 7)])
@pytest.mark.parametrize("op", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_odd_sizes_output_paddings_no_bias(form, h, w, op, channels_last):
    x, wt, _ = _operands(3, 2, h, w, seed=h * 10 + w)
    ref = F.conv_transpose2d(x, wt, None, stride=2, padding=1, output_padding=op)
    _close(FORMS[form](x, wt, None, op, channels_last), ref)


@pytest.mark.parametrize("form", list(FORMS))
def test_unbatched_input_and_int_output_padding(form):
    x, w, b = _operands(4, 3, 3, 5, batch=())
    ref = F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1)
    _close(FORMS[form](x, w, b, 1), ref)


def test_kernel_is_the_phase_taps():
    """Channel (s, t, c) of the 2x2 kernel holds, per dimension, taps (w3, w1) for s = 1
    (output phase 0) and (w2, w0) for s = 0 (phase 1) -- written out, not derived."""
    w = torch.arange(2 * 3 * 16, dtype=F64).reshape(2, 3, 4, 4)
    k = subpixel_weight(w).reshape(2, 2, 3, 2, 2, 2)  # s, t, c_out, c_in, ty, tx
    taps = {0: (2, 0), 1: (3, 1)}
    for s in (0, 1):
        for t in (0, 1):
            for ty in (0, 1):
                for tx in (0, 1):
                    assert torch.equal(k[s, t, :, :, ty, tx],
                                       w[:, :, taps[s][ty], taps[t][tx]].T)


def test_taps_kernel_is_each_pixels_contribution():
    """Channel (dy, dx, s, t, c) of the 1x1 kernel is tap (2 dy + s, 2 dx + t)."""
    w = torch.arange(2 * 3 * 16, dtype=F64).reshape(2, 3, 4, 4)
    k = taps_weight(w).reshape(2, 2, 2, 2, 3, 2)  # dy, dx, s, t, c_out, c_in
    for dy, dx, s, t in torch.cartesian_prod(*[torch.arange(2)] * 4).tolist():
        assert torch.equal(k[dy, dx, s, t], w[:, :, 2 * dy + s, 2 * dx + t].T)


@pytest.mark.parametrize("form", list(FORMS))
def test_bad_operands_are_rejected(form):
    x, w, b = _operands(2, 2, 3, 3)
    with pytest.raises(ValueError, match="4x4"):
        FORMS[form](x, w[..., :3, :3], b)
    with pytest.raises(ValueError, match="output_padding"):
        FORMS[form](x, w, b, (2, 0))


@pytest.mark.parametrize("form", list(FORMS))
def test_runs_on_the_weights_device_without_making_tensors_elsewhere(form):
    """Nothing is built on the default device: on the meta device the shapes come out."""
    x = torch.empty(2, 5, 3, 4, device="meta")
    w, b = torch.empty(5, 6, 4, 4, device="meta"), torch.empty(6, device="meta")
    out = FORMS[form](x, w, b, (1, 0))
    assert out.device.type == "meta" and out.shape == (2, 6, 7, 8)


# --- derivatives, vmap ----------------------------------------------------------------------
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("op", [(0, 0), (1, 1)])
def test_backward_equal(form, op):
    x, w, b = _operands(3, 2, 3, 4, seed=3)
    g = torch.randn(2, 2, 6 + op[0], 8 + op[1], generator=_gen(4), dtype=F64)
    grads = []
    for fn in (lambda *a: F.conv_transpose2d(*a, stride=2, padding=1, output_padding=op),
               lambda *a: FORMS[form](*a, op)):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        grads.append(torch.autograd.grad(fn(*leaves), leaves, g))
    for ref, got in zip(*grads):
        _close(got, ref)


@pytest.mark.parametrize("form", list(FORMS))
def test_jvp_and_jacfwd_equal(form):
    x, w, b = _operands(2, 2, 2, 3, seed=5, batch=(1,))
    tx, tw = torch.randn_like(x), torch.randn_like(w)

    def native(x, w):
        return F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=(1, 0))

    def sub(x, w):
        return FORMS[form](x, w, b, (1, 0))

    (p_ref, t_ref), (p, t) = jvp(native, (x, w), (tx, tw)), jvp(sub, (x, w), (tx, tw))
    _close(p, p_ref)
    _close(t, t_ref)
    _close(jacfwd(sub)(x, w), jacfwd(native)(x, w))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_vmap_over_stacked_weights(form, channels_last):
    x, w, b = _operands(3, 2, 3, 3, seed=6, batch=(4, 2))  # 4 replicas
    ws = torch.randn(4, 3, 2, 4, 4, generator=_gen(7), dtype=F64)
    bs = torch.randn(4, 2, generator=_gen(8), dtype=F64)
    out = vmap(lambda x, w, b: FORMS[form](x, w, b, (1, 1), channels_last))(x, ws, bs)
    for r in range(4):
        _close(out[r], F.conv_transpose2d(x[r], ws[r], bs[r], stride=2, padding=1,
                                          output_padding=1))


# --- the module -----------------------------------------------------------------------------
def _module_pair(c_in=3, c_out=2, op=1, seed=9, impl="subpixel"):
    torch.manual_seed(seed)
    native = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, output_padding=op).double()
    sub = SubpixelConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, output_padding=op).double()
    sub.load_state_dict(native.state_dict())
    return native, set_deconv_impl(sub, impl)


@pytest.mark.parametrize("form", list(FORMS))
def test_module_has_the_parameters_and_results_of_conv_transpose2d(form):
    native, sub = _module_pair(impl=form)
    assert list(sub.state_dict()) == list(native.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 3, 4, 5, generator=_gen(10), dtype=F64)
    assert sub.form() == form
    _close(sub(x), native(x))
    _close(sub(x[0]), native(x[0]))  # unbatched
    # output_size picks the output padding, as in nn.ConvTranspose2d
    for size in ([8, 10], [9, 10], [8, 11], [9, 11]):
        _close(sub(x, output_size=size), native(x, output_size=size))
    set_deconv_impl(sub, "native")
    assert sub.form() == "native"
    with pytest.raises(ValueError, match="impl"):
        set_deconv_impl(sub, "fast")


@pytest.mark.parametrize("form", list(FORMS))
def test_module_under_functional_call_and_vmap_like_packing(form):
    mods = [_module_pair(seed=s, impl=form)[1] for s in (11, 12, 13)]
    params, buffers = stack_module_state(mods)
    x = torch.randn(3, 2, 3, 4, 4, generator=_gen(14), dtype=F64)

    def step(p, b, x):
        return functional_call(mods[0], (p, b), (x,))

    out = vmap(step)(params, buffers, x)
    for r, m in enumerate(mods):
        _close(out[r], F.conv_transpose2d(x[r], m.weight, m.bias, stride=2, padding=1,
                                          output_padding=1))


def _forms(dec):
    return [m.form() for m in dec.modules() if isinstance(m, SubpixelConvTranspose2d)]


def test_auto_rule():
    """``auto``: on a CPU with no gradient recorded for the weight, taps for one output
    channel, sub-pixel for few output channels or output padding, native otherwise; native
    whenever the weight's gradient is recorded."""
    dec = ConvDecoder(architecture_for((1, 28, 28)), 4)
    with torch.no_grad():
        assert _forms(dec) == ["subpixel", "native", "taps"]
        assert _forms(ConvDecoder(architecture_for((3, 32, 32)), 4)) == [
            "native", "native", "subpixel"]
        assert _forms(ConvDecoder(architecture_for((3, 64, 64)), 4)) == [
            "native", "native", "native", "subpixel"]
    assert _forms(dec) == ["native"] * 3
    dec.requires_grad_(False)  # frozen weights: no gradient recorded for them
    assert _forms(dec) == ["subpixel", "native", "taps"]
    dec.requires_grad_(True)
    for impl in ("subpixel", "taps"):
        set_deconv_impl(dec, impl)
        assert _forms(dec) == [impl] * 3
    set_deconv_impl(dec, "native")
    with torch.no_grad():
        assert _forms(dec) == ["native"] * 3


# --- the decoder ----------------------------------------------------------------------------
def _decoders(shape, d=3, seed=0):
    torch.manual_seed(seed)
    plain = set_plain_decoding(ConvDecoder(architecture_for(shape), d).double())
    fast = ConvDecoder(architecture_for(shape), d).double()
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def test_state_dict_round_trip_with_a_native_decoder():
    """A decoder built with plain nn.ConvTranspose2d layers (checkpoints written before the
    sub-pixel layers) loads unchanged, and back."""
    torch.manual_seed(0)
    old = ConvDecoder(architecture_for((1, 28, 28)), 3).double()
    for i, m in enumerate(old.deconv):
        if isinstance(m, SubpixelConvTranspose2d):
            plain = nn.ConvTranspose2d(m.in_channels, m.out_channels, 4, stride=2, padding=1,
                                       output_padding=m.output_padding).double()
            plain.load_state_dict(m.state_dict())
            old.deconv[i] = plain
    assert not any(isinstance(m, SubpixelConvTranspose2d) for m in old.modules())
    new = ConvDecoder(architecture_for((1, 28, 28)), 3).double()
    new.load_state_dict(old.state_dict())
    assert list(new.state_dict()) == list(old.state_dict())
    z = torch.randn(7, 3, generator=_gen(1), dtype=F64)
    with torch.no_grad():
        _close(new(z), old(z))
    old.load_state_dict(new.state_dict())


@pytest.mark.parametrize("shape", list(ARCHITECTURES))
@pytest.mark.parametrize("impl", ["auto", "subpixel", "taps"])
def test_whole_decoder_equal_in_every_impl(shape, impl):
    plain, fast = _decoders(shape)
    set_deconv_impl(fast, impl)
    set_eval_block_bytes(fast, 1 << 14)  # a few z's per block: the blocked path runs
    z = torch.randn(4, 3, 3, generator=_gen(2), dtype=F64)
    with torch.no_grad():
        assert fast.eval_block(z.reshape(-1, 3)) < 12
        ref = plain(z)
        _close(fast(z), ref)
        set_channels_last(fast, False)
        _close(fast(z), ref)
    # with gradients (auto: native; subpixel, taps: that form, in-place ReLUs)
    zr = z.clone().requires_grad_()
    out = fast(zr)
    _close(out, ref)
    g = torch.randn(out.shape, generator=_gen(3), dtype=F64)
    (gz,) = torch.autograd.grad(out, zr, g)
    zp = z.clone().requires_grad_()
    (gz_ref,) = torch.autograd.grad(plain(zp), zp, g)
    _close(gz, gz_ref)


def test_cache_blocking_splits_only_cpu_evaluation_and_keeps_the_values(monkeypatch):
    plain, fast = _decoders((1, 28, 28))
    threads = torch.get_num_threads()
    z = torch.randn(9 * threads + 1, 3, generator=_gen(4), dtype=F64)
    set_eval_block_bytes(fast, 3 * fast.largest_activation * 8)  # 3 z's of float64 a thread
    parts = []
    decode = fast._decode
    monkeypatch.setattr(fast, "_decode", lambda part: parts.append(len(part)) or decode(part))
    with torch.no_grad():
        assert fast.eval_block(z) == 3 * threads
        _close(fast(z), plain(z))
        assert plain.eval_block(z) is None
    assert sum(parts) == len(z) and len(parts) == 4 and max(parts) - min(parts) <= 1
    assert fast.eval_block(z) is None  # gradients recorded: one pass
    assert fast.largest_activation == 32 * 14 * 14
    with pytest.raises(ValueError, match="block_bytes"):
        set_eval_block_bytes(fast, 0)


def test_inplace_relu_switch():
    plain, fast = _decoders((1, 28, 28))
    relus = [m for m in fast.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 4 and all(m.inplace for m in relus)
    assert not any(m.inplace for m in plain.modules() if isinstance(m, nn.ReLU))
    assert plain.eval_block_bytes is None
    assert all(m.impl == "native" for m in plain.modules()
               if isinstance(m, SubpixelConvTranspose2d))
    set_inplace_relu(fast, False)
    assert not any(m.inplace for m in relus)
    set_plain_decoding(fast, False)
    assert all(m.inplace for m in relus) and fast.eval_block_bytes == ConvDecoder.EVAL_BLOCK_BYTES
    assert all(m.impl == "auto" for m in fast.modules() if isinstance(m, SubpixelConvTranspose2d))


@pytest.mark.parametrize("form", list(FORMS))
def test_vmap_through_the_decoder_as_packing_runs_it(form):
    plain, fast = _decoders((1, 28, 28))
    set_deconv_impl(fast, form)
    set_channels_last(fast, False)
    params, buffers = stack_module_state([fast, fast])
    z = torch.randn(2, 5, 3, generator=_gen(5), dtype=F64)
    out = vmap(lambda p, b, z: functional_call(fast, (p, b), (z,)))(params, buffers, z)
    with torch.no_grad():
        _close(out[1], plain(z[1]))


@pytest.mark.parametrize("method", ["vae", "gpvae"])
def test_iwae_estimate_equal_in_both_impls(method):
    torch.manual_seed(0)
    model = build_model(method, (1, 28, 28), latent_dim=2).double().eval()
    x = images(3)
    fast = estimate(model, Data(x), samples=6, progress=False)
    plain = estimate(set_plain_decoding(model), Data(x), samples=6, progress=False)
    assert torch.allclose(fast.iwae, plain.iwae, rtol=0, atol=1e-9)
    assert torch.allclose(fast.elbo, plain.elbo, rtol=0, atol=1e-9)


def test_kernels_built_once_per_call_never_across_calls():
    """Within one blocked call the sub-pixel kernels are built once; a weight changed
    between calls (an optimizer step, load_state_dict) is seen by the next call."""
    plain, fast = _decoders((1, 28, 28))
    set_eval_block_bytes(fast, 1)  # one z per block
    z = torch.randn(3, 3, generator=_gen(6), dtype=F64)
    layers = [m for m in fast.modules() if isinstance(m, SubpixelConvTranspose2d)]
    with torch.no_grad():
        with kernels_built_once(fast):
            assert [m._built and m._built[0] for m in layers] == ["subpixel", None, "taps"]
        assert all(m._built is None for m in layers)
        _close(fast(z), plain(z))
        for dec in (plain, fast):
            dec.deconv[-1].weight.mul_(-2.0)  # in place, as an optimizer step
            dec.deconv[0].bias.add_(1.0)
        _close(fast(z), plain(z))
    with kernels_built_once(fast):  # gradients recorded: nothing is built
        assert all(m._built is None for m in layers)


def test_decoder_relu_in_place_only_outside_torch_func():
    relu = DecoderReLU(inplace=True)
    x = torch.randn(3, 5, generator=_gen(7))
    y = x.clone()
    assert relu(y).data_ptr() == y.data_ptr() and torch.equal(y, x.clamp_min(0))
    y = x.clone()
    out = vmap(relu)(y)
    assert torch.equal(y, x) and torch.equal(out, x.clamp_min(0))  # y left alone


@pytest.mark.parametrize("form", list(FORMS))
def test_decoder_jacobian_as_vlae_takes_it(form):
    """jacfwd through the whole decoder (VLAE's linearization: NCHW, gradients on) in
    sub-pixel / taps form equals the plain decoder's."""
    plain, fast = _decoders((1, 28, 28))
    set_deconv_impl(fast, form)
    set_channels_last(fast, False)
    set_channels_last(plain, False)
    z = torch.randn(2, 3, generator=_gen(8), dtype=F64)

    def jac(dec):
        return jacfwd(lambda u: dec(z + u).flatten(1))(z.new_zeros(3))

    _close(jac(fast), jac(plain))


def test_decoder_traces_as_one_graph():
    """torch.compile (the --compile option) traces the decoder in evaluation without a graph
    break (the cache blocking steps aside there; backend "eager": only Dynamo's tracing)."""
    plain, fast = _decoders((1, 28, 28))
    z = torch.randn(5, 3, generator=_gen(9), dtype=F64)
    compiled = torch.compile(fast, fullgraph=True, backend="eager")
    with torch.no_grad():
        _close(compiled(z), plain(z))


def test_taps_form_adds_whole_planes_in_evaluation_only(monkeypatch):
    """Without autograd (outside torch.func) the taps form takes the planes path -- the
    values are covered by every test above, which run it on plain operands -- and with a
    weight that records gradients the differentiable one."""
    from gpvae import subpixel

    calls = []
    real = subpixel._taps_by_planes
    monkeypatch.setattr(subpixel, "_taps_by_planes",
                        lambda *a: calls.append(1) or real(*a))
    x, w, b = _operands(32, 1, 14, 14)
    with torch.no_grad():
        out = taps_conv_transpose2d(x, w, b)
    assert calls == [1]
    w.requires_grad_()
    out_grad = taps_conv_transpose2d(x, w, b)
    assert calls == [1] and out_grad.requires_grad
    _close(out, out_grad)
    with torch.no_grad():
        vmap(lambda xi: taps_conv_transpose2d(xi, w, b))(x.unsqueeze(1))
    assert calls == [1]  # torch.func: the out-of-place path
