"""SVHN (Netzer et al., 2011), cropped 32x32 house-number digits: 73,257 train / 26,032 test.

Source: "Format 2" of http://ufldl.stanford.edu/housenumbers/, the MATLAB files
``train_32x32.mat`` and ``test_32x32.mat`` in ``data_dir`` (or ``data_dir/svhn``).  The
optional ``extra_32x32.mat`` is not used.  Each file is a MATLAB v5 file (read with
:func:`scipy.io.loadmat`) whose key ``X`` is a ``uint8`` array of shape
``(32, 32, 3, N)`` indexed ``[row, column, channel, image]`` and ``y`` the labels
(unused here).

Images are returned as ``uint8`` tensors of shape ``(N, 3, 32, 32)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ._common import describe, fail, resolve_data_dir, search_dirs

NAME = "svhn"
LABEL = "SVHN"
SHAPE = (3, 32, 32)
TRAIN_FILE = "train_32x32.mat"
TEST_FILE = "test_32x32.mat"
ORIGIN = "the cropped-digit 'Format 2' files from http://ufldl.stanford.edu/housenumbers/"


def _expected(where: Path | str) -> str:
    return f"expected {TRAIN_FILE} and {TEST_FILE} in {where} ({ORIGIN})"


def read_mat(path: Path) -> torch.Tensor:
    """One SVHN ``.mat`` file -> ``uint8`` tensor of shape ``(N, 3, 32, 32)``."""
    try:
        from scipy.io import loadmat

        mat = loadmat(str(path), variable_names=["X"])
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError, ...
        raise fail(LABEL, f"could not read {path} (truncated or corrupt MATLAB file: "
                          f"{describe(exc)}); {_expected(path.parent)}") from None
    x = mat.get("X")
    if (not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3)
            or x.shape[3] == 0 or not np.issubdtype(x.dtype, np.integer)):
        shape = getattr(x, "shape", "nothing")
        raise fail(LABEL, f"{path}: 'X' should be a uint8 (32, 32, 3, N) array, got {shape}; "
                          f"{_expected(path.parent)}")
    if x.dtype != np.uint8:
        if x.min() < 0 or x.max() > 255:
            raise fail(LABEL, f"{path}: pixel values outside 0..255; {_expected(path.parent)}")
        x = x.astype(np.uint8)
    # [row, column, channel, image] -> [image, channel, row, column]
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))))


def load(data_dir: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(training partition, test partition)`` as ``uint8`` ``(N, 3, 32, 32)`` tensors."""
    root = resolve_data_dir(data_dir, LABEL, f"{TRAIN_FILE} and {TEST_FILE} ({ORIGIN})")
    dirs = search_dirs(root, NAME)
    found = next((d for d in dirs if (d / TRAIN_FILE).is_file() or (d / TEST_FILE).is_file()), None)
    if found is None:
        raise fail(LABEL, _expected(" or ".join(str(d) for d in dirs)))
    missing = [n for n in (TRAIN_FILE, TEST_FILE) if not (found / n).is_file()]
    if missing:
        raise fail(LABEL, f"{found} lacks {', '.join(missing)}; {_expected(found)}")
    return read_mat(found / TRAIN_FILE), read_mat(found / TEST_FILE)
