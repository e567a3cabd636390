"""ELBO and IWAE estimates of log p(x), written once against the inference interface.

For K samples z_k ~ q(z|x) the log importance weights are
``log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x)``, and (paper Sec. 10; Burda et al.)

    IWAE_K(x) = logsumexp_k(log w_k) - log K   <= log p(x),
    ELBO(x)   ~ mean_k(log w_k)                 (a K-sample Monte Carlo estimate of eq. 2).

Both come from the same weights, so one pass gives both.  Work is chunked over data and
samples so memory stays bounded whatever K is, and runs under ``torch.inference_mode``
(q(z|x) of a method whose ``posterior`` needs autograd is computed with it switched back
on for that call: :func:`gpvae.models.base.posterior_without_grad`).  Only
``model.posterior``, ``model.log_likelihood`` and ``model.log_prior`` are used: every
inference method is scored by the same code.

Precision (``precision``, :mod:`gpvae.precision`): the log weights are computed in it
(``bf16``: the networks under bfloat16 autocast, every log-density in float32, so the log
weights are float32); their logsumexp and means are always taken in float64, outside
autocast.  The default is fp32, whatever precision a run was trained in.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .devices import model_device_dtype
from .errors import ConfigError
from .likelihoods import eval_binarization
from .precision import check_precision, precision_context
from .models.base import posterior_without_grad


@dataclass
class Estimates:
    """Per-example estimates (nats per image)."""

    iwae: torch.Tensor  # (N,)
    elbo: torch.Tensor  # (N,)
    samples: int
    seconds: float

    def summary(self) -> dict:
        n = int(self.iwae.numel())

        def se(v: torch.Tensor) -> float:
            return float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")

        return {
            "test_iwae": float(self.iwae.mean()),
            "test_iwae_se": se(self.iwae),
            "test_elbo": float(self.elbo.mean()),
            "test_elbo_se": se(self.elbo),
            "iwae_samples": self.samples,
            "n": n,
            "seconds": self.seconds,
            "images_per_s": n / self.seconds if self.seconds > 0 else float("nan"),
        }


#: images per batch of ``gpvae evaluate`` (its ``--batch-size`` default); ``gpvae gap``
#: scores its IWAE with q as proposal the same way
EVAL_BATCH_SIZE = 100
#: z's decoded per call by default on a CPU (small chunks stay in the caches)
CPU_MAX_BATCH_SAMPLES = 512
#: z's decoded per call by default on CUDA for a 28 x 28 image (MNIST, OMNIGLOT); larger
#: images get proportionally fewer, so the activations of a call stay about this size
#: (about 0.5 GB per layer of the Tab. 6 decoder).  Big calls keep a GPU busy: measured
#: against 512 in docs/benchmarks.md ("On a GPU")
CUDA_MAX_BATCH_SAMPLES = 10_000


def default_max_batch_samples(device, image_shape) -> int:
    """How many z's :func:`estimate` decodes per call when not told:
    :data:`CPU_MAX_BATCH_SAMPLES` on a CPU; on CUDA :data:`CUDA_MAX_BATCH_SAMPLES` for a
    28 x 28 image, scaled down by the image's size (never below the CPU's)."""
    if torch.device(device).type != "cuda":
        return CPU_MAX_BATCH_SAMPLES
    pixels = math.prod(image_shape)
    return max(CPU_MAX_BATCH_SAMPLES, CUDA_MAX_BATCH_SAMPLES * 784 // pixels)


def prepared_batches(model, data, batch_size: int, device, dtype):
    """(lo, x) for consecutive batches of ``data`` (an :class:`~gpvae.data.ImageData`),
    prepared for the model's likelihood as every evaluation prepares them -- a binary
    likelihood scores the one fixed binarization of the images
    (:func:`gpvae.likelihoods.eval_binarization`, the same for any seed and batch size) --
    and cast to ``device`` and ``dtype``."""
    binarize = eval_binarization()
    for lo in range(0, len(data), batch_size):
        x = model.likelihood.prepare(data.batch(slice(lo, lo + batch_size)), binarize)
        yield lo, x.to(device, dtype)


def log_weights(model, x: torch.Tensor, samples: int, max_batch_samples: int = 512) -> torch.Tensor:
    """log w (K, B) for a batch x, decoding at most ``max_batch_samples`` z's at a time.
    Without gradients (call it under ``torch.inference_mode`` or ``no_grad``)."""
    q = posterior_without_grad(model, x)
    per_chunk = max(1, max_batch_samples // x.shape[0])
    out = []
    for start in range(0, samples, per_chunk):
        k = min(per_chunk, samples - start)
        z = q.sample((k,))
        out.append(model.log_likelihood(x, z) + model.log_prior(z) - q.log_prob(z))
    return torch.cat(out, 0)


def estimate(
    model,
    data,
    samples: int = 100,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_batch_samples: int | None = None,
    progress: bool = True,
    desc: str = "IWAE",
    precision: str = "fp32",
    compile="off",
) -> Estimates:
    """IWAE_K and ELBO for every image of ``data`` (an :class:`~gpvae.data.ImageData`).

    Binary likelihoods score the one fixed binarization of the images
    (:func:`prepared_batches`); ``seed`` draws the z's only.
    Each batch is cast to the dtype and device of the model's tensors (its first parameter,
    or buffer), so a model converted with ``.double()`` is scored on the same images;
    ``device`` is used only by a model that holds no tensors.  ``precision``: fp32, tf32
    or bf16 for computing the log weights (module docstring).  ``compile``: ``--compile``
    off, on or auto (:mod:`gpvae.compiling`: q(z|x) and each chunk's log weights as
    compiled graphs, the same draws, the same numbers up to float rounding).
    ``max_batch_samples``: z's decoded per call (default :func:`default_max_batch_samples`;
    the chunking decides which random numbers each image gets, not the estimator).
    """
    if samples < 1:
        raise ConfigError(f"--iwae-samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    from .progress import progress_bar

    device, dtype = model_device_dtype(model, device)
    check_precision(precision, device)
    from .compiling import inference_runner

    runner = inference_runner(model, compile, device)
    if max_batch_samples is None:
        max_batch_samples = default_max_batch_samples(device, data.batch(slice(0, 1)).shape[1:])
    elif max_batch_samples < 1:
        raise ConfigError(f"--max-batch-samples must be >= 1, got {max_batch_samples}")
    was_training = model.training
    model.eval()
    n = len(data)
    iwae = torch.empty(n, dtype=torch.float64)
    elbo = torch.empty(n, dtype=torch.float64)
    start_time = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.inference_mode():
            bar = progress_bar(n, desc=desc, unit="img", enabled=progress)
            for lo, x in prepared_batches(model, data, batch_size, device, dtype):
                hi = lo + x.shape[0]
                with precision_context(precision, device):
                    lw = (runner.log_weights(model, x, samples, max_batch_samples) if runner
                          else log_weights(model, x, samples, max_batch_samples))
                lw = lw.double()  # the reductions: float64, outside autocast
                iwae[lo:hi] = (torch.logsumexp(lw, 0) - math.log(samples)).cpu()
                elbo[lo:hi] = lw.mean(0).cpu()
                bar.update(hi - lo)
            bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start_time
    model.train(was_training)
    return Estimates(iwae=iwae, elbo=elbo, samples=samples, seconds=seconds)
