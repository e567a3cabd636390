"""Native vs sub-pixel transposed convolutions, per Tab. 6/7/8 decoder layer, on this machine
(the measurements behind ``gpvae.subpixel.fastest_form``; docs/benchmarks.md).

    .venv/bin/python scripts/bench_deconv.py [--z 167] [--rounds 20]
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_deconv.py   # one core

For every transposed convolution of the three decoders (NHWC, as the decoders run): the time
of a forward pass without gradients (evaluation: ``--z`` decoder inputs, default one cache
block of the Tab. 6 decoder) and of a forward + backward pass (training: a batch of 128),
natively, in sub-pixel form and in taps form, and which form ``auto`` picks in evaluation; then each decoder as a whole
in evaluation, plain (as before: native, out-of-place ReLUs, one pass) and as it runs now,
at 500 z's per call (the IWAE evaluator's chunk).  The forms are timed interleaved,
best of ``--rounds``; on one thread the clock is the thread's CPU time, so that other work
on a shared machine does not count.
"""
import argparse
import time

import torch

from gpvae.networks import (ARCHITECTURES, ConvDecoder, architecture_for, set_deconv_impl,
                            set_plain_decoding)
from gpvae.subpixel import SubpixelConvTranspose2d

CL = torch.channels_last


def clock() -> float:
    return time.thread_time() if torch.get_num_threads() == 1 else time.perf_counter()


def best_of(runs: dict, rounds: int) -> dict:
    """Each callable of ``runs`` once as warm-up, then ``rounds`` interleaved rounds: the
    best time of each (ms)."""
    for fn in runs.values():
        fn()
    best = {k: float("inf") for k in runs}
    for _ in range(rounds):
        for k, fn in runs.items():
            t0 = clock()
            fn()
            best[k] = min(best[k], (clock() - t0) * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--z", type=int, default=167, help="evaluation batch (default 167)")
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads; ms, best of {args.rounds}")
    forms = ("native", "subpixel", "taps")
    print(f"{'layer':<30} {'eval:':>6} {'native':>7} {'subpixel':>9} {'taps':>7}   "
          f"{'train:':>6} {'native':>7} {'subpixel':>9} {'taps':>7}   auto (eval)")
    for key, arch in ARCHITECTURES.items():
        c_in, size = arch.dec_seed[0], arch.dec_seed[1]
        for c_out, op in zip(arch.dec_channels, arch.dec_output_padding):
            layer = SubpixelConvTranspose2d(c_in, c_out, 4, 2, 1, output_padding=op)
            layer = layer.to(memory_format=CL)
            layer.channels_last = True
            x = torch.randn(args.z, c_in, size, size).contiguous(memory_format=CL)
            xt = torch.randn(args.train_batch, c_in, size, size).contiguous(memory_format=CL)
            xt.requires_grad_()

            def evaluate(impl):
                set_deconv_impl(layer, impl)
                with torch.inference_mode():
                    return torch.relu(layer(x))

            def train(impl):
                set_deconv_impl(layer, impl)
                out = torch.relu(layer(xt))
                out.backward(torch.ones_like(out))

            ev = best_of({i: (lambda i=i: evaluate(i)) for i in forms}, args.rounds)
            tr = best_of({i: (lambda i=i: train(i)) for i in forms}, args.rounds)
            set_deconv_impl(layer, "auto")
            with torch.inference_mode():
                auto = layer.form()
            name = f"{'x'.join(map(str, key))} {c_in}->{c_out} {size}x{size} op{op}"
            print(f"{name:<30} {'':>6} " + " ".join(f"{ev[f]:>{len(f) + 1}.2f}" for f in forms)
                  + f"   {'':>6} " + " ".join(f"{tr[f]:>{len(f) + 1}.2f}" for f in forms)
                  + f"   {auto}")
            c_in, size = c_out, 2 * size + op
    print("\nwhole decoder, evaluation, 500 z's per call (d = 10)")
    for key in ARCHITECTURES:
        torch.manual_seed(0)
        now = ConvDecoder(architecture_for(key), 10).eval()
        plain = set_plain_decoding(ConvDecoder(architecture_for(key), 10).eval())
        plain.load_state_dict(now.state_dict())
        z = torch.randn(500, 10)
        with torch.inference_mode():
            t = best_of({"plain": lambda: plain(z), "now": lambda: now(z)}, args.rounds)
        print(f"{'x'.join(map(str, key)):<10} plain {t['plain']:8.2f} ms   now {t['now']:8.2f} ms"
              f"   speed-up {t['plain'] / t['now']:.2f}x")


if __name__ == "__main__":
    main()
