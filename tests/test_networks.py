"""Tab. 6/7/8 networks: shapes for every image size and latent dimension, Sec. 11 FC decoder size."""
import pytest
import torch

from gpvae.errors import ConfigError
from gpvae.networks import (ARCHITECTURES, ConvDecoder, EncoderTrunk, FCDecoder, GaussianEncoder,
                            architecture_for, count_parameters)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
@pytest.mark.parametrize("d", [10, 20, 50])
def test_shapes(shape, d):
    arch = architecture_for(shape)
    enc, dec = GaussianEncoder(arch, d), ConvDecoder(arch, d)
    x = torch.rand(3, *shape)
    mean, std = enc(x)
    assert mean.shape == std.shape == (3, d)
    assert (std > 0).all()
    assert EncoderTrunk(arch)(x).shape == (3, arch.hidden)
    assert dec(torch.randn(5, 3, d)).shape == (5, 3, *shape)
    assert FCDecoder(arch, d)(torch.randn(4, d)).shape == (4, *shape)


def test_hidden_sizes_and_layers_match_the_tables():
    assert architecture_for((1, 28, 28)).hidden == 256  # Tab. 6
    assert architecture_for((3, 32, 32)).hidden == 512  # Tab. 7
    assert architecture_for((3, 64, 64)).hidden == 512  # Tab. 8
    convs = [m for m in EncoderTrunk(architecture_for((3, 64, 64))).modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    deconvs = [m for m in ConvDecoder(architecture_for((3, 64, 64)), 10).modules()
               if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.out_channels for c in deconvs] == [64, 32, 32, 3]
    leaky = [m for m in EncoderTrunk(architecture_for((1, 28, 28))).modules()
             if isinstance(m, torch.nn.LeakyReLU)]
    assert len(leaky) == 4 and all(m.negative_slope == 0.01 for m in leaky)


@pytest.mark.parametrize("shape", list(ARCHITECTURES))
@pytest.mark.parametrize("d", [10, 20, 50])
def test_fc_decoder_parameter_count_within_10_percent(shape, d):
    arch = architecture_for(shape)
    conv, fc = count_parameters(ConvDecoder(arch, d)), count_parameters(FCDecoder(arch, d))
    assert abs(fc - conv) / conv < 0.10
    assert len([m for m in FCDecoder(arch, d).modules() if isinstance(m, torch.nn.Linear)]) == 3


def test_unknown_shape_is_a_clear_error():
    with pytest.raises(ConfigError, match="no network architecture"):
        architecture_for((1, 30, 30))


# --- FastLinear: nn.Linear on oneDNN where nothing is differentiated ----------------------
def _spy_onednn(monkeypatch):
    from gpvae import onednn

    calls = []
    real = onednn._onednn_linear

    def spy(x, weight, bias=None):
        calls.append(tuple(weight.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(onednn, "_onednn_linear", spy)
    return calls


def test_fast_linear_is_linear_on_onednn_in_evaluation_only(monkeypatch):
    """The same values and state dict as nn.Linear; its product on oneDNN without
    autograd on a CPU in float32, as F.linear (with gradients equal to nn.Linear's) when
    training, in float64, or with ``fast = False``."""
    from gpvae.networks import FastLinear

    torch.manual_seed(0)
    ref, fast = torch.nn.Linear(20, 7), FastLinear(20, 7)
    fast.load_state_dict(ref.state_dict())
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 5, 20)
    calls = _spy_onednn(monkeypatch)
    with torch.no_grad():
        out = fast(x)
    assert calls == [(7, 20)]
    assert torch.allclose(out, ref(x).detach(), rtol=1e-6, atol=1e-6)
    fast.fast = False
    with torch.no_grad():
        fast(x)
    fast.fast = True
    fast.double()(x.double()).sum()
    xg = x.clone().requires_grad_()
    fast.float()(xg).square().sum().backward()
    assert calls == [(7, 20)]  # none of those on oneDNN
    xr = x.clone().requires_grad_()
    ref(xr).square().sum().backward()
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fast.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fast.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_every_fc_layer_of_the_networks_is_a_fast_linear(monkeypatch, shape):
    """Trunk, head and both decoders: each of their Linear layers runs on oneDNN in
    evaluation; set_plain_decoding puts the conv decoder's back on F.linear."""
    from gpvae.networks import FastLinear, set_plain_decoding

    arch = architecture_for(shape)
    nets = [GaussianEncoder(arch, 10), ConvDecoder(arch, 10), FCDecoder(arch, 10)]
    linears = [m for net in nets for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 + 2 + 3 and all(type(m) is FastLinear for m in linears)
    calls = _spy_onednn(monkeypatch)
    weights = [tuple(m.weight.shape) for m in linears]

    def linear_calls():  # (the decoder's taps form makes one more product, not a layer's)
        return sorted(c for c in calls if c in weights)

    with torch.no_grad():
        nets[0](torch.rand(2, *shape))
        nets[1](torch.randn(2, 10))
        nets[2](torch.randn(2, 10))
        assert linear_calls() == sorted(weights)
        set_plain_decoding(nets[1])
        nets[1](torch.randn(2, 10))
        assert linear_calls() == sorted(weights)
        set_plain_decoding(nets[1], plain=False)
        nets[1](torch.randn(2, 10))
        assert len(linear_calls()) == len(weights) + 2


def test_exported_networks_keep_the_portable_product():
    """torch.export of an encoder and a decoder without autograd (as ``gpvae export`` runs
    it): the graph holds PyTorch's own linear, never the CPU-only oneDNN op FastLinear
    takes in eager evaluation, and never the taps form's in-place planes."""
    arch = architecture_for((1, 28, 28))
    for net, example in [(GaussianEncoder(arch, 10).eval(), torch.rand(2, 1, 28, 28)),
                         (ConvDecoder(arch, 10).eval(), torch.randn(2, 10))]:
        with torch.no_grad():
            program = torch.export.export(net, (example,))
            torch.testing.assert_close(program.module()(example), net(example))
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any("linear" in t or "addmm" in t for t in targets), targets
        assert not any("mkldnn" in t for t in targets), targets
