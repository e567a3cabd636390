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
import errno
import json
import math
import os
import re
import secrets
import stat
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, OutputError, describe, one_line

_META_KEY = "gpvae"


_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{16}\.tmp(\.[A-Za-z0-9]+)?$")


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path next to ``path``; on success fsync it, rename it over
    ``path`` (atomic on POSIX) and fsync the directory, on failure remove it.  Readers see
    the old or the new file, never a torn one.

    The temporary file ``.NAME.<16 hex digits>.tmp`` is created with mode 0666 minus the
    umask, like any file the user creates, and keeps that mode even if the writer replaced
    it with a file of its own (safetensors writes 0600), so outputs are as readable as the
    user's other files.  An OSError (a full disk, a read-only file system, a directory where the file
    should go) becomes a one-line :class:`~gpvae.errors.OutputError`; the old file, if
    any, is left unchanged.  A kill can still leave the temporary file behind:
    :func:`remove_orphan_temps` removes those.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}{suffix}"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                mode = stat.S_IMODE(os.stat(tmp).st_mode)  # 0666 minus the umask
                break
            except FileExistsError:  # pragma: no cover - 64 random bits
                continue
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {describe(exc)}") from None
    try:
        yield str(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that made its own file
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise OutputError(f"could not write {path}: {describe(exc)} ({kept})") from None
        raise


def check_output_file(path: str | os.PathLike, flag: str, kind=None) -> Path:
    """Check, before any work, that ``path`` can be written as a file by :func:`atomic_path`:
    not a directory, not one of a run directory's own files (its checkpoints, configuration,
    metrics or lock), its nearest existing ancestor a writable directory, and -- when it
    exists and ``kind`` is given, an :class:`OutputKind` -- a file of that kind (an earlier
    output, which may be replaced; anything else of the user's is never overwritten).
    Raises a one-line :class:`~gpvae.errors.OutputError` naming ``flag`` otherwise."""
    from .rundir import CONFIG_FILE, LOCK_FILE, RUN_FILES

    path = Path(path)
    if not os.fspath(path).strip():
        raise OutputError(f"{flag} must name a file, got {os.fspath(path)!r}")
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; name a file")
    if path.name in (*RUN_FILES, LOCK_FILE) and (path.parent / CONFIG_FILE).is_file():
        raise OutputError(f"{flag} {path} is a file of the run in {path.parent}; writing it "
                          "would destroy the run: name another file (nothing was written)")
    if kind is not None and path.exists() and not kind.matches(path):
        raise OutputError(f"{flag} {path} exists and is not {kind.description}; gpvae replaces "
                          "only its own earlier outputs: name another file (nothing was "
                          "written)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: cannot write in {parent} (permission denied or a "
                          "read-only file system)")
    return path


class OutputKind:
    """What an output file is, for :func:`check_output_file`: ``description`` (for the
    error) and ``matches(path)``, whether an existing file is one (so may be replaced)."""

    def __init__(self, description: str, matches):
        self.description, self._matches = description, matches

    def matches(self, path: Path) -> bool:
        try:
            return bool(self._matches(Path(path)))
        except (OSError, ValueError, zipfile.BadZipFile):
            return False

    @classmethod
    def csv(cls, description: str, header_prefix: str) -> "OutputKind":
        """A CSV file whose header line starts with ``header_prefix``."""
        def matches(path):
            with open(path, "rb") as f:
                return f.readline(4096).decode("utf-8").startswith(header_prefix)
        return cls(description, matches)


def _is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _is_torch_export(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/archive_format") for n in z.namelist())


#: a PNG image (the figures of ``--png``)
PNG = OutputKind("a PNG image", _is_png)
#: a torch.export archive (``gpvae export``'s .pt2)
TORCH_EXPORT = OutputKind("a torch.export archive (.pt2)", _is_torch_export)


def file_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the SHA-256 of a file's bytes: which checkpoint (which
    run, which training state) an output was computed from."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def temp_target(name: str) -> str | None:
    """The file a temporary of :func:`atomic_path` named ``name`` was to become, or None
    when ``name`` is not such a temporary."""
    m = _TEMP_NAME.match(name)
    return m.group("target") if m else None


def remove_orphan_temps(directory: str | os.PathLike, names) -> list[str]:
    """Remove the temporary files that a killed :func:`atomic_path` left in ``directory``
    for the targets ``names``; return what was removed.  Call it only while no other
    process can be writing those targets (e.g. under the run directory's lock)."""
    removed = []
    names = set(names)
    for entry in os.scandir(directory):
        if temp_target(entry.name) in names and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = None) -> str:
    """``obj`` as strict JSON: a non-finite float (a standard error of one image, a p-value
    of one seed) is written as null, since NaN and Infinity are not JSON and strict parsers
    reject them.  For every JSON a user reads (``--json`` output, results files)."""
    return json.dumps(_finite_or_none(obj), indent=indent, allow_nan=False)


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
    """Save model (and optimizer) tensors plus a JSON-able ``meta`` dict, atomically.
    A model with a NaN/inf weight is refused (:class:`~gpvae.errors.CheckpointError`): a
    checkpoint on disk is always one that can be resumed from or evaluated."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to write {path}: {bad[0][len('model/'):]} holds NaN/inf"
                              + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
        except SafetensorError as exc:  # e.g. "I/O error: No space left on device"
            raise OSError(errno.EIO, one_line(exc)) from None


def _invalid(path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid gpvae checkpoint (expected a safetensors file "
                           f"written by gpvae; refusing to load it: {type(exc).__name__})")


def read_checkpoint_meta(path) -> dict:
    """A checkpoint's gpvae metadata (a dict), read from its header without loading its
    tensors.  Never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header[_META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise _invalid(path, exc) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a valid gpvae checkpoint (its metadata is not a "
                              "JSON object)")
    return meta


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Return (model tensors, optimizer tensors, meta).  Never unpickles."""
    meta = read_checkpoint_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _invalid(path, exc) from None
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim/")}
    return model, optim, meta


def _load_error_detail(exc: RuntimeError, limit: int = 3, width: int = 160) -> str:
    """The problems listed in a load_state_dict error (missing / unexpected keys, size
    mismatches), on one line, the first ``limit`` of them, each cut to ``width`` chars."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines()]
    problems = [ln for ln in lines[1:] if ln] or lines[:1]
    cut = [p if len(p) <= width else p[:width - 3] + "..." for p in problems[:limit]]
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return one_line("; ".join(cut) + more)


def load_checkpoint(path, model: torch.nn.Module, optimizer=None) -> dict:
    """Load tensors into ``model`` (and ``optimizer``); return the metadata."""
    model_state, optim_tensors, meta = read_checkpoint(path)
    try:
        model.load_state_dict(model_state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match this {type(model).__name__} (written with "
                              f"other model options?): {_load_error_detail(exc)}") from None
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{path} holds no optimizer state; cannot resume from it")
        try:
            optimizer.load_state_dict(_unflatten_optimizer(optim_tensors, meta["optimizer"]))
        except (KeyError, ValueError, TypeError, AttributeError, IndexError,
                RuntimeError) as exc:  # a damaged or hand-edited file
            raise CheckpointError(f"{path}: its optimizer state cannot be restored "
                                  f"({describe(exc)}); the run cannot resume from it") from None
    return meta
