"""CelebA (Liu et al., 2015), aligned face photos tightly cropped and resized to 64x64.

Source: the "Align&Cropped Images" of https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html,
``img_align_celeba.zip`` extracted so that ``data_dir/img_align_celeba/`` (or
``data_dir/celeba/img_align_celeba/``) holds the 202,599 JPEGs ``000001.jpg`` ... of
178x218 pixels (width x height).

Preprocessing ("tightly cropped to the face and resized to 64x64", paper Sec. 5): every
image is cropped to the widely used 148x148 box ``(left, upper, right, lower) =
(15, 40, 163, 188)`` -- horizontally centred, slightly below the vertical centre so that
it covers the face from forehead to chin -- and resized to 64x64 with PIL's bicubic
filter (anti-aliased when downsampling).  File names are sorted for determinism.

Decoding ~200k JPEGs takes minutes, so the result, a ``uint8`` array of shape
``(N, 3, 64, 64)``, is cached as ``celeba_64x64_uint8.npy`` next to ``img_align_celeba/``.
The cache is written atomically (temporary file + :func:`os.replace`); if the directory is
not writable the data are simply not cached.  A cache whose image count differs from the
number of JPEG files (or which is unreadable) is ignored and rebuilt.

CelebA has no official partition here: :func:`gpvae.data.load_splits` draws a random
80/10/10 train / valid / test split.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gpvae.errors import DataError

from ._common import describe, fail, resolve_data_dir, search_dirs

NAME = "celeba"
LABEL = "CELEBA"
SHAPE = (3, 64, 64)
DIRNAME = "img_align_celeba"
CACHE_FILE = "celeba_64x64_uint8.npy"
SOURCE_SIZE = (178, 218)  # (width, height) of the aligned images
CROP_BOX = (15, 40, 163, 188)  # (left, upper, right, lower): 148x148
ORIGIN = ("000001.jpg ... from img_align_celeba.zip, the 'Align&Cropped Images' of "
          "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, extracted")
_CHUNK = 256


def _expected(where: Path | str) -> str:
    return f"expected {DIRNAME}/ in {where} ({ORIGIN})"


def list_images(image_dir: Path) -> list[Path]:
    """The JPEG files of ``image_dir``, sorted by name."""
    try:
        names = sorted(e.name for e in os.scandir(image_dir)
                       if e.name.lower().endswith((".jpg", ".jpeg")) and e.is_file())
    except OSError as exc:
        raise fail(LABEL, f"could not list {image_dir} ({describe(exc)}); "
                          f"{_expected(image_dir.parent)}") from None
    return [image_dir / n for n in names]


def decode_image(path: Path) -> np.ndarray:
    """One aligned CelebA JPEG -> cropped, resized ``uint8`` array of shape ``(64, 64, 3)``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.size != SOURCE_SIZE:
                raise fail(LABEL, f"{path} is {img.size[0]}x{img.size[1]} pixels, expected the "
                                  f"178x218 aligned images; {_expected(path.parent.parent)}")
            img = img.convert("RGB").crop(CROP_BOX)
            img = img.resize(SHAPE[1:], Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, truncated-file OSError, ...
        raise fail(LABEL, f"could not decode {path} (truncated or corrupt JPEG: {describe(exc)}); "
                          f"{_expected(path.parent.parent)}") from None


def _decode_chunk(paths: Sequence[Path]) -> np.ndarray:
    return np.stack([decode_image(p) for p in paths]).transpose(0, 3, 1, 2)


def decode_all(paths: Sequence[Path], *, progress: bool = True) -> np.ndarray:
    """Decode ``paths`` in parallel threads (PIL releases the GIL) with a progress bar."""
    out = np.empty((len(paths), *SHAPE), dtype=np.uint8)
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="CelebA: decoding JPEGs (cached afterwards)",
                   unit="img", disable=not progress)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None
    workers = max(1, min(8, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="celeba-decode")
    try:
        start = 0
        for block in pool.map(_decode_chunk, chunks):
            out[start:start + len(block)] = block
            start += len(block)
            if bar is not None:
                bar.update(len(block))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return out


def read_cache(path: Path, count: int) -> np.ndarray | None:
    """The cached array if it exists, is readable and holds ``count`` images, else None."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        warnings.warn(f"CelebA: ignoring unreadable cache {path} ({describe(exc)}); rebuilding",
                      stacklevel=3)
        return None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.shape != (count, *SHAPE):
        return None
    return arr


def write_cache(path: Path, arr: np.ndarray) -> bool:
    """Atomically write ``arr`` to ``path``; False (and no file left behind) if impossible."""
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        return True
    except OSError as exc:  # read-only directory, disk full, ...
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
        warnings.warn(f"CelebA: could not write the cache {path} ({describe(exc)}); "
                      f"the images will be decoded again next time", stacklevel=3)
        return False


def load(data_dir: str | os.PathLike | None, *, progress: bool = True) -> tuple[torch.Tensor, None]:
    """All CelebA images as a ``uint8`` ``(N, 3, 64, 64)`` tensor (no official test split)."""
    root = resolve_data_dir(data_dir, LABEL, f"{DIRNAME}/ ({ORIGIN})")
    dirs = search_dirs(root, NAME)
    image_dir = next((d / DIRNAME for d in dirs if (d / DIRNAME).is_dir()), None)
    if image_dir is None:
        raise fail(LABEL, _expected(" or ".join(str(d) for d in dirs)))
    paths = list_images(image_dir)
    if not paths:
        raise fail(LABEL, f"{image_dir} contains no .jpg files; {_expected(image_dir.parent)}")
    cache = image_dir.parent / CACHE_FILE
    arr = read_cache(cache, len(paths))
    if arr is None:
        arr = decode_all(paths, progress=progress)
        write_cache(cache, arr)
    return torch.from_numpy(arr), None
