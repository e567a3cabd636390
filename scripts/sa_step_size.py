"""SA(k)'s step size: how much k SVI steps raise each test image's ELBO, starting from a
trained encoder, for several step sizes alpha and with / without gradient clipping.

    python scripts/sa_step_size.py RUN_DIR [--images 500]

RUN_DIR is a VAE run (gpvae train --model vae ...): its best checkpoint loads into SA(k),
whose encoder is the VAE's.  Prints, per (clip, alpha), the base ELBO and the mean ELBO
gain after k = 1, 2, 4, 8 steps (nats per image, each ELBO averaged over 32 fixed noise
draws).  docs/results.md quotes its output; --sa-lr's default comes from it.
"""
import argparse
import json
from pathlib import Path

import torch

from gpvae.checkpoint import load_checkpoint
from gpvae.data import load_splits
from gpvae.models.sa import SA, SAConfig


def elbo(model, x, mu, logvar, draws=32):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        vals = [model.instance_elbo(x, mu, logvar, torch.randn(mu.shape, generator=g))
                for _ in range(draws)]
    return torch.stack(vals).mean(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    cfg = json.loads((Path(args.run_dir) / "config.json").read_text())
    options = {k: v for k, v in cfg["model_options"].items()}
    splits = load_splits(cfg["dataset"], cfg["data_dir"], split_seed=cfg["split_seed"],
                         limit_train=1, limit_test=args.images)
    x = splits.test.batch(slice(0, args.images))
    for clip in (5.0, 0.0):
        for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0):
            row = []
            for k in (1, 2, 4, 8):
                model = SA(SAConfig(**options, sa_steps=k, sa_lr=lr, sa_clip=clip),
                           splits.shape)
                load_checkpoint(Path(args.run_dir) / "best.safetensors", model)
                model.eval()
                torch.manual_seed(0)
                with torch.no_grad():
                    mean, std = model.encoder(x)
                    logvar0 = 2 * std.log()
                mu, logvar = model.refine(x, mean, logvar0)
                base, refined = elbo(model, x, mean, logvar0), elbo(model, x, mu, logvar)
                row.append(f"k={k}: {float((refined - base).mean()):+8.2f}")
            print(f"clip={clip:g} alpha={lr:g}: base {float(base.mean()):.1f}  "
                  + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
