"""NCHW vs channels-last (NHWC) for the Tab. 6 networks on this machine (docs/benchmarks.md).

    .venv/bin/python scripts/bench_layout.py

Prints, for each layout, the encoder trunk's time per batch of 128 MNIST-shaped images, the
first (one-input-channel) convolution's share of it, and the decoder's throughput at 500 z's
per call (the IWAE evaluator's chunk size).  Best of 7 rounds of 20 calls each.
"""
import time

import torch

from gpvae.models import build_model


def best(fn, calls: int = 20, rounds: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    model = build_model("vae", (1, 28, 28), latent_dim=10).eval()
    trunk, decoder = model.encoder.trunk, model.decoder
    x, z = torch.rand(128, 1, 28, 28), torch.randn(500, 10)
    print(f"{torch.get_num_threads()} threads")
    with torch.inference_mode():
        for nhwc in (False, True):
            trunk.use_channels_last(nhwc)
            decoder.use_channels_last(nhwc)
            first = trunk.net[0]
            x_in = x.contiguous(memory_format=torch.channels_last) if nhwc else x
            print(f"{'NHWC' if nhwc else 'NCHW'}: encoder trunk {best(lambda: trunk(x)) * 1e3:.2f} "
                  f"ms/batch of 128 (first conv {best(lambda: first(x_in)) * 1e3:.2f} ms), "
                  f"decoder {500 / best(lambda: decoder(z)):.0f} samples/s")


if __name__ == "__main__":
    main()
