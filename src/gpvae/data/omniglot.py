"""OMNIGLOT (Lake et al.), the 28x28 version of Burda et al. (IWAE, 2016).

Source: ``chardata.mat`` from Burda et al.'s IWAE repository
(https://github.com/yburda/iwae, ``datasets/OMNIGLOT/chardata.mat``), looked for in
``data_dir`` or ``data_dir/omniglot``.  It is a MATLAB file (read with
:func:`scipy.io.loadmat`) whose key ``data`` is a ``(784, 24345)`` array of training
images and ``testdata`` a ``(784, 8070)`` array of test images, values in ``[0, 1]``.

Each image column is stored column-major (Fortran order).  Burda's loader turns it into
upright row-major images with::

    x.T.reshape((-1, 28, 28)).reshape((-1, 784), order="F")

which is reproduced exactly here before reshaping to ``(N, 1, 28, 28)`` ``float32``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ._common import describe, fail, resolve_data_dir, search_dirs

NAME = "omniglot"
LABEL = "OMNIGLOT"
SHAPE = (1, 28, 28)
FILE = "chardata.mat"
ORIGIN = ("the 28x28 split from Burda et al.'s IWAE repository, github.com/yburda/iwae, "
          "datasets/OMNIGLOT/chardata.mat")


def _expected(where: Path | str) -> str:
    return f"expected {FILE} in {where} ({ORIGIN})"


def burda_reshape(data: np.ndarray) -> np.ndarray:
    """Burda et al.'s ``reshape_data`` applied to a ``(784, N)`` matrix: ``(N, 784)`` upright rows."""
    return data.T.reshape((-1, 28, 28)).reshape((-1, 28 * 28), order="F")


def _images(mat: dict, key: str, path: Path) -> torch.Tensor:
    if key not in mat:
        raise fail(LABEL, f"{path} has no variable '{key}' (not the IWAE chardata.mat?); "
                          f"{_expected(path.parent)}")
    data = mat[key]
    if (not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[0] != 784
            or data.shape[1] == 0 or not np.issubdtype(data.dtype, np.number)):
        shape = getattr(data, "shape", type(data).__name__)
        raise fail(LABEL, f"{path}: '{key}' should be a numeric (784, N) array, got {shape}; "
                          f"{_expected(path.parent)}")
    images = burda_reshape(data.astype(np.float32, copy=False))
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 1:
        raise fail(LABEL, f"{path}: '{key}' has values outside [0, 1]; {_expected(path.parent)}")
    return torch.from_numpy(np.ascontiguousarray(images).reshape(-1, *SHAPE))


def load(data_dir: str | os.PathLike | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(training partition, test partition)`` as ``float32`` ``(N, 1, 28, 28)`` tensors."""
    root = resolve_data_dir(data_dir, LABEL, f"{FILE} ({ORIGIN})")
    dirs = search_dirs(root, NAME)
    path = next((d / FILE for d in dirs if (d / FILE).is_file()), None)
    if path is None:
        raise fail(LABEL, _expected(" or ".join(str(d) for d in dirs)))
    try:
        from scipy.io import loadmat

        mat = loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, MatReadError, OSError, ...
        raise fail(LABEL, f"could not read {path} (truncated or corrupt MATLAB file: "
                          f"{describe(exc)}); {_expected(path.parent)}") from None
    return _images(mat, "data", path), _images(mat, "testdata", path)
