"""``gpvae demo``: train the VAE and the GPVAE on the bundled real MNIST with the same
budget, then print, for both, test IWAE-K and ELBO, the inference time per batch of 128 and
the mean GP uncertainty, and write a PNG of reconstructions and samples.

The inference time is measured as ``gpvae bench-inference`` measures it (paper Tab. 5:
time of q(z|x) per batch of 128, :func:`gpvae.bench.time_posterior`), on full batches only
-- with fewer than 128 test images they are repeated to fill one -- and reported as the
median of :data:`TIMING_REPEATS` passes."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .bench import time_posterior
from .data import load_splits
from .devices import resolve_device
from .evaluation import estimate
from .models import parse_model_list, run_dir_name
from .plots import reconstructions_and_samples
from .errors import ConfigError
from .rundir import CONFIG_FILE, TrainConfig, load_run, settings_changed
from .training import train
from .uncertainty import instance_uncertainty

BATCH = 128  # the batch size of the timing column (Tab. 5, ``gpvae bench-inference``)
TIMING_REPEATS = 5


def full_batches(data, batch_size: int = BATCH, device=None) -> list[torch.Tensor]:
    """ceil(n / batch_size) batches of exactly ``batch_size`` images of ``data``: the images
    in order, cycled (0, 1, .., n - 1, 0, 1, ..) to fill the last batch (the only one when
    n < batch_size)."""
    n = len(data)
    idx = torch.arange(-(-n // batch_size) * batch_size) % n
    return [data.batch(idx[lo:lo + batch_size], device) for lo in range(0, len(idx), batch_size)]


def inference_ms(model, data, device, batch_size: int = BATCH,
                 repeats: int = TIMING_REPEATS) -> float:
    """Milliseconds per batch of ``batch_size`` images of computing q(z|x): the median of
    ``repeats`` passes over :func:`full_batches` after a warm-up (:func:`time_posterior`)."""
    batches = full_batches(data, batch_size, device)
    return statistics.median(time_posterior(model, batches, repeats=repeats, device=device))


def run_demo(args) -> list[dict]:
    device = resolve_device(args.device)
    out = Path(args.out)
    specs = parse_model_list(args.models)  # bad names and sizes fail before any work
    rows, models = [], {}
    splits = load_splits("mnist", limit_train=args.limit_train, limit_test=args.limit_test)
    for name, (method, options) in specs.items():
        run_dir = out / run_dir_name(name)
        cfg = TrainConfig(out=str(run_dir), dataset="mnist", model=method,
                          model_options={"latent_dim": args.latent_dim, **options},
                          epochs=args.epochs, seed=args.seed, limit_train=args.limit_train,
                          limit_test=args.limit_test, device=str(device))
        resume = (run_dir / CONFIG_FILE).is_file()
        differ = settings_changed(run_dir, cfg)
        if differ:
            raise ConfigError(f"--out {out} holds a demo run of {name} made with other "
                              f"settings ({'; '.join(differ)}): rerun with those, or choose "
                              "another --out (nothing was changed)")
        print(f"[demo] training {name} on {args.limit_train} real MNIST images for "
              f"{args.epochs} epochs ({device}){' -- resuming' if resume else ''}")
        t0 = time.perf_counter()
        train(cfg, resume=resume, progress=not args.no_progress)
        train_s = time.perf_counter() - t0
        model, _ = load_run(run_dir, "best", device)
        est = estimate(model, splits.test, samples=args.iwae_samples, device=device,
                       seed=args.seed, progress=not args.no_progress).summary()
        ms = inference_ms(model, splits.test, device)
        unc = (float(instance_uncertainty(model, splits.test, device=device,
                                          progress=False)["total"].mean())
               if model.supports_uncertainty() else None)
        rows.append({"model": name, "train_s": train_s, "ms_per_batch": ms,
                     "uncertainty": unc, **est})
        models[name] = model
    print()
    print(f"real MNIST, d={args.latent_dim}, {args.limit_train} training images, "
          f"{args.epochs} epochs, {rows[0]['n']} test images")
    header = (f"{'model':<8} {'IWAE-' + str(args.iwae_samples) + ' (± se)':>16} "
              f"{'ELBO (± se)':>16} {'q(z|x) ms/batch':>16} {'mean uncertainty':>17} "
              f"{'train s':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        unc = f"{r['uncertainty']:.4g}" if r["uncertainty"] is not None else "-"
        print(f"{r['model']:<8} {r['test_iwae']:>9.1f} ±{r['test_iwae_se']:>5.1f} "
              f"{r['test_elbo']:>9.1f} ±{r['test_elbo_se']:>5.1f} {r['ms_per_batch']:>16.2f} "
              f"{unc:>17} {r['train_s']:>8.0f}")
    print(f"(IWAE/ELBO: nats per test image, higher is better; ms/batch: computing q(z|x) for "
          f"a batch of {BATCH} test images, median of {TIMING_REPEATS} passes"
          f"{', the test images repeated to fill it' if rows[0]['n'] < BATCH else ''}; "
          f"uncertainty: Tr V(f(x)|D) + Tr V(h(x)|D), Sec. 5.3)")
    png = reconstructions_and_samples(models, splits.test.batch(slice(0, 16)), out / "demo.png")
    print(f"\nreconstructions and samples: {png}")
    return rows
