"""Analytic FLOP counts (2 x multiply-accumulates) of the paper's networks, for judging
measured speeds against what the arithmetic allows.  Counts come from forward hooks on the
real modules, so they follow the networks exactly."""
from __future__ import annotations

import torch
from torch import nn


def forward_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``module`` on ``inputs`` (Linear, Conv, ConvTranspose)."""
    total = 0

    def hook(mod, args, out):
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * out.numel() * mod.in_features
        elif isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += 2 * out.numel() * k
        elif isinstance(mod, nn.ConvTranspose2d):
            x = args[0]
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.out_channels // mod.groups
            total += 2 * x.numel() * k

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total
