"""gpvae.allocator: glibc's thresholds fixed so that a batch's activations reuse memory
instead of a fresh mmap (and its page faults) on every call."""
import importlib.util
from pathlib import Path

import pytest

from gpvae import allocator

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "bench_allocator", ROOT / "scripts" / "bench_allocator.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tuning_removes_the_page_faults_of_repeated_batches():
    """A fresh process that builds a VAE and runs its encoder trunk batch after batch: with
    glibc's own settings each call takes ~1,500 page faults (two 3 MB activations mmapped
    afresh); tuned, none (the same memory is reused)."""
    bench = _script()
    default = bench.measure("default", calls=6)
    if default["faults_per_call"] < 500:
        pytest.skip("this C library does not mmap these activations afresh on every call")
    tuned = bench.measure("tuned", calls=6)
    assert not default["applied"] and tuned["applied"]
    assert tuned["faults_per_call"] < 50, (default, tuned)


@pytest.fixture
def fresh(monkeypatch):
    """The module as if nothing had called it yet; glibc's own variables unset."""
    monkeypatch.setattr(allocator, "_applied", None)
    for name in (allocator.ENV, *allocator._GLIBC_ENV):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(allocator, "_glibc", lambda: (lambda p, v: calls.append((p, v)) or 1))
    return calls


def test_it_sets_both_thresholds_once(fresh):
    assert allocator.tune_cpu_allocator() is True
    assert fresh == [(allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD),
                     (allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD)]
    assert allocator.tune_cpu_allocator() is True and len(fresh) == 2  # idempotent


@pytest.mark.parametrize("name,value", [("GPVAE_CPU_ALLOCATOR", "default"),
                                        ("MALLOC_MMAP_THRESHOLD_", "1048576"),
                                        ("MALLOC_TRIM_THRESHOLD_", "1048576")])
def test_the_users_choice_wins(fresh, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert allocator.tune_cpu_allocator() is False and fresh == []


def test_without_glibc_it_does_nothing(fresh, monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert allocator.tune_cpu_allocator() is False


def test_the_command_and_every_grid_run_tune_it(monkeypatch, tmp_path):
    from gpvae import cli
    from gpvae.grid import runs

    calls = []
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: calls.append(1) or True)
    assert cli.main(["evaluate", str(tmp_path / "no-such-run")]) == 2  # a one-line error
    assert calls == [1]
    monkeypatch.setattr(runs, "_attempt", lambda run, progress, log: {"state": "done"})
    spec = runs.RunSpec(cfg=None, label="x")
    assert runs.run_one(spec, progress=False)["state"] == "done"
    assert calls == [1, 1]
