"""Multi-seed comparisons with proper statistics (paper Sec. 5 protocol, scaled down).

``gpvae compare`` trains every (model, seed) pair with the same budget -- seed s sets both
the initialization and the train/validation split (the paper uses a different random split
per run) -- evaluates IWAE-K on the test images of each run's own split (the data set's
test partition; for CelebA, which has none, the test images cut from that seed's
permutation, so no run is ever scored on images it trained or validated on), and reports
mean ± sd over seeds, the paired difference to the first model with its standard error,
and two-sided t-tests (Welch, as the paper's tables, and paired, since each seed shares
its split across models).

Models are ``--models`` specs, a method with an optional size in the paper's notation
(``vae,sa:2,gpvae``: :func:`gpvae.models.parse_model_spec`).  Runs live in
``OUT/MODEL/seedS`` (``OUT/sa-2/seed0`` for ``sa:2``) and are resumed or skipped when
already finished, so a killed comparison continues where it stopped.  A comparison is a
special case of a grid (:mod:`gpvae.grid`): one data set, one latent dimension, one init
per split; each run is trained and scored by the grid's :func:`gpvae.grid.runs.run_one`
and keeps its score in ``eval.json``.  Results go to
``OUT/results.json`` and ``OUT/results.md`` (atomically).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from .checkpoint import atomic_write_text, json_text, temp_target
from .devices import resolve_device
from .errors import ConfigError
from .grid.runs import RunSpec, check_same_run, read_json, run_one
from .models import parse_model_list, run_dir_name
from .rundir import TrainConfig, check_out_path, check_seed

#: what a comparison writes into ``--out`` besides its MODEL/seedS run directories
RESULT_FILES = ("results.json", "results.md")
_RUN_ENTRY = re.compile(r"seed\d+")


def check_seeds(seeds) -> list[int]:
    """``--seeds`` as a list of distinct seeds (one run per seed: a seed given twice would
    count one run twice and fake the statistics)."""
    seeds = [check_seed(s, "--seeds") for s in seeds]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if not seeds or twice:
        raise ConfigError("--seeds needs at least one seed" if not seeds else
                          f"--seeds names {', '.join(map(str, twice))} more than once")
    return seeds


def check_compare_out(out) -> Path:
    """``--out`` of a comparison: new, empty, or a comparison's own directory -- its
    ``results.json`` (when there is a ``results.md``, the JSON must be there and be a
    comparison's) and MODEL/seedS run directories -- so a user's files are never
    overwritten.  A one-line ConfigError names what does not belong."""
    out = check_out_path(out)
    if not out.is_dir():
        return out
    ours = read_json(out / "results.json")
    ours = isinstance(ours, dict) and {"models", "seeds", "runs"} <= ours.keys()
    foreign = []
    for entry in sorted(os.listdir(out)):
        path = out / entry
        if entry in RESULT_FILES and path.is_file() and ours:
            continue
        if temp_target(entry) in RESULT_FILES and path.is_file():  # left by a kill mid-write
            continue
        if path.is_dir() and not path.is_symlink() and all(
                _RUN_ENTRY.fullmatch(e) and (path / e).is_dir() for e in os.listdir(path)):
            continue
        foreign.append(entry)
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" (+{len(foreign) - 4} more)" if len(foreign) > 4
                                           else "")
        raise ConfigError(f"--out {out} is not empty and is not a comparison's directory (it "
                          f"holds {shown}); gpvae compare writes only into a new or empty "
                          "directory or its own: choose another --out")
    return out


def compare_runs(models, seeds, *, out, dataset="mnist", data_dir=None, epochs=20,
                 latent_dim=10, limit_train=None, limit_test=None, iwae_samples=100,
                 device="cpu", model_options=None) -> list[tuple[str, int, RunSpec]]:
    """The runs of a comparison as (label, seed, :class:`~gpvae.grid.runs.RunSpec`): run
    ``OUT/MODEL/seedS`` with ``seed = split_seed = S`` and the test IWAE estimated with
    seed S, the layout and seeds ``gpvae compare`` has always used."""
    specs = parse_model_list(models)
    model_options = model_options or {}
    runs = []
    for name, (method, options) in specs.items():
        for seed in seeds:
            cfg = TrainConfig(out=str(Path(out) / run_dir_name(name) / f"seed{seed}"),
                              dataset=dataset, data_dir=data_dir, model=method,
                              model_options={"latent_dim": latent_dim, **options,
                                             **model_options.get(name, {})},
                              epochs=epochs, seed=seed, split_seed=seed,
                              limit_train=limit_train, limit_test=limit_test, device=device)
            runs.append((name, seed, RunSpec(cfg=cfg, iwae_samples=iwae_samples,
                                             eval_seed=seed, label=f"{name} seed {seed}",
                                             key=(name, seed), tag="compare")))
    return runs


def compare(models, seeds, *, out, dataset="mnist", data_dir=None, epochs=20, latent_dim=10,
            limit_train=None, limit_test=None, iwae_samples=100, device="auto",
            model_options=None, progress=True, log=print) -> dict:
    """Train and score every (model, seed); ``models`` are specs (``"sa:2"``), the first
    the reference; ``model_options`` optionally maps a spec to further options.

    Each run goes through :func:`gpvae.grid.runs.run_one`, the grid's one code path for
    training-then-scoring a run (a finished run is reused from its ``eval.json``, a killed
    one resumed); unlike a grid, the first error stops the comparison.  ``out`` must be new,
    empty or a comparison's own (:func:`check_compare_out`); ``seeds`` distinct."""
    device = resolve_device(device)
    out = check_compare_out(out)
    seeds = check_seeds(seeds)
    models = list(parse_model_list(models))  # canonical labels
    scores: dict[str, dict[int, dict]] = {}
    runs = compare_runs(models, seeds, out=out, dataset=dataset, data_dir=data_dir,
                        epochs=epochs, latent_dim=latent_dim, limit_train=limit_train,
                        limit_test=limit_test, iwae_samples=iwae_samples,
                        device=str(device), model_options=model_options)
    for _, _, run in runs:  # every earlier run checked before any is trained
        check_same_run(run)
    for name, seed, run in runs:
        outcome = run_one(run, progress=progress, log=log, raise_errors=True)
        if outcome["state"] != "done":  # pragma: no cover - raise_errors raises instead
            raise ConfigError(f"{run.run_dir}: {outcome['state']}")
        scores.setdefault(name, {})[seed] = outcome["eval"]["estimate"]
    table = score_table(scores, models, seeds)
    first = scores[models[0]][seeds[0]]
    result = {"dataset": dataset, "latent_dim": latent_dim, "epochs": epochs,
              "limit_train": limit_train, "test_images": first["n"],
              "iwae_samples": iwae_samples,
              "seeds": list(seeds), "models": table, "runs": scores}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json_text(result, indent=2) + "\n")
    atomic_write_text(out / "results.md", markdown_table(result))
    return result


def score_table(scores: dict, models, seeds) -> dict:
    """Per model: IWAE and ELBO mean ± sd over seeds; against the first model (the
    reference), the mean paired difference with its standard error and two-sided p-values
    of Welch's and of the paired t-test.  ``scores[model][seed]`` holds ``test_iwae`` and
    ``test_elbo``."""
    from scipy import stats

    ref = models[0]
    table = {}
    for name in models:
        vals = [scores[name][s]["test_iwae"] for s in seeds]
        elbos = [scores[name][s]["test_elbo"] for s in seeds]
        row = {"iwae_mean": sum(vals) / len(vals), "iwae_sd": _sd(vals), "iwae_per_seed": vals,
               "elbo_mean": sum(elbos) / len(elbos), "elbo_sd": _sd(elbos)}
        if name != ref:
            diffs = [scores[name][s]["test_iwae"] - scores[ref][s]["test_iwae"] for s in seeds]
            refs = [scores[ref][s]["test_iwae"] for s in seeds]
            row["diff_to_" + ref] = sum(diffs) / len(diffs)
            row["diff_se"] = _sd(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
            if len(seeds) > 1:
                row["p_welch"] = float(stats.ttest_ind(vals, refs, equal_var=False).pvalue)
                row["p_paired"] = float(stats.ttest_rel(vals, refs).pvalue)
        table[name] = row
    return table


def _sd(v):
    if len(v) < 2:
        return math.nan
    m = sum(v) / len(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def markdown_table(result: dict) -> str:
    ref = next(iter(result["models"]))
    lines = [
        f"{result['dataset']}, d={result['latent_dim']}, {result['limit_train'] or 'all'} training "
        f"images, {result['epochs']} epochs, IWAE-{result['iwae_samples']} on "
        f"{result['test_images']} test images, seeds {result['seeds']} (mean ± sd over seeds)",
        "",
        f"| model | test IWAE | test ELBO | per seed | Δ vs {ref} (± se) | p (Welch) | p (paired) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["models"].items():
        per = ", ".join(f"{v:.1f}" for v in r["iwae_per_seed"])
        diff = (f"{r['diff_to_' + ref]:+.2f} ± {r['diff_se']:.2f}" if name != ref else "—")
        pw = f"{r['p_welch']:.3g}" if "p_welch" in r else "—"
        pp = f"{r['p_paired']:.3g}" if "p_paired" in r else "—"
        lines.append(f"| {name} | {r['iwae_mean']:.2f} ± {r['iwae_sd']:.2f} | "
                     f"{r['elbo_mean']:.2f} ± {r['elbo_sd']:.2f} | {per} | {diff} | {pw} | {pp} |")
    return "\n".join(lines) + "\n"
