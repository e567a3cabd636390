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


def test_gpvae_resume_equals_uninterrupted_run(tmp_path):
    """The GPVAE through the real trainer: stopping after epoch 1 and resuming to 2 ends with
    exactly the weights of a straight 2-epoch run.  This goes through the checkpointed
    fused-Adam moments of channels-last convolution weights, which make_adam's load hook
    must lay out like their parameters (else the fused kernel silently misreads them)."""
    def cfg(out, epochs):
        return TrainConfig(out=str(tmp_path / out), model="gpvae",
                           model_options={"latent_dim": 3}, epochs=epochs, limit_train=300,
                           batch_size=64, seed=5, device="cpu")

    train(cfg("full", 2), progress=False, log=lambda *_: None)
    train(cfg("split", 1), progress=False, log=lambda *_: None)
    train(cfg("split", 2), resume=True, progress=False, log=lambda *_: None)
    a, _, a_meta = read_checkpoint(tmp_path / "full" / "last.safetensors")
    b, _, b_meta = read_checkpoint(tmp_path / "split" / "last.safetensors")
    assert a_meta["epoch"] == b_meta["epoch"] == 2
    assert any(k.endswith("sigma_offdiag") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_make_adam_state_round_trip_and_mismatch():
    """Moments saved contiguous (as checkpoints store them) load into the layout of their
    channels-last parameters, and the next step equals the uninterrupted optimizer's;
    state of the wrong shape is refused with a CheckpointError."""
    from gpvae.errors import CheckpointError
    from gpvae.training import make_adam

    def net():
        torch.manual_seed(0)
        return torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)

    x = torch.rand(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)

    def step(model, opt):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    a = net()
    opt_a = make_adam(a.parameters(), 1e-2)
    for _ in range(3):
        step(a, opt_a)
    saved = opt_a.state_dict()
    # fresh contiguous copies, as read back from a checkpoint (state_dict() shares tensors)
    saved["state"] = {i: {k: (v.clone(memory_format=torch.contiguous_format)
                              if torch.is_tensor(v) else v)
                          for k, v in s.items()} for i, s in saved["state"].items()}
    assert not saved["state"][0]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    b = net()
    b.load_state_dict(a.state_dict())
    opt_b = make_adam(b.parameters(), 1e-2)
    opt_b.load_state_dict(saved)
    step(a, opt_a)
    step(b, opt_b)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)

    bad = opt_a.state_dict()
    bad["state"][0]["exp_avg"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match="does not match"):
        make_adam(net().parameters(), 1e-2).load_state_dict(bad)
