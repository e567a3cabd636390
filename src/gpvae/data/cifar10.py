"""CIFAR-10 (Krizhevsky, 2009), 32x32 colour images: 50,000 training and 10,000 test.

Source: the "CIFAR-10 python version" archive
https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted so that
``data_dir/cifar-10-batches-py/`` (or ``data_dir/cifar10/cifar-10-batches-py/``) holds
``data_batch_1`` ... ``data_batch_5`` and ``test_batch``.

Each batch is a Python-2 pickle of a dict with (bytes) keys ``b"data"``, a ``uint8``
``(10000, 3072)`` array whose rows are 1024 red, then 1024 green, then 1024 blue values,
each plane a row-major 32x32 image, and ``b"labels"`` (unused here).  The pickles are read
with the restricted unpickler of :mod:`gpvae.data._common` (``encoding="bytes"``), which
only admits numpy arrays and plain containers, never arbitrary code.

Images are returned as ``uint8`` tensors of shape ``(N, 3, 32, 32)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ._common import fail, resolve_data_dir, safe_unpickle, search_dirs

NAME = "cifar10"
LABEL = "CIFAR10"
SHAPE = (3, 32, 32)
DIRNAME = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
ORIGIN = ("data_batch_1..data_batch_5 and test_batch, from "
          "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted")


def _expected(where: Path | str) -> str:
    return f"expected {DIRNAME}/ in {where} ({ORIGIN})"


def read_batch(path: Path) -> np.ndarray:
    """One pickled batch -> ``uint8`` array of shape ``(n, 3, 32, 32)``."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise fail(LABEL, f"could not open {path} ({exc.strerror or exc}); "
                          f"{_expected(path.parent.parent)}") from None
    with f:
        batch = safe_unpickle(f, source=path, label=LABEL, encoding="bytes")
    if not isinstance(batch, dict):
        raise fail(LABEL, f"{path} is not a CIFAR-10 batch (unpickled a "
                          f"{type(batch).__name__}, expected a dict); {_expected(path.parent.parent)}")
    data = batch.get(b"data", batch.get("data"))
    if (not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072
            or data.shape[0] == 0 or not np.issubdtype(data.dtype, np.integer)):
        shape = getattr(data, "shape", type(data).__name__)
        raise fail(LABEL, f"{path}: b'data' should be a uint8 (n, 3072) array, got {shape}; "
                          f"{_expected(path.parent.parent)}")
    if data.dtype != np.uint8:
        if data.min() < 0 or data.max() > 255:
            raise fail(LABEL, f"{path}: pixel values outside 0..255; {_expected(path.parent.parent)}")
        data = data.astype(np.uint8)
    return data.reshape(-1, *SHAPE)


def load(data_dir: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(training partition, test partition)`` as ``uint8`` ``(N, 3, 32, 32)`` tensors."""
    root = resolve_data_dir(data_dir, LABEL, f"{DIRNAME}/ ({ORIGIN})")
    dirs = search_dirs(root, NAME)
    batch_dir = next((d / DIRNAME for d in dirs if (d / DIRNAME).is_dir()), None)
    if batch_dir is None:
        raise fail(LABEL, _expected(" or ".join(str(d) for d in dirs)))
    missing = [n for n in (*TRAIN_FILES, TEST_FILE) if not (batch_dir / n).is_file()]
    if missing:
        raise fail(LABEL, f"{batch_dir} lacks {', '.join(missing)}; {_expected(batch_dir.parent)}")
    train = np.concatenate([read_batch(batch_dir / n) for n in TRAIN_FILES])
    test = read_batch(batch_dir / TEST_FILE)
    return torch.from_numpy(train), torch.from_numpy(np.array(test, copy=True))  # own, writable
