"""``gpvae grid``: the command line of :mod:`gpvae.grid` (parser in :mod:`gpvae.cli`)."""
from __future__ import annotations

from dataclasses import replace

from ..errors import ConfigError
from .spec import (SCORE_KEYS, SPEC_COPY, Grid, check_gpus_per_run, claim_out_dir, expand,
                   load_spec, parse_time, stored_spec)


def _with_flags(g: Grid, args) -> Grid:
    """The spec with the command line's overrides of ``[launcher]`` and ``device``."""
    la = g.launcher
    over = {"kind": args.launcher, "jobs": args.jobs, "partition": args.partition,
            "gpus_per_task": args.gpus_per_task, "cpus_per_task": args.cpus_per_task,
            "runs_per_task": args.runs_per_task,
            "pack": True if getattr(args, "pack", False) else None,
            "address": getattr(args, "ray_address", None),
            "gpus_per_run": getattr(args, "gpus_per_run", None),
            "cpus_per_run": getattr(args, "cpus_per_run", None)}
    over = {k: v for k, v in over.items() if v is not None}
    if over.get("gpus_per_run") is not None:
        over["gpus_per_run"] = check_gpus_per_run(over["gpus_per_run"])
    if args.time is not None:
        over["time_min"] = parse_time(args.time, "--time")
    g.launcher = replace(la, **over)
    if args.device is not None:
        g.device = args.device
    return g


def _preflight(g: Grid) -> None:
    """Before any run starts: the device exists (for Ray: the runs reserve a GPU when they
    are to use one; the GPUs are on the cluster's nodes, not necessarily here) and every
    data set loads."""
    from ..data import load_splits
    from ..devices import resolve_device

    if g.launcher.kind != "ray":
        resolve_device(g.device)
    elif g.device.startswith("cuda") and g.launcher.gpus_per_run == 0:
        raise ConfigError(f"device {g.device!r} with the ray launcher needs gpus_per_run > 0 "
                          "([launcher] gpus_per_run or --gpus-per-run): a run that reserves "
                          "no GPU sees none")
    for dataset in g.datasets:
        load_splits(dataset, g.data_dir, split_seed=g.split_seeds[0], limit_train=1,
                    limit_test=1)


def grid_command(args) -> int:
    """Run, or report on, a grid; exit status 0, or 1 when some runs failed."""
    from ..progress import echo
    from ..rundir import check_out_path
    from .launchers import import_ray, make_executor, run_local, run_ray, submit_slurm
    from .report import to_markdown, write_report
    from .status import CHECKPOINT_ERROR, format_status, grid_status

    out = check_out_path(args.out)
    if args.spec is None:
        if not (args.status or args.report):
            raise ConfigError("name the grid spec: gpvae grid SPEC --out DIR (without SPEC "
                              "only --status and --report, which read DIR/grid.toml)")
        g = stored_spec(out)
        if g is None:
            raise ConfigError(f"{out} holds no grid ({out / SPEC_COPY} is missing); name the "
                              "spec: gpvae grid SPEC --out DIR")
    else:
        g = load_spec(args.spec)
        claim_out_dir(g, out, write=False)  # refuses an incompatible spec before any work
    g = _with_flags(g, args)
    runs = expand(g, out)
    progress = not args.no_progress
    if args.status:
        print(format_status(grid_status(runs), out), end="")
        return 0
    if args.report:
        stored = stored_spec(out)
        if stored is None:
            raise ConfigError(f"{out} holds no grid yet (no {SPEC_COPY}); start it with "
                              "gpvae grid SPEC --out DIR")
        _check_scored_alike(g, stored, out)
        r = write_report(g, runs, out)
        print(to_markdown(r), end="")
        echo(f"[grid] report written to {out / 'report'}/report.{{md,tex,csv,json}}")
        return 0

    if g.launcher.kind == "slurm":
        executor = make_executor(out / "slurm" / "%j", g.launcher, args.submitit_cluster)
        claim_out_dir(g, out)
        jobs = submit_slurm(g, runs, out, cluster=args.submitit_cluster, progress=progress,
                            executor=executor)
        if not jobs:
            echo(f"[grid] nothing to submit: every run in {out} is done or running")
        else:
            n = sum(1 for _ in jobs)
            echo(f"[grid] submitted job array {jobs[0].job_id.split('_')[0]}: {n} task(s) of "
                 f"at most {g.launcher.runs_per_task} run(s); logs in {out / 'slurm'}")
            echo(f"[grid] follow it with: gpvae grid --out {out} --status   (the report is "
                 f"rewritten in {out / 'report'} as tasks finish; resubmit the same command "
                 "to pick up what failed or was cut off)")
        if not args.wait and args.submitit_cluster != "debug":  # debug runs on waiting
            return 0
        for job in jobs:
            job.results()  # a task's own failure (not a run's) raises here
        r = write_report(g, runs, out)
    else:
        if g.launcher.kind == "ray":
            import_ray()  # installed, or a one-line error before any work
        _preflight(g)
        claim_out_dir(g, out)
        la = g.launcher
        if la.kind == "ray":
            outcomes = run_ray(runs, address=la.address, gpus_per_run=la.gpus_per_run,
                               cpus_per_run=la.cpus_per_run, progress=progress, log=echo)
        else:
            outcomes = run_local(runs, jobs=la.jobs, progress=progress, log=echo,
                                 pack=la.pack)
        r = write_report(g, runs, out)
        failed = sum(o["state"] == "failed" for o in outcomes.values())
        if failed:
            echo(f"[grid] {failed} run(s) failed (see gpvae grid --out {out} --status); "
                 "rerunning the command retries them")
    print(to_markdown(r), end="")
    echo(f"[grid] report written to {out / 'report'}/report.{{md,tex,csv,json}}")
    st = grid_status(runs)
    for label, hint in st["hints"].items():
        echo(f"[grid] {label} failed on its checkpoint ({CHECKPOINT_ERROR}); {hint}")
    echo(format_status(st, out).splitlines()[0])
    return 1 if st["totals"]["failed"] else 0


def _check_scored_alike(g: Grid, stored: Grid, out) -> None:
    """``--report`` with a spec: refused when the spec scores the runs otherwise than
    ``DIR/grid.toml`` (:data:`~gpvae.grid.spec.SCORE_KEYS`): it would find no run scored
    its way and overwrite the report with empty tables."""
    for key in SCORE_KEYS:
        if getattr(g, key) != getattr(stored, key):
            raise ConfigError(
                f"{g.path}: {key} = {getattr(g, key)!r} differs from {out}/{SPEC_COPY} "
                f"({getattr(stored, key)!r}), the runs' scoring; --report only reads the runs "
                f"and would find none scored so (nothing was written): leave out the spec to "
                f"report {out}/{SPEC_COPY}, or run gpvae grid {g.path} --out {out} to re-score "
                "them")
