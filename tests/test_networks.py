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
