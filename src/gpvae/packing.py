"""Packed training: several runs of one grid cell trained as one vmapped computation.

The paper's protocol trains every cell (data set x latent dimension x method) 10 splits x 3
initializations times (Sec. 5); one such run keeps a GPU mostly idle.  :func:`train_packed`
trains R runs that differ only in ``out``, ``seed`` and ``split_seed`` in one process, as
one computation over a leading replica dimension, and gives *the result of training them one
by one* with :func:`gpvae.training.train` (same seeds: same weights, metrics, best epoch and
files, up to float rounding):

* parameters: the R models are built exactly as ``train`` builds each (global seed
  ``cfg.seed``, then the model), and stacked (:func:`torch.func.stack_module_state`); one
  step is :func:`torch.func.vmap` over the replica dimension of
  :func:`torch.func.functional_call` of the model's ``likelihood.prepare`` and
  ``training_objective`` on each replica's own mini-batch; ``sum_r loss_r`` is
  back-propagated (replica r's loss depends only on replica r's slice, so each slice gets
  exactly its own gradient), and one Adam (:func:`gpvae.training.make_adam`, with the
  model's own parameter groups) steps the stacked parameters -- Adam is element-wise, so
  that is R independent Adams;
* data: each replica has its own split (``split_seed``) and its own shuffle;
* model selection and divergence are per replica: after every epoch each replica's weights
  are loaded into an ordinary module and go through ``train``'s own end of epoch
  (:func:`gpvae.training.finish_epoch`: scored on its own validation split, ``last`` and
  ``best`` checkpoints with optimizer state, ``metrics.csv``; ``config.json`` is written as
  ``train`` writes it), so evaluation, ``--resume`` and every reader of run directories
  treat packed runs like any other.  A replica whose loss, gradients, weights or validation
  ELBO go non-finite is stopped with the error ``train`` would raise (its directory keeps
  its last good epoch, as ``train`` leaves it) and dropped from the pack before the
  optimizer step; the others go on.

Randomness
----------
``train`` seeds the global generators with ``epoch_seed(seed, epoch)`` at every epoch, then
draws the shuffle (``randperm``) and, in every step, the model's noise (``q.rsample()``,
Bernoulli binarization, ...) from them.  The packed step reproduces each replica's stream
exactly: every replica owns one ``torch.Generator`` per device, seeded as ``train`` seeds the
global ones; the shuffle is drawn outside vmap from it, and every random call made inside
the vmapped step is replayed once per replica from that replica's generator by
:class:`_ReplicaRandomness`, a ``TorchFunctionMode`` (it sees the call as the model made it,
e.g. ``Tensor.normal_``, before vmap's batching rules; it runs the same call on each
replica's slice of the arguments, with the functorch layer popped, and stacks the results).
vmap itself runs with ``randomness="error"``, so a random operation the mode does not
replay is an error, never a silently shared stream.  (A ``TorchDispatchMode`` would see the
batched aten ops, but cannot do it: ``Normal.rsample`` draws with an in-place ``normal_`` on
an unbatched ``empty`` tensor, which vmap refuses under ``randomness="different"`` before any
dispatch mode sees it, and runs once for all replicas under ``"same"``.)

What cannot be packed
---------------------
A method is packed if its class says so
(:meth:`~gpvae.models.base.LatentVariableModel.packable`) and a one-step probe of its
vmapped training step succeeds before anything is written (SA's autograd inside
``posterior`` and RME's stage schedule, which reads tensor values, fail there); otherwise
:func:`train_packed` raises a one-line :class:`~gpvae.errors.UnsupportedError`.  A custom
autograd Function in a training step needs a vmap rule of its own (the GPVAE's have them:
the blocked-Cholesky quadratic forms of eq. 13 run for all replicas at once,
:class:`gpvae.cholesky._StackedBlockedCholeskyQuadratic`; the closed form of eq. 16 is
element-wise).  vmap cannot run channels-last (NHWC) convolutions, so the packed step runs
the networks NCHW: the same values, other kernels, so packed and one-at-a-time runs agree
to float rounding, not bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn
from torch._functorch.pyfunctorch import temporarily_pop_interpreter_stack
from torch.func import functional_call, stack_module_state, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .checkpoint import atomic_write_text, remove_orphan_temps
from .devices import model_device_dtype, resolve_device
from .errors import ConfigError, DataError, GpvaeError, UnsupportedError, describe
from .networks import set_channels_last
from .progress import progress_bar
from .rundir import (CONFIG_FILE, RUN_FILES, TrainConfig, build_from_config, check_out_path,
                     locked_run_dir, require_empty)
from .training import (epoch_seed, finish_epoch, load_training_splits, make_adam, metric_fields,
                       model_optimizer, run_summary, step_error, tensorboard_writer)

_functorch = torch._C._functorch

#: the TrainConfig fields in which the runs of one pack may differ
PER_RUN_FIELDS = ("out", "seed", "split_seed")


# --------------------------------------------------------------------------------------
# Which runs can be packed
# --------------------------------------------------------------------------------------
def pack_key(cfg: TrainConfig) -> str:
    """What runs packed together must share: every :class:`~gpvae.rundir.TrainConfig` field
    but :data:`PER_RUN_FIELDS`, as a canonical JSON string (group a grid's runs by it)."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig)
              if f.name not in PER_RUN_FIELDS}
    return json.dumps(shared, sort_keys=True, default=repr)


def check_packable(cfgs) -> list[TrainConfig]:
    """The configs of a pack, checked: a non-empty list of valid TrainConfigs that differ
    only in ``out``, ``seed`` and ``split_seed``, with distinct ``out`` directories, of a
    method whose class is :meth:`~gpvae.models.base.LatentVariableModel.packable`.  Raises a
    one-line :class:`~gpvae.errors.ConfigError` (:class:`~gpvae.errors.UnsupportedError`
    for a method that cannot be packed) otherwise."""
    from .models import model_class

    cfgs = list(cfgs) if isinstance(cfgs, (list, tuple)) else cfgs
    if not isinstance(cfgs, list) or not cfgs:
        raise ConfigError("packed training needs a non-empty list of run configurations")
    for cfg in cfgs:
        if not isinstance(cfg, TrainConfig):
            raise ConfigError(f"packed training needs TrainConfig objects, got "
                              f"{type(cfg).__name__}")
        cfg.validate()
    first = cfgs[0]
    for cfg in cfgs[1:]:
        differ = [f.name for f in fields(TrainConfig) if f.name not in PER_RUN_FIELDS
                  and getattr(cfg, f.name) != getattr(first, f.name)]
        if differ:
            raise ConfigError(f"packed runs may differ only in {', '.join(PER_RUN_FIELDS)}; "
                              f"{', '.join(differ)} differ between {first.out} and {cfg.out} "
                              "(train them in separate packs)")
    seen: dict[Path, str] = {}
    for cfg in cfgs:
        key = check_out_path(cfg.out).resolve()
        if key in seen:
            raise ConfigError(f"two packed runs write the same directory {cfg.out}")
        seen[key] = cfg.out
    cls = model_class(first.model)
    if not cls.packable():
        raise UnsupportedError(f"{first.model} runs cannot be trained packed (vmap cannot "
                               f"batch its training step: {cls.__name__}.packable() is "
                               "False); train them one at a time")
    if first.precision != "fp32":
        raise UnsupportedError(f"packed training runs in fp32 only, got --precision "
                               f"{first.precision}; train these runs one at a time")
    return cfgs


# --------------------------------------------------------------------------------------
# Per-replica random streams inside vmap
# --------------------------------------------------------------------------------------
_IN_PLACE_RANDOM = ("normal_", "uniform_", "bernoulli_", "exponential_", "geometric_",
                    "log_normal_", "cauchy_", "random_")
#: the random calls replayed per replica (all take a ``generator`` keyword)
RANDOM_FUNCTIONS = frozenset(
    [getattr(torch.Tensor, name) for name in _IN_PLACE_RANDOM]
    + [torch.bernoulli, torch.Tensor.bernoulli, torch.normal, torch.rand, torch.randn,
       torch.randint, torch.rand_like, torch.randn_like, torch.randint_like, torch.poisson,
       torch.multinomial, torch.Tensor.multinomial, torch.randperm])
_IN_PLACE = frozenset(getattr(torch.Tensor, name) for name in _IN_PLACE_RANDOM)


class ReplicaStreams:
    """One ``torch.Generator`` per replica and device, each seeded as
    :func:`gpvae.training.train` seeds the global generators of that run
    (``torch.manual_seed`` seeds the CPU and every CUDA device alike)."""

    def __init__(self, seeds: list[int]):
        self.seeds = list(seeds)
        self._generators: list[dict[torch.device, torch.Generator]] = [{} for _ in seeds]

    def generator(self, replica: int, device) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gens = self._generators[replica]
        if device not in gens:  # created on first use: as if seeded with the rest
            gens[device] = torch.Generator(device=device).manual_seed(self.seeds[replica])
        return gens[device]


class _ReplicaRandomness(TorchFunctionMode):
    """Replays every call of :data:`RANDOM_FUNCTIONS` made inside the vmapped step once per
    replica, on that replica's slice of the arguments, from that replica's generator
    (``streams.generator(rows[i], device)`` for the i-th replica of the pack), and returns
    the stacked results as the batched tensor vmap expects.

    The per-replica calls are the model's own calls with ``generator=`` added, run with the
    vmap layer popped: each replica draws exactly what it draws when trained alone.  An
    in-place call on a batched tensor writes each replica's slice in place; one on an
    unbatched tensor (``torch.empty(shape).normal_()``, how ``Normal.rsample`` draws) cannot
    become batched in place, so the batched draws are returned and the unbatched tensor is
    filled with NaN (code that ignores the return value then fails loudly).  A call that
    passes its own generator is refused: it cannot be split into per-replica streams."""

    def __init__(self, streams: ReplicaStreams, rows: list[int]):
        """Create it inside the function vmap maps over the replicas: that vmap level is
        the replica dimension."""
        super().__init__()
        self.streams, self.rows = streams, rows
        self.level = _functorch.maybe_current_level()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in RANDOM_FUNCTIONS:
            return func(*args, **kwargs)
        level = _functorch.maybe_current_level()
        if level is None:  # not inside vmap: nothing to split
            return func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if level != self.level:
            raise UnsupportedError(f"the training step calls {name} inside a functorch "
                                   "transform of its own, which packed training cannot split "
                                   "into per-replica streams; train these runs one at a time")
        if kwargs.get("generator") is not None:
            raise UnsupportedError(f"the training step calls {name} with its own "
                                   "torch.Generator, which packed training cannot split into "
                                   "per-replica streams; train these runs one at a time")
        kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
        flat, spec = tree_flatten((args, kwargs))
        values, dims = [], []
        for a in flat:
            if isinstance(a, torch.Tensor) and _functorch.maybe_get_level(a) == level:
                value, dim = _functorch._unwrap_batched(a, level)
            else:
                value, dim = a, None
            values.append(value)
            dims.append(dim)
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        device = (tensors[0].device if tensors else
                  torch.device(kwargs.get("device") or torch.get_default_device()))
        in_place = func in _IN_PLACE
        outs = []
        with temporarily_pop_interpreter_stack():
            for i, replica in enumerate(self.rows):
                own = [v.select(d, i) if d is not None else v for v, d in zip(values, dims)]
                if in_place and dims[0] is None:
                    own[0] = own[0].clone()
                a, k = tree_unflatten(own, spec)
                outs.append(func(*a, **k, generator=self.streams.generator(replica, device)))
            if in_place and dims[0] is not None:  # written into each replica's slice
                return args[0]
            stacked = torch.stack(outs)
            if in_place and values[0].is_floating_point():
                values[0].fill_(math.nan)
        return _functorch._add_batch_dim(stacked, 0, level)


# --------------------------------------------------------------------------------------
# The pack: stacked parameters, one Adam, the vmapped step
# --------------------------------------------------------------------------------------
class _TrainingStep(nn.Module):
    """What one replica does in one step of :func:`gpvae.training.train`: prepare the batch
    (e.g. binarize it), the model's training objective, the loss; plus its diagnostics."""

    def __init__(self, model, n_train: int):
        super().__init__()
        self.model, self.n_train = model, n_train

    def forward(self, x):
        x = self.model.likelihood.prepare(x)
        objective, diag = self.model.training_objective(x, self.n_train)
        def scalar(key):
            return torch.as_tensor(diag.get(key, math.nan), dtype=objective.dtype,
                                   device=objective.device)

        return -objective.mean(), scalar("rec"), scalar("kl")


class Pack:
    """R models of one configuration as stacked parameters and buffers with one Adam, and
    the vmapped training step.  ``rows`` lists the replicas (indices into ``models``) still
    in the pack, in the order of the stacked dimension."""

    def __init__(self, models: list, lr: float, n_train: int, streams: ReplicaStreams):
        self.models, self.lr, self.streams = models, lr, streams
        self.rows = list(range(len(models)))
        template = models[0]
        # vmap cannot query channels-last contiguity: the stacked step runs NCHW (the same
        # values; the plain models keep their layout for validation)
        step_model = set_channels_last(copy.deepcopy(template), False)
        self.step = _TrainingStep(step_model, n_train)
        params, buffers = stack_module_state(models)
        trains = {name: p.requires_grad for name, p in template.named_parameters()}
        self.params = {k: v.detach().requires_grad_(trains[k]) for k, v in params.items()}
        self.buffers = buffers
        name_of = {id(p): name for name, p in template.named_parameters()}
        self.groups = [({k: v for k, v in g.items() if k != "params"},
                        [name_of[id(p)] for p in g["params"]])
                       for g in template.param_groups(lr)]
        model_optimizer(template, lr)  # its checks of the parameter groups
        self.optimizer = self._optimizer()

    def _optimizer(self):
        return make_adam([{**opts, "params": [self.params[n] for n in names]}
                          for opts, names in self.groups], self.lr)

    # --- the step ----------------------------------------------------------------------
    def losses(self, x: torch.Tensor, params=None, buffers=None, streams=None):
        """(loss, rec, kl), each (R,), of every replica of the pack on its own batch
        ``x[i]`` (x: (R, B, C, H, W)), differentiable with respect to the stacked
        parameters."""
        params = self.params if params is None else params
        buffers = self.buffers if buffers is None else buffers
        x = x.to(*model_device_dtype(self.models[0], x.device))  # the models' device, dtype
        mode_args = (streams or self.streams, self.rows)
        named = ({f"model.{k}": v for k, v in params.items()},
                 {f"model.{k}": v for k, v in buffers.items()})

        def one(params, buffers, x):
            with _ReplicaRandomness(*mode_args):
                return functional_call(self.step, (params, buffers), (x,))

        try:
            return vmap(one, randomness="error")(*named, x)
        except RuntimeError as exc:
            if "randomness" not in str(exc):
                raise
            raise UnsupportedError(
                f"{type(self.models[0]).__name__}'s training step draws random numbers "
                "through an operation packed training does not replay per replica (it "
                f"replays {', '.join(sorted({f.__name__ for f in RANDOM_FUNCTIONS}))}): "
                f"{describe(exc)}; train these runs one at a time") from None

    def probe(self, x: torch.Tensor) -> None:
        """One vmapped forward and backward on copies of the state (nothing changes):
        a method vmap cannot batch is a one-line UnsupportedError before any work."""
        params = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        buffers = {k: v.clone() for k, v in self.buffers.items()}
        streams = ReplicaStreams([0] * len(self.models))
        name = type(self.models[0]).__name__
        try:
            loss = self.losses(x, params, buffers, streams)[0]
            loss.sum().backward()
        except UnsupportedError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure means "cannot be packed"
            raise UnsupportedError(f"{name} runs cannot be trained packed: vmap fails on its "
                                   f"training step ({describe(exc)}); train them one at a "
                                   "time") from None

    def backward(self, x: torch.Tensor) -> list[list[float]]:
        """A training step up to the optimizer's: every replica's loss on its batch ``x[i]``,
        the gradients (``sum_r loss_r`` back-propagated into the zeroed ``.grad`` s), and,
        in one device-to-host sync, [losses, gradient norms, rec, kl] (each a list over the
        pack) for the caller's checks before ``optimizer.step()``."""
        loss, rec, kl = self.losses(x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        return torch.stack([loss.detach(), self.gradient_norms().to(loss.dtype),
                            rec.to(loss.dtype), kl.to(loss.dtype)]).tolist()

    def gradient_norms(self) -> torch.Tensor:
        """Each replica's gradient norm over all parameters, (R,) (as ``train`` checks it)."""
        norms = [torch.linalg.vector_norm(p.grad.flatten(1), dim=1)
                 for p in self.params.values() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms), dim=0)

    def drop(self, positions: list[int]) -> None:
        """Remove the replicas at ``positions`` of the stacked dimension: parameters, their
        gradients, buffers and Adam state are sliced, the optimizer rebuilt over them."""
        keep = [i for i in range(len(self.rows)) if i not in set(positions)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        first = next(iter(self.params.values()))
        idx = torch.tensor(keep, device=first.device)
        old_state = self.optimizer.state
        params = {}
        for name, p in self.params.items():
            new = p.detach().index_select(0, idx).requires_grad_(p.requires_grad)
            if p.grad is not None:
                new.grad = p.grad.index_select(0, idx)
            params[name] = new
        self.buffers = {k: v.index_select(0, idx) for k, v in self.buffers.items()}
        old = self.params
        self.params = params
        self.optimizer = self._optimizer()
        for name, p in old.items():
            state = old_state.get(p)
            if state:
                self.optimizer.state[params[name]] = {
                    k: (v.index_select(0, idx) if torch.is_tensor(v) and v.shape == p.shape
                        else v.clone() if torch.is_tensor(v) else v)
                    for k, v in state.items()}

    # --- one replica as an ordinary model -------------------------------------------------
    def load_into(self, position: int, model) -> None:
        """Copy the replica at ``position`` into ``model`` (parameters and buffers)."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.params[name][position])
            for name, b in model.named_buffers():
                b.copy_(self.buffers[name][position])

    def plain_optimizer(self, position: int, model):
        """The optimizer ``train`` would hold for ``model``
        (:func:`gpvae.training.model_optimizer`), with the replica's Adam state."""
        opt = model_optimizer(model, self.lr)
        for name, p in model.named_parameters():
            stacked = self.params[name]
            state = self.optimizer.state.get(stacked)
            if state:
                opt.state[p] = {k: (v[position].clone() if torch.is_tensor(v)
                                    and v.shape == stacked.shape
                                    else v.clone() if torch.is_tensor(v) else v)
                                for k, v in state.items()}
        return opt


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def train_packed(cfgs: list[TrainConfig], progress: bool = True, log=print) -> list[dict]:
    """Train the new runs ``cfgs`` -- one grid cell: the same configuration but for ``out``,
    ``seed`` and ``split_seed`` -- as one packed computation; return one summary per run, in
    order, as :func:`gpvae.training.train` returns it, plus ``"error"``: None, or the
    exception that stopped the run (a :class:`~gpvae.errors.TrainingDivergedError` with the
    message ``train`` gives, or an error writing its files); a stopped run's directory
    holds its last good epoch, as ``train`` leaves it.

    Everything is checked before the first step, as ``train`` checks it, for every run (the
    options, that they may be packed, the model, the data, that each directory is new or
    empty and its write lock), plus a one-step probe that vmap can batch the method's
    training step.  Packing only starts runs: a killed pack is resumed run by run with
    ``gpvae train --resume`` (the files are the same as ``train``'s).
    """
    from .data import IMAGE_SHAPES

    cfgs = check_packable(cfgs)
    first = cfgs[0]
    device = resolve_device(first.device)
    if first.dataset not in IMAGE_SHAPES:
        raise DataError(f"unknown data set {first.dataset!r}; choose from "
                        f"{', '.join(IMAGE_SHAPES)}")
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)  # as train() builds each run's model
        models.append(build_from_config(cfg, IMAGE_SHAPES[cfg.dataset]).to(device))
    warning = models[0].training_plan_warning(first.epochs)
    if warning:
        log(f"warning: {warning}")
    loaded: dict[int, object] = {}
    splits = []
    for cfg in cfgs:
        if cfg.split_seed not in loaded:
            loaded[cfg.split_seed] = load_training_splits(cfg)
        splits.append(loaded[cfg.split_seed])
    sizes = sorted({len(s.train) for s in splits})
    if len(sizes) > 1:  # cannot happen for one data set and limit; the step needs it
        raise DataError(f"packed runs need training splits of one size, got {sizes}")
    for cfg in cfgs:
        if Path(cfg.out).is_dir():
            require_empty(Path(cfg.out))
    streams = ReplicaStreams([cfg.seed for cfg in cfgs])
    pack = Pack(models, first.lr, sizes[0], streams)
    probe_batch = min(2, sizes[0])
    pack.probe(torch.stack([s.train.batch(slice(0, probe_batch), device) for s in splits]))

    with contextlib.ExitStack() as locks:
        for cfg in cfgs:
            locks.enter_context(locked_run_dir(cfg.out, create=True))
            require_empty(Path(cfg.out))
            remove_orphan_temps(cfg.out, RUN_FILES)
        for cfg in cfgs:
            atomic_write_text(Path(cfg.out) / CONFIG_FILE,
                              json.dumps(asdict(cfg), indent=2) + "\n")
        return _train_epochs(cfgs, pack, splits, device, progress, log)


def _train_epochs(cfgs, pack: Pack, splits, device, progress: bool, log) -> list[dict]:
    """The epochs of :func:`gpvae.training._train_epochs`, for every replica of ``pack``."""
    first = cfgs[0]
    outs = [Path(cfg.out) for cfg in cfgs]
    train_data = [s.train.to(device) if device.type == "cuda" else s.train for s in splits]
    n_train = len(train_data[0])
    steps = math.ceil(n_train / first.batch_size)
    fields_ = metric_fields(pack.models[0])
    writers = [tensorboard_writer(out) for out in outs]
    histories: list[list[dict]] = [[] for _ in cfgs]
    bests = [{"epoch": 0, "valid_elbo": -math.inf} for _ in cfgs]
    errors: list[Exception | None] = [None] * len(cfgs)

    def stop(replica: int, exc: Exception) -> None:
        errors[replica] = exc
        log(f"{outs[replica]}: stopped: {exc}")

    bar = progress_bar(first.epochs * steps, unit="step", enabled=progress)
    for epoch in range(first.epochs):
        if not pack.rows:
            break
        t0 = time.perf_counter()
        pack.streams = ReplicaStreams([epoch_seed(cfg.seed, epoch) for cfg in cfgs])
        perms = {r: torch.randperm(n_train, device=train_data[r].images.device,
                                   generator=pack.streams.generator(
                                       r, train_data[r].images.device))
                 for r in pack.rows}
        pack.step.train()
        sums = {r: {"train_objective": 0.0, "train_rec": 0.0, "train_kl": 0.0}
                for r in pack.rows}
        for step in range(steps):
            lo, hi = step * first.batch_size, (step + 1) * first.batch_size
            x = torch.stack([train_data[r].batch(perms[r][lo:hi], device) for r in pack.rows])
            checks = pack.backward(x)  # one device-to-host sync for every replica's checks
            rows, failed = list(pack.rows), []
            for i, r in enumerate(rows):
                error = step_error(checks[0][i], checks[1][i], epoch, step, steps, outs[r])
                if error is not None:
                    stop(r, error)
                    failed.append(i)
            if failed:
                pack.drop(failed)
            if pack.rows:
                pack.optimizer.step()
            w = x.shape[1] / n_train
            for i, r in enumerate(rows):
                if i not in failed:
                    sums[r]["train_objective"] += w * -checks[0][i]
                    sums[r]["train_rec"] += w * checks[2][i]
                    sums[r]["train_kl"] += w * checks[3][i]
            bar.update(1)
            bar.set_description(f"epoch {epoch + 1}/{first.epochs}")
            if not pack.rows:
                break
        dropped = []
        for i, r in enumerate(list(pack.rows)):
            # each replica's end of epoch is train's: its weights and Adam state in an
            # ordinary model and optimizer; ``seconds`` is the wall time of the packed epoch
            # up to this replica's row (all replicas' steps)
            model = pack.models[r]
            pack.load_into(i, model)
            try:
                finish_epoch(cfgs[r], model, pack.plain_optimizer(i, model), splits[r], device,
                             epoch, sums[r], t0, histories[r], bests[r], fields_, writers[r])
            except GpvaeError as exc:
                stop(r, exc)
                dropped.append(i)
        if dropped:
            pack.drop(dropped)
        valids = [histories[r][-1]["valid_elbo"] for r in pack.rows]
        bar.set_postfix(runs=f"{len(pack.rows)}/{len(cfgs)}",
                        max_valid_elbo=f"{max(valids):.1f}" if valids else "-")
    bar.close()
    for writer in writers:
        if writer is not None:
            writer.close()
    return [{**run_summary(outs[r], {"history": histories[r], "best": bests[r]}, cfg.epochs),
             "error": errors[r]} for r, cfg in enumerate(cfgs)]

