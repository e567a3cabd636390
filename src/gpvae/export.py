"""Export a trained model's amortized encoder x -> (m(x), v(x)) as one standalone file.

The file is a ``torch.export`` program (``.pt2``): an ATen graph with its weights, loadable
with ``torch.export.load(path).module()`` in a process that has only PyTorch -- gpvae is not
needed.  The batch dimension is dynamic.  Everything that does not depend on x is folded in
before export (for the GPVAE: the diagonal blocks of the Cholesky factors of Sigma_j,
Gamma_j of eq. 13, with their diagonals exponentiated and upper triangles zeroed).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import atomic_path
from .devices import model_device_dtype


def encoder_module(model) -> torch.nn.Module:
    """The model's fused marginal encoder x -> (mean, variance) of q(z|x), each (B, d);
    :class:`~gpvae.errors.UnsupportedError` for a method without one
    (``model.supports_fused_encoder()``)."""
    return model.fused_encoder().eval()


def export_encoder(model, path, batch_size: int = 4) -> Path:
    """Export :func:`encoder_module` with a dynamic batch dimension to ``path`` (.pt2)."""
    module = encoder_module(model).to("cpu")
    with torch.no_grad():
        # the .pt2 archive stores weights as plain contiguous tensors; the graph still
        # converts x to channels-last where the networks do, and the convolutions follow
        for p in module.parameters():
            p.data = p.data.contiguous()
    device, dtype = model_device_dtype(module)  # the exported program's: CPU
    example = torch.rand(batch_size, *model.image_shape, device=device, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    with atomic_path(path, suffix=".tmp.pt2") as tmp:  # torch.export wants a .pt2 name
        torch.export.save(program, tmp)
    return Path(path)
