"""``gpvae demo``: train small models on the bundled real MNIST, evaluate IWAE on test
images, print a table and write a PNG of reconstructions and samples."""
from __future__ import annotations

import time
from pathlib import Path

from .data import load_splits
from .evaluation import estimate
from .plots import reconstructions_and_samples
from .training import TrainConfig, load_run, resolve_device, train


def run_demo(args) -> list[dict]:
    device = resolve_device(args.device)
    out = Path(args.out)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    from .models import model_class

    for name in names:
        model_class(name)  # unknown names fail before any work
    rows, models = [], {}
    splits = load_splits("mnist", limit_train=args.limit_train, limit_test=args.limit_test)
    for name in names:
        run_dir = out / name
        cfg = TrainConfig(out=str(run_dir), dataset="mnist", model=name,
                          model_options={"latent_dim": args.latent_dim}, epochs=args.epochs,
                          seed=args.seed, limit_train=args.limit_train,
                          limit_test=args.limit_test, device=str(device))
        resume = (run_dir / "last.safetensors").exists()
        print(f"[demo] training {name} on {args.limit_train} real MNIST images for "
              f"{args.epochs} epochs ({device}){' -- resuming' if resume else ''}")
        t0 = time.perf_counter()
        train(cfg, resume=resume, progress=not args.no_progress)
        train_s = time.perf_counter() - t0
        model, _ = load_run(run_dir, "best", device)
        est = estimate(model, splits.test, samples=args.iwae_samples, device=device,
                       seed=args.seed, progress=not args.no_progress).summary()
        rows.append({"model": name, "train_s": train_s, **est})
        models[name] = model
    print()
    print(f"real MNIST, d={args.latent_dim}, {args.limit_train} training images, "
          f"{args.epochs} epochs, {rows[0]['n']} test images")
    header = f"{'model':<8} {'IWAE-' + str(args.iwae_samples):>14} {'ELBO':>14} {'train s':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<8} {r['test_iwae']:>8.1f} ±{r['test_iwae_se']:>4.1f} "
              f"{r['test_elbo']:>8.1f} ±{r['test_elbo_se']:>4.1f} {r['train_s']:>8.0f}")
    png = reconstructions_and_samples(models, splits.test.batch(slice(0, 16)), out / "demo.png")
    print(f"\nreconstructions and samples: {png}")
    return rows
