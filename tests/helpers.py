"""Small stand-ins shared by the per-method tests (imported as ``helpers``: pytest puts
tests/ on sys.path)."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

SHAPE = (1, 28, 28)
D = 28 * 28


def cli_usage_error(argv, capsys) -> str:
    """The one line ``gpvae ARGV`` prints on stderr when its parser refuses a flag (exit
    status 2, before any work); fails unless it is exactly one line."""
    from gpvae.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


class Data:
    """A tensor of images with the two methods of :class:`gpvae.data.ImageData` that
    evaluation uses (``len`` and ``batch``), so float64 images can be scored as they are."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return self.x.shape[0]

    def batch(self, idx, device=None):
        return self.x[idx]


def images(n, seed=1, dtype=torch.float64, shape=SHAPE):
    """n uniform random images, reproducible from ``seed``."""
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class LinearDecoder(nn.Module):
    """g(z) = A z + b reshaped to an image (fixed: A and b are buffers).  With p(z) = N(0, I)
    and a Gaussian likelihood, p(x) = N(b, A Aᵀ + σ² I) and p(z|x) are known in closed form."""

    def __init__(self, A, b, shape=SHAPE):
        super().__init__()
        self.shape = tuple(shape)
        self.register_buffer("A", A)
        self.register_buffer("b", b)

    def forward(self, z):
        return (z @ self.A.T + self.b).reshape(*z.shape[:-1], *self.shape)


class TrainableLinearDecoder(LinearDecoder):
    """:class:`LinearDecoder` with A and b as parameters (for gradient checks)."""

    def __init__(self, A, b, shape=SHAPE):
        nn.Module.__init__(self)
        self.shape = tuple(shape)
        self.A, self.b = nn.Parameter(A), nn.Parameter(b)


class TanhDecoder(nn.Module):
    """A tiny smooth decoder (no ReLU kinks) for finite differences, float64."""

    def __init__(self, d, hidden=3, seed=0, shape=SHAPE):
        super().__init__()
        self.shape = tuple(shape)
        g = torch.Generator().manual_seed(seed)
        n_out = 1
        for s in self.shape:
            n_out *= s
        self.w1 = nn.Parameter(torch.randn(hidden, d, generator=g, dtype=torch.float64))
        self.w2 = nn.Parameter(0.3 * torch.randn(n_out, hidden, generator=g, dtype=torch.float64))

    def forward(self, z):
        return (torch.tanh(z @ self.w1.T) @ self.w2.T).reshape(*z.shape[:-1], *self.shape)


class CountFlops(TorchDispatchMode):
    """Matrix-product and convolution FLOPs (PyTorch's own formulas) of every op run,
    backward included.  (FlopCounterMode's module tracker cannot follow autograd.grad
    w.r.t. leaf tensors, so the formulas are applied directly.)  Also oneDNN's matrix
    product ``mkldnn::_linear_pointwise`` (gpvae.onednn.linear_kernel), which the
    registry does not know: 2 M K N; ``onednn`` counts its calls."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.onednn = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        elif "mkldnn._linear_pointwise" in str(func):
            self.total += 2 * args[0].numel() * args[1].shape[0]
            self.onednn += 1
        return out


def assert_is_the_vae(vae, model, x, modes=("train",)):
    """``model`` built after the same seed as ``vae`` is the VAE bit for bit: state dict,
    q(z|x), the training objective and its diagnostics (in each of ``modes``), IWAE/ELBO."""
    from gpvae.evaluation import estimate

    sv, sm = vae.state_dict(), model.state_dict()
    assert list(sv) == list(sm)
    assert all(torch.equal(sv[k], sm[k]) for k in sv)
    qv, qm = vae.posterior(x), model.posterior(x)
    assert type(qv) is type(qm)
    assert torch.equal(qv.mean, qm.mean) and torch.equal(qv.stddev, qm.stddev)
    for mode in modes:
        getattr(vae, mode)(), getattr(model, mode)()
        torch.manual_seed(3)
        ov, dv = vae.training_objective(x, n_train=100)
        torch.manual_seed(3)
        om, dm = model.training_objective(x, n_train=100)
        assert torch.equal(ov, om) and dv.keys() == dm.keys()
        assert all(torch.equal(dv[k], dm[k]) for k in dv)
    ev = estimate(vae, Data(x), samples=10, progress=False)
    em = estimate(model, Data(x), samples=10, progress=False)
    assert torch.equal(ev.iwae, em.iwae) and torch.equal(ev.elbo, em.elbo)
    assert model.extra_posterior_flops(8) == 0
