"""gpvae grid end to end on a tiny grid (2 methods x 2 splits x 2 inits, d=2, 40 real MNIST
images, 2 epochs): through submitit's LocalExecutor, killed midway and resumed to
byte-identical tables through the local launcher's worker pool, --status and --report, failed runs
recorded and retried, and a run held by another process left alone."""
import json
import re
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
