"""Training throughput of packed runs (gpvae.packing) against runs one at a time, on the
current device (issue 10, item 5; the figures belong in docs/scaling.md).

    .venv/bin/python scripts/bench_packing.py                       # auto: CUDA if present
    .venv/bin/python scripts/bench_packing.py --device cpu --replicas 1,2,4 --steps 5

For each method and each R it times training steps exactly as the trainers run them:

* one at a time -- one model's step of :func:`gpvae.training.train` on B images (prepare
  the batch, the training objective, backward, the one device-to-host sync that checks the
  loss and gradients, Adam).  R runs trained one after another have this throughput;
* packed -- one :class:`gpvae.packing.Pack` step on R x B images (the vmapped objective,
  backward, every replica's checks in one sync, one Adam over the stacked parameters).

and prints training images per second of each and their ratio (packed / one at a time), the
time per step, and on CUDA the peak memory of the packed step.  Each figure is the best of
``--rounds`` rounds of ``--steps`` steps after ``--warmup`` steps (random images; the data
loading and per-epoch validation that both trainers add are not timed).  On a shared
machine run it when the machine is otherwise idle, and say so with the numbers.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from gpvae.data import IMAGE_SHAPES
from gpvae.devices import resolve_device
from gpvae.models import build_model
from gpvae.packing import Pack, ReplicaStreams
from gpvae.training import model_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(step, steps: int, warmup: int, rounds: int, device: torch.device) -> float:
    """Seconds per step: the best of ``rounds`` rounds of ``steps`` calls, after warm-up."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append((time.perf_counter() - t0) / steps)
    return min(times)


def alone_step(model, optimizer, x: torch.Tensor, n_train: int) -> float:
    """One step of gpvae.training._train_epochs; returns the loss."""
    x = model.likelihood.prepare(x)
    objective, _ = model.training_objective(x, n_train)
    loss = -objective.mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]
    checks = torch.stack([loss.detach(), torch.linalg.vector_norm(torch.stack(grads))]).tolist()
    if not all(math.isfinite(v) for v in checks):
        raise RuntimeError("the benchmark's loss or gradients became non-finite")
    optimizer.step()
    return checks[0]


def packed_step(pack: Pack, x: torch.Tensor) -> list[float]:
    """One step of gpvae.packing._train_epochs (no replica diverges here); returns the
    replicas' losses."""
    checks = pack.backward(x)
    if not all(math.isfinite(v) for row in checks[:2] for v in row):
        raise RuntimeError("the benchmark's loss or gradients became non-finite")
    pack.optimizer.step()
    return checks[0]


def check(method: str, args, device: torch.device, replicas: int = 3, steps: int = 3) -> None:
    """Packed steps against each replica trained alone on this device (``--check``): the
    largest relative loss difference and absolute weight difference after ``steps`` steps
    (float rounding: losses ~1e-7 in float32; weights up to a fraction of ``--lr``, as
    Adam's first steps are about lr sign(g) and a gradient near 0 can change sign), next to
    the loss difference another seed's random stream gives (what a broken per-replica stream
    would look like)."""
    shape = IMAGE_SHAPES[args.dataset]
    options = {"latent_dim": args.latent_dim, "likelihood": args.likelihood}
    seeds = [100 + r for r in range(replicas)]
    models = []
    for r in range(replicas):
        torch.manual_seed(r)
        models.append(build_model(method, shape, **options).to(device))
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.rand(steps, replicas, args.batch_size, *shape, device=device, generator=g)

    def alone(r, seed):
        model = copy.deepcopy(models[r])
        optimizer = model_optimizer(model, args.lr)
        torch.manual_seed(seed)  # CPU and every CUDA device, as train() seeds an epoch
        losses = [alone_step(model, optimizer, x[s, r], args.n_train) for s in range(steps)]
        return losses, dict(model.named_parameters())

    expected = [alone(r, seed) for r, seed in enumerate(seeds)]
    wrong = alone(0, seeds[0] + 1)[0]
    pack = Pack(models, args.lr, args.n_train, ReplicaStreams(seeds))
    got = [packed_step(pack, x[s]) for s in range(steps)]
    loss_diff = max(abs(got[s][r] - expected[r][0][s]) / abs(expected[r][0][s])
                    for s in range(steps) for r in range(replicas))
    weight_diff = max(float((pack.params[name][r] - w).detach().abs().max())
                      for r in range(replicas) for name, w in expected[r][1].items())
    wrong_diff = max(abs(wrong[s] - expected[0][0][s]) / abs(expected[0][0][s])
                     for s in range(steps))
    print(f"{method}: packed vs alone over {steps} steps of {replicas} replicas: losses "
          f"{loss_diff:.1e} (relative), weights {weight_diff:.1e} (absolute); another seed's "
          f"stream: losses {wrong_diff:.1e}")


def bench(method: str, replicas: list[int], args, device: torch.device) -> None:
    shape = IMAGE_SHAPES[args.dataset]
    options = {"latent_dim": args.latent_dim, "likelihood": args.likelihood}
    n_train, batch = args.n_train, args.batch_size
    g = torch.Generator(device=device).manual_seed(0)

    def build(seed):
        torch.manual_seed(seed)
        return build_model(method, shape, **options).to(device)

    model = build(0)
    optimizer = model_optimizer(model, args.lr)
    x1 = torch.rand(batch, *shape, device=device, generator=g)
    t_alone = _best(lambda: alone_step(model, optimizer, x1, n_train), args.steps, args.warmup,
                    args.rounds, device)
    alone = batch / t_alone
    print(f"{method}: one at a time {alone:9.0f} images/s ({t_alone * 1e3:.2f} ms/step of "
          f"{batch})")
    for r in replicas:
        models = [build(seed) for seed in range(r)]
        pack = Pack(models, args.lr, n_train, ReplicaStreams(list(range(r))))
        x = torch.rand(r, batch, *shape, device=device, generator=g)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_packed = _best(lambda: packed_step(pack, x), args.steps, args.warmup, args.rounds,
                         device)
        packed = r * batch / t_packed
        memory = (f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                  if device.type == "cuda" else "")
        print(f"{method}: R = {r:3d} packed {packed:9.0f} images/s ({t_packed * 1e3:.2f} "
              f"ms/step of {r} x {batch}{memory}): {packed / alone:6.2f} x one at a time")
        del pack, models, x
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--models", default="vae,gpvae", help="comma-separated methods")
    parser.add_argument("--replicas", default="1,4,8,30",
                        help="comma-separated pack sizes R (default 1,4,8,30)")
    parser.add_argument("--dataset", default="mnist", choices=sorted(IMAGE_SHAPES),
                        help="the image shape (and so the Tab. 6-8 networks) to train")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--latent-dim", type=int, default=10)
    parser.add_argument("--likelihood", default="gaussian")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--n-train", type=int, default=50000,
                        help="the training-set size N the objective is told (the GPVAE's "
                             "eq. 15 divides its global KL by it)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best is kept")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU intra-op threads (torch.set_num_threads); default torch's")
    parser.add_argument("--check", action="store_true",
                        help="first compare a few packed steps with each replica alone on "
                             "this device (exactness, not speed)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    replicas = [int(r) for r in args.replicas.split(",") if r.strip()]
    if not replicas or min(replicas) < 1:
        parser.error("--replicas needs positive integers")
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"device {device} ({name}); torch {torch.__version__}; {args.dataset} "
          f"{IMAGE_SHAPES[args.dataset]}, d = {args.latent_dim}, batch {args.batch_size}")
    methods = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.check:
        for method in methods:
            check(method, args, device)
    for method in methods:
        bench(method, replicas, args, device)


if __name__ == "__main__":
    main()
