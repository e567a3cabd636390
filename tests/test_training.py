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
from gpvae.rundir import TrainConfig
from gpvae.training import train

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
    with pytest.raises(ConfigError, match=r"model_options.latent_dim 2 -> 3"):
        train(cfg, resume=True, progress=False)
    cfg.model_options, cfg.lr = {"latent_dim": 2}, 1e-3
    with pytest.raises(ConfigError, match=r"\(lr 0.0005 -> 0.001\)"):
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
    exactly the weights and metrics.csv of a straight 2-epoch run.  This goes through the checkpointed
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

    # and it logs the same metrics: the straight run's epoch-2 validation follows its
    # epoch-1 validation in the same model object (a stale inference cache showed there)
    def metrics(run):
        lines = (tmp_path / run / "metrics.csv").read_text().splitlines()
        return [ln.rsplit(",", 1)[0] for ln in lines]  # all but the seconds column

    assert metrics("full") == metrics("split") and len(metrics("full")) == 3


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


# --- issue 7: validation uses fresh q(W, U) factors; selection uses validation data ----------
def _quiet(cfg, **kw):
    return train(cfg, progress=False, log=lambda *_: None, **kw)


def _tiny(out, **kw):
    return TrainConfig(out=str(out), **{"model_options": {"latent_dim": 2}, "epochs": 1,
                                        "limit_train": 100, "batch_size": 50, "device": "cpu",
                                        **kw})


def test_gpvae_inference_follows_the_training_optimizer():
    """q(z|x) without gradients (what validation and evaluation use) after steps of the
    optimizer training really uses equals a fresh model's with the same weights.  The fused
    Adam writes parameters without bumping their version counters, so a cache keyed on
    versions served stale factors here."""
    from gpvae.models import build_model
    from gpvae.training import make_adam

    torch.manual_seed(0)
    model = build_model("gpvae", (1, 28, 28), latent_dim=3, gp_init_std=0.3)
    opt = make_adam(model.parameters(), 0.05)
    assert opt.param_groups[0]["fused"]
    x = torch.rand(16, 1, 28, 28)
    for _ in range(3):
        with torch.inference_mode():
            before = model.posterior(x).variance
        opt.zero_grad()
        (-model.training_objective(x, 100)[0].mean()).backward()
        opt.step()
        fresh = build_model("gpvae", (1, 28, 28), latent_dim=3, gp_init_std=0.3)
        fresh.load_state_dict(model.state_dict())
        with torch.inference_mode():
            after, expected = model.posterior(x).variance, fresh.posterior(x).variance
        assert not torch.equal(before, after)
        torch.testing.assert_close(after, expected, rtol=0, atol=0)


class _ScriptedValidation:
    """Stands in for gpvae.training.estimate: records the images validated on and returns
    scripted validation ELBOs, epoch by epoch."""

    def __init__(self, elbos):
        self.elbos, self.seen = list(elbos), []

    def __call__(self, model, data, **kwargs):
        self.seen.append(data.batch(slice(None)))
        value = self.elbos[len(self.seen) - 1]

        class _E:
            def summary(self):
                return {"test_elbo": value}

        return _E()


def test_selection_validates_on_the_validation_split_and_keeps_the_best_epoch(tmp_path,
                                                                              monkeypatch):
    import gpvae.training as training
    from gpvae.data import load_splits

    cfg = _tiny(tmp_path / "run", epochs=3, split_seed=4, limit_test=50)
    scripted = _ScriptedValidation([-50.0, -10.0, -30.0])
    monkeypatch.setattr(training, "estimate", scripted)
    summary = _quiet(cfg)
    splits = load_splits("mnist", split_seed=4, limit_train=100, limit_test=50)
    valid = splits.valid.batch(slice(None))
    assert len(scripted.seen) == 3
    for seen in scripted.seen:
        assert torch.equal(seen, valid)
    assert summary["best_epoch"] == 2 and summary["best_valid_elbo"] == -10.0
    best, _, meta = read_checkpoint(tmp_path / "run" / "best.safetensors")
    assert meta["epoch"] == 2
    # the best checkpoint holds the weights after epoch 2: those of a 2-epoch run
    monkeypatch.setattr(training, "estimate", _ScriptedValidation([-50.0, -10.0]))
    _quiet(_tiny(tmp_path / "two", epochs=2, split_seed=4, limit_test=50))
    two, _, _ = read_checkpoint(tmp_path / "two" / "last.safetensors")
    assert best.keys() == two.keys()
    for k in best:
        assert torch.equal(best[k], two[k]), k


# --- non-finite gradients: stop before a NaN reaches a checkpoint ------------------------------
class _NanGradients(VAE):
    """A VAE whose loss stays finite but whose gradients turn NaN at training step ``at``."""

    calls, at = 0, 3

    def training_objective(self, x, n_train):
        type(self).calls += 1
        obj, diag = super().training_objective(x, n_train)
        if type(self).calls == type(self).at:
            w = next(self.decoder.parameters())
            obj = obj + 0.0 * torch.sqrt(w.sum() * 0.0)  # value 0, gradient 0 * inf = NaN
        return obj, diag


@pytest.mark.parametrize("at,epoch,named", [(2, 1, False), (3, 2, True)])
def test_nan_gradients_stop_before_any_nan_checkpoint(tmp_path, monkeypatch, at, epoch, named):
    monkeypatch.setitem(MODELS, "nangrad", _NanGradients)
    monkeypatch.setattr(_NanGradients, "calls", 0)
    monkeypatch.setattr(_NanGradients, "at", at)
    out = tmp_path / "r"
    cfg = _tiny(out, model="nangrad", epochs=3, limit_train=200, batch_size=100)
    with pytest.raises(TrainingDivergedError) as exc:
        _quiet(cfg)
    msg = str(exc.value)
    assert "gradient became non-finite" in msg and f"epoch {epoch}, step {2 - at % 2}" in msg
    if named:
        assert f"last good checkpoint is {out / 'last.safetensors'} (epoch 1)" in msg
        weights, _, meta = read_checkpoint(out / "last.safetensors")
        assert meta["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in weights.values())
    else:
        assert "no checkpoint was written" in msg and "last.safetensors" not in msg
        assert not (out / "last.safetensors").exists()


def test_a_nan_checkpoint_is_never_written(tmp_path):
    from gpvae.checkpoint import save_checkpoint
    from gpvae.errors import CheckpointError
    from gpvae.models import build_model

    model = build_model("vae", (1, 28, 28), latent_dim=2)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN/inf"):
        save_checkpoint(tmp_path / "c.safetensors", model, {})
    assert os.listdir(tmp_path) == []


# --- resume with fewer epochs; tiny data sets ----------------------------------------------
def test_resume_to_fewer_epochs_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "r"
    _quiet(_tiny(out, epochs=2))
    config = (out / "config.json").read_bytes()
    last = (out / "last.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        _quiet(_tiny(out, epochs=1), resume=True)
    logs = []
    summary = train(_tiny(out, epochs=2), resume=True, progress=False, log=logs.append)
    assert "nothing to do" in logs[-1] and summary["best_epoch"] in (1, 2)
    assert (out / "config.json").read_bytes() == config
    assert (out / "last.safetensors").read_bytes() == last


def test_resume_of_a_run_killed_in_its_first_epoch_starts_it(tmp_path):
    out = tmp_path / "r"
    _quiet(_tiny(out))
    for name in ("last.safetensors", "best.safetensors", "metrics.csv"):
        (out / name).unlink()  # as a kill during epoch 1 leaves it: config.json only
    with pytest.raises(ConfigError, match="already holds a run"):
        _quiet(_tiny(out))
    _quiet(_tiny(out), resume=True)
    assert read_checkpoint(out / "last.safetensors")[2]["epoch"] == 1


def test_a_data_set_too_small_for_a_validation_split_is_refused_up_front(tmp_path):
    import gzip

    import numpy as np

    from gpvae.errors import DataError

    data = tmp_path / "data"
    data.mkdir()
    for name, n in (("train-images-idx3-ubyte.gz", 4), ("t10k-images-idx3-ubyte.gz", 3)):
        header = np.array([0x803, n, 28, 28], dtype=">u4").tobytes()
        pixels = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
        with gzip.open(data / name, "wb") as f:
            f.write(header + pixels.tobytes())
    out = tmp_path / "r"
    with pytest.raises(DataError, match="4 training and 0 validation images"):
        _quiet(_tiny(out, data_dir=str(data), limit_train=None))
    assert not out.exists()


# --- issue 9 item 4: q(W, U)'s own learning rate; per-epoch model summaries --------------------
def _gp_names():
    from gpvae.models.gpvae import GPVAE

    return GPVAE.GP_PARAMETERS


def test_gp_lr_gives_q_wu_its_own_optimizer_group():
    from gpvae.models import build_model
    from gpvae.training import model_optimizer

    torch.manual_seed(0)
    model = build_model("gpvae", (1, 28, 28), latent_dim=3, likelihood="gaussian-learned",
                        gp_lr=2e-2)
    groups = model_optimizer(model, 5e-4).param_groups
    assert [g["lr"] for g in groups] == [5e-4, 2e-2]
    assert all(g["fused"] for g in groups)
    assert [id(p) for p in groups[1]["params"]] == [id(getattr(model, n)) for n in _gp_names()]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert set(grouped) == {id(p) for p in model.parameters()}
    assert id(model.likelihood.log_sigma) in {id(p) for p in groups[0]["params"]}
    # without gp_lr: the one group of before (runs written then resume unchanged)
    plain = build_model("gpvae", (1, 28, 28), latent_dim=3)
    (group,) = model_optimizer(plain, 5e-4).param_groups
    assert group["lr"] == 5e-4
    assert [id(p) for p in group["params"]] == [id(p) for p in plain.parameters()]


class _DroppingGroups(VAE):
    """param_groups that leave one parameter out."""

    def param_groups(self, lr):
        return [{"params": list(self.parameters())[1:], "lr": lr}]


class _RepeatingGroups(VAE):
    """param_groups that list one parameter twice (and leave another out)."""

    def param_groups(self, lr):
        params = list(self.parameters())
        return [{"params": params[:-1], "lr": lr}, {"params": params[:1], "lr": lr}]


@pytest.mark.parametrize("cls", [_DroppingGroups, _RepeatingGroups])
def test_model_optimizer_refuses_groups_that_miss_or_repeat_a_parameter(cls):
    from gpvae.models import VAEConfig
    from gpvae.training import model_optimizer

    with pytest.raises(ValueError, match="exactly once"):
        model_optimizer(cls(VAEConfig(latent_dim=2), (1, 28, 28)), 1e-3)


@pytest.mark.parametrize("gp_lr", [0.0, None])
def test_gp_lr_zero_holds_q_wu_while_the_networks_move(gp_lr):
    """Two Adam steps with gp_lr = 0: every q(W, U) parameter has a gradient and stays
    exactly where it was, every network parameter with a gradient moves; with gp_lr None
    (the networks' lr) q(W, U) moves too."""
    from gpvae.models import build_model
    from gpvae.training import model_optimizer

    torch.manual_seed(0)
    model = build_model("gpvae", (1, 28, 28), latent_dim=3, gp_init_std=0.05, gp_lr=gp_lr)
    opt = model_optimizer(model, 1e-2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        (-model.training_objective(x, 100)[0].mean()).backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        opt.step()
    after = dict(model.named_parameters())
    for name in _gp_names():
        assert grads[name].abs().sum() > 0, name
        assert torch.equal(after[name], before[name]) == (gp_lr == 0.0), name
    nets = [k for k in before if k not in _gp_names() and grads[k].abs().sum() > 0]
    assert len(nets) > 10
    for name in nets:
        assert not torch.equal(after[name], before[name]), name


def test_gpvae_with_gp_lr_resumes_exactly_and_logs_q_wu_every_epoch(tmp_path, monkeypatch):
    """A GPVAE with its own q(W, U) learning rate, stopped after epoch 1 and resumed to 2,
    ends with the weights, optimizer state and metrics.csv of a straight 2-epoch run;
    metrics.csv's header is the trainer's columns plus the model's epoch_summary keys (before
    ``seconds``) from the first epoch on, and each row's summaries are those of the weights
    after that epoch."""
    import functools

    import gpvae.data
    from gpvae.models import build_model
    from gpvae.training import METRIC_FIELDS

    # the three runs read the same images: load them once (the trainer only reads them)
    monkeypatch.setattr(gpvae.data, "load_splits",
                        functools.lru_cache(maxsize=None)(gpvae.data.load_splits))

    def cfg(out, epochs):
        return TrainConfig(out=str(tmp_path / out), model="gpvae",
                           model_options={"latent_dim": 2, "gp_lr": 3e-3}, epochs=epochs,
                           limit_train=40, batch_size=18, seed=2, device="cpu")

    def summary_of(path):
        model = build_model("gpvae", (1, 28, 28), latent_dim=2, gp_lr=3e-3)
        model.load_state_dict(read_checkpoint(path)[0])
        return model.epoch_summary()

    def rows(run):
        import csv

        with open(tmp_path / run / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    keys = ["gp_mu_norm", "gp_eta_norm", "gp_sigma_trace", "gp_gamma_trace", "gp_sigma_logdet",
            "gp_gamma_logdet"]
    header = ",".join(METRIC_FIELDS[:-1] + keys + ["seconds"])
    _quiet(cfg("full", 2))
    _quiet(cfg("split", 1))
    assert (tmp_path / "split" / "metrics.csv").read_text().splitlines()[0] == header
    epoch1 = summary_of(tmp_path / "split" / "last.safetensors")
    assert epoch1["gp_mu_norm"] > 0 and epoch1["gp_eta_norm"] > 0
    _quiet(cfg("split", 2), resume=True)
    a, a_opt, a_meta = read_checkpoint(tmp_path / "full" / "last.safetensors")
    b, b_opt, b_meta = read_checkpoint(tmp_path / "split" / "last.safetensors")
    assert a_meta["epoch"] == b_meta["epoch"] == 2
    assert [g["lr"] for g in a_meta["optimizer"]["param_groups"]] == [5e-4, 3e-3]
    assert a_meta["optimizer"] == b_meta["optimizer"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a_opt.keys() == b_opt.keys() and all(torch.equal(a_opt[k], b_opt[k]) for k in a_opt)
    for run in ("full", "split"):
        assert (tmp_path / run / "metrics.csv").read_text().splitlines()[0] == header
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(rows("full")) == strip(rows("split")) and len(rows("full")) == 2
    epoch2 = summary_of(tmp_path / "full" / "last.safetensors")
    for row, expected in zip(rows("full"), (epoch1, epoch2)):
        assert {k: float(row[k]) for k in keys} == expected
    assert epoch2 != epoch1


def test_metric_fields_of_a_model_without_summaries_are_the_trainers():
    from gpvae.models import build_model
    from gpvae.training import METRIC_FIELDS, metric_fields

    assert metric_fields(build_model("vae", (1, 28, 28), latent_dim=2)) == METRIC_FIELDS
    assert METRIC_FIELDS[-1] == "seconds"


def test_cli_gp_lr_reaches_the_run_and_old_configs_without_it_still_load(tmp_path):
    import json
    from dataclasses import asdict

    from gpvae.cli import _train_config, build_parser
    from gpvae.rundir import build_from_config, read_config
    from gpvae.training import model_optimizer

    args = build_parser().parse_args(["train", "--model", "gpvae", "--gp-lr", "0.002",
                                      "--out", str(tmp_path / "new")])
    cfg = _train_config(args)
    assert cfg.model_options == {"gp_lr": 0.002}
    assert len(model_optimizer(build_from_config(cfg, (1, 28, 28)), cfg.lr).param_groups) == 2
    # a config.json written before gp_lr existed
    old = tmp_path / "old"
    old.mkdir()
    raw = asdict(TrainConfig(out=str(old), model="gpvae",
                             model_options={"latent_dim": 2, "gp_init_std": 1e-3}))
    (old / "config.json").write_text(json.dumps(raw))
    model = build_from_config(read_config(old), (1, 28, 28))
    assert model.config.gp_lr is None
    assert len(model_optimizer(model, 5e-4).param_groups) == 1


def test_make_adam_falls_back_to_unfused_with_param_groups(monkeypatch):
    """Where the fused kernel is refused (its RuntimeError comes after Adam has written its
    settings, fused=True included, into the group dicts), the unfused fallback gets clean
    copies of the groups: unfused, each group's own lr kept, and it steps."""
    import gpvae.training as training

    real = torch.optim.Adam

    class NoFusedKernel(real):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            if kw.get("fused"):
                raise RuntimeError("`fused=True` requires ... supported devices")

    monkeypatch.setattr(training.torch.optim, "Adam", NoFusedKernel)
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    groups = [{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.0}]
    opt = training.make_adam(groups, 1e-3)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.0]
    assert not any(g["fused"] for g in opt.param_groups)
    (a.sum() + b.sum()).backward()
    opt.step()
    assert torch.allclose(a, torch.full((3,), 0.9)) and torch.equal(b, torch.ones(2))
    assert groups == [{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.0}]


def test_a_run_that_finished_no_epoch_may_restart_with_other_settings(tmp_path):
    """A run diverged or killed before its first epoch ended kept nothing: --resume may then
    change its settings (the divergence message says to), and the run equals a fresh one
    with the new settings; once an epoch is kept, changed settings are refused."""
    out = tmp_path / "r"
    with pytest.raises(TrainingDivergedError, match=r"--resume and a smaller --lr"):
        _quiet(_tiny(out, lr=1e12))
    assert not (out / "last.safetensors").exists()
    logs = []
    train(_tiny(out, lr=1e-3), resume=True, progress=False, log=logs.append)
    assert any("finished no epoch: starting it over with the new settings (lr 1000000000000.0 "
               "-> 0.001)" in m for m in logs), logs
    fresh = tmp_path / "fresh"
    _quiet(_tiny(fresh, lr=1e-3))
    a, b = (read_checkpoint(d / "last.safetensors")[0] for d in (out, fresh))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"\(lr 0.001 -> 0.002\).*another --out"):
        _quiet(_tiny(out, lr=2e-3, epochs=2), resume=True)
    # --limit-test decides only which test images are scored: it may change
    _quiet(_tiny(out, lr=1e-3, epochs=2, limit_test=10), resume=True)


@pytest.mark.parametrize("field,value", [("seed", None), ("seed", 1.5), ("seed", -1),
                                         ("seed", 2**64), ("split_seed", "x"), ("lr", "fast"),
                                         ("epochs", 0)])
def test_a_hand_edited_config_is_refused_in_one_line_naming_the_file(tmp_path, field, value):
    import json

    from gpvae.errors import CheckpointError
    from gpvae.rundir import read_config

    out = tmp_path / "r"
    _quiet(_tiny(out))
    raw = json.loads((out / "config.json").read_text())
    raw[field] = value
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config.json holds an invalid setting: --"):
        read_config(out)
    with pytest.raises(CheckpointError, match="invalid setting"):  # and --resume says so
        _quiet(_tiny(out, epochs=2), resume=True)


def test_weights_that_overflow_in_validation_stop_as_a_divergence(tmp_path):
    """One giant Adam step leaves the weights finite but q(z|x) of the validation images
    non-finite: a one-line TrainingDivergedError naming the epoch, not torch's traceback
    from inside the sampler."""
    with pytest.raises(TrainingDivergedError, match=r"q\(z\|x\) of the validation images "
                                                    r"became non-finite .* at epoch 1; no "
                                                    r"checkpoint"):
        _quiet(_tiny(tmp_path / "r", lr=1e12, batch_size=128))
    assert not (tmp_path / "r" / "last.safetensors").exists()
