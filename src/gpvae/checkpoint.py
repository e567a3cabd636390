"""Checkpoints that load without executing code, written atomically.

A checkpoint is one ``.safetensors`` file: the model's tensors under ``model/``, the
optimizer's tensors under ``optim/``, and a JSON document (configs, epoch, history, the
optimizer's non-tensor state) in the safetensors header metadata.  safetensors never
unpickles anything, so a file crafted to run code when unpickled is simply rejected as
"not a safetensors file".  Files are written to a temporary name in the same directory,
fsync'ed and renamed over the target, so a kill at any moment leaves either the old or the
new checkpoint, never a torn one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

_META_KEY = "gpvae"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path next to ``path``; on success fsync it and rename it over
    ``path`` (atomic on POSIX), on failure remove it.  Readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split("/", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path, model: torch.nn.Module, meta: dict, optimizer=None) -> None:
    """Save model (and optimizer) tensors plus a JSON-able ``meta`` dict, atomically."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Return (model tensors, optimizer tensors, meta).  Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(header[_META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid gpvae checkpoint (expected a safetensors file written by "
            f"gpvae; refusing to load it: {type(exc).__name__})"
        ) from None
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
    return model, optim, meta


def load_checkpoint(path, model: torch.nn.Module, optimizer=None) -> dict:
    """Load tensors into ``model`` (and ``optimizer``); return the metadata."""
    model_state, optim_tensors, meta = read_checkpoint(path)
    try:
        model.load_state_dict(model_state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not match this model: {first}") from None
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{path} holds no optimizer state; cannot resume from it")
        optimizer.load_state_dict(_unflatten_optimizer(optim_tensors, meta["optimizer"]))
    return meta
