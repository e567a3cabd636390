"""gpvae grid end to end on a tiny grid (2 methods x 2 splits x 2 inits, d=2, 40 real MNIST
images, 2 epochs): through submitit's LocalExecutor, killed midway and resumed to
byte-identical tables through the local launcher's worker pool, --status and --report, failed runs
recorded and retried, and a run held by another process left alone."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpvae.grid.runs as runs_mod
import gpvae.training as training
from gpvae.cli import main
from gpvae.errors import ConfigError, TrainingDivergedError
from gpvae.grid import expand, load_spec, run_one
from gpvae.grid.report import FILES, REPORT_DIR
from gpvae.grid.runs import ERROR_FILE, EVAL_FILE
from gpvae.rundir import CONFIG_FILE, LAST, locked_run_dir
from test_grid import tiny_mnist  # noqa: F401  (the session fixture)

SPEC = """\
datasets = ["mnist"]
latent_dims = [2]
methods = ["vae", "hf:1"]
splits = 2
inits = 2
epochs = 2
limit_train = 40
limit_test = 10
iwae_samples = 2
batch_size = 20
data_dir = "{data}"
device = "cpu"
"""


class Killed(BaseException):
    """Stands for SIGKILL: nothing in gpvae catches it."""


def write_spec(folder: Path, data, text=SPEC, name="spec.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text.format(data=data))
    return path


def reports(out: Path) -> dict:
    return {name: (out / REPORT_DIR / name).read_bytes() for name in FILES}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here, as in the submitit tasks (cpus_per_task = 1): float sums
    depend on the thread count, and the tables are compared byte for byte."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_mnist):  # noqa: F811
    """The tiny grid run once without interruption: through submitit's LocalExecutor (two
    array tasks of 4 runs, each a separate process) when submitit is installed, else
    through the local launcher."""
    from gpvae.grid.spec import claim_out_dir

    root = tmp_path_factory.mktemp("uninterrupted")
    launcher = "[launcher]\nruns_per_task = 4\ncpus_per_task = 1\n"
    g = load_spec(write_spec(root, tiny_mnist, SPEC + launcher))
    out = root / "grid"
    claim_out_dir(g, out)
    runs = expand(g, out)
    try:
        import submitit  # noqa: F401
    except ImportError:
        from gpvae.grid.launchers import run_local
        from gpvae.grid.report import write_report

        run_local(runs, progress=False, log=lambda m: None)
        write_report(g, runs, out)
        return out, None
    from gpvae.grid.launchers import submit_slurm

    jobs = submit_slurm(g, runs, out, cluster="local", progress=True)
    return out, [job.results() for job in jobs]


def test_the_grid_runs_through_submitits_local_executor(uninterrupted):
    pytest.importorskip("submitit")
    out, results = uninterrupted
    # two array tasks of four runs each; every run done in its task's own process
    assert [len(r[0]) for r in results] == [4, 4]
    assert all(state == "done" for r in results for state in r[0].values())
    logs = "".join(p.read_text() for p in (out / "slurm").rglob("*_log.err"))
    # the tasks' stderr is a file: one progress line per epoch, no redrawn bars
    assert "mnist/d2/hf-1/split1/init1 | epoch 2/2 | 4/4 step (100%)" in logs
    assert "\r" not in logs
    report = json.loads((out / REPORT_DIR / "report.json").read_text())
    cells = report["datasets"]["mnist"]["cells"]
    assert all(c["2"]["complete"] for c in cells.values())


def test_a_killed_grid_resumes_to_the_same_tables(uninterrupted, tmp_path, tiny_mnist,  # noqa
                                                  monkeypatch, capfd):
    spec = write_spec(tmp_path, tiny_mnist)
    out = tmp_path / "grid"
    real_save = training.save_checkpoint
    saves = {"last": 0}

    def dying_save(path, *args, **kwargs):
        if Path(path).name == LAST:
            saves["last"] += 1
            if saves["last"] == 8:  # the 4th run's second epoch, after its best checkpoint
                raise Killed
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", dying_save)
    with pytest.raises(Killed):
        main(["grid", str(spec), "--out", str(out)])
    monkeypatch.undo()
    capfd.readouterr()
    assert main(["grid", "--out", str(out), "--status"]) == 0  # reads DIR/grid.toml
    status = capfd.readouterr().out
    assert "8 runs: 3 done, 0 running, 0 failed, 5 pending" in status, status
    assert re.search(r"mnist +2 +vae +2/4 +0 +0 +2 ", status), status  # split-major order
    assert re.search(r"mnist +2 +hf:1 +1/4 +0 +0 +3 ", status), status

    # resumed by two worker processes (one torch thread each, as here)
    assert main(["grid", str(spec), "--out", str(out), "--jobs", "2"]) == 0
    captured = capfd.readouterr()
    assert "resuming mnist/d2/hf-1/split0/init1" in captured.err
    assert "hf-1/split0/init1 after epoch 1" in captured.err  # the trainer's own message
    assert captured.err.count("[grid] training ") == 4  # the finished three are skipped
    assert "mnist/d2/vae/split1/init0 | epoch 2/2 | 4/4 step" in captured.err  # lines
    assert "| VAE | " in captured.out and "| HF(1) | " in captured.out
    ref, _ = uninterrupted
    assert reports(out) == reports(ref)  # byte-identical Markdown, LaTeX, CSV and JSON

    # --report rewrites the same files; --status sees every run done
    (out / REPORT_DIR / "report.csv").unlink()
    assert main(["grid", "--out", str(out), "--report"]) == 0
    assert reports(out) == reports(ref)
    assert main(["grid", str(spec), "--out", str(out), "--status"]) == 0
    assert "8 runs: 8 done, 0 running, 0 failed, 0 pending" in capfd.readouterr().out
    # rerunning a finished grid trains and scores nothing
    assert main(["grid", str(spec), "--out", str(out)]) == 0
    err = capfd.readouterr().err
    assert "[grid] training" not in err and "IWAE-2" not in err


SMALL = SPEC.replace('["vae", "hf:1"]', '["vae"]').replace("splits = 2", "splits = 1") \
    .replace("epochs = 2", "epochs = 1")


def test_failed_runs_are_recorded_do_not_stop_the_grid_and_are_retried(
        tmp_path, tiny_mnist, monkeypatch, capfd):  # noqa: F811
    spec = write_spec(tmp_path, tiny_mnist, SMALL)
    out = tmp_path / "grid"
    real_train = runs_mod.train

    def failing_train(cfg, **kwargs):
        if cfg.out.endswith("init0"):
            raise TrainingDivergedError("the training loss became nan at epoch 1, step 1")
        real_train(cfg, **kwargs)
        raise RuntimeError("boom")  # after training: the run is trained but not scored

    monkeypatch.setattr(runs_mod, "train", failing_train)
    assert main(["grid", str(spec), "--out", str(out), "--no-progress"]) == 1
    monkeypatch.undo()
    # a run says where its tables went, as --report does
    assert f"[grid] report written to {out / REPORT_DIR}/report.{{md,tex,csv,json}}" in \
        capfd.readouterr().err
    init0 = out / "mnist" / "d2" / "vae" / "split0" / "init0"
    init1 = init0.parent / "init1"
    e0 = json.loads((init0 / ERROR_FILE).read_text())
    assert (e0["type"], e0["error"]) == ("TrainingDivergedError",
                                         "the training loss became nan at epoch 1, step 1")
    assert "traceback" not in e0
    e1 = json.loads((init1 / ERROR_FILE).read_text())
    assert e1["type"] == "RuntimeError" and "boom" in e1["traceback"]
    assert not (init0 / EVAL_FILE).exists() and not (init1 / EVAL_FILE).exists()
    capfd.readouterr()
    main(["grid", "--out", str(out), "--status"])
    text = capfd.readouterr().out
    assert "2 runs: 0 done, 0 running, 2 failed, 0 pending" in text
    assert "mnist/d2/vae/split0/init0: TrainingDivergedError: the training loss became nan" \
        in text
    report = (out / REPORT_DIR / "report.md").read_text()
    assert "– [0/1 splits]" in report

    # the rerun retries both: init0 from scratch (its directory holds only error.json),
    # init1 only scored (it had finished training)
    capfd.readouterr()
    assert main(["grid", str(spec), "--out", str(out)]) == 0
    err = capfd.readouterr().err
    assert "[grid] training mnist/d2/vae/split0/init0" in err
    assert "[grid] training mnist/d2/vae/split0/init1" not in err
    assert "[grid] mnist/d2/vae/split0/init1: IWAE-2 " in err
    assert not (init0 / ERROR_FILE).exists() and not (init1 / ERROR_FILE).exists()
    assert (init0 / EVAL_FILE).is_file() and (init1 / EVAL_FILE).is_file()


def test_a_run_with_a_damaged_checkpoint_says_to_delete_its_directory(tmp_path, tiny_mnist,  # noqa
                                                                      capfd):
    """A truncated checkpoint fails the run on every rerun (the rerun resumes from it): the
    run's failure line and --status say to delete the run's directory, which then works."""
    spec = write_spec(tmp_path, tiny_mnist, SMALL.replace("inits = 2", "inits = 1"))
    out = tmp_path / "grid"
    assert main(["grid", str(spec), "--out", str(out), "--no-progress"]) == 0
    run = out / "mnist" / "d2" / "vae" / "split0" / "init0"
    (run / EVAL_FILE).unlink()  # a run killed before it was scored ...
    with open(run / LAST, "r+b") as f:  # ... whose last checkpoint is damaged
        f.truncate(100)
    capfd.readouterr()
    hint = f"delete {run} to train the run anew"
    for _ in range(2):  # every rerun fails the same way
        assert main(["grid", str(spec), "--out", str(out), "--no-progress"]) == 1
        err = capfd.readouterr().err
        assert "failed: CheckpointError: " in err, err
        assert f"[grid] mnist/d2/vae/split0/init0 failed on its checkpoint (CheckpointError)" \
            f"; a rerun fails the same way (it cannot repair the run's files): {hint}" in err
    assert main(["grid", "--out", str(out), "--status"]) == 0
    status = capfd.readouterr().out
    assert re.search(r"init0: CheckpointError: .*last.safetensors is not a valid gpvae "
                     rf"checkpoint.*; a rerun fails the same way .*: {re.escape(hint)}\n",
                     status), status
    import shutil

    shutil.rmtree(run)  # as the hint says
    assert main(["grid", str(spec), "--out", str(out), "--no-progress"]) == 0
    assert "failed on its checkpoint" not in capfd.readouterr().err


def test_a_run_held_by_another_process_is_skipped_and_a_lost_probe_retried(
        tmp_path, tiny_mnist, monkeypatch):  # noqa: F811
    g = load_spec(write_spec(tmp_path, tiny_mnist, SMALL.replace("inits = 2", "inits = 1")))
    (run,) = expand(g, tmp_path / "grid")
    logs = []
    with locked_run_dir(run.run_dir, create=True):
        outcome = run_one(run, progress=False, log=logs.append)
    assert outcome["state"] == "running"
    assert "being run by another process, skipped" in logs[-1]
    assert sorted(p.name for p in run.run_dir.iterdir()) == [".gpvae.lock"]  # untouched

    def racing_train(cfg, **kwargs):  # the other writer created its files meanwhile
        raise ConfigError(f"{cfg.out} already holds a run; pass --resume to continue it")

    monkeypatch.setattr(runs_mod, "train", racing_train)
    with locked_run_dir(run.run_dir, create=True):
        assert run_one(run, progress=False, log=logs.append)["state"] == "running"
    assert not (run.run_dir / ERROR_FILE).exists()  # not recorded as the run's failure
    assert run_one(run, progress=False, log=logs.append)["state"] == "failed"  # lock free
    (run.run_dir / ERROR_FILE).unlink()
    monkeypatch.undo()

    # the trainer lost the lock to a momentary test-and-release (--status): retried
    real_train, calls = runs_mod.train, []

    def once_busy(cfg, **kwargs):
        calls.append(cfg.out)
        if len(calls) == 1:
            raise ConfigError(f"{cfg.out} is being written by another gpvae process (pid 1); "
                              "wait for it to finish or choose another --out")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(runs_mod, "train", once_busy)
    assert run_one(run, progress=False, log=logs.append)["state"] == "done"
    assert len(calls) == 2 and (run.run_dir / CONFIG_FILE).is_file()


@pytest.mark.parametrize("text,needles", [
    (SPEC.replace("epochs = 2", "epochs = -2"), ["epochs", "-2"]),
    (SPEC.replace('["mnist"]', '["cifar10"]'), ["CIFAR", "data_batch"]),
])
def test_bad_specs_and_missing_data_fail_before_any_work(tmp_path, tiny_mnist, capsys,  # noqa
                                                         text, needles):
    spec = write_spec(tmp_path, tiny_mnist, text)
    out = tmp_path / "grid"
    assert main(["grid", str(spec), "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("gpvae grid: error: "), err
    assert all(n in err[0] for n in needles), err
    assert not out.exists()


def test_grid_help_explains_the_spec(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["grid", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("latent_dims", "split_seeds", "[launcher]", "runs_per_task", "1000*S + I",
                   "--status", "--launcher slurm"):
        assert needle in text


def test_status_and_report_need_a_grid(tmp_path, capsys):
    for flag in ("--status", "--report"):
        assert main(["grid", "--out", str(tmp_path / "none"), flag]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "holds no grid" in err, err
    assert main(["grid", "--out", str(tmp_path / "none")]) == 2
    assert "name the grid spec" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_a_packed_grid_gives_the_unpacked_tables(uninterrupted, tmp_path, tiny_mnist,  # noqa
                                                 monkeypatch):
    """--pack trains each cell's 4 runs (2 splits x 2 inits) as one vmapped computation and
    scores them as run_one does: the same test IWAE as the uninterrupted one-by-one grid,
    up to float rounding (the packed step runs the convolutions NCHW: other kernels)."""
    import gpvae.packing as packing

    calls = []
    real = packing.train_packed

    def spy(cfgs, **kwargs):
        calls.append(sorted((c.split_seed, c.seed) for c in cfgs))
        return real(cfgs, **kwargs)

    monkeypatch.setattr(packing, "train_packed", spy)
    out = tmp_path / "grid"
    assert main(["grid", str(write_spec(tmp_path, tiny_mnist)), "--out", str(out), "--pack",
                 "--no-progress"]) == 0
    # one pack per cell (vae, hf:1), each with every split x init of the cell
    assert calls == [[(0, 0), (0, 1), (1, 1000), (1, 1001)]] * 2
    ref, _ = uninterrupted
    evals = sorted(out.rglob(EVAL_FILE))
    assert len(evals) == 8
    for path in evals:
        got = json.loads(path.read_text())
        want = json.loads((ref / path.relative_to(out)).read_text())
        assert got["best_epoch"] == want["best_epoch"]
        assert got["test_iwae"] == pytest.approx(want["test_iwae"], rel=1e-4, abs=1e-3)
        assert got["best_valid_elbo"] == pytest.approx(want["best_valid_elbo"], rel=1e-4,
                                                       abs=1e-3)


# --------------------------------------------------------------------------------------
# the local pool's workers end with the gpvae grid process
# --------------------------------------------------------------------------------------
def _proc_stat(pid: int):
    """(state, parent pid, start time) of a live process, or None when it is gone (a zombie
    counts as gone: it runs nothing)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    state, ppid, start = fields[0], int(fields[1]), fields[19]
    return None if state in "ZXx" else (state, ppid, start)


def _children(pid: int) -> dict:
    """{pid: start time} of the live processes whose parent is ``pid``."""
    kids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None and st[1] == pid:
                kids[int(entry)] = st[2]
    return kids


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="reads /proc; the kernel's parent-death signal is Linux's")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT", "worker"])
def test_the_pool_workers_end_with_the_grid_process(tmp_path, tiny_mnist, capsys,  # noqa
                                                    sig):
    """gpvae grid --jobs 2 killed (kill -9), or interrupted by a SIGINT sent to it alone (not
    its process group, so the workers get none): its worker processes and the resource
    tracker end within seconds, instead of training their runs and the queued ones on
    (holding the runs' locks: a rerun skipped them) and then waiting forever.  A worker
    killed (``worker``: e.g. by the out-of-memory killer) stops the grid with a one-line
    error, not a traceback."""
    spec = write_spec(tmp_path, tiny_mnist, SMALL.replace("epochs = 1", "epochs = 100000")
                      .replace("inits = 2", "inits = 4"))  # runs that outlast the test
    out = tmp_path / "grid"
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from gpvae.cli import main; sys.exit(main(sys.argv[1:]))")
    with open(tmp_path / "stderr.log", "wb") as log:
        parent = subprocess.Popen(
            [sys.executable, "-c", code, "grid", str(spec), "--out", str(out), "--jobs", "2",
             "--no-progress"], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    kids = {}
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(f"mnist/d2/vae/split0/init*/{LAST}")):  # a worker trains
            assert parent.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "stderr.log").read_text()
            time.sleep(0.2)
        kids = _children(parent.pid)
        assert len(kids) >= 2, kids  # the two workers (and the resource tracker)
        if sig == "worker":
            workers = [p for p in kids if b"spawn_main" in Path(f"/proc/{p}/cmdline")
                       .read_bytes()]  # not the resource tracker
            os.kill(workers[0], signal.SIGKILL)
        else:
            os.kill(parent.pid, getattr(signal, sig))
        want = {"SIGINT": 130, "SIGKILL": -signal.SIGKILL, "worker": 2}[sig]
        assert parent.wait(timeout=20) == want
        deadline = time.monotonic() + 10
        alive = kids
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = {p: t for p, t in kids.items() if (_proc_stat(p) or (0, 0, None))[2] == t}
        assert not alive, f"still running after the grid process ended: {sorted(alive)}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid, start in kids.items():  # a failed test leaves no trainer behind
            if (_proc_stat(pid) or (0, 0, None))[2] == start:
                os.kill(pid, signal.SIGKILL)
    err = (tmp_path / "stderr.log").read_text()
    if sig == "SIGINT":
        assert "gpvae grid: interrupted" in err, err
    if sig == "worker":
        assert "gpvae grid: error: a worker process died" in err and "Traceback" not in err, \
            err
    if sig != "SIGKILL":  # no "leaked semaphore" warning from the resource tracker
        assert "leaked" not in err, err
    # no lock left held: the next gpvae grid resumes every run (none "being run")
    assert main(["grid", "--out", str(out), "--status"]) == 0
    assert "4 runs: 0 done, 0 running, 0 failed, 4 pending" in capsys.readouterr().out
