"""Devices: the ``--device`` flag, and the device and dtype a model's inputs must take."""
from __future__ import annotations

import itertools

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; reject devices that are not present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device (try cpu, cuda, cuda:0 or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not supported (cpu, cuda or auto)")
    return dev


def model_device_dtype(model, default_device="cpu") -> tuple[torch.device, torch.dtype | None]:
    """The device and dtype of a model's tensors (its first parameter, or buffer): what its
    inputs must be cast to; ``default_device`` and no cast for a model with no tensors."""
    ref = next(itertools.chain(model.parameters(), model.buffers()), None)
    if ref is None:
        return torch.device(default_device), None
    return ref.device, ref.dtype
