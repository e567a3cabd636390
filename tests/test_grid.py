"""gpvae grid without training: the spec (validation, expansion, seeds, the stored copy),
the report's statistics against scipy on hand-made eval.json files (best of inits by
validation ELBO), --status states, the Slurm parameters, and log-friendly progress."""
import csv
import io
import json
import math
import statistics

import pytest
from scipy import stats

from gpvae.errors import ConfigError
from gpvae.grid import expand, parse_spec
from gpvae.grid.report import build_report, render, select_split, t_tests
from gpvae.grid.runs import ERROR_FILE, EVAL_FILE
from gpvae.grid.spec import SPEC_COPY, claim_out_dir, parse_time, run_path
from gpvae.grid.status import format_status, grid_status
from gpvae.rundir import locked_run_dir

BASE = """
datasets = ["mnist"]
latent_dims = [2]
methods = ["vae", "sa:2"]
splits = 3
inits = 2
epochs = 1
limit_test = 20
iwae_samples = 3
"""


def spec(extra="", base=BASE):
    return parse_spec(base + extra, "spec.toml")


# --------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,needles", [
    (BASE + "epoch = 3\n", ["unknown key 'epoch'", "did you mean 'epochs'"]),
    (BASE.replace("epochs = 1", "epochs = 0"), ["epochs", ">= 1", "0"]),
    (BASE.replace("epochs = 1", "epochs = 1.5"), ["epochs", "1.5"]),
    (BASE.replace("epochs = 1", 'epochs = "3"'), ["epochs", "'3'"]),
    (BASE.replace('["mnist"]', '["imagenet"]'), ["datasets", "imagenet", "mnist"]),
    (BASE.replace('"sa:2"', '"sa:x"'), ["methods", "sa:x"]),
    (BASE.replace('"sa:2"', '"nope"'), ["methods", "nope"]),
    (BASE.replace('"sa:2"', '"vae:2"'), ["methods", "takes no size"]),
    (BASE.replace('"sa:2"', '"vae"'), ["methods", "twice"]),
    (BASE.replace("[2]", "[2, 2]"), ["latent_dims", "twice"]),
    (BASE.replace("[2]", "[]"), ["latent_dims", "non-empty list"]),
    (BASE.replace("[2]", "[true]"), ["latent_dims", "True"]),
    (BASE.replace("latent_dims = [2]", ""), ["latent_dims is required"]),
    (BASE + "split_seeds = [0, 1]\n", ["splits or split_seeds, not both"]),
    # a run's seed is 1000 split + init: it must stay a seed (<= 2^63 - 1)
    (BASE.replace("splits = 3", "split_seeds = [9223372036854776]"),
     ["split_seeds", "<= 9223372036854774"]),
    (BASE.replace("inits = 2", "init_seeds = [0, 1000]"), ["init_seeds", "<= 999"]),
    (BASE.replace("inits = 2", "init_seeds = [3, 3]"), ["init_seeds", "twice"]),
    (BASE + "lr = -1\n", ["lr", "positive"]),
    (BASE + 'likelihood = "poisson"\n', ["likelihood", "poisson"]),
    (BASE + 'decoder = "mlp"\n', ["decoder", "mlp"]),
    (BASE + "[launcher]\nkind = \"pbs\"\n", ["launcher.kind", "pbs"]),
    (BASE + "[launcher]\njobz = 2\n", ["unknown key launcher.'jobz'", "did you mean 'jobs'"]),
    (BASE + "[launcher]\njobs = 0\n", ["launcher.jobs", ">= 1"]),
    (BASE + "[launcher]\ntime = \"4h\"\n", ["launcher.time", "4h"]),
    (BASE + "[launcher]\nsbatch = {x = 1.5}\n", ["launcher.sbatch.x", "1.5"]),
    (BASE + "[report]\ntest = \"z\"\n", ["report.test", "welch"]),
    (BASE + "[report]\nalpha = 1.5\n", ["report.alpha", "below 1"]),
    (BASE + "[options.gpvae]\ngp_init_std = 0.1\n", ["options.gpvae", "names no method"]),
    (BASE + "[options.\"sa:2\"]\nsa_stepz = 3\n", ["options.sa:2.sa_stepz", "sa_steps"]),
    (BASE + "[options.\"sa:2\"]\nsa_steps = 3\n", ["options.sa:2.sa_steps", "size"]),
    (BASE + "[options.\"sa:2\"]\nsa_lr = \"fast\"\n", ["options.sa:2.sa_lr", "float"]),
    (BASE + "[options.vae]\nlatent_dim = 3\n", ["options.vae.latent_dim", "latent_dims"]),
    (BASE + "datasets = [\"mnist\"]\n", ["not valid TOML"]),
])
def test_bad_specs_are_one_line_errors_naming_the_key(text, needles):
    with pytest.raises(ConfigError) as exc:
        parse_spec(text, "spec.toml")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("spec.toml")
    for n in needles:
        assert n in msg, msg


def test_a_spec_expands_into_the_layout_with_shared_splits_and_distinct_inits(tmp_path):
    g = spec('[options."sa:2"]\nsa_lr = 0.01\n')
    runs = expand(g, tmp_path)
    assert len(runs) == 1 * 1 * 2 * 3 * 2
    by_key = {r.key: r for r in runs}
    sa = by_key[("mnist", 2, "sa:2", 1, 0)]
    assert sa.run_dir == tmp_path / "mnist" / "d2" / "sa-2" / "split1" / "init0"
    assert sa.cfg.model == "sa" and sa.cfg.model_options["sa_steps"] == 2
    assert sa.cfg.model_options["sa_lr"] == 0.01 and sa.cfg.model_options["latent_dim"] == 2
    assert "sa_lr" not in by_key[("mnist", 2, "vae", 1, 0)].cfg.model_options
    for s in g.split_seeds:  # every method sees split s; seed = 1000 s + i
        for i in g.init_seeds:
            cfgs = [by_key[("mnist", 2, m, s, i)].cfg for m in g.methods]
            assert {(c.split_seed, c.seed) for c in cfgs} == {(s, 1000 * s + i)}
    seeds = [r.cfg.seed for r in runs if r.key[2] == "vae"]
    assert len(set(seeds)) == len(seeds)  # no two runs of a cell share weights
    assert all(r.eval_seed == r.cfg.seed and r.cfg.epochs == 1 for r in runs)
    # split-major order: every method's split 0 before any split 1
    assert [r.key[3] for r in runs] == sorted(r.key[3] for r in runs)


def test_explicit_seed_lists(tmp_path):
    g = spec(base=BASE.replace("splits = 3", "split_seeds = [4, 7]")
             .replace("inits = 2", "init_seeds = [5]"))
    assert {(r.cfg.split_seed, r.cfg.seed) for r in expand(g, tmp_path)} == {(4, 4005), (7, 7005)}


@pytest.mark.parametrize("text,minutes", [(90, 90), ("90", 90), ("4:00:00", 240),
                                          ("1-00", 1440), ("1-2:30", 1590), ("2:30", 3),
                                          ("0:10:01", 11)])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


def test_the_spec_is_stored_and_a_rerun_may_only_extend_it(tmp_path):
    out = tmp_path / "g"
    g = spec()
    claim_out_dir(g, out)
    assert (out / SPEC_COPY).read_text() == g.source
    claim_out_dir(spec(), out)  # the same spec again
    with pytest.raises(ConfigError, match=r"epochs = 2 differs .*grid.toml \(1\)"):
        claim_out_dir(spec(base=BASE.replace("epochs = 1", "epochs = 2")), out)
    with pytest.raises(ConfigError, match="drops 6 run"):
        claim_out_dir(spec(base=BASE.replace(', "sa:2"', "")), out)
    with pytest.raises(ConfigError, match=r"\[options.sa:2\] differs"):
        claim_out_dir(spec('[options."sa:2"]\nsa_lr = 0.01\n'), out)
    assert (out / SPEC_COPY).read_text() == g.source  # refusals change nothing
    wider = spec("[launcher]\njobs = 4\n",
                 BASE.replace('"sa:2"]', '"sa:2", "hf:1"]').replace("[2]", "[2, 3]")
                 .replace("iwae_samples = 3", "iwae_samples = 5"))
    claim_out_dir(wider, out)
    assert (out / SPEC_COPY).read_text() == wider.source
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="not empty and holds no grid"):
        claim_out_dir(g, tmp_path / "mine")
    claim_out_dir(g, tmp_path / "mine", write=False)  # --status / --report only read
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------------------
# the report, from hand-made eval.json files
# --------------------------------------------------------------------------------------
def fake_eval(run, test_iwae, valid_elbo):
    run.run_dir.mkdir(parents=True, exist_ok=True)
    ev = {"key": list(run.key), "epochs": run.cfg.epochs, "iwae_samples": run.iwae_samples,
          "limit_test": run.cfg.limit_test, "eval_seed": run.eval_seed,
          "best_valid_elbo": valid_elbo, "best_epoch": 1, "test_iwae": test_iwae,
          "estimate": {"test_iwae": test_iwae}}
    (run.run_dir / EVAL_FILE).write_text(json.dumps(ev))


# per (method, split): (test IWAE, validation ELBO) of init 0 and init 1.  In every split
# the init with the better validation ELBO has the *worse* test IWAE.
TABLE = {
    "vae": [((-90.0, -101.0), (-95.0, -100.0)), ((-91.0, -99.0), (-97.0, -98.0)),
            ((-92.0, -97.5), (-93.5, -97.0))],
    "sa:2": [((-90.0, -105.0), (-96.0, -104.0)), ((-98.2, -96.0), (-95.0, -103.0)),
             ((-90.0, -100.0), (-94.4, -99.0))],
}


def selected(method):
    """The test IWAE per split of the init with the best validation ELBO."""
    return [max(split, key=lambda tv: tv[1])[0] for split in TABLE[method]]


@pytest.fixture
def fake_grid(tmp_path):
    g = spec()
    runs = expand(g, tmp_path)
    for run in runs:
        _, _, method, s, i = run.key
        fake_eval(run, *TABLE[method][s][i])
    return g, runs


def test_each_split_keeps_the_init_with_the_best_validation_elbo_not_test_iwae(fake_grid):
    g, runs = fake_grid
    r = build_report(g, runs)
    cells = r["datasets"]["mnist"]["cells"]
    assert selected("vae") == [-95.0, -97.0, -93.5]  # every choice disagrees with test IWAE
    for m in ("vae", "sa:2"):
        c = cells[m]["2"]
        assert [p["test_iwae"] for p in c["per_split"]] == selected(m)
        assert c["mean"] == pytest.approx(statistics.mean(selected(m)))
        assert c["sd"] == pytest.approx(statistics.stdev(selected(m)))
    assert [p["init"] for p in cells["vae"]["2"]["per_split"]] == [1, 1, 1]
    assert [p["init"] for p in cells["sa:2"]["2"]["per_split"]] == [1, 0, 1]
    assert select_split([None, {"best_valid_elbo": 0.0}]) is None  # an init not done


def test_t_tests_match_scipy_and_the_marks_use_the_stated_test(fake_grid, tmp_path):
    g, runs = fake_grid
    vae, sa = selected("vae"), selected("sa:2")
    assert statistics.mean(vae) > statistics.mean(sa)
    cells = build_report(g, runs)["datasets"]["mnist"]["cells"]
    assert cells["vae"]["2"]["best"] and not cells["sa:2"]["2"]["best"]
    c = cells["sa:2"]["2"]
    p_paired = stats.ttest_rel(sa, vae).pvalue
    p_welch = stats.ttest_ind(sa, vae, equal_var=False).pvalue
    assert c["p_paired"] == pytest.approx(p_paired, rel=1e-12)
    assert c["p_welch"] == pytest.approx(p_welch, rel=1e-12)
    # by hand: paired t on the differences, Welch with Satterthwaite's df
    diffs = [a - b for a, b in zip(sa, vae)]
    t = statistics.mean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    assert p_paired == pytest.approx(2 * stats.t.sf(abs(t), 2), rel=1e-9)
    va, vb = statistics.variance(sa) / 3, statistics.variance(vae) / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    tw = (statistics.mean(sa) - statistics.mean(vae)) / math.sqrt(va + vb)
    assert p_welch == pytest.approx(2 * stats.t.sf(abs(tw), df), rel=1e-9)
    # the two tests disagree at some alpha: the marks follow the spec's [report] test
    alpha = float(p_paired + p_welch) / 2
    assert p_paired < 0.01 < 0.3 < p_welch  # sa:2 is consistently a little worse
    for test, p in (("welch", p_welch), ("paired", p_paired)):
        g2 = spec(f"[report]\ntest = \"{test}\"\nalpha = {alpha!r}\n")
        c2 = build_report(g2, expand(g2, tmp_path))["datasets"]["mnist"]["cells"]["sa:2"]["2"]
        assert c2["no_evidence"] == (p > alpha)
    assert t_tests([1.0], [2.0]) == {"p_paired": None, "p_welch": None}


def test_report_files_markdown_latex_csv_json(fake_grid):
    g, runs = fake_grid
    r = build_report(g, runs)
    files = render(r)
    vae, sa = selected("vae"), selected("sa:2")
    cell = f"{statistics.mean(vae):.1f} ({statistics.stdev(vae):.1f})"
    assert f"| VAE | **{cell}** |" in files["report.md"]
    assert "Welch t-test: p > 0.01" in files["report.md"]
    assert rf"VAE & \textbf{{{cell}}} \\" in files["report.tex"]
    assert r"$\dim(\mathbf{z}) = 2$" in files["report.tex"]
    rows = list(csv.DictReader(io.StringIO(files["report.csv"])))
    assert [(row["method"], row["best"]) for row in rows] == [("vae", "True"), ("sa:2", "False")]
    assert float(rows[1]["p_paired"]) == pytest.approx(stats.ttest_rel(sa, vae).pvalue)
    assert [float(v) for v in rows[1]["per_split_test_iwae"].split(";")] == sa
    assert json.loads(files["report.json"]) == json.loads(json.dumps(r))


def test_incomplete_cells_are_shown_as_such_and_not_tested(fake_grid):
    g, runs = fake_grid
    victim = next(r for r in runs if r.key == ("mnist", 2, "sa:2", 2, 1))
    (victim.run_dir / EVAL_FILE).unlink()  # split 2 of sa:2 lacks an init
    r = build_report(g, runs)
    c = r["datasets"]["mnist"]["cells"]["sa:2"]["2"]
    assert (c["splits_done"], c["complete"], c["p_welch"]) == (2, False, None)
    assert c["mean"] == pytest.approx(statistics.mean(selected("sa:2")[:2]))
    assert "[2/3 splits]" in render(r)["report.md"]


def test_status_counts_done_running_failed_pending(fake_grid):
    g, runs = fake_grid
    by_key = {r.key: r for r in runs}
    (by_key[("mnist", 2, "vae", 0, 0)].run_dir / EVAL_FILE).unlink()  # pending
    failed = by_key[("mnist", 2, "vae", 0, 1)]
    (failed.run_dir / EVAL_FILE).unlink()
    (failed.run_dir / ERROR_FILE).write_text(json.dumps(
        {"type": "TrainingDivergedError", "error": "the training loss became nan"}))
    stale = by_key[("mnist", 2, "sa:2", 1, 1)]  # scored with another K: not done
    ev = json.loads((stale.run_dir / EVAL_FILE).read_text())
    (stale.run_dir / EVAL_FILE).write_text(json.dumps({**ev, "iwae_samples": 99}))
    running = by_key[("mnist", 2, "sa:2", 2, 0)]
    (running.run_dir / EVAL_FILE).unlink()
    with locked_run_dir(running.run_dir, create=False):
        st = grid_status(runs)
    assert st["cells"][("mnist", 2, "vae")] == {"done": 4, "failed": 1, "pending": 1}
    assert st["cells"][("mnist", 2, "sa:2")] == {"done": 4, "running": 1, "pending": 1}
    text = format_status(st, "OUT")
    assert "12 runs: 8 done, 1 running, 1 failed, 2 pending" in text
    assert "mnist/d2/vae/split0/init1: TrainingDivergedError: the training loss became nan" \
        in text
    assert grid_status(runs)["states"][running.label] == "pending"  # lock released


# --------------------------------------------------------------------------------------
# Slurm parameters (submitit's real SlurmExecutor, a stand-in srun/sbatch on PATH)
# --------------------------------------------------------------------------------------
def test_the_slurm_submission_is_one_array_with_the_spec_parameters(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from gpvae.grid.launchers import make_executor, submit_slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.args"
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {log}\n"
                                    f"cp \"$1\" {tmp_path / 'job.sh'}\n"
                                    "echo Submitted batch job 4242\n")
    for f in ("srun", "sbatch"):
        (bin_dir / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    g = spec('[launcher]\nkind = "slurm"\npartition = "gpu"\ntime = "4:00:00"\n'
             'gpus_per_task = 1\ncpus_per_task = 4\nruns_per_task = 5\n'
             'setup = ["source .venv/bin/activate"]\nsbatch = {account = "abc"}\n')
    out = tmp_path / "g"
    runs = expand(g, out)
    fake_eval(runs[0], -1.0, -1.0)  # done: not submitted
    executor = make_executor(out / "slurm" / "%j", g.launcher, "slurm")
    assert isinstance(executor._executor, submitit.SlurmExecutor)
    jobs = submit_slurm(g, runs, out, executor=executor)
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1", "4242_2"]  # 11 runs, 5 per task
    script = (tmp_path / "job.sh").read_text()
    for line in ("--array=0-2", "--partition=gpu", "--time=240", "--gpus-per-node=1",
                 "--cpus-per-task=4", "--account=abc", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}" in script, script
    assert "source .venv/bin/activate" in script


# --------------------------------------------------------------------------------------
# progress that suits logs
# --------------------------------------------------------------------------------------
def test_progress_writes_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    from gpvae import progress

    monkeypatch.delenv("GPVAE_PROGRESS", raising=False)
    assert progress.progress_mode() == "lines"  # pytest captures stderr: not a tty
    with progress.line_prefix("run7"):
        bar = progress.progress_bar(8, unit="step")
    for epoch in range(2):
        for _ in range(4):
            bar.update(1)
            bar.set_description(f"epoch {epoch + 1}/2")
        bar.set_postfix(valid_elbo=f"{-10.0 * epoch:.1f}")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("run7 | epoch 1/2 | 4/8 step (50%) | ")
    assert lines[0].endswith(" | valid_elbo=-0.0")
    assert lines[1].startswith("run7 | epoch 2/2 | 8/8 step (100%) | ")
    bar = progress.progress_bar(5, desc="IWAE", unit="img")  # no results: one line at close
    bar.update(5)
    bar.close()
    assert capsys.readouterr().err.startswith("IWAE | 5/5 img (100%) | ")
    monkeypatch.setenv("GPVAE_PROGRESS", "off")
    progress.progress_bar(3).update(3)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("GPVAE_PROGRESS", "bar")
    from tqdm import tqdm

    for enabled in (True, False):
        bar = progress.progress_bar(3, enabled=enabled)
        assert isinstance(bar, tqdm) and bar.disable is not enabled
        bar.close()
    capsys.readouterr()


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """A data_dir with the first 120 training and 20 test images of real MNIST as IDX files
    (loads in milliseconds, unlike the whole bundled set)."""
    import struct

    import numpy as np

    from gpvae.data import load_splits

    d = tmp_path_factory.mktemp("mnist")
    full = load_splits("mnist", None, split_seed=0, limit_train=120, limit_test=20)
    for name, data in (("train-images-idx3-ubyte", full.train),
                       ("t10k-images-idx3-ubyte", full.test)):
        x = data.images.numpy().reshape(-1, 28, 28).astype(np.uint8)
        (d / name).write_bytes(struct.pack(">IIII", 0x803, len(x), 28, 28) + x.tobytes())
    return d


def test_local_pool_workers_spread_over_the_gpus(monkeypatch):
    """Worker i of the local pool sees only GPU i mod n (CUDA_VISIBLE_DEVICES, set before
    CUDA starts), so --jobs 4 on a 2-GPU machine puts two workers on each GPU; with one GPU
    or none nothing is set."""
    import multiprocessing
    import os

    import torch

    from gpvae.grid import launchers

    threads = torch.get_num_threads()
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    seen = []
    try:
        for _ in range(4):
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
            launchers._worker_init(threads, counter, ["3", "5"])
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
        assert seen == ["3", "5", "3", "5"]
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        launchers._worker_init(threads, counter, ["3"])
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 7")
    assert launchers.visible_gpus() == ["2", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert launchers.visible_gpus() == ["0", "1", "2"]


def test_a_pool_worker_ends_when_the_grid_process_is_gone(monkeypatch):
    """_die_with_parent: a worker whose parent died before the kernel was asked to signal
    it ends at once; where there is no such signal (not Linux) a thread watches the parent
    pid and ends the worker when it changes (the orphan was adopted)."""
    import os
    import time

    from gpvae.grid import launchers

    exits = []
    monkeypatch.setattr(launchers, "_PARENT", None)
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(launchers, "_linux_parent_death_signal", lambda: True)
    monkeypatch.setattr(launchers.sys, "platform", "linux")
    launchers._die_with_parent(os.getppid())  # the parent lives: nothing happens
    assert exits == [] and launchers._PARENT == os.getppid()
    launchers._die_with_parent(os.getppid() + 1)  # it died before the call
    assert exits == [1]
    launchers._die_with_parent(None)  # not a pool worker (jobs = 1, tests)
    assert exits == [1]
    monkeypatch.setattr(launchers, "run_one", lambda run, **kwargs: {"state": "done"})
    monkeypatch.setattr(launchers, "_PARENT", os.getppid() + 1)  # orphaned meanwhile:
    launchers._worker_run(None, False)  # a queued run is not started
    assert exits == [1, 1]

    exits.clear()
    monkeypatch.setattr(launchers.sys, "platform", "darwin")
    if os.name == "posix":  # (a thread for a live parent would outlive the test)
        launchers._die_with_parent(os.getppid() + 1, interval=0.01)  # it is gone
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exits == [1]


def _grid_dir(fake_grid, tmp_path):
    g, runs = fake_grid
    (tmp_path / SPEC_COPY).write_text(g.source)  # the runs live in tmp_path
    return g, runs, tmp_path


def test_report_with_a_spec_scored_otherwise_is_refused_and_keeps_the_report(
        fake_grid, tmp_path, tmp_path_factory, capsys):
    """--report with a spec that the grid accepts (a rerun may change iwae_samples) but that
    scores the runs otherwise than DIR/grid.toml: a one-line error, and the report stays --
    it found no run scored that way and used to overwrite the tables with empty ones."""
    from gpvae.cli import main
    from gpvae.grid.report import FILES, REPORT_DIR

    g, runs, out = _grid_dir(fake_grid, tmp_path)
    assert main(["grid", "--out", str(out), "--report"]) == 0
    files = {n: (out / REPORT_DIR / n).read_bytes() for n in FILES}
    assert b"| VAE | **" in files["report.md"]  # complete tables
    specs = tmp_path_factory.mktemp("specs")
    other_k = specs / "k5.toml"
    other_k.write_text(g.source.replace("iwae_samples = 3", "iwae_samples = 5"))
    capsys.readouterr()
    assert main(["grid", str(other_k), "--out", str(out), "--report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "iwae_samples = 5 differs" in err and \
        "nothing was written" in err, err
    assert {n: (out / REPORT_DIR / n).read_bytes() for n in FILES} == files
    # a spec that changes only what is shown, or adds runs, still reports these runs
    shown = specs / "wider.toml"
    shown.write_text(g.source.replace('"sa:2"]', '"sa:2", "hf:1"]') + "[report]\nalpha = 0.05\n")
    assert main(["grid", str(shown), "--out", str(out), "--report"]) == 0
    md = (out / REPORT_DIR / "report.md").read_text()
    assert "p > 0.05" in md and "| VAE | **" in md and "| HF(1) | – [0/3 splits] |" in md
    assert main(["grid", str(other_k), "--out", str(out), "--status"]) == 0  # only reads


def test_status_says_to_delete_a_run_whose_checkpoint_is_damaged(fake_grid, tmp_path,
                                                                 capsys):
    """A CheckpointError fails every rerun the same way (it resumes from the same files):
    --status says to delete that run's directory; other failures keep the usual line."""
    from gpvae.cli import main

    g, runs, out = _grid_dir(fake_grid, tmp_path)
    by_key = {r.key: r for r in runs}
    bad, diverged = by_key[("mnist", 2, "vae", 0, 1)], by_key[("mnist", 2, "sa:2", 1, 0)]
    for run, kind in ((bad, "CheckpointError"), (diverged, "TrainingDivergedError")):
        (run.run_dir / EVAL_FILE).unlink()
        (run.run_dir / ERROR_FILE).write_text(json.dumps(
            {"type": kind, "error": f"{run.run_dir}/last.safetensors: oops"}))
    assert main(["grid", "--out", str(out), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    hinted = [ln for ln in lines if ln.startswith(f"  {bad.label}: CheckpointError: ")]
    assert len(hinted) == 1 and hinted[0].endswith(
        f"; a rerun fails the same way (it cannot repair the run's files): delete "
        f"{bad.run_dir} to train the run anew"), lines
    assert f"  {diverged.label}: TrainingDivergedError: {diverged.run_dir}/last.safetensors: " \
           "oops" in lines
