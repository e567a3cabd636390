"""Shared pieces of the data package: containers, error helpers, a safe unpickler.

* :class:`ImageData` holds one split in memory in its compact native dtype (``uint8``
  for pixel data, ``float32`` in ``[0, 1]`` where the source format stores floats) and
  converts mini-batches to ``float32`` in ``[0, 1]`` on demand.
* :class:`Splits` bundles the train / validation / test :class:`ImageData` of one data set.
* :func:`fail` and :func:`describe` build the one-line :class:`~gpvae.errors.DataError`
  messages that every loader raises for user-caused problems (missing, truncated,
  corrupt or wrongly shaped files).
* :func:`safe_unpickle` is a restricted unpickler used for the CIFAR-10 batches and the
  bundled MNIST pickle: it only admits the handful of globals that numpy arrays and plain
  containers need, so a malicious pickle cannot run code.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

import torch

from gpvae.errors import DataError, describe, one_line

__all__ = [
    "ImageData",
    "Splits",
    "describe",
    "fail",
    "one_line",
    "resolve_data_dir",
    "safe_unpickle",
    "search_dirs",
]


# --------------------------------------------------------------------------- errors


def fail(label: str, message: str) -> DataError:
    """Build (not raise) a :class:`DataError` ``"<LABEL>: <message>"`` guaranteed to be one line."""
    return DataError(one_line(f"{label}: {message}"))


def resolve_data_dir(data_dir: str | os.PathLike | None, label: str, expected: str) -> Path:
    """Check that ``data_dir`` was given and is an existing directory; return it as a Path.

    ``expected`` describes what the directory should contain (for the error message).
    """
    if data_dir is None:
        raise fail(label, f"no data directory given; pass --data-dir pointing to a directory "
                          f"that contains {expected}")
    try:
        path = Path(os.fspath(data_dir)).expanduser()
    except TypeError as exc:
        raise fail(label, f"invalid data directory {data_dir!r} ({describe(exc)})") from None
    if not path.is_dir():
        raise fail(label, f"data directory {path} does not exist or is not a directory; "
                          f"it should contain {expected}")
    return path


def search_dirs(root: Path, subdir: str) -> list[Path]:
    """Directories in which a data set's files are looked for: ``root`` and ``root/subdir``.

    This lets one ``--data-dir`` hold every data set either side by side or one per
    sub-directory named after the data set.
    """
    dirs = [root]
    if (root / subdir).is_dir():
        dirs.append(root / subdir)
    return dirs


# --------------------------------------------------------------------------- safe unpickling

# (module, name) pairs a pickle may refer to.  numpy arrays pickle as
# ``_reconstruct(ndarray, shape, dtype)`` followed by ``__setstate__``; numpy scalars
# as ``scalar(dtype, bytes)``.  Python-3 pickles with protocol < 3 encode ``bytes``
# objects as ``_codecs.encode(str, "latin1")``.  Nothing here can run code or touch
# the file system.
_SAFE_BUILTINS = frozenset(
    ["list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int",
     "float", "complex", "bool"]
)
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy.core.multiarray", "scalar"): "scalar",
    ("numpy._core.multiarray", "scalar"): "scalar",
}
# Python 2 module names (the unpickler's own fix_imports mapping lives in the default
# find_class, which we replace).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _numpy_global(kind: str) -> Any:
    import numpy as np

    if kind == "ndarray":
        return np.ndarray
    if kind == "dtype":
        return np.dtype
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, kind)


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside a small whitelist."""

    def __init__(self, file: IO[bytes], *, source: str, label: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._source = source
        self._label = label

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        module = _PY2_MODULES.get(module, module)
        if module == "builtins" and name in _SAFE_BUILTINS:
            import builtins

            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":
            import _codecs

            return _codecs.encode
        kind = _NUMPY_GLOBALS.get((module, name))
        if kind is not None:
            return _numpy_global(kind)
        raise fail(self._label, f"refusing to unpickle {module}.{name} from {self._source} "
                                f"(only numpy arrays and plain containers are allowed; "
                                f"the file is not a genuine data file)")

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        raise fail(self._label, f"refusing to unpickle a persistent id from {self._source} "
                                f"(the file is not a genuine data file)")


def safe_unpickle(file: IO[bytes], *, source: str | os.PathLike, label: str,
                  encoding: str = "bytes") -> Any:
    """Unpickle ``file`` allowing only numpy arrays / dtypes / scalars and plain builtins.

    Any refused global, truncated stream or other unpickling failure is raised as a
    one-line :class:`DataError` naming ``source``.
    """
    try:
        return _RestrictedUnpickler(file, source=str(source), label=label,
                                    encoding=encoding).load()
    except DataError:
        raise
    except Exception as exc:  # truncated / corrupt pickle, gzip or zlib errors, ...
        raise fail(label, f"could not unpickle {source} (truncated or corrupt file: "
                          f"{describe(exc)})") from None


# --------------------------------------------------------------------------- containers


class ImageData:
    """One split of an image data set, held in memory.

    ``images`` is an ``(N, C, H, W)`` tensor, either ``uint8`` (0..255) or ``float32`` in
    ``[0, 1]``.  It is kept in that compact form; :meth:`batch` converts the requested
    rows to ``float32`` in ``[0, 1]``.
    """

    __slots__ = ("images",)

    def __init__(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"ImageData needs a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"ImageData needs an (N, C, H, W) tensor, got shape "
                             f"{tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"ImageData needs uint8 or float32 images, got {images.dtype}")
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"ImageData(n={len(self)}, shape={self.shape}, dtype={self.images.dtype}, "
                f"device={self.images.device})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The per-image shape ``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def device(self) -> torch.device:
        """The device the images are stored on."""
        return self.images.device

    def batch(self, idx: torch.Tensor | slice | Sequence[int],
              device: torch.device | str | None = None) -> torch.Tensor:
        """Rows ``idx`` as a new ``float32`` tensor in ``[0, 1]`` of shape ``(n, C, H, W)``.

        ``idx`` is a slice or a 1-D integer (or boolean) index tensor; the result is moved
        to ``device`` (if given) *before* the dtype conversion, so only the compact bytes
        are transferred.  The result never shares memory with :attr:`images`.
        """
        images = self.images
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        elif not isinstance(idx, (slice, torch.Tensor)):
            idx = torch.as_tensor(idx, dtype=torch.long)
        if isinstance(idx, torch.Tensor) and idx.device != images.device:
            idx = idx.to(images.device)
        x = images[idx]
        if device is not None:
            x = x.to(device)
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255.0)
        x = x.to(torch.float32)
        if x.untyped_storage().data_ptr() == images.untyped_storage().data_ptr():
            x = x.clone()  # a slice of float32 images on the same device is a view
        return x

    def to(self, device: torch.device | str) -> "ImageData":
        """A new :class:`ImageData` with the images on ``device``.

        The tensor itself is shared (not copied) when it is already on that device.
        """
        return ImageData(self.images.to(device))


@dataclass
class Splits:
    """Train / validation / test splits of one data set (see :func:`gpvae.data.load_splits`)."""

    name: str
    shape: tuple[int, int, int]
    train: ImageData
    valid: ImageData
    test: ImageData
