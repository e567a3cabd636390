"""Page faults and time of the Tab. 6 encoder trunk (batch 128) with glibc's default
allocator settings and with :func:`gpvae.allocator.tune_cpu_allocator`, each in a fresh
process (the allocator's state is the process's history, so nothing else may run first).

    .venv/bin/python scripts/bench_allocator.py [--calls 40]

Each process builds a VAE (``gpvae.models.build_model``, as a user's script would), calls
the trunk a few times to warm up, then prints the minor page faults per call and the best
milliseconds per call.  The tuned process differs only by the one call to
``tune_cpu_allocator()`` before anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
tuned = sys.argv[1] == "tuned"
if tuned:
    from gpvae.allocator import tune_cpu_allocator
    applied = tune_cpu_allocator()
else:
    applied = False
import torch
from gpvae.models import build_model
model = build_model("vae", (1, 28, 28), latent_dim=50).eval()
x = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
calls = int(sys.argv[2])
with torch.inference_mode():
    for _ in range(4):
        model.encoder.trunk(x)
    faults, best = 0, float("inf")
    for _ in range(calls):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        model.encoder.trunk(x)
        best = min(best, time.perf_counter() - t0)
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(json.dumps({"applied": applied, "faults_per_call": faults / calls, "ms": best * 1e3}))
"""


def measure(mode: str, calls: int) -> dict:
    """One fresh process: ``mode`` "default" (glibc's settings) or "tuned"."""
    env = dict(os.environ, GPVAE_CPU_ALLOCATOR="default" if mode == "default" else "")
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(calls)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args(argv)
    print("Tab. 6 encoder trunk, batch 128, fresh process each; page faults and best time "
          "per call")
    for mode in ("default", "tuned", "default", "tuned"):
        r = measure(mode, args.calls)
        print(f"{mode:8s} applied={str(r['applied']):5s} page faults/call "
              f"{r['faults_per_call']:8.1f}   {r['ms']:6.2f} ms")


if __name__ == "__main__":
    main()
