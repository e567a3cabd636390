"""Analytic FLOP counts (2 x multiply-accumulates) of the paper's networks, for judging
measured speeds against what the arithmetic allows.  Counts come from forward hooks on the
real modules, so they follow the networks exactly."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_COUNTED = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def count_flops(module: nn.Module, fn: Callable[[], object]) -> int:
    """FLOPs of the ``nn.Linear`` / ``Conv2d`` / ``ConvTranspose2d`` layers of ``module`` (any
    depth) that run during ``fn()``, each call counted; arithmetic outside them is not."""
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
               if isinstance(m, _COUNTED)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return total


def forward_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``module`` on ``inputs`` (Linear, Conv, ConvTranspose)."""
    with torch.no_grad():
        return count_flops(module, lambda: module(*inputs))
