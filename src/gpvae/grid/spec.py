"""The grid spec: a TOML file that names the paper's protocol (Sec. 5) for ``gpvae grid``.

Reading (:func:`load_spec`) validates every key before any work starts: an unknown key, a
value of the wrong type or out of range, an unknown data set or method is a one-line
:class:`~gpvae.errors.ConfigError` naming the file and the key.  :func:`expand` turns a
:class:`Grid` into its runs (the layout and the seeds are described in :mod:`gpvae.grid`),
and :func:`claim_out_dir` ties an output directory to its spec.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError
from ..rundir import MAX_SEED

#: the copy of the spec kept in the grid's output directory
SPEC_COPY = "grid.toml"
#: init seeds must stay below this so that ``seed = SEED_STRIDE * split + init`` is unique
SEED_STRIDE = 1000

#: what ``gpvae grid --help`` shows: every key, its default and its meaning
SPEC_HELP = """\
The spec is a TOML file (a commented example: experiments/example.toml).  Top-level keys:

  datasets      list of data sets, e.g. ["mnist"]                                 (required)
  latent_dims   list of latent dimensions d, e.g. [10, 20, 50]                   (required)
  methods       list of methods, NAME or NAME:SIZE in the paper's notation,
                e.g. ["vae", "gpvae", "sa:2", "iaf:4"]                            (required)
  splits        number of train/validation splits: split seeds 0..splits-1   (default 1)
  split_seeds   ... or the split seeds themselves, e.g. [0, 1, 2]
  inits         initializations per split: init seeds 0..inits-1             (default 1)
  init_seeds    ... or the init seeds themselves (each < 1000)
  epochs        training epochs of every run                                (default 20)
  limit_train   training images per run (default: all)
  limit_test    test images each run is scored on (default: all)
  iwae_samples  K of the test IWAE-K (default 100; may change between reruns: finished
                runs are then re-scored, not retrained)
  batch_size, lr, valid_samples        as gpvae train (defaults 128, 5e-4, 1)
  likelihood, sigma_x, decoder         the generative model, as gpvae train
                                       (defaults gaussian, 0.1, conv)
  data_dir      where the data sets' files are (MNIST needs none)
  device        auto (default), cpu, cuda, cuda:N

Tables:
  [options.METHOD]   further options of one method, e.g. [options.gpvae] gp_lr = 1e-3 or
                     [options."sa:2"] sa_lr = 0.01 (a sized method's name quoted; the names
                     of gpvae train's method-specific flags, with _)
  [launcher]         kind = "local" (default), "slurm" or "ray"; local: jobs (worker processes,
                     default 1), pack (true: train the new runs of a cell as one vmapped
                     computation, gpvae.packing; default false); slurm: partition, time
                     (minutes or "[D-]HH:MM[:SS]"),
                     gpus_per_task, cpus_per_task, mem_gb, runs_per_task (default 1),
                     array_parallelism, setup (shell lines run before each task, e.g.
                     ["source .venv/bin/activate"]), sbatch (a table of further sbatch
                     options, e.g. {account = "abc", qos = "high"}); ray (pip install
                     'gpvae[ray]'): address (default: start Ray here; "auto" or
                     "ray://HOST:10001" joins a cluster), gpus_per_run (GPUs each run
                     reserves, may be fractional: 0.25 = four runs share a GPU; default 0:
                     no GPU), cpus_per_run (CPUs and torch threads per run, default 1)
  [report]           test = "welch" (default) or "paired": the t-test behind the marks;
                     alpha = 0.01 (p > alpha: marked as no evidence of a difference)

Runs: DIR/DATASET/dD/METHOD/splitS/initI (METHOD with ':' as '-', e.g. sa-2).  Split seed S
fixes the train/validation partition (the same for every method); the weights and the
training noise use seed 1000*S + I.  The spec is copied to DIR/grid.toml; a rerun may only
extend it (more data sets, dims, methods, splits or inits; other launcher or report
settings, another iwae_samples, data_dir or device), never change what a run is."""

_TOP = ("datasets", "latent_dims", "methods", "splits", "split_seeds", "inits", "init_seeds",
        "epochs", "limit_train", "limit_test", "iwae_samples", "batch_size", "lr",
        "valid_samples", "likelihood", "sigma_x", "decoder", "data_dir", "device", "options",
        "launcher", "report")
_LAUNCHER = ("kind", "jobs", "pack", "partition", "time", "gpus_per_task", "cpus_per_task",
             "mem_gb",
             "runs_per_task", "array_parallelism", "setup", "sbatch", "address",
             "gpus_per_run", "cpus_per_run")
_REPORT = ("test", "alpha")
#: what defines a run: a rerun in the same DIR must keep these (sets may only grow)
RUN_KEYS = ("epochs", "limit_train", "limit_test", "batch_size", "lr", "valid_samples",
            "likelihood", "sigma_x", "decoder")
#: what a run's score depends on besides its RUN_KEYS: a rerun may change these (finished
#: runs are re-scored), ``--report`` may not (it only reads what the runs were scored with)
SCORE_KEYS = ("iwae_samples",)


@dataclass
class Launcher:
    """Where the runs go (the ``[launcher]`` table)."""

    kind: str = "local"
    jobs: int = 1
    pack: bool = False
    partition: str | None = None
    time_min: int | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    runs_per_task: int = 1
    array_parallelism: int | None = None
    setup: list = field(default_factory=list)
    sbatch: dict = field(default_factory=dict)
    address: str | None = None  # ray: None starts a local instance; "auto", "ray://..."
    gpus_per_run: float = 0.0  # ray: may be fractional (< 1), else a whole number
    cpus_per_run: int = 1  # ray: CPUs reserved and torch threads per run


@dataclass
class Grid:
    """A validated spec.  ``methods``: {label: (registry name, size options)} in spec order."""

    datasets: list
    latent_dims: list
    methods: dict
    split_seeds: list
    init_seeds: list
    epochs: int = 20
    limit_train: int | None = None
    limit_test: int | None = None
    iwae_samples: int = 100
    batch_size: int = 128
    lr: float = 5e-4
    valid_samples: int = 1
    likelihood: str = "gaussian"
    sigma_x: float = 0.1
    decoder: str = "conv"
    data_dir: str | None = None
    device: str = "auto"
    options: dict = field(default_factory=dict)  # {label: {option: value}}
    launcher: Launcher = field(default_factory=Launcher)
    test: str = "welch"
    alpha: float = 0.01
    source: str = ""  # the spec's text, copied to DIR/grid.toml
    path: str = "spec"

    def model_options(self, label: str, latent_dim: int) -> dict:
        """The model options of one method at one latent dimension."""
        _, size = self.methods[label]
        return {"latent_dim": latent_dim, "likelihood": self.likelihood,
                "sigma_x": self.sigma_x, "decoder": self.decoder, **size,
                **self.options.get(label, {})}


def init_seed(split: int, init: int) -> int:
    """The training seed (weights, shuffling, sampling) of run (split, init)."""
    return SEED_STRIDE * split + init


# --------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------
def load_spec(path) -> Grid:
    """Read and validate the spec file ``path``."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"grid spec {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        from ..errors import describe

        raise ConfigError(f"cannot read the grid spec {path}: {describe(exc)}") from None
    return parse_spec(text, str(path))


def parse_spec(text: str, where: str = "spec") -> Grid:
    """Validate the TOML text of a spec (``where`` names it in errors)."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading a grid spec needs Python >= 3.11 (tomllib) or the "
                              "tomli package") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    c = _Checker(where)
    c.keys(raw, _TOP, "")
    for key in ("datasets", "latent_dims", "methods"):
        if key not in raw:
            raise ConfigError(f"{where}: {key} is required (see gpvae grid --help)")
    datasets = c.str_list(raw, "datasets")
    from ..data import DATASETS

    for name in datasets:
        if name not in DATASETS:
            c.fail("datasets", f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    c.unique("datasets", datasets)
    latent_dims = c.int_list(raw, "latent_dims", lo=1)
    c.unique("latent_dims", latent_dims)
    methods = c.methods(raw)
    # a run's training seed is SEED_STRIDE * split + init: at most rundir.MAX_SEED
    split_seeds = c.seeds(raw, "splits", "split_seeds",
                          hi=(MAX_SEED - SEED_STRIDE + 1) // SEED_STRIDE)
    init_seeds = c.seeds(raw, "inits", "init_seeds", hi=SEED_STRIDE - 1)
    g = Grid(datasets=datasets, latent_dims=latent_dims, methods=methods,
             split_seeds=split_seeds, init_seeds=init_seeds, source=text, path=where)
    for key in ("epochs", "iwae_samples", "batch_size", "valid_samples"):
        setattr(g, key, c.integer(raw, key, getattr(g, key), lo=1))
    for key in ("limit_train", "limit_test"):
        setattr(g, key, c.integer(raw, key, None, lo=1))
    g.lr = c.number(raw, "lr", g.lr, positive=True)
    g.sigma_x = c.number(raw, "sigma_x", g.sigma_x, positive=True)
    from ..likelihoods import LIKELIHOODS
    from ..networks import DECODERS

    g.likelihood = c.choice(raw, "likelihood", g.likelihood, LIKELIHOODS)
    g.decoder = c.choice(raw, "decoder", g.decoder, sorted(DECODERS))
    g.data_dir = c.string(raw, "data_dir", None)
    if g.data_dir is not None:
        g.data_dir = os.path.abspath(os.path.expanduser(g.data_dir))
    g.device = c.string(raw, "device", g.device)
    g.options = c.options(raw, g)
    g.launcher = c.launcher(raw.get("launcher", {}))
    report = raw.get("report", {})
    c.table("report", report)
    c.keys(report, _REPORT, "report.")
    g.test = c.choice(report, "test", g.test, ("welch", "paired"), "report.")
    g.alpha = c.number(report, "alpha", g.alpha, positive=True, prefix="report.")
    if g.alpha >= 1:
        c.fail("report.alpha", f"must be below 1, got {g.alpha}")
    return g


def parse_time(value, key: str = "launcher.time") -> int:
    """Slurm's time formats (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) or an
    integer number of minutes -> whole minutes (rounded up)."""
    if isinstance(value, int) and not isinstance(value, bool):
        minutes = value
    elif isinstance(value, str):
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
        if not m:
            raise ConfigError(f"{key} must be minutes or [D-]HH:MM[:SS], got {value!r}")
        days, a, b, c = (int(x) if x is not None else None for x in m.groups())
        if days is not None:  # D-HH[:MM[:SS]]
            seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif c is not None:  # HH:MM:SS
            seconds = a * 3600 + b * 60 + c
        elif b is not None:  # MM:SS
            seconds = a * 60 + b
        else:  # MM
            seconds = a * 60
        minutes = math.ceil(seconds / 60)
    else:
        raise ConfigError(f"{key} must be minutes or [D-]HH:MM[:SS], got {value!r}")
    if minutes < 1:
        raise ConfigError(f"{key} must be at least one minute, got {value!r}")
    return minutes


class _Checker:
    """One-line errors ``WHERE: KEY ...`` for the spec's values."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, message: str):
        raise ConfigError(f"{self.where}: {key} {message}")

    def keys(self, table: dict, known, prefix: str) -> None:
        for key in table:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{self.where}: unknown key {prefix}{key!r}{hint}; the keys "
                                  f"are {', '.join(known)}")

    def table(self, key: str, value) -> None:
        if not isinstance(value, dict):
            self.fail(key, f"must be a table ([{key}]), got {value!r}")

    def integer(self, raw, key, default, lo, hi=None, prefix=""):
        value = raw.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < lo or (
                hi is not None and value > hi):
            bound = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
            self.fail(prefix + key, f"must be {bound}, got {value!r}")
        return value

    def number(self, raw, key, default, positive=False, prefix=""):
        value = raw.get(key, default)
        if value is None and default is None:
            return None
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not math.isfinite(value) or (positive and value <= 0)):
            self.fail(prefix + key, f"must be a {'positive ' if positive else ''}number, got "
                      f"{value!r}")
        return float(value)

    def string(self, raw, key, default, prefix=""):
        value = raw.get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(prefix + key, f"must be a non-empty string, got {value!r}")
        return value

    def choice(self, raw, key, default, choices, prefix=""):
        value = raw.get(key, default)
        if value not in choices:
            self.fail(prefix + key, f"must be one of {', '.join(map(repr, choices))}, got "
                      f"{value!r}")
        return value

    def _list(self, raw, key):
        value = raw[key]
        if not isinstance(value, list) or not value:
            self.fail(key, f"must be a non-empty list, got {value!r}")
        return value

    def str_list(self, raw, key):
        value = self._list(raw, key)
        if not all(isinstance(v, str) and v.strip() for v in value):
            self.fail(key, f"must be a list of names, got {value!r}")
        return [v.strip() for v in value]

    def int_list(self, raw, key, lo, hi=None):
        value = self._list(raw, key)
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool) or v < lo or (
                    hi is not None and v > hi):
                bound = f">= {lo}" + (f" and <= {hi}" if hi is not None else "")
                self.fail(key, f"must be a list of integers {bound}, got {v!r} in {value!r}")
        return list(value)

    def unique(self, key, values):
        seen = set()
        for v in values:
            if v in seen:
                self.fail(key, f"names {v!r} twice")
            seen.add(v)

    def seeds(self, raw, count_key, list_key, hi):
        if count_key in raw and list_key in raw:
            raise ConfigError(f"{self.where}: give {count_key} or {list_key}, not both")
        if list_key in raw:
            seeds = self.int_list(raw, list_key, lo=0, hi=hi)
            self.unique(list_key, seeds)
            return seeds
        n = self.integer(raw, count_key, 1, lo=1, hi=None if hi is None else hi + 1)
        return list(range(n))

    def methods(self, raw) -> dict:
        from ..models import parse_model_list

        specs = self.str_list(raw, "methods")
        try:
            return parse_model_list(specs, flag="methods")
        except ConfigError as exc:
            raise ConfigError(f"{self.where}: methods: {exc}") from None

    def options(self, raw, g: Grid) -> dict:
        """``[options.LABEL]``: each method's further options, checked against its config."""
        from dataclasses import MISSING

        from ..models import ModelConfig, model_class

        table = raw.get("options", {})
        self.table("options", table)
        shared = {f.name for f in fields(ModelConfig)}
        out = {}
        for label, opts in table.items():
            key = f"options.{label}"
            if label not in g.methods:
                self.fail(key, f"names no method of the spec (methods: "
                          f"{', '.join(g.methods)})")
            self.table(key, opts)
            name, size = g.methods[label]
            cls = model_class(name).config_class
            own = {f.name: f for f in fields(cls) if f.name not in shared}
            for opt, value in opts.items():
                if opt in shared:
                    self.fail(f"{key}.{opt}", "is set for every method by the top-level key "
                              f"{opt} (latent dims: latent_dims)")
                if opt not in own:
                    self.fail(f"{key}.{opt}", f"is not an option of {name!r}; its options: "
                              f"{', '.join(sorted(own)) or 'none'}")
                if opt in size:
                    self.fail(f"{key}.{opt}", f"is set by the size in {label!r}")
                default = own[opt].default
                if default is not MISSING and default is not None and not _same_kind(
                        value, default):
                    self.fail(f"{key}.{opt}", f"must be of type {type(default).__name__} like "
                              f"its default {default!r}, got {value!r}")
            try:
                cls(**{**g.model_options(label, g.latent_dims[0]), **opts}).validate()
            except (ConfigError, TypeError, ValueError) as exc:
                self.fail(key, f"is not valid for {name!r}: {exc}")
            out[label] = dict(opts)
        return out

    def launcher(self, table) -> Launcher:
        self.table("launcher", table)
        self.keys(table, _LAUNCHER, "launcher.")
        p = "launcher."
        la = Launcher()
        la.kind = self.choice(table, "kind", "local", ("local", "slurm", "ray"), p)
        la.jobs = self.integer(table, "jobs", 1, lo=1, prefix=p)
        pack = table.get("pack", False)
        if not isinstance(pack, bool):
            self.fail(p + "pack", f"must be true or false, got {pack!r}")
        la.pack = pack
        la.partition = self.string(table, "partition", None, p)
        if "time" in table:
            la.time_min = parse_time(table["time"], f"{self.where}: launcher.time")
        for key in ("gpus_per_task", "cpus_per_task", "array_parallelism"):
            setattr(la, key, self.integer(table, key, None, lo=0 if key == "gpus_per_task"
                                          else 1, prefix=p))
        la.mem_gb = self.number(table, "mem_gb", None, positive=True, prefix=p)
        la.runs_per_task = self.integer(table, "runs_per_task", 1, lo=1, prefix=p)
        setup = table.get("setup", [])
        if not isinstance(setup, list) or not all(isinstance(s, str) for s in setup):
            self.fail(p + "setup", f"must be a list of shell lines, got {setup!r}")
        la.setup = list(setup)
        sbatch = table.get("sbatch", {})
        self.table(p + "sbatch", sbatch)
        for k, v in sbatch.items():
            if not isinstance(v, (str, int, bool)) or isinstance(v, float):
                self.fail(f"{p}sbatch.{k}", f"must be a string, integer or boolean, got {v!r}")
        la.sbatch = dict(sbatch)
        la.address = self.string(table, "address", None, p)
        la.gpus_per_run = check_gpus_per_run(
            self.number(table, "gpus_per_run", 0.0, prefix=p), f"{self.where}: {p}gpus_per_run")
        la.cpus_per_run = self.integer(table, "cpus_per_run", 1, lo=1, prefix=p)
        return la


def check_gpus_per_run(value: float, key: str = "--gpus-per-run") -> float:
    """Ray's rule for a task's GPUs: a fraction below one (runs share a GPU) or a whole
    number; never negative."""
    if not math.isfinite(value) or value < 0 or (value > 1 and value != int(value)):
        raise ConfigError(f"{key} must be >= 0 and, above 1, a whole number (a fraction "
                          f"below 1 lets runs share a GPU), got {value!r}")
    return float(value)


def _same_kind(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


# --------------------------------------------------------------------------------------
# The output directory and the runs
# --------------------------------------------------------------------------------------
def run_keys(g: Grid):
    """Every run's key (dataset, latent_dim, method label, split, init), in the order the
    launchers start them: split-major, so that partial tables compare every method on the
    same splits."""
    for dataset in g.datasets:
        for d in g.latent_dims:
            for split in g.split_seeds:
                for label in g.methods:
                    for init in g.init_seeds:
                        yield dataset, d, label, split, init


def run_path(out, dataset: str, latent_dim: int, label: str, split: int, init: int) -> Path:
    from ..models import run_dir_name

    return Path(out) / dataset / f"d{latent_dim}" / run_dir_name(label) / f"split{split}" / \
        f"init{init}"


def expand(g: Grid, out) -> list:
    """The grid's runs (:class:`~gpvae.grid.runs.RunSpec`), in :func:`run_keys` order."""
    from ..models import run_dir_name
    from ..rundir import TrainConfig
    from .runs import RunSpec

    runs = []
    for dataset, d, label, split, init in run_keys(g):
        name, _ = g.methods[label]
        seed = init_seed(split, init)
        cfg = TrainConfig(out=str(run_path(out, dataset, d, label, split, init)),
                          dataset=dataset, data_dir=g.data_dir, model=name,
                          model_options=g.model_options(label, d), epochs=g.epochs,
                          batch_size=g.batch_size, lr=g.lr, seed=seed, split_seed=split,
                          limit_train=g.limit_train, limit_test=g.limit_test,
                          valid_samples=g.valid_samples, device=g.device)
        runs.append(RunSpec(
            cfg=cfg, iwae_samples=g.iwae_samples, eval_seed=seed, tag="grid",
            label=f"{dataset}/d{d}/{run_dir_name(label)}/split{split}/init{init}",
            key=(dataset, d, label, split, init)))
    return runs


def _run_set(g: Grid) -> set:
    return {(ds, d, label, tuple(sorted(g.options.get(label, {}).items())), s, i)
            for ds, d, label, s, i in run_keys(g)}


def check_compatible(new: Grid, old: Grid, out) -> None:
    """A rerun in ``out`` may extend the stored spec ``old`` but not change what a run is."""
    for key in RUN_KEYS:
        if getattr(new, key) != getattr(old, key):
            raise ConfigError(
                f"{new.path}: {key} = {getattr(new, key)!r} differs from {out}/{SPEC_COPY} "
                f"({getattr(old, key)!r}), the spec this grid was started with; a rerun may "
                "only add data sets, dims, methods, splits or inits: use another --out")
    for label in set(new.methods) & set(old.methods):
        if new.options.get(label, {}) != old.options.get(label, {}):
            raise ConfigError(f"{new.path}: [options.{label}] differs from {out}/{SPEC_COPY}; "
                              "a rerun may not change a method's options: use another --out")
    dropped = _run_set(old) - _run_set(new)
    if dropped:
        ds, d, label, _, s, i = sorted(dropped, key=repr)[0]
        raise ConfigError(
            f"{new.path} drops {len(dropped)} run(s) of the grid in {out} (e.g. {ds} d={d} "
            f"{label} split {s} init {i}); a rerun may only extend {out}/{SPEC_COPY}: add "
            "the missing entries back or use another --out")


def stored_spec(out) -> Grid | None:
    """The spec a grid in ``out`` was started with, or None."""
    path = Path(out) / SPEC_COPY
    return load_spec(path) if path.is_file() else None


def claim_out_dir(g: Grid, out, write: bool = True) -> Grid:
    """Check ``g`` against the spec stored in ``out`` (if any) and, with ``write``, store
    ``g``'s text there (atomically).  Returns the stored spec's :class:`Grid` (``g``)."""
    from ..checkpoint import atomic_write_text
    from ..rundir import check_out_path

    out = check_out_path(out)
    old = stored_spec(out)
    if old is not None:
        check_compatible(g, old, out)
    elif write and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty and holds no grid (no {SPEC_COPY}); a new "
                          "grid goes only into a new or empty directory: choose another --out")
    if write and (old is None or old.source != g.source):
        atomic_write_text(out / SPEC_COPY, g.source)
    return g
