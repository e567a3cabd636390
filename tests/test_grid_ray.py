"""gpvae grid's ray launcher: the [launcher] keys and flags (no Ray needed), the one-line
error without Ray, and the tiny grid of test_grid_e2e run as Ray tasks on a local Ray
instance giving the uninterrupted grid's tables byte for byte (skipped without ray)."""
import argparse
import builtins
import json

import pytest

from gpvae.cli import main
from gpvae.errors import ConfigError
import gpvae.grid.launchers as launchers
from gpvae.grid import expand
from gpvae.grid.command import _with_flags
from gpvae.grid.runs import EVAL_FILE
from gpvae.grid.spec import parse_spec
from test_grid import tiny_mnist  # noqa: F401  (the session fixture)
from test_grid_e2e import SPEC, one_thread, reports, uninterrupted, write_spec  # noqa: F401

BASE = 'datasets = ["mnist"]\nlatent_dims = [2]\nmethods = ["vae"]\n'


def launcher(text: str):
    return parse_spec(BASE + "[launcher]\n" + text, "s.toml").launcher


def test_the_ray_keys_and_their_defaults():
    la = launcher('kind = "ray"\n')
    assert (la.kind, la.address, la.gpus_per_run, la.cpus_per_run) == ("ray", None, 0.0, 1)
    la = launcher('kind = "ray"\naddress = "ray://head:10001"\ngpus_per_run = 0.25\n'
                  'cpus_per_run = 2\n')
    assert (la.address, la.gpus_per_run, la.cpus_per_run) == ("ray://head:10001", 0.25, 2)
    assert launcher("gpus_per_run = 2\n").gpus_per_run == 2.0  # whole numbers above 1


@pytest.mark.parametrize("text,needle", [
    ('kind = "rya"\n', "launcher.kind must be one of 'local', 'slurm', 'ray'"),
    ("gpus_per_run = -0.5\n", "launcher.gpus_per_run must be >= 0"),
    ("gpus_per_run = 1.5\n", "launcher.gpus_per_run must be >= 0 and, above 1, a whole"),
    ('gpus_per_run = "half"\n', "launcher.gpus_per_run must be a number"),
    ("cpus_per_run = 0\n", "launcher.cpus_per_run must be an integer >= 1"),
    ("cpus_per_run = 1.5\n", "launcher.cpus_per_run must be an integer >= 1"),
    ("address = \"\"\n", "launcher.address must be a non-empty string"),
    ("gpu_per_run = 1\n", "did you mean 'gpus_per_run'?"),
])
def test_bad_ray_keys_are_one_line_errors(text, needle):
    with pytest.raises(ConfigError) as exc:
        launcher(text)
    assert str(exc.value).startswith("s.toml: ") and needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_the_flags_override_the_table():
    g = parse_spec(BASE + '[launcher]\naddress = "auto"\ngpus_per_run = 0.5\n')
    args = argparse.Namespace(launcher="ray", jobs=None, partition=None, gpus_per_task=None,
                              cpus_per_task=None, runs_per_task=None, time=None, device=None,
                              ray_address="ray://h:10001", gpus_per_run=0.25, cpus_per_run=3)
    la = _with_flags(g, args).launcher
    assert (la.kind, la.address, la.gpus_per_run, la.cpus_per_run) == (
        "ray", "ray://h:10001", 0.25, 3)
    args.ray_address = args.gpus_per_run = args.cpus_per_run = None  # not given: the table's
    la = _with_flags(parse_spec(BASE + '[launcher]\naddress = "auto"\ngpus_per_run = 0.5\n'),
                     args).launcher
    assert (la.address, la.gpus_per_run, la.cpus_per_run) == ("auto", 0.5, 1)
    args.gpus_per_run = 2.5
    with pytest.raises(ConfigError, match="--gpus-per-run must be >= 0 and, above 1"):
        _with_flags(g, args)


class FakeRay:
    """Stands for the ray module: records init/remote/shutdown, runs no task; the run
    labelled ``fail`` loses its task."""

    class RayError(Exception):
        pass

    def __init__(self, fail: str):
        self.calls, self.fail, self.initialized = [], fail, False
        self.exceptions = type("exceptions", (), {"RayError": self.RayError})

    def is_initialized(self):
        return self.initialized

    def init(self, address=None, **kwargs):
        self.calls.append(("init", address))
        self.initialized = True

    def shutdown(self):
        self.calls.append(("shutdown",))

    def remote(self, **resources):
        self.calls.append(("remote", resources))
        fake = self

        class Task:
            @staticmethod
            def remote(run, progress, threads, gpus):
                fake.calls.append(("task", run.label, threads, gpus))
                return type("Ref", (), {"run": run})()
        return lambda fn: Task

    def wait(self, refs, num_returns):
        return refs[:1], refs[1:]

    def get(self, ref):
        if ref.run.label == self.fail:
            raise self.RayError("the worker died\ntraceback ...")
        return {"state": "done", "eval": {"label": ref.run.label}, "error": None}

    def cancel(self, ref, force=False):
        self.calls.append(("cancel", ref.run.label))


def test_run_ray_asks_ray_for_one_task_per_unfinished_run(tmp_path, monkeypatch):
    g = parse_spec(BASE + "inits = 3\n")
    runs = expand(g, tmp_path / "grid")
    finished, lost, new = (r.label for r in runs)
    fake = FakeRay(fail=lost)
    monkeypatch.setattr(launchers, "import_ray", lambda: fake)
    monkeypatch.setattr(launchers, "finished_eval",
                        lambda run: {"old": 1} if run.label == finished else None)
    logs = []
    outcomes = launchers.run_ray(runs, address="auto", gpus_per_run=0.25, cpus_per_run=2,
                                 progress=False, log=logs.append)
    assert fake.calls == [("init", "auto"), ("remote", {"num_gpus": 0.25, "num_cpus": 2}),
                          ("task", lost, 2, 0.25), ("task", new, 2, 0.25), ("shutdown",)]
    assert outcomes[finished] == {"state": "done", "eval": {"old": 1}, "error": None}
    assert outcomes[new]["state"] == "done"
    assert outcomes[lost] == {"state": "failed", "eval": None,
                              "error": "RayError: the worker died"}
    assert logs == [f"[grid] {lost}: the Ray task failed: the worker died"]
    # an instance this process started itself is used and left running
    fake = FakeRay(fail=None)
    fake.initialized = True
    monkeypatch.setattr(launchers, "import_ray", lambda: fake)
    launchers.run_ray(runs, progress=False)
    assert [c[0] for c in fake.calls] == ["remote", "task", "task"]


def _one_line_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("gpvae grid: error: "), err
    return err[0]


def test_without_ray_a_one_line_error_before_any_work(tmp_path, tiny_mnist, capsys,  # noqa
                                                      monkeypatch):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    spec = write_spec(tmp_path, tiny_mnist)
    out = tmp_path / "grid"
    assert main(["grid", str(spec), "--out", str(out), "--launcher", "ray"]) == 2
    assert _one_line_error(capsys).endswith(
        "the ray launcher needs ray: pip install 'gpvae[ray]'")
    assert not out.exists()


def test_a_cuda_device_without_gpus_per_run_is_refused_before_any_work(
        tmp_path, tiny_mnist, capsys):  # noqa: F811
    pytest.importorskip("ray")
    spec = write_spec(tmp_path, tiny_mnist, SPEC.replace('device = "cpu"', 'device = "cuda"'))
    out = tmp_path / "grid"
    assert main(["grid", str(spec), "--out", str(out), "--launcher", "ray"]) == 2
    assert "needs gpus_per_run > 0" in _one_line_error(capsys)
    assert not out.exists()


def test_the_grid_as_ray_tasks_gives_the_uninterrupted_tables(
        uninterrupted, tmp_path, tiny_mnist, monkeypatch):  # noqa: F811
    """Every run a Ray task (one CPU, one torch thread: as the uninterrupted grid) on a
    local instance of 2 CPUs started here, as run_ray finds it; the eval.json files equal
    the uninterrupted grid's and the report is byte-identical."""
    ray = pytest.importorskip("ray")

    def not_here(run, **kwargs):
        raise AssertionError(f"{run.label} ran in the driver, not as a Ray task")

    monkeypatch.setattr(launchers, "run_one", not_here)  # the Ray workers import their own
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=True)
    try:
        spec = write_spec(tmp_path, tiny_mnist, SPEC + '[launcher]\nkind = "ray"\n')
        out = tmp_path / "grid"
        assert main(["grid", str(spec), "--out", str(out)]) == 0
        assert ray.is_initialized()  # an instance run_ray found is left to its owner
        ref, _ = uninterrupted
        evals = sorted(out.rglob(EVAL_FILE))
        assert len(evals) == 8
        for path in evals:
            got = json.loads(path.read_text())
            want = json.loads((ref / path.relative_to(out)).read_text())
            assert got["test_iwae"] == want["test_iwae"], path
        assert reports(out) == reports(ref)
        # a rerun finds every run finished: nothing trained or scored again (Ray forwards
        # the workers' lines when it gets to it: the files tell, not the log)
        stamps = {p: p.stat().st_mtime_ns for p in (out / "mnist").rglob("*") if p.is_file()}
        assert main(["grid", str(spec), "--out", str(out)]) == 0
        assert stamps == {p: p.stat().st_mtime_ns for p in (out / "mnist").rglob("*")
                          if p.is_file()}
    finally:
        ray.shutdown()
