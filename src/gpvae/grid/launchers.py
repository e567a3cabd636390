"""Where a grid's runs go: this machine (a pool of processes), a Slurm cluster (submitit)
or a Ray cluster.

The launchers call :func:`gpvae.grid.runs.run_one` on every run and nothing else, so a
run is trained and scored the same way wherever it goes, finished runs are skipped and
killed ones resumed wherever the next attempt lands, and a run that another process holds
is left to it.

* :func:`run_local`: ``jobs`` worker processes (``jobs=1``: in this process, so Ctrl-C
  and debuggers behave as usual), a progress bar over the runs, the report at the end.
  The workers end with this process however it ends -- Ctrl-C (to it alone, too), kill,
  kill -9 -- rather than train on holding their runs' locks; the next call resumes them.
  With ``pack``, the new runs of each cell are first trained together as one vmapped
  computation (:func:`train_packs`, :mod:`gpvae.packing`); :func:`run_one` then finds
  them trained and only scores them (and resumes, one by one, any a kill cut short).
* :func:`submit_slurm`: one Slurm job array per call through submitit, each array task
  running ``runs_per_task`` runs one after the other (:class:`RunGroup`) and rewriting the
  report when it ends; a task that hits its time limit is requeued by submitit and
  resumes.  Resubmitting the same grid submits only the runs that are neither done nor
  running.  ``cluster="local"`` (submitit's LocalExecutor: the same submission, run as
  local processes instead of ``sbatch``) or ``"debug"`` (in this process) test it
  without a cluster.
* :func:`run_ray` (the optional extra ``gpvae[ray]``): one Ray task per unfinished run on
  a local Ray instance or a cluster (``address``), each reserving ``gpus_per_run`` GPUs
  (a fraction lets several runs share one) and ``cpus_per_run`` CPUs; a progress bar over
  the runs, the report at the end as for the local launcher.  As with Slurm, every node
  needs gpvae installed and the grid's directory (and ``data_dir``) on a shared file
  system.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .runs import RunSpec, finished_eval, run_one
from .spec import Grid, Launcher, expand, stored_spec


def _outcome_text(counts: dict) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in ("done", "running", "failed") if counts[k])


def _recorder(total: int, progress: bool):
    """(outcomes, counts, bar, record): ``record(run, outcome)`` stores a run's outcome
    under its label, counts its state and moves the grid's progress bar over ``total``
    runs."""
    from ..progress import progress_bar

    outcomes: dict[str, dict] = {}
    counts = {"done": 0, "running": 0, "failed": 0}
    bar = progress_bar(total, desc="grid", unit="run", enabled=progress)

    def record(run, outcome):
        outcomes[run.label] = outcome
        counts[outcome["state"]] += 1
        bar.update(1)
        bar.set_postfix(runs=_outcome_text(counts))

    return outcomes, counts, bar, record


def train_packs(runs: list[RunSpec], progress: bool = True, log=print) -> dict:
    """Train the runs that have not started yet, grouped by cell (everything but the seeds
    equal: :func:`gpvae.packing.pack_key`), each group of two or more of a packable method
    as one packed computation (:func:`gpvae.packing.train_packed`).  Returns {label:
    outcome} for the runs that failed there (recorded in ``error.json`` like any failure);
    the others are left trained for :func:`run_one` to score.  A group that cannot be
    packed (the method's step does not vmap) is left to :func:`run_one` to train one by one."""
    from ..errors import GpvaeError
    from ..models import model_class
    from ..packing import pack_key, train_packed
    from ..rundir import CONFIG_FILE
    from .runs import _record_failure

    cells: dict[str, list[RunSpec]] = {}
    for run in runs:
        if (finished_eval(run) is None and not (run.run_dir / CONFIG_FILE).exists()
                and model_class(run.cfg.model).packable()):
            cells.setdefault(pack_key(run.cfg), []).append(run)
    failed: dict[str, dict] = {}
    for cell in cells.values():
        if len(cell) < 2:
            continue
        log(f"[grid] training {len(cell)} runs packed: {', '.join(r.label for r in cell)}")
        try:
            summaries = train_packed([r.cfg for r in cell], progress=progress, log=log)
        except GpvaeError as exc:  # refused before any work: train them one by one
            log(f"[grid] not packed ({exc}); they run one by one")
            continue
        for run, summary in zip(cell, summaries):
            if summary.get("error") is not None:
                failed[run.label] = _record_failure(run, summary["error"], log)
    return failed


def run_local(runs: list[RunSpec], jobs: int = 1, progress: bool = True, log=print,
              pack: bool = False) -> dict:
    """Run ``runs`` here with ``jobs`` processes (``pack``: new runs trained packed first,
    :func:`train_packs`); returns {label: outcome}."""
    failed = train_packs(runs, progress=progress, log=log) if pack else {}
    runs = [run for run in runs if run.label not in failed]
    outcomes, counts, bar, record = _recorder(len(runs), progress)

    for label, outcome in failed.items():
        outcomes[label] = outcome
        counts["failed"] += 1
    try:
        if jobs <= 1:
            for run in runs:
                record(run, run_one(run, progress=progress, log=log))
        else:
            todo = []
            for run in runs:  # finished runs need no worker
                ev = finished_eval(run)
                if ev is None:
                    todo.append(run)
                else:
                    record(run, {"state": "done", "eval": ev, "error": None})
            _pool(todo, jobs, progress, record)
    finally:
        bar.close()
    return outcomes


def _pool(runs, jobs, progress, record) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    import torch

    from ..errors import GpvaeError
    from ..progress import progress_mode

    # workers share this terminal: per-epoch lines (never competing redrawn bars), and
    # only when this process itself writes lines (a log); on a terminal, the grid bar only
    worker_progress = progress and progress_mode() == "lines"
    threads = max(1, torch.get_num_threads() // jobs)  # this process's threads, shared
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch
    gpus = visible_gpus()
    counter = ctx.Value("i", 0)  # the workers' start order: worker i gets GPU i mod n
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(threads, counter, gpus, os.getpid())) as pool:
        futures = {pool.submit(_worker_run, run, worker_progress): run for run in runs}
        try:
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BrokenProcessPool:  # the executor has stopped the other workers
            _stop_workers(pool)
            raise GpvaeError("a worker process died (killed from outside, or by the system "
                             "when memory ran out?), which stops the pool; rerun the same "
                             "command to resume the runs cut short") from None
        except BaseException:
            _stop_workers(pool)
            raise


def _stop_workers(pool, grace: float = 5.0) -> None:
    """Interrupted (Ctrl-C, even one sent to this process alone) or failed: cancel the
    queued runs and end the workers now, mid-run, rather than wait for them to finish their
    runs and start the ones already handed to them.  A run cut short resumes on the next
    ``gpvae grid``, as after kill -9; its lock goes with its worker."""
    # the executor forgets its processes on shutdown; no public API before Python 3.14
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(grace)
        if proc.is_alive():
            proc.kill()
            proc.join(grace)


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (that
    variable's list when set, else 0 .. device_count - 1; empty without CUDA)."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []


def _worker_init(threads: int, counter=None, gpus=(), parent: int | None = None) -> None:
    """A pool worker: per-epoch log lines, its share of the CPU threads and, on a machine
    with several GPUs, one of them -- worker i (in start order) sees only GPU i mod n, so
    ``jobs`` workers spread over the GPUs (``device = "auto"`` / ``"cuda"`` then means that
    GPU; several workers per GPU when jobs > n).  ``parent``: the pid of the ``gpvae grid``
    process; the worker ends when it dies (:func:`_die_with_parent`)."""
    _die_with_parent(parent)
    os.environ.setdefault("GPVAE_PROGRESS", "lines")
    if parent is not None:
        import threading

        from tqdm import tqdm

        # a worker draws no bar (lines, or a disabled tqdm): a thread lock, not the
        # process-shared semaphore tqdm would create and a stopped worker would leak
        # (the resource tracker then warns about it)
        tqdm.set_lock(threading.RLock())
    if counter is not None and len(gpus) > 1:
        with counter.get_lock():
            index = counter.value
            counter.value += 1
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]  # before CUDA starts
    import torch

    torch.set_num_threads(threads)


#: the pid of the process that started this pool worker (None: not a pool worker)
_PARENT: int | None = None


def _die_with_parent(parent: int | None, interval: float = 1.0) -> None:
    """End this pool worker when ``parent`` (the process that started it) dies, however it
    dies (kill -9 and SIGTERM included): otherwise the worker would go on training its run
    and the runs queued to it, holding their locks (a rerun skips them as "being run by
    another process"), then wait for work forever.  On Linux the kernel sends it SIGKILL
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere on POSIX a thread polls the parent pid every
    ``interval`` seconds; on Windows nothing is done.  Killing is safe: a run resumes from
    its last checkpoint on the next ``gpvae grid``."""
    global _PARENT
    if parent is None:
        return
    _PARENT = parent
    if sys.platform.startswith("linux") and _linux_parent_death_signal():
        if os.getppid() != parent:  # it died before the call: no signal will come
            os._exit(1)
        return
    if os.name == "posix":
        import threading

        threading.Thread(target=_watch_parent, args=(parent, interval), daemon=True,
                         name="gpvae-parent-watch").start()


def _linux_parent_death_signal() -> bool:
    """Ask the kernel for SIGKILL when this process's parent dies; False if it cannot."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(ctypes.c_int(pr_set_pdeathsig), ctypes.c_ulong(int(signal.SIGKILL)),
                          ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError, TypeError):  # no libc prctl (e.g. a static build)
        return False


def _watch_parent(parent: int, interval: float) -> None:
    while os.getppid() == parent:  # an orphan is adopted by another process
        time.sleep(interval)
    os._exit(1)


def _worker_run(run: RunSpec, progress: bool) -> dict:
    from ..progress import echo

    if _PARENT is not None and os.getppid() != _PARENT:  # orphaned: start nothing new
        os._exit(1)
    return run_one(run, progress=progress, log=echo)


# --------------------------------------------------------------------------------------
# Slurm through submitit
# --------------------------------------------------------------------------------------
class RunGroup:
    """What one Slurm array task runs: its runs one after the other, then the report.
    Picklable; ``checkpoint`` lets submitit requeue a task that hits its time limit or is
    preempted (the runs resume where they stopped)."""

    def __init__(self, out: str, progress: bool = True, threads: int | None = None):
        self.out = out
        self.progress = progress
        self.threads = threads  # CPU threads of torch: the task's CPUs, not the node's

    def __call__(self, runs: list[RunSpec]) -> dict:
        from ..progress import echo

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        outcomes = {run.label: run_one(run, progress=self.progress, log=echo)
                    for run in runs}
        g = stored_spec(self.out)
        if g is not None:
            from .report import write_report

            write_report(g, expand(g, self.out), self.out)
        return {label: o["state"] for label, o in outcomes.items()}

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def executor_parameters(la: Launcher) -> dict:
    """submitit ``update_parameters`` keywords for a launcher table (None: not set)."""
    params = {"name": "gpvae-grid", "timeout_min": la.time_min,
              "gpus_per_node": la.gpus_per_task, "cpus_per_task": la.cpus_per_task,
              "mem_gb": la.mem_gb, "tasks_per_node": 1, "nodes": 1,
              "slurm_partition": la.partition,
              "slurm_array_parallelism": la.array_parallelism,
              "slurm_setup": la.setup or None,
              "slurm_additional_parameters": dict(la.sbatch) or None}
    return {k: v for k, v in params.items() if v is not None}


def make_executor(folder, la: Launcher, cluster: str = "slurm"):
    """A submitit executor for the launcher table: ``cluster`` ``slurm`` (sbatch), ``local``
    (submitit's LocalExecutor) or ``debug`` (in this process)."""
    from ..errors import ConfigError

    try:
        import submitit
    except ImportError:
        raise ConfigError("the slurm launcher needs submitit: pip install 'gpvae[slurm]' "
                          "(or pip install submitit)") from None
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"submitit cannot use cluster {cluster!r}: {exc}") from None
    params = executor_parameters(la)
    if cluster != "slurm":  # the local executors run one task on this machine
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")
                  and k not in ("mem_gb", "cpus_per_task")}
    executor.update_parameters(**params)
    return executor


def groups(runs: list, size: int) -> list[list]:
    """``runs`` in consecutive groups of ``size`` (the last may be smaller)."""
    return [runs[i:i + size] for i in range(0, len(runs), size)]


def submit_slurm(g: Grid, runs: list[RunSpec], out, cluster: str = "slurm",
                 progress: bool = True, executor=None) -> list:
    """Submit ``runs`` (those neither done nor running) as one job array, ``runs_per_task``
    runs per array task; returns the submitit jobs (empty when nothing is left to run)."""
    from .status import run_state

    todo = [run for run in runs if run_state(run)[0] in ("pending", "failed")]
    if not todo:
        return []
    if executor is None:
        executor = make_executor(Path(out) / "slurm" / "%j", g.launcher, cluster)
    task = RunGroup(str(out), progress=progress, threads=g.launcher.cpus_per_task)
    return executor.map_array(task, groups(todo, g.launcher.runs_per_task))


# --------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------
def import_ray():
    """The ``ray`` module, or a one-line :class:`~gpvae.errors.ConfigError`."""
    from ..errors import ConfigError

    # every run's own lines, not Ray's merging of similar lines across tasks (read when
    # ray is first imported)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray launcher needs ray: pip install 'gpvae[ray]'") from None
    return ray


def _ray_task(run: RunSpec, progress: bool, threads: int, gpus: float) -> dict:
    """One run in a Ray worker: ``threads`` torch threads (the CPUs it reserved), per-epoch
    log lines (Ray forwards them to the driver), and no GPU unless it reserved one (Ray
    itself hides the GPUs from such a task only in some versions)."""
    os.environ.setdefault("GPVAE_PROGRESS", "lines")
    if gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before this worker's CUDA starts
    import torch

    from ..progress import echo

    torch.set_num_threads(threads)
    return run_one(run, progress=progress, log=echo)


def run_ray(runs: list[RunSpec], address: str | None = None, gpus_per_run: float = 0.0,
            cpus_per_run: int = 1, progress: bool = True, log=print) -> dict:
    """Run ``runs`` as Ray tasks; returns {label: outcome} like :func:`run_local`.

    ``address``: None starts a local Ray instance (stopped again at the end), ``"auto"`` or
    ``"ray://HOST:10001"`` joins a running cluster; when this process has already called
    ``ray.init`` that instance is used as it is.  Each unfinished run is one task reserving
    ``gpus_per_run`` GPUs (0.25: four runs share a GPU, whose ``CUDA_VISIBLE_DEVICES`` Ray
    sets; 0: the run sees no GPU) and ``cpus_per_run`` CPUs, its torch thread count.  A
    task that Ray loses (its worker or node died) is retried by Ray and resumes from the
    run's checkpoint; if it still fails the run is reported failed (the rerun resumes it)."""
    from ..progress import progress_mode

    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    outcomes, counts, bar, record = _recorder(len(runs), progress)

    task = ray.remote(num_gpus=gpus_per_run, num_cpus=cpus_per_run)(_ray_task)
    worker_progress = progress and progress_mode() == "lines"
    pending = {}
    try:
        for run in runs:  # finished runs need no task
            ev = finished_eval(run)
            if ev is None:
                ref = task.remote(run, worker_progress, cpus_per_run, gpus_per_run)
                pending[ref] = run
            else:
                record(run, {"state": "done", "eval": ev, "error": None})
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the task itself, not the run, failed
                log(f"[grid] {run.label}: the Ray task failed: {str(exc).splitlines()[0]}")
                outcome = {"state": "failed", "eval": None,
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            record(run, outcome)
    finally:
        for ref in pending:  # interrupted: the runs not finished stop (and resume later)
            ray.cancel(ref, force=True)
        bar.close()
        if started:
            ray.shutdown()
    return outcomes
