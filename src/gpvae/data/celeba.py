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
``(N, 3, 64, 64)``, is cached as ``celeba_64x64_uint8.npy`` next to ``img_align_celeba/``,
with its key in ``celeba_64x64_uint8.json`` (:func:`cache_key`): what the array was built
from -- the sorted JPEG names with their sizes and modification times (``st_size``,
``st_mtime_ns``), and the decoding (source size, crop box, resize filter, output shape,
:data:`DECODE_VERSION`) -- and the size and modification time of the ``.npy`` it belongs
to.  The cache is used only when its key matches the JPEGs now in the directory and the
decoding of this code; otherwise (a JPEG added, removed, or rewritten under the same
name -- which changes its mtime, unless the copy preserves timestamps *and* the size
stays the same; the decoding changed; a cache written before keys existed, which has no
key file; a ``.npy`` replaced after its key was written) it is rebuilt, and the progress
bar says so.  Both files are written atomically (temporary file + rename), the array first and
its key last, so a kill at any moment never leaves a key that vouches for another array.
If the directory is not writable the data are simply not cached (a warning says so); a
cache that matches its key but cannot be read is rebuilt with a warning.

The decoding progress bar follows :func:`gpvae.progress.progress_bar`: a redrawn bar on a
terminal, plain lines in a log, nothing with ``GPVAE_PROGRESS=off`` or ``progress=False``.

CelebA has no official partition here: :func:`gpvae.data.load_splits` draws a random
80/10/10 train / valid / test split.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gpvae.checkpoint import atomic_path, atomic_write_text
from gpvae.errors import DataError, OutputError

from ._common import describe, fail, resolve_data_dir, search_dirs

NAME = "celeba"
LABEL = "CELEBA"
SHAPE = (3, 64, 64)
DIRNAME = "img_align_celeba"
CACHE_FILE = "celeba_64x64_uint8.npy"
#: the cache's key (:func:`cache_key`), next to :data:`CACHE_FILE`
KEY_FILE = "celeba_64x64_uint8.json"
SOURCE_SIZE = (178, 218)  # (width, height) of the aligned images
CROP_BOX = (15, 40, 163, 188)  # (left, upper, right, lower): 148x148
RESAMPLE = "bicubic"  # the PIL resize filter (a name of PIL.Image.Resampling, lower case)
#: Bump whenever :func:`decode_image` changes in a way the constants above do not show:
#: every existing cache is then rebuilt.
DECODE_VERSION = 1
ORIGIN = ("000001.jpg ... from img_align_celeba.zip, the 'Align&Cropped Images' of "
          "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html, extracted")
_CHUNK = 256
_KEY_FORMAT = 1
_DESC_NEW = "CelebA: decoding JPEGs (cached afterwards)"
_DESC_STALE = "CelebA: decoding JPEGs (rebuilding the cache: it is out of date or has no key)"


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
            img = img.resize(SHAPE[1:], Image.Resampling[RESAMPLE.upper()])
            return np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, truncated-file OSError, ...
        raise fail(LABEL, f"could not decode {path} (truncated or corrupt JPEG: {describe(exc)}); "
                          f"{_expected(path.parent.parent)}") from None


def _decode_chunk(paths: Sequence[Path]) -> np.ndarray:
    return np.stack([decode_image(p) for p in paths]).transpose(0, 3, 1, 2)


def decode_all(paths: Sequence[Path], *, progress: bool = True, desc: str = _DESC_NEW) -> np.ndarray:
    """Decode ``paths`` in parallel threads (PIL releases the GIL) under a
    :func:`gpvae.progress.progress_bar` (``progress=False`` or ``GPVAE_PROGRESS=off``: silent)."""
    from gpvae.progress import progress_bar

    out = np.empty((len(paths), *SHAPE), dtype=np.uint8)
    chunks = [paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    bar = progress_bar(len(paths), desc=desc, unit="img", enabled=progress)
    workers = max(1, min(8, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="celeba-decode")
    try:
        start = 0
        for block in pool.map(_decode_chunk, chunks):
            out[start:start + len(block)] = block
            start += len(block)
            bar.update(len(block))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return out


def cache_key(paths: Sequence[Path]) -> dict:
    """What a cache of ``paths`` is built from: the decoding (source size, crop box, resize
    filter, output shape, :data:`DECODE_VERSION`), the number of images and a SHA-256 of
    the sorted file names with their sizes and modification times (``st_size``,
    ``st_mtime_ns``).  Replacing a JPEG, even by one of the same name, changes the key."""
    digest = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise fail(LABEL, f"could not read {p} ({describe(exc)}); "
                              f"{_expected(p.parent.parent)}") from None
        digest.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"format": _KEY_FORMAT,
            "decoding": {"version": DECODE_VERSION, "source_size": list(SOURCE_SIZE),
                         "crop_box": list(CROP_BOX), "resample": RESAMPLE, "shape": list(SHAPE)},
            "count": len(paths), "sources": digest.hexdigest()}


def _fingerprint(path: Path) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_cache(path: Path, key: dict) -> np.ndarray | None:
    """The array cached in ``path`` if its key file (:data:`KEY_FILE`, next to it) holds
    ``key`` and vouches for this very ``.npy`` (its size and modification time), and the
    array is readable with ``key['count']`` images; else None (the caller rebuilds it).
    A cache that matches its key but cannot be read is reported with a warning."""
    try:
        stored = json.loads((path.parent / KEY_FILE).read_text())
        if not isinstance(stored, dict) or stored.get("cache") != _fingerprint(path):
            return None
    except (OSError, ValueError):  # no key file (or no cache), or a torn / foreign one
        return None
    if {k: v for k, v in stored.items() if k != "cache"} != key:
        return None
    try:
        return _cache_array(path, key["count"])
    except Exception as exc:
        warnings.warn(f"CelebA: ignoring unreadable cache {path} ({describe(exc)}); rebuilding",
                      stacklevel=3)
        return None


def _cache_array(path: Path, count: int) -> np.ndarray | None:
    """The ``uint8`` array of ``count`` images in the cache ``path``, or None when it holds
    something else (what :func:`numpy.load` raises propagates)."""
    arr = np.load(path, allow_pickle=False)
    if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8
            and arr.shape == (count, *SHAPE)):
        return None
    return arr


def _unkeyed_cache(path: Path, count: int) -> np.ndarray | None:
    """A cache written before caches had keys, in a read-only directory (so it can neither
    be rebuilt with a key nor replaced): used as it is when it holds ``count`` images, with
    a warning that it cannot be checked against the JPEGs; else None."""
    try:
        arr = _cache_array(path, count)
    except (OSError, ValueError):
        return None
    if arr is None:
        return None
    warnings.warn(f"CelebA: using {path} as it is: it was written before caches recorded "
                  "what they were built from, and its directory is read-only, so it cannot "
                  "be checked against the JPEGs or rebuilt (make the directory writable once "
                  "to rebuild it with a key)", stacklevel=3)
    return arr


def write_cache(path: Path, arr: np.ndarray, key: dict) -> bool:
    """Atomically write ``arr`` to ``path``, then its key (``key`` plus the new file's size
    and modification time) to :data:`KEY_FILE` next to it; False (with a warning, and no
    temporary file left behind) if impossible.  A kill or failure between the two leaves
    an old key that does not vouch for the new ``.npy``, so the cache is rebuilt."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        atomic_write_text(path.parent / KEY_FILE,
                          json.dumps({**key, "cache": _fingerprint(path)}, indent=1) + "\n")
        return True
    except OutputError as exc:  # read-only directory, disk full, ...: says which file
        detail = str(exc)
    except OSError as exc:  # the new .npy vanished before its key was written
        detail = f"could not write {path.parent / KEY_FILE}: {describe(exc)}"
    warnings.warn(f"CelebA: cache not written, {detail}; the images will be decoded again "
                  "next time", stacklevel=3)
    return False


def load(data_dir: str | os.PathLike | None, *, progress: bool = True) -> tuple[torch.Tensor, None]:
    """All CelebA images as a ``uint8`` ``(N, 3, 64, 64)`` tensor (no official test split).

    ``progress=False`` silences the decoding progress bar; otherwise it follows
    :func:`gpvae.progress.progress_mode` (``GPVAE_PROGRESS=off``: silent)."""
    root = resolve_data_dir(data_dir, LABEL, f"{DIRNAME}/ ({ORIGIN})")
    dirs = search_dirs(root, NAME)
    image_dir = next((d / DIRNAME for d in dirs if (d / DIRNAME).is_dir()), None)
    if image_dir is None:
        raise fail(LABEL, _expected(" or ".join(str(d) for d in dirs)))
    paths = list_images(image_dir)
    if not paths:
        raise fail(LABEL, f"{image_dir} contains no .jpg files; {_expected(image_dir.parent)}")
    cache = image_dir.parent / CACHE_FILE
    key = cache_key(paths)
    arr = read_cache(cache, key)
    if arr is None and not (image_dir.parent / KEY_FILE).exists() \
            and not os.access(image_dir.parent, os.W_OK):
        arr = _unkeyed_cache(cache, key["count"])  # read-only: it could never be rebuilt
    if arr is None:
        arr = decode_all(paths, progress=progress,
                         desc=_DESC_STALE if cache.exists() else _DESC_NEW)
        write_cache(cache, arr, key)
    return torch.from_numpy(arr), None
