"""Figures, written once against the model interface (decode, posterior, likelihood.mean).
Without gradients; q(z|x) of a method that needs autograd inside it gets it
(:func:`gpvae.models.base.posterior_without_grad`)."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import atomic_write_bytes
from .devices import model_device_dtype
from .models.base import posterior_without_grad


def _to_uint8_grid(images: torch.Tensor, ncol: int, below: int = 0) -> torch.Tensor:
    """(N, C, H, W) in [0,1] -> (rows*H, ncol*W, C) uint8 with 2-pixel gutters (and
    ``below`` white rows under each row of images, for captions)."""
    n, c, h, w = images.shape
    rows = (n + ncol - 1) // ncol
    cell = h + 2 + below
    grid = torch.ones(c, rows * cell, ncol * (w + 2))
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, r * cell + 1:r * cell + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = images[i]
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


@torch.no_grad()
def reconstructions_and_samples(models: dict, x: torch.Tensor, path, n_samples: int = 16,
                                seed: int = 0) -> Path:
    """PNG: the test images, then each model's reconstructions (decoded posterior means) and
    samples from p(x|z), z ~ N(0, I); one labelled band per model."""
    bands = [("test images", x.cpu())]
    gen = torch.Generator().manual_seed(seed)
    for name, model in models.items():
        model.eval()
        device, dtype = model_device_dtype(model)
        q = posterior_without_grad(model, x.to(device, dtype))
        rec = model.likelihood.mean(model.decode(q.mean)).float().cpu()
        z = torch.randn(n_samples, model.latent_dim, generator=gen).to(device, dtype)
        samples = model.likelihood.mean(model.decode(z)).float().cpu()
        bands += [(f"{name}: reconstructions", rec), (f"{name}: samples", samples)]
    return _save_bands(bands, max(x.shape[0], n_samples), path)


def _save_bands(bands, ncol: int, path, scale: int = 2) -> Path:
    """Stack labelled image grids vertically into one PNG, written atomically."""
    import io

    from PIL import Image, ImageDraw

    label_h, caption_h = 14, 12
    pieces = []
    for label, imgs, *captions in bands:  # (label, images[, a caption under each image])
        below = caption_h if captions else 0
        grid = _to_uint8_grid(imgs, ncol, below)
        if grid.shape[2] == 1:
            grid = grid.expand(-1, -1, 3)
        band = Image.new("RGB", (grid.shape[1], grid.shape[0] + label_h), "white")
        band.paste(Image.fromarray(grid.contiguous().numpy()), (0, label_h))
        draw = ImageDraw.Draw(band)
        draw.text((2, 1), label, fill="black")
        h, w = imgs.shape[-2:]
        for i, text in enumerate(captions[0] if captions else ()):
            r, col = divmod(i, ncol)
            draw.text((col * (w + 2) + 1, label_h + r * (h + 2 + below) + h + 2), text,
                      fill="black")
        pieces.append(band)
    width = max(p.width for p in pieces)
    canvas = Image.new("RGB", (width, sum(p.height for p in pieces)), "white")
    y = 0
    for p in pieces:
        canvas.paste(p, (0, y))
        y += p.height
    canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def gap_caption(value: float) -> str:
    """A number in at most 5 characters (it is written under a 28-pixel-wide image)."""
    v = float(value)
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"


@torch.no_grad()
def uncertainty_extremes(model, data, low_idx, high_idx, path, gaps=None) -> Path:
    """PNG (Fig. 1, bottom panel): the least and the most uncertain images with their
    reconstructions.  ``gaps`` (one value per image of ``data``, e.g. the amortization gaps
    of ``gpvae gap``): each image's value is written under it (:func:`gap_caption`)."""
    device, dtype = model_device_dtype(model)
    bands = []
    for label, idx in (("least uncertain", low_idx), ("most uncertain", high_idx)):
        idx = torch.as_tensor(idx)
        x = data.batch(idx, device)
        q = posterior_without_grad(model, x.to(device, dtype))
        rec = model.likelihood.mean(model.decode(q.mean)).float().cpu()
        if gaps is None:
            bands.append((f"{label}: images", x.cpu()))
        else:
            captions = [gap_caption(gaps[int(i)]) for i in idx]
            bands.append((f"{label}; amortization gap (nats)", x.cpu(),
                          captions))
        bands.append((f"{label}: reconstructions", rec))
    return _save_bands(bands, max(len(low_idx), len(high_idx)), path)
