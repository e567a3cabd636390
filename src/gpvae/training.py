"""A plain training loop (in the spirit of nanoGPT): Adam, mini-batches, per-epoch validation.

What a run directory (``--out``) holds, the :class:`~gpvae.rundir.TrainConfig` that defines
a run and how to read a run back are in :mod:`gpvae.rundir`.

Determinism and resume: every epoch reseeds the global RNGs from (seed, epoch) before it
shuffles, samples or binarizes, and checkpoints are written atomically at the end of each
epoch.  A run killed at any point and restarted with ``--resume`` therefore replays the
unfinished epoch exactly and ends with the same weights and metrics as an uninterrupted run.

Precision (``cfg.precision``, :mod:`gpvae.precision`): the TF32 flags of a ``tf32`` run are
set for the whole of training (forward, backward, optimizer step) and restored after it; a
``bf16`` run computes each step's objective under bfloat16 autocast (its batch mean in
float32) and everything else -- backward, the NaN/inf guard, Adam on the float32 weights --
outside it.  The validation ELBO is scored in the run's precision.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .compiling import (TrainingStep, apply_fused_trunks, apply_gp_quadratic, check_compile_option,
                        compile_enabled)
from .checkpoint import (atomic_write_text, load_checkpoint, remove_orphan_temps,
                         save_checkpoint)
from .devices import resolve_device
from .errors import CheckpointError, ConfigError, DataError, TrainingDivergedError
from .evaluation import estimate
from .precision import check_precision, precision_context
from .progress import progress_bar
from .rundir import (BEST, CONFIG_FILE, LAST, METRICS, RUN_FILES, TrainConfig,
                     build_from_config, config_differences, locked_run_dir, read_config,
                     require_empty, run_progress)

#: the trainer's own columns of metrics.csv; a model's :meth:`epoch_summary` keys come
#: between ``valid_elbo`` and ``seconds`` (:func:`metric_fields`)
METRIC_FIELDS = ["epoch", "train_objective", "train_rec", "train_kl", "valid_elbo", "seconds"]


def metric_fields(model) -> list[str]:
    """The columns of a run's metrics.csv: :data:`METRIC_FIELDS` with the model's
    :meth:`~gpvae.models.base.LatentVariableModel.epoch_summary` keys inserted before
    ``seconds`` (which stays last).  Fixed by the model's class and config, so the header
    is the same in every epoch and after ``--resume``."""
    with torch.no_grad():
        extra = list(model.epoch_summary())
    clash = sorted(set(extra) & set(METRIC_FIELDS))
    if clash or len(set(extra)) != len(extra):
        raise ValueError(f"{type(model).__name__}.epoch_summary() keys {extra} repeat a key or "
                         f"one of the trainer's own columns {METRIC_FIELDS}")
    return METRIC_FIELDS[:-1] + extra + METRIC_FIELDS[-1:]


def model_optimizer(model, lr: float) -> torch.optim.Adam:
    """:func:`make_adam` over the model's
    :meth:`~gpvae.models.base.LatentVariableModel.param_groups` for the base learning rate
    ``lr``, after checking that they hold every parameter of the model exactly once (a
    programming error otherwise: ValueError)."""
    groups = model.param_groups(lr)
    grouped = [p for group in groups for p in group["params"]]
    params = list(model.parameters())
    if len(grouped) != len(params) or {id(p) for p in grouped} != {id(p) for p in params}:
        raise ValueError(f"{type(model).__name__}.param_groups() must hold each of its "
                         f"{len(params)} parameters exactly once (it holds {len(grouped)} "
                         "entries)")
    return make_adam(groups, lr)


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam over ``params``: parameters, or parameter groups (dicts with ``"params"`` and
    optionally their own ``"lr"``; ``lr`` is the default); the fused implementation (one
    kernel for all parameters instead of a loop over them; its effect on a GPVAE step is
    measured in docs/benchmarks.md) where the device has it.

    The fused kernel needs each parameter's moment estimates in the parameter's memory
    layout, and on CPU it does not check: moments loaded contiguous (as checkpoints store
    them) for a channels-last weight silently give wrong updates.  A load hook therefore
    re-lays them out like their parameters (values unchanged, so resume stays exact),
    rejects state whose shape does not match (the kernel does not check that either), and
    keeps the optimizer fused when the checkpoint's own settings (which load_state_dict
    copies) came from an unfused one.
    """
    params = list(params)

    def fresh():  # Adam writes its settings into group dicts: each try gets its own copies
        return [dict(p) if isinstance(p, dict) else p for p in params]

    try:
        optimizer = torch.optim.Adam(fresh(), lr=lr, fused=True)
    except RuntimeError:  # a device or dtype without a fused Adam kernel
        return torch.optim.Adam(fresh(), lr=lr)

    def fused_state(opt):
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, None
            for p in group["params"]:
                state = opt.state.get(p, {})
                for key, value in state.items():
                    if not torch.is_tensor(value):
                        continue
                    if key == "step":  # fused: a float32 tensor on the parameter's device
                        state[key] = value.to(device=p.device, dtype=torch.float32)
                    elif value.shape != p.shape:  # the fused kernel would not notice
                        raise CheckpointError(
                            f"optimizer state {key!r} of shape {tuple(value.shape)} does not "
                            f"match its parameter's {tuple(p.shape)}: the checkpoint was "
                            "written by another version of this model; cannot resume from it")
                    elif value.stride() != p.stride():
                        state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    optimizer.register_load_state_dict_post_hook(fused_state)
    return optimizer


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63)


def _metrics_csv(history: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k) for k in fields})
    return buf.getvalue()


def tensorboard_writer(out: Path):
    """A TensorBoard ``SummaryWriter`` for the run directory ``out`` (``out/tensorboard``),
    or None when tensorboard is not installed (metrics.csv only)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: CSV only
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _finite_parameters(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def diverged_error(what: str, where: str, out: Path, epoch: int) -> TrainingDivergedError:
    """The error for a non-finite loss/gradient/weight, naming the last good checkpoint only
    if one was written (``epoch``: the epochs finished)."""
    if (out / LAST).is_file():
        kept = (f"the last good checkpoint is {out / LAST} (epoch {epoch}); try a smaller --lr "
                "or another --seed in a new run (another --out)")
    else:
        kept = ("no checkpoint was written (it happened before the first epoch finished); "
                f"rerun with --out {out} --resume and a smaller --lr or another --seed: the "
                "run starts over")
    return TrainingDivergedError(f"{what} at {where}; {kept}")


def step_error(loss: float, grad_norm: float, epoch: int, step: int, steps: int,
               out: Path) -> TrainingDivergedError | None:
    """None if a training step's loss and gradient norm are finite; otherwise the error that
    stops the run (``epoch``, ``step``: 0-based, ``steps`` per epoch)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return None
    what = (f"the training loss became {loss}" if not math.isfinite(loss)
            else f"a gradient became non-finite (norm {grad_norm})")
    return diverged_error(what, f"epoch {epoch + 1}, step {step + 1} of {steps}", out, epoch)


def load_training_splits(cfg: TrainConfig):
    """The run's train / validation / test splits, refused with a one-line
    :class:`~gpvae.errors.DataError` unless there is at least one training and one
    validation image."""
    from .data import load_splits

    splits = load_splits(cfg.dataset, cfg.data_dir, split_seed=cfg.split_seed,
                         limit_train=cfg.limit_train, limit_test=cfg.limit_test)
    if len(splits.train) < 1 or len(splits.valid) < 1:
        raise DataError(f"{cfg.dataset}: {len(splits.train)} training and {len(splits.valid)} "
                        "validation images; training needs at least one of each (a training "
                        "partition of at least 5 images, of which 10% are held out for "
                        "validation)")
    return splits


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print,
          compile="auto", fused_trunks="auto", gp_quadratic="auto") -> dict:
    """Train (or resume) a run; return the final summary (best epoch and its valid ELBO).

    Everything that can be checked is checked before the first step: the options, the
    model, the run directory (new or empty; or, with ``resume``, a run with the same
    settings and no more finished epochs than ``cfg.epochs``), its write lock, and the
    data (at least one training and one validation image).  Model selection uses the
    validation split only: ``best.safetensors`` is the epoch with the highest validation
    ELBO.  A non-finite loss, gradient or weight stops training before anything
    non-finite is saved.  ``resume`` on a run killed before its first epoch finished
    starts it from the beginning.  ``compile``: ``--compile`` off, on or auto
    (:mod:`gpvae.compiling`: training steps and validation as compiled graphs; auto: on
    CUDA for the methods measured to gain); ``fused_trunks``: ``--fused-trunks`` off, on
    or auto (the GPVAE's three trunks as one network; auto: on CUDA); ``gp_quadratic``:
    ``--gp-quadratic`` blocked, dense or auto (the GPVAE's quadratic forms; auto: dense on
    CUDA).  All are execution options, not stored in config.json, so a run may resume with
    others (the steps are the same up to float rounding).
    """
    from .data import IMAGE_SHAPES

    cfg.validate()
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    check_compile_option(compile)
    if cfg.dataset not in IMAGE_SHAPES:
        raise DataError(f"unknown data set {cfg.dataset!r}; choose from {', '.join(IMAGE_SHAPES)}")
    # Build (and validate) the model and load the data before touching the disk: bad
    # options and data fail before a directory is created.
    torch.manual_seed(cfg.seed)
    model = build_from_config(cfg, IMAGE_SHAPES[cfg.dataset]).to(device)
    compiled = compile_enabled(compile, device, model)
    apply_fused_trunks(model, fused_trunks, device)
    apply_gp_quadratic(model, gp_quadratic, device)
    if compiled:
        log(f"note: compiling {cfg.model}'s training step and evaluation (--compile "
            f"{compile}); the first steps take longer (--compile off runs eagerly)")
    warning = model.training_plan_warning(cfg.epochs)
    if warning:
        log(f"warning: {warning}")
    splits = load_training_splits(cfg)

    # refuse a directory that is not ours before creating even the lock file in it
    # (and check again under the lock)
    if resume:
        read_config(out)
    elif out.is_dir():
        require_empty(out)
    with locked_run_dir(out, create=not resume):
        done = 0
        if resume:
            last_meta = run_progress(out / LAST) if (out / LAST).is_file() else {}
            done = last_meta.get("epoch", 0)
            differ = config_differences(read_config(out), cfg)
            if differ and done:
                raise ConfigError(f"--resume: the run in {out} was trained with other settings "
                                  f"({'; '.join(differ)}); only --epochs, --device, "
                                  "--data-dir and --limit-test may change when resuming "
                                  "(nothing was changed; a new run needs another --out)")
            if differ:  # no epoch finished: nothing of it is kept, so it may start anew
                log(f"{out} finished no epoch: starting it over with the new settings "
                    f"({'; '.join(differ)})")
            if cfg.epochs < done:
                raise ConfigError(f"--resume --epochs {cfg.epochs}: the run in {out} has already "
                                  f"trained {done} epochs; pass --epochs {done} or more (nothing "
                                  "was changed)")
            if cfg.epochs == done:
                log(f"{out} has already trained {done} epochs: nothing to do")
                return run_summary(out, last_meta, cfg.epochs)
        else:
            require_empty(out)
        remove_orphan_temps(out, RUN_FILES)
        optimizer = model_optimizer(model, cfg.lr)
        history: list[dict] = []
        best = {"epoch": 0, "valid_elbo": -math.inf}
        if done:
            meta = load_checkpoint(out / LAST, model, optimizer)
            history, best = meta["history"], meta["best"]
            log(f"resuming {out} after epoch {done}")
        elif resume:
            log(f"resuming {out}: no epoch had finished, starting from the first")
        atomic_write_text(out / CONFIG_FILE, json.dumps(asdict(cfg), indent=2) + "\n")
        with precision_context(cfg.precision, device, autocast=False):
            _train_epochs(cfg, model, optimizer, splits, device, out, done, history, best,
                          progress, compiled, log)
        return run_summary(out, {"history": history, "best": best}, cfg.epochs)


def run_summary(out: Path, meta: dict, epochs: int) -> dict:
    """What :func:`train` returns for the run in ``out``: from its ``history`` and ``best``
    (``meta``, as the last checkpoint stores them) and the epochs asked for."""
    history, best = meta["history"], meta["best"]
    return {"run_dir": str(out), "epochs": epochs, "best_epoch": best["epoch"],
            "best_valid_elbo": best["valid_elbo"],
            "last_valid_elbo": history[-1]["valid_elbo"] if history else None}


def _train_epochs(cfg, model, optimizer, splits, device, out: Path, start_epoch: int,
                  history: list, best: dict, progress: bool, compiled: bool = False,
                  log=print) -> None:
    """Epochs ``start_epoch + 1 .. cfg.epochs``: updates ``history`` and ``best`` in place and
    checkpoints after every epoch; ``compiled``: each step's forward and backward pass as
    compiled graphs (:class:`gpvae.compiling.TrainingStep`)."""
    train_data = splits.train.to(device) if device.type == "cuda" else splits.train
    n_train = len(train_data)
    steps = math.ceil(n_train / cfg.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    fields = metric_fields(model)
    train_step = TrainingStep(model, optimizer, n_train, compiled, device, log, cfg.precision)
    writer = tensorboard_writer(out)
    bar = progress_bar((cfg.epochs - start_epoch) * steps, unit="step", enabled=progress)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch))  # seeds CPU and all CUDA devices
        perm = torch.randperm(n_train, device=train_data.images.device)
        model.train()
        sums = {"train_objective": 0.0, "train_rec": 0.0, "train_kl": 0.0}
        for step in range(steps):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = model.likelihood.prepare(train_data.batch(idx, device))
            loss, diag = train_step(x)  # zero_grad, objective (autocast), backward
            # one device-to-host sync checks the loss and every gradient
            grad_norm = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
            checks = torch.stack([loss.detach(), grad_norm.to(loss.dtype)]).tolist()
            error = step_error(checks[0], checks[1], epoch, step, steps, out)
            if error is not None:
                raise error
            optimizer.step()
            w = x.shape[0] / n_train
            sums["train_objective"] += w * -checks[0]
            sums["train_rec"] += w * float(diag.get("rec", float("nan")))
            sums["train_kl"] += w * float(diag.get("kl", float("nan")))
            bar.update(1)
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
        row = finish_epoch(cfg, model, optimizer, splits, device, epoch, sums, t0, history,
                           best, fields, writer, compiled)
        bar.set_postfix(valid_elbo=f"{row['valid_elbo']:.1f}")
    bar.close()
    if writer is not None:
        writer.close()


#: what torch says when a distribution gets non-finite parameters (torch.normal's "std >=
#: 0.0" check, argument validation's "found invalid values", nan / inf in a message)
_NON_FINITE = re.compile(r"\bnan\b|\binf\b|invalid values|std >= 0", re.IGNORECASE)


def finish_epoch(cfg, model, optimizer, splits, device, epoch: int, sums: dict, t0: float,
                 history: list, best: dict, fields: list[str], writer,
                 compiled: bool = False) -> dict:
    """The end of epoch ``epoch`` (0-based) of the run ``cfg``, after its steps; the one
    code for :func:`train` and packed training (:func:`gpvae.packing.train_packed`, once
    per replica, its weights loaded into ``model``).

    Checks that the weights are finite, scores the validation split (``splits.valid``,
    :func:`gpvae.evaluation.estimate` seeded by ``cfg.seed``) and that its ELBO is not NaN
    -- raising :func:`diverged_error`'s error before anything is written otherwise -- then
    appends the metrics row (``sums``: the epoch's train_objective, train_rec and train_kl;
    the model's :meth:`epoch_summary`; ``seconds`` since ``t0``) to ``history``, logs it to
    TensorBoard (``writer``, or None), checkpoints ``best.safetensors`` when the validation
    ELBO beats ``best`` (updated in place) and ``last.safetensors`` with ``optimizer``'s
    state, and rewrites metrics.csv (columns ``fields``, :func:`metric_fields`).  Returns
    the row.  The checkpoint holds what ``--resume`` restarts from: the run goes on exactly
    as if never stopped."""
    out = Path(cfg.out)
    if not _finite_parameters(model):
        raise diverged_error("the weights became non-finite", f"epoch {epoch + 1}", out, epoch)
    try:
        valid = estimate(model, splits.valid, samples=cfg.valid_samples, batch_size=500,
                         device=device, seed=cfg.seed, progress=False,
                         precision=cfg.precision,
                         compile="on" if compiled else "off").summary()["test_elbo"]
    except (RuntimeError, ValueError) as exc:  # finite weights, yet they overflow
        if not _NON_FINITE.search(str(exc)):
            raise
        raise diverged_error("q(z|x) of the validation images became non-finite "
                             f"({str(exc).splitlines()[0][:100]})", f"epoch {epoch + 1}", out,
                             epoch) from None
    if math.isnan(valid):
        raise diverged_error("the validation ELBO became NaN", f"epoch {epoch + 1}", out, epoch)
    with torch.no_grad():
        summary = {k: float(v) for k, v in model.epoch_summary().items()}
    row = {"epoch": epoch + 1, **sums, "valid_elbo": valid, **summary,
           "seconds": time.perf_counter() - t0}
    if list(row) != fields:
        raise ValueError(f"{type(model).__name__}.epoch_summary() keys changed during "
                         f"training: {list(summary)}")
    history.append(row)
    if writer is not None:
        for k, v in row.items():
            if k != "epoch":
                writer.add_scalar(k, v, epoch + 1)
    if valid > best["valid_elbo"]:
        best.update(epoch=epoch + 1, valid_elbo=valid)
        save_checkpoint(out / BEST, model, {"epoch": epoch + 1, "config": asdict(cfg),
                                            "best": best})
    save_checkpoint(out / LAST, model, {"epoch": epoch + 1, "config": asdict(cfg),
                                        "history": history, "best": best}, optimizer)
    atomic_write_text(out / METRICS, _metrics_csv(history, fields))
    return row
