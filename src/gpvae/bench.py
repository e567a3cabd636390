"""Benchmarks.  They print what they measure; nothing here asserts a speed.

``gpvae bench-iwae``: IWAE-K evaluation throughput on real MNIST test images with the
Tab. 6 networks.  In the same run it also times a per-image reference loop that scores one
image at a time with its K samples in one decoder batch -- the way pythae's ``VAE.get_nll``
works -- so the printed speed-up is measured on this machine, now.
"""
from __future__ import annotations

import json
import math
import time

import torch

from .data import load_splits
from .evaluation import estimate
from .flops import forward_flops
from .models import build_model
from .training import resolve_device


def reference_per_image_iwae(model, data, samples: int, device) -> torch.Tensor:
    """IWAE_K one image at a time (K copies of the image through encoder and decoder)."""
    out = []
    with torch.no_grad():
        for i in range(len(data)):
            x = data.batch(slice(i, i + 1), device)
            xs = x.expand(samples, *x.shape[1:])
            q = model.posterior(xs)
            z = q.rsample()
            lw = model.log_likelihood(xs, z) + model.log_prior(z) - q.log_prob(z)
            out.append(torch.logsumexp(lw, 0) - math.log(samples))
    return torch.stack(out)


def iwae_flops_per_image(model, samples: int) -> int:
    x = torch.zeros(1, *model.image_shape)
    enc = forward_flops(model.encoder, x) if hasattr(model, "encoder") else 0
    dec = forward_flops(model.decoder, torch.zeros(1, model.latent_dim))
    return enc + samples * dec


def _time(fn, repeats: int, device) -> float:
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_iwae(args) -> dict:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    test = load_splits("mnist", limit_train=1, limit_test=args.images).test
    model = build_model(args.model, test.images.shape[1:], latent_dim=args.latent_dim)
    model = model.to(device).eval()
    n, k = len(test), args.iwae_samples

    def ours():
        estimate(model, test, samples=k, batch_size=args.batch_size, device=device,
                 max_batch_samples=args.max_batch_samples, progress=False)

    ref_n = min(n, 100)
    ref_data = type(test)(test.images[:ref_n])

    def reference():
        reference_per_image_iwae(model, ref_data, k, device)

    ours()  # warm-up
    t_ours = _time(ours, args.repeats, device)
    t_ref = _time(reference, args.repeats, device)
    flops = iwae_flops_per_image(model, k)
    result = {
        "device": str(device), "threads": torch.get_num_threads(), "model": args.model,
        "iwae_samples": k, "images": n,
        "images_per_s": n / t_ours, "reference_images_per_s": ref_n / t_ref,
        "speedup_vs_reference": (n / t_ours) / (ref_n / t_ref),
        "gflop_per_image": flops / 1e9, "achieved_gflop_per_s": flops * n / t_ours / 1e9,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"IWAE-{k} on {n} MNIST test images, {args.model}, Tab. 6 networks, d={args.latent_dim}, "
              f"{device} ({result['threads']} threads), best of {args.repeats}")
        print(f"  gpvae estimator:            {result['images_per_s']:8.1f} images/s")
        print(f"  per-image reference loop:   {result['reference_images_per_s']:8.1f} images/s "
              f"(pythae get_nll style, {ref_n} images)")
        print(f"  speed-up:                   {result['speedup_vs_reference']:8.2f}x")
        print(f"  FLOP floor: {result['gflop_per_image']:.3f} GFLOP/image -> "
              f"{result['achieved_gflop_per_s']:.1f} GFLOP/s achieved")
    return result
