"""Run directories: what a run writes where, who may write it, and how to read it back.

A run directory (``gpvae train --out DIR``) holds::

    config.json        the TrainConfig (what to build, which data, which seeds)
    last.safetensors   model + optimizer + history after the last finished epoch (for --resume)
    best.safetensors   model at the epoch with the best validation ELBO (what evaluate uses)
    metrics.csv        one row per epoch
    tensorboard/       the same metrics, when TensorBoard is installed
    .gpvae.lock        the write lock

:mod:`gpvae.training` writes them; every reader (evaluate, uncertainty, export, compare,
demo) uses :func:`read_config`, :func:`load_run` and :func:`run_test_split` from here.
The rules, enforced before any training work starts:

* only one process writes a run directory at a time: the writer holds an exclusive
  ``flock`` on the lock file, which the kernel releases when the process ends however it
  ends (``kill -9`` included), so a dead run never leaves the directory stuck; a second
  writer is refused with a one-line error naming the holder's pid;
* a new run goes only into a new or empty directory (the lock file aside), never over a
  user's files; an existing run is continued only with ``--resume``;
* a directory that cannot be written (a file, a read-only file system, ``/proc``) is a
  one-line error.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from .devices import resolve_device
from .errors import CheckpointError, ConfigError, OutputError, describe
from .precision import check_precision

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not guarded
    fcntl = None

CONFIG_FILE = "config.json"
LAST = "last.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.csv"
LOCK_FILE = ".gpvae.lock"
#: the files the trainer writes (atomically, under the lock)
RUN_FILES = (CONFIG_FILE, LAST, BEST, METRICS)


def check_out_path(out) -> Path:
    """``--out`` as a Path; refuses the empty string (which would mean the current
    directory by accident) and a path that exists but is not a directory."""
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).strip():
        raise ConfigError(f"--out must name a directory, got {out!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} exists and is not a directory")
    return path


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextlib.contextmanager
def locked_run_dir(out, *, create: bool):
    """Hold the exclusive write lock of run directory ``out`` for the ``with`` block.

    ``create``: make the directory (and its parents) if it does not exist; otherwise it
    must exist.  Raises :class:`~gpvae.errors.ConfigError` if another process holds the lock
    and :class:`~gpvae.errors.OutputError` if the directory cannot be created or written.
    """
    path = check_out_path(out)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise CheckpointError(f"{path} is not a gpvae run directory (it does not exist)")
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write the run directory {path}: {describe(exc)}") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"{path} is being written by another gpvae process"
                                  f"{_holder(fd)}; wait for it to finish or choose another "
                                  "--out") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def foreign_entries(path: Path) -> list[str]:
    """What ``path`` holds besides the lock file (sorted)."""
    return sorted(e for e in os.listdir(path) if e != LOCK_FILE)


def require_empty(path: Path) -> None:
    """A new run may only be written into a new or empty directory."""
    held = foreign_entries(path)
    if not held:
        return
    shown = ", ".join(held[:4]) + (f" (+{len(held) - 4} more)" if len(held) > 4 else "")
    if is_run_dir(path):
        raise ConfigError(f"{path} already holds a run; pass --resume to continue it or "
                          "choose another --out")
    raise ConfigError(f"--out {path} is not empty (it holds {shown}); gpvae train writes "
                      "only into a new or empty directory: choose another --out")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a readable gpvae ``config.json``."""
    try:
        read_config(path)
    except (CheckpointError, ConfigError):
        return False
    return True


# --------------------------------------------------------------------------------------
# What defines a run, and reading one back
# --------------------------------------------------------------------------------------
#: the largest seed a run, an evaluation or a comparison accepts (seeds are 0 .. 2^63 - 1,
#: what torch.manual_seed takes as a signed 64-bit integer)
MAX_SEED = 2**63 - 1


def check_seed(value, flag: str) -> int:
    """``value`` as a seed (an int in 0 .. :data:`MAX_SEED`), else a one-line ConfigError
    naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{flag} must be an integer from 0 to {MAX_SEED}, got {value!r}")
    return value


@dataclass
class TrainConfig:
    """Everything that defines a run.  Defaults follow the paper's Sec. 8 except ``epochs``."""

    out: str = "runs/run"
    dataset: str = "mnist"
    data_dir: str | None = None
    model: str = "vae"
    model_options: dict = field(default_factory=dict)  # the model config's fields
    epochs: int = 20  # paper: 2000
    batch_size: int = 128
    lr: float = 5e-4
    seed: int = 0  # initialization, shuffling, sampling
    split_seed: int = 0  # the train/validation split
    limit_train: int | None = None
    limit_test: int | None = None
    valid_samples: int = 1  # importance samples per validation image for the ELBO
    device: str = "auto"
    #: fp32, tf32 or bf16 (:mod:`gpvae.precision`) for the training steps and the validation
    #: ELBO; fixed for the run (``--resume`` keeps it)
    precision: str = "fp32"

    def validate(self) -> None:
        """Every setting, the output path and the device (a one-line ConfigError)."""
        check_out_path(self.out)
        self.check_values()
        resolve_device(self.device)

    def check_values(self) -> None:
        """Every setting's type and range (a one-line ConfigError naming its flag)."""
        def positive(name, value, allow_none=False):
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")

        check_seed(self.seed, "--seed")
        check_seed(self.split_seed, "--split-seed")
        positive("epochs", self.epochs)
        positive("batch_size", self.batch_size)
        positive("valid_samples", self.valid_samples)
        positive("limit_train", self.limit_train, allow_none=True)
        positive("limit_test", self.limit_test, allow_none=True)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr!r}")
        check_precision(self.precision)


#: TrainConfig fields added after runs were first written: a config.json without them
#: loads with their defaults (a run written before ``precision`` existed trained in fp32)
ADDED_FIELDS = ("precision",)


def read_config(run_dir) -> TrainConfig:
    """The :class:`TrainConfig` of a run directory; a missing, unreadable or invalid
    ``config.json`` is a one-line :class:`~gpvae.errors.CheckpointError`.  Model options
    written under a method's former names are returned under their current ones
    (:func:`gpvae.models.current_options`)."""
    from .data import DATASETS
    from .models import MODELS, current_options

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a gpvae run directory (no {CONFIG_FILE}); "
                              "create one with `gpvae train --out DIR`")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        missing = {f.name for f in fields(TrainConfig)} - raw.keys() - set(ADDED_FIELDS)
        if missing:  # the trainer writes every field: this file is someone else's
            raise TypeError(f"no {', '.join(sorted(missing))}")
        cfg = TrainConfig(**raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a gpvae run configuration "
                              f"({describe(exc)})") from None
    if cfg.dataset not in DATASETS:
        raise CheckpointError(f"{path} names an unknown data set {cfg.dataset!r} "
                              f"(known: {', '.join(DATASETS)})")
    if not isinstance(cfg.model_options, dict):
        raise CheckpointError(f"{path}: model_options is not a JSON object")
    try:
        cfg.check_values()
    except ConfigError as exc:  # a hand-edited file: name it, not a flag the user never gave
        raise CheckpointError(f"{path} holds an invalid setting: {exc}") from None
    if cfg.model in MODELS:  # an unknown model is refused when the run is built
        try:
            cfg.model_options = current_options(cfg.model, cfg.model_options)
        except ConfigError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    return cfg


#: the settings a run may change when it is continued (``--resume``, a rerun of a grid or a
#: comparison): how long, where it runs, where its data lie and how many test images a
#: comparison scores -- not what is trained
MUTABLE_FIELDS = ("epochs", "device", "out", "data_dir", "limit_test")


def config_differences(saved: TrainConfig, wanted: TrainConfig) -> list[str]:
    """How ``wanted`` differs from the stored ``saved`` configuration of the same run, one
    ``"name saved -> wanted"`` string per setting (model options named one by one), apart
    from :data:`MUTABLE_FIELDS`; empty when ``wanted`` may continue ``saved``."""
    old, new = saved.__dict__, wanted.__dict__
    out = []
    for f in fields(TrainConfig):
        k = f.name
        if k in MUTABLE_FIELDS or old[k] == new[k]:
            continue
        if k == "model_options" and old["model"] == new["model"]:
            a, b = (_with_defaults(old["model"], opts) for opts in (old[k], new[k]))
            out += [f"{k}.{o} {a.get(o, '(unset)')!r} -> {b.get(o, '(unset)')!r}"
                    for o in sorted(a.keys() | b.keys()) if a.get(o) != b.get(o)]
        else:
            out.append(f"{k} {old[k]!r} -> {new[k]!r}")
    return out


def settings_changed(run_dir, cfg: TrainConfig) -> list[str]:
    """:func:`config_differences` between the run in ``run_dir`` and ``cfg`` when that run
    has kept something (a finished epoch: its ``last.safetensors``), else [] -- a run that
    kept nothing, or no run, may start with any settings."""
    run_dir = Path(run_dir)
    if not ((run_dir / CONFIG_FILE).is_file() and (run_dir / LAST).is_file()):
        return []
    return config_differences(read_config(run_dir), cfg)


def _with_defaults(model: str, options: dict) -> dict:
    """``options`` (current names) with the model config's defaults filled in, so that an
    option given at its default equals one left out."""
    from .models import MODELS, current_options

    if model not in MODELS:
        return dict(options)
    filled = {f.name: f.default for f in fields(MODELS[model].config_class)
              if f.default is not MISSING}
    filled.update(current_options(model, options))
    return filled


def run_progress(path) -> dict:
    """The training metadata of a run's checkpoint ``path`` (``last.safetensors``): its
    finished ``epoch`` (an int >= 1), the per-epoch ``history`` (one dict per epoch) and the
    ``best`` epoch so far ({"epoch", "valid_elbo"}); anything else -- a damaged or
    hand-edited file -- is a one-line :class:`~gpvae.errors.CheckpointError`."""
    from .checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(path)
    epoch, history, best = meta.get("epoch"), meta.get("history"), meta.get("best")
    ok = (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1
          and isinstance(history, list) and len(history) == epoch
          and all(isinstance(row, dict) for row in history)
          and isinstance(best, dict) and isinstance(best.get("epoch"), int)
          and isinstance(best.get("valid_elbo"), (int, float)))
    if not ok:
        raise CheckpointError(f"{path} is not a valid gpvae run checkpoint (its epoch, history "
                              "or best-epoch record is missing or malformed); delete the run "
                              "directory to train it again")
    return meta


def build_from_config(cfg: TrainConfig, image_shape):
    """The (freshly initialised) model a run's configuration describes."""
    from .models import build_model

    return build_model(cfg.model, image_shape, **cfg.model_options)


def load_run(run_dir, which: str = "best", device="cpu"):
    """(model, TrainConfig) of a finished or running run, weights from best/last checkpoint."""
    from .checkpoint import load_checkpoint
    from .data import IMAGE_SHAPES

    cfg = read_config(run_dir)
    model = build_from_config(cfg, IMAGE_SHAPES[cfg.dataset])
    load_checkpoint(checkpoint_path(run_dir, which), model)
    return model.to(device).eval(), cfg


def checkpoint_path(run_dir, which: str) -> Path:
    """The file of the run's ``best`` or ``last`` checkpoint (``--checkpoint``)."""
    name = {"best": BEST, "last": LAST}.get(which)
    if name is None:
        raise ConfigError(f"--checkpoint must be 'best' or 'last', got {which!r}")
    return Path(run_dir) / name


def run_test_split(cfg: TrainConfig, data_dir=None, limit_test: int | None = None):
    """The test images of a run: its data set's test partition, cut from the run's own
    ``split_seed`` where the data set has none (CelebA), so it never overlaps the run's
    training or validation images."""
    from .data import load_splits

    return load_splits(cfg.dataset, data_dir or cfg.data_dir, split_seed=cfg.split_seed,
                       limit_train=1, limit_test=limit_test).test
