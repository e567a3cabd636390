"""Experiment grids: the paper's protocol (Sec. 5) as one command, ``gpvae grid SPEC --out DIR``.

A spec (:mod:`gpvae.grid.spec`; a commented example in ``experiments/example.toml``) names
data sets x latent dimensions x methods x splits x inits and the training budget.  Each
combination is one run directory::

    DIR/grid.toml                                   the spec (a rerun may only extend it)
    DIR/DATASET/dD/METHOD/splitS/initI/             one run (gpvae.rundir + eval.json)
    DIR/report/report.{md,tex,csv,json}             the tables (gpvae.grid.report)
    DIR/slurm/                                      submitit's files (slurm launcher)

Seeds: split seed ``S`` is the run's ``TrainConfig.split_seed`` (the train/validation
partition, and CelebA's test cut), so every method sees the same splits; its
``TrainConfig.seed`` (weights, shuffling, sampling) is ``1000 * S + I``
(:func:`~gpvae.grid.spec.init_seed`), different for every run of a cell; the test IWAE is
estimated with that seed too.

Modules: :mod:`~gpvae.grid.spec` (read and expand a spec), :mod:`~gpvae.grid.runs` (train
and score one run: the one code path, also behind ``gpvae compare``),
:mod:`~gpvae.grid.status`, :mod:`~gpvae.grid.report` (the tables) and
:mod:`~gpvae.grid.launchers` (local pool, Slurm through submitit).
"""
from .runs import RunSpec, run_one
from .spec import Grid, expand, load_spec, parse_spec

__all__ = ["Grid", "RunSpec", "expand", "load_spec", "parse_spec", "run_one"]
