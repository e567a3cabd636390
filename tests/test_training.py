"""Training: resume after kill -9 reproduces an uninterrupted run; NaN stops with epoch/step."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpvae.checkpoint import read_checkpoint
from gpvae.errors import ConfigError, TrainingDivergedError
from gpvae.models import MODELS, VAE
from gpvae.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["train", "--dataset", "mnist", "--model", "vae", "--latent-dim", "4", "--epochs", "4",
        "--limit-train", "3000", "--batch-size", "64", "--seed", "3", "--no-progress",
        "--device", "cpu"]


def _gpvae(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "gpvae", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _epochs_done(run: Path) -> int:
    path = run / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def test_kill_9_then_resume_gives_the_same_result(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = _gpvae(*ARGS, "--out", str(full))
    q = _gpvae(*ARGS, "--out", str(killed))
    deadline = time.time() + 240
    while _epochs_done(killed) < 2 and time.time() < deadline and q.poll() is None:
        time.sleep(0.05)
    assert q.poll() is None, "the run finished before it could be killed"
    os.kill(q.pid, signal.SIGKILL)  # mid-epoch 3, at an arbitrary point
    q.wait()
    assert p.wait(timeout=300) == 0, p.stderr.read()
    done_before = _epochs_done(killed)
    assert 2 <= done_before < 4
    r = _gpvae("train", "--out", str(killed), "--resume", "--no-progress")
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    assert f"resuming {killed} after epoch {done_before}" in err
    a_model, _, a_meta = read_checkpoint(full / "last.safetensors")
    b_model, _, b_meta = read_checkpoint(killed / "last.safetensors")
    assert a_meta["epoch"] == b_meta["epoch"] == 4
    for k in a_model:
        assert torch.equal(a_model[k], b_model[k]), k
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(a_meta["history"]) == strip(b_meta["history"])
    assert a_meta["best"] == b_meta["best"]
    assert not [f for f in os.listdir(killed) if f.endswith(".tmp")]


class _Diverging(VAE):
    """A VAE whose objective turns NaN at its 3rd training step."""

    calls = 0

    def training_objective(self, x, n_train):
        type(self).calls += 1
        obj, diag = super().training_objective(x, n_train)
        return (obj * float("nan") if type(self).calls == 3 else obj), diag


def test_nan_stops_with_epoch_and_step(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "diverging", _Diverging)
    cfg = TrainConfig(out=str(tmp_path / "r"), model="diverging", model_options={"latent_dim": 2},
                      epochs=2, limit_train=200, batch_size=100, device="cpu")
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, step 1 of 2"):
        train(cfg, progress=False)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "r"), model_options={"latent_dim": 2}, epochs=1,
                      limit_train=100, device="cpu")
    train(cfg, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, progress=False)
    # resuming with a changed model option is refused, with the option named
    cfg.model_options = {"latent_dim": 3}
    with pytest.raises(ConfigError, match="model_options"):
        train(cfg, resume=True, progress=False)


@pytest.mark.parametrize("field,value", [("epochs", -1), ("epochs", 0), ("batch_size", 0),
                                         ("lr", -1.0), ("limit_train", 0)])
def test_bad_values_rejected_before_work(tmp_path, field, value):
    cfg = TrainConfig(out=str(tmp_path / "r"), **{field: value})
    with pytest.raises(ConfigError):
        train(cfg, progress=False)
    assert not (tmp_path / "r").exists()
