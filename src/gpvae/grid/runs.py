"""One run of a grid (or of ``gpvae compare``): train it, or resume it, then score it.

:func:`run_one` is the only code path that trains and evaluates a run, whichever launcher
calls it (the local pool, a Slurm array task, ``gpvae compare``).  It is idempotent: a
finished run (its ``eval.json`` matches the request) is skipped, a killed one resumed
exactly (:func:`gpvae.training.train`), a finished training only scored.  A run directory
holds, besides what :mod:`gpvae.rundir` lists:

    eval.json    the test IWAE-K of the best checkpoint on the run's own test split
                 (:func:`gpvae.rundir.run_test_split`), its best validation ELBO and epoch,
                 and the settings it was scored with; written atomically, last
    error.json   why the last attempt failed (removed when the run succeeds)

Concurrency: the trainer holds the run directory's flock while it trains and
:func:`run_one` holds it while it scores, so two processes never write one run at once;
a process that finds the lock held reports the run as ``running`` and moves on.  The lock
is released by the kernel when its holder dies, however it dies.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import atomic_write_text, json_text, read_checkpoint
from ..errors import ConfigError, GpvaeError, describe
from ..evaluation import estimate
from ..likelihoods import EVAL_BINARIZATION_SEED
from ..rundir import (CONFIG_FILE, LAST, LOCK_FILE, TrainConfig, load_run, run_progress,
                      run_test_split, settings_changed)
from ..training import train

EVAL_FILE = "eval.json"
ERROR_FILE = "error.json"
#: the part of the trainer's message that says another process holds the run's lock
_BUSY = "is being written by another gpvae process"


@dataclass
class RunSpec:
    """What to train and how to score it.  ``key`` identifies the run in its grid (grid:
    (dataset, latent_dim, method label, split, init)); ``label`` names it in logs."""

    cfg: TrainConfig
    iwae_samples: int = 100
    eval_seed: int = 0
    label: str = ""
    key: tuple = ()
    tag: str = "grid"

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)


def read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished_eval(run: RunSpec) -> dict | None:
    """The run's ``eval.json`` if it scores what ``run`` asks for, else None."""
    ev = read_json(run.run_dir / EVAL_FILE)
    if not isinstance(ev, dict):
        return None
    want = {"epochs": run.cfg.epochs, "iwae_samples": run.iwae_samples,
            "limit_test": run.cfg.limit_test, "eval_seed": run.eval_seed}
    if run.cfg.model_options.get("likelihood") == "bernoulli":
        # scores written before every evaluation used the one fixed binarization (they used
        # one seeded by eval_seed) are scored again, never mixed with today's
        want["binarization_seed"] = EVAL_BINARIZATION_SEED
    return ev if all(ev.get(k) == v for k, v in want.items()) else None


def check_same_run(run: RunSpec) -> None:
    """Refuse (one-line ConfigError) ``run`` when its directory holds a run that trained
    other settings (:func:`gpvae.rundir.config_differences`): its scores must never be
    reported as this run's.  A directory with no finished epoch kept nothing: fine."""
    differ = settings_changed(run.run_dir, run.cfg)
    if differ:
        raise ConfigError(f"{run.run_dir} holds a run trained with other settings "
                          f"({'; '.join(differ)}); a rerun may add epochs, seeds, models or "
                          "runs, not change what a run is: use another --out (nothing was "
                          "changed)")


def lock_held(run_dir) -> bool:
    """Whether a live process holds the run directory's write lock (a test-and-release,
    so it briefly takes the lock itself; :func:`run_one` retries a run it loses that way)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locks
        return False
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases it if we took it
    return False


def _busy(exc: BaseException) -> bool:
    return isinstance(exc, ConfigError) and _BUSY in str(exc)


def _trained_epochs(run_dir: Path) -> int:
    try:
        return int(read_checkpoint(run_dir / LAST)[2]["epoch"])
    except Exception:
        return 0


def run_one(run: RunSpec, *, progress: bool = True, log=print,
            raise_errors: bool = False, retries: int = 3) -> dict:
    """Train (or resume) and score one run; returns ``{"state", "eval", "error"}`` with state
    ``done`` (``eval``: the ``eval.json`` content), ``running`` (another process holds the
    run: skipped) or ``failed`` (``error``: the message, also written to ``error.json``).

    Any exception of a run (a :class:`~gpvae.errors.TrainingDivergedError`, a
    :class:`~gpvae.errors.DataError`, anything else) is recorded and returned, so one bad
    run does not stop a grid; with ``raise_errors`` (``gpvae compare``) it propagates and
    nothing is recorded.  A run whose lock another process holds is reported as running
    (also when the attempt failed otherwise meanwhile: the other writer explains it); one
    whose lock was lost to a momentary probe (``--status``) is retried ``retries`` times.  KeyboardInterrupt and
    other BaseExceptions always propagate (the run resumes on the next call).
    """
    from .. import progress as progress_mod
    from ..allocator import tune_cpu_allocator

    tune_cpu_allocator()  # a grid worker (pool, Slurm, Ray) is not the gpvae command
    for attempt in range(retries + 1):
        try:
            with progress_mod.line_prefix(run.label):
                return _attempt(run, progress, log)
        except Exception as exc:
            if raise_errors:
                raise
            busy = _busy(exc)
            if busy or lock_held(run.run_dir):  # another process writes the run meanwhile
                if busy:
                    time.sleep(0.05 * (attempt + 1))
                    if attempt < retries and not lock_held(run.run_dir):
                        continue  # lost to a momentary probe: try again
                log(f"[{run.tag}] {run.label}: being run by another process, skipped")
                return {"state": "running", "eval": None, "error": None}
            return _record_failure(run, exc, log)
    raise AssertionError("unreachable")  # pragma: no cover


def _attempt(run: RunSpec, progress: bool, log) -> dict:
    from ..devices import resolve_device
    from ..rundir import locked_run_dir

    d, cfg = run.run_dir, run.cfg
    check_same_run(run)
    ev = finished_eval(run)
    if ev is not None:
        return {"state": "done", "eval": ev, "error": None}
    if _trained_epochs(d) != cfg.epochs:  # more epochs than asked: train() refuses
        resume = (d / CONFIG_FILE).is_file()
        if not resume and (d / ERROR_FILE).is_file():
            (d / ERROR_FILE).unlink()  # a new run goes into an empty directory only
        log(f"[{run.tag}] {'resuming' if resume else 'training'} {run.label}")
        train(cfg, resume=resume, progress=progress, log=log)
    with locked_run_dir(d, create=False):
        ev = finished_eval(run)  # another process may have scored it meanwhile
        if ev is None:
            device = resolve_device(cfg.device)
            model, run_cfg = load_run(d, "best", device)
            meta = run_progress(d / LAST)
            if meta["epoch"] != cfg.epochs:
                raise ConfigError(f"{d} has trained {meta['epoch']} epochs, not {cfg.epochs}")
            test = _test_split(run_cfg, cfg.data_dir, cfg.limit_test)
            est = estimate(model, test, samples=run.iwae_samples, device=device,
                           seed=run.eval_seed, progress=progress).summary()
            ev = {"run": run.label, "key": list(run.key), "model": cfg.model,
                  "model_options": cfg.model_options, "dataset": cfg.dataset,
                  "split_seed": cfg.split_seed, "seed": cfg.seed, "epochs": cfg.epochs,
                  "iwae_samples": run.iwae_samples, "limit_test": cfg.limit_test,
                  "eval_seed": run.eval_seed, "binarization_seed": EVAL_BINARIZATION_SEED,
                  "best_epoch": meta["best"]["epoch"],
                  "best_valid_elbo": meta["best"]["valid_elbo"],
                  "test_iwae": est["test_iwae"], "estimate": est}
            atomic_write_text(d / EVAL_FILE, json_text(ev, indent=2) + "\n")
        if (d / ERROR_FILE).is_file():
            (d / ERROR_FILE).unlink()
    log(f"[{run.tag}] {run.label}: IWAE-{run.iwae_samples} {ev['estimate']['test_iwae']:.2f} "
        f"± {ev['estimate']['test_iwae_se']:.2f} (best valid ELBO {ev['best_valid_elbo']:.2f} "
        f"at epoch {ev['best_epoch']})")
    return {"state": "done", "eval": ev, "error": None}


_TEST_CACHE: dict = {}
#: test splits up to this size are kept for the next runs of this process (the runs of a
#: split follow each other; loading a data set costs more than scoring a tiny run)
_TEST_CACHE_BYTES = 64 * 2**20


def _test_split(cfg: TrainConfig, data_dir, limit_test):
    """:func:`gpvae.rundir.run_test_split`, remembering the last two small ones."""
    where = data_dir or cfg.data_dir
    key = (cfg.dataset, where and os.path.abspath(where), cfg.split_seed, limit_test)
    if key in _TEST_CACHE:
        return _TEST_CACHE[key]
    test = run_test_split(cfg, data_dir, limit_test)
    if test.images.numel() * test.images.element_size() <= _TEST_CACHE_BYTES:
        while len(_TEST_CACHE) >= 2:
            _TEST_CACHE.pop(next(iter(_TEST_CACHE)))
        _TEST_CACHE[key] = test
    return test


def _record_failure(run: RunSpec, exc: Exception, log) -> dict:
    kind = type(exc).__name__
    message = describe(exc)  # one line, cut; "Type: message" except for an OSError
    message = message[len(kind) + 2:] if message.startswith(kind + ": ") else message
    record = {"run": run.label, "key": list(run.key), "type": kind, "error": message}
    if not isinstance(exc, GpvaeError):  # a bug or an environment problem: keep the trace
        record["traceback"] = "".join(traceback.format_exception(exc, limit=8))
    try:
        atomic_write_text(run.run_dir / ERROR_FILE, json.dumps(record, indent=2) + "\n")
    except GpvaeError as write_error:  # e.g. a read-only disk: still report it
        log(f"[{run.tag}] {run.label}: could not record the failure: {write_error}")
    log(f"[{run.tag}] {run.label} failed: {kind}: {message}")
    return {"state": "failed", "eval": None, "error": f"{kind}: {message}"}
