"""Packed training (gpvae.packing): R runs of one cell as one vmapped computation give what
training.train gives run by run -- same weights, optimizer state, metrics, best epoch and
files up to float rounding -- with per-replica random streams, best epochs and divergence."""
import copy
import csv
import dataclasses
import json
import math
import os

import pytest
import torch
from torch.func import vmap

from gpvae import cholesky, special
from gpvae.checkpoint import read_checkpoint
from gpvae.data import ImageData, Splits
from gpvae.errors import ConfigError, TrainingDivergedError, UnsupportedError
from gpvae.models import MODELS, VAE, build_model
from gpvae.packing import Pack, ReplicaStreams, _ReplicaRandomness, pack_key, train_packed
from gpvae.rundir import TrainConfig
from gpvae.training import model_optimizer, train

N_TRAIN, N_VALID, BATCH = 40, 8, 20  # two steps per epoch, all of one size

# Tolerances of the float32 end-to-end comparisons (packed: grouped NCHW convolutions under
# vmap; alone: channels-last convolutions; the rounding differs).  Metrics and validation
# ELBOs: relative METRIC_RTOL (they agree to ~1e-7).  Adam moments: |packed - alone| <=
# ATOL_REL x the tensor's largest |value| + RTOL x |value|.  Weights: an absolute
# WEIGHT_ATOL, the learning rate, + RTOL x |value|: Adam's step lr m / (sqrt(v) + eps) is
# about lr sign(g) at first, so a gradient whose float32 rounding error exceeds its value
# moves a weight by up to 2 lr (seen: ~3% of lr); the float64 step test below checks the
# weights to float64 rounding.
ATOL_REL, RTOL, METRIC_RTOL, WEIGHT_ATOL = 2e-3, 1e-3, 1e-5, 5e-4


def _fake_splits(name, data_dir=None, *, split_seed=0, limit_train=None, limit_test=None,
                 **_):
    """Random uint8 images, a different partition for each split seed (no files read)."""
    g = torch.Generator().manual_seed(1000 + int(split_seed))

    def images(n):
        return ImageData(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8))

    return Splits(name="mnist", shape=(1, 28, 28), train=images(limit_train or N_TRAIN),
                  valid=images(N_VALID), test=images(4))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tests run many tiny ops, which two OpenMP threads on a
    busy 2-core machine slow down many times over (threads wait on each other at every op's
    barrier); the results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def fake_data(monkeypatch):
    import gpvae.data

    monkeypatch.setattr(gpvae.data, "load_splits", _fake_splits)


@pytest.fixture
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _cfg(out, model, options, seed, split_seed, **kw):
    kw = {"epochs": 2, "batch_size": BATCH, "limit_train": N_TRAIN, "device": "cpu", **kw}
    return TrainConfig(out=str(out), model=model, model_options={"latent_dim": 2, **options},
                       seed=seed, split_seed=split_seed, **kw)


def _close(packed, alone, what, rtol=RTOL, atol_rel=ATOL_REL, atol=1e-12):
    packed, alone = packed.double(), alone.double()
    scale = float(alone.abs().max()) if alone.numel() else 0.0
    torch.testing.assert_close(packed, alone, rtol=rtol, atol=atol_rel * scale + atol,
                               msg=lambda m: f"{what}: {m}")


def _rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_run(packed, alone):
    """The run directory ``packed`` holds what ``alone`` holds, up to float rounding."""
    assert sorted(os.listdir(packed)) == sorted(os.listdir(alone))
    cp, ca = (json.loads((run / "config.json").read_text()) for run in (packed, alone))
    assert {**cp, "out": None} == {**ca, "out": None}
    rp, ra = (_rows(run) if (run / "metrics.csv").exists() else [] for run in (packed, alone))
    assert len(rp) == len(ra) and all(list(a) == list(b) for a, b in zip(rp, ra))
    for row_p, row_a in zip(rp, ra):
        assert row_p["epoch"] == row_a["epoch"]
        for k in row_a:
            if k not in ("epoch", "seconds"):
                assert float(row_p[k]) == pytest.approx(float(row_a[k]), rel=METRIC_RTOL), k
    for name in ("last.safetensors", "best.safetensors"):
        if not (alone / name).exists():
            continue
        (mp, op, meta_p), (ma, oa, meta_a) = (read_checkpoint(run / name)
                                              for run in (packed, alone))
        assert list(mp) == list(ma) and list(op) == list(oa)
        for k in ma:
            _close(mp[k], ma[k], f"{name} {k}", atol_rel=0, atol=WEIGHT_ATOL)
        for k in oa:
            _close(op[k], oa[k], f"{name} {k}")
        assert meta_p["epoch"] == meta_a["epoch"]
        assert meta_p["best"]["epoch"] == meta_a["best"]["epoch"]
        assert meta_p["best"]["valid_elbo"] == pytest.approx(meta_a["best"]["valid_elbo"],
                                                             rel=METRIC_RTOL)
        assert meta_p.get("optimizer") == meta_a.get("optimizer")  # param groups, settings
        assert {**meta_p["config"], "out": None} == {**meta_a["config"], "out": None}


class _Offsets:
    """Validation ELBOs with a fixed offset per (run seed, epoch), the same for packed and
    alone runs, so that the replicas' best epochs differ: seeds 11 and 13 are best after
    epoch 1, seed 12 after epoch 2."""

    OFFSETS = {11: [0.0, -1e4], 12: [-1e4, 0.0], 13: [0.0, -1e4]}

    def __init__(self, estimate):
        self.estimate, self.calls = estimate, {}

    def __call__(self, model, data, **kw):
        est = self.estimate(model, data, **kw)
        k = self.calls.get(kw["seed"], 0)
        self.calls[kw["seed"]] = k + 1
        offset = self.OFFSETS[kw["seed"]][k]
        est.elbo = est.elbo + offset
        return est


# --------------------------------------------------------------------------------------
# End to end: packed runs are the runs trained one by one
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, options", [("vae", {"likelihood": "bernoulli"}),
                                            ("gpvae", {})])
def test_train_packed_equals_train_run_by_run(tmp_path, monkeypatch, fake_data, model,
                                              options):
    """Three replicas (two init seeds on one split, a third seed on another split), 2 epochs
    of 3 steps (16, 16 and 8 images): every file of every packed run matches training.train's
    run of the same config, each replica keeps its own best epoch."""
    import gpvae.training

    estimate = gpvae.training.estimate
    monkeypatch.setattr(gpvae.training, "estimate", _Offsets(estimate))
    runs = [(11, 0), (12, 0), (13, 1)]
    for i, (seed, split) in enumerate(runs):
        train(_cfg(tmp_path / f"alone{i}", model, options, seed, split, batch_size=16),
              progress=False)
    # packed runs validate through train's own end of epoch: the same offsets, counted anew
    monkeypatch.setattr(gpvae.training, "estimate", _Offsets(estimate))
    lines = []
    summaries = train_packed([_cfg(tmp_path / f"packed{i}", model, options, seed, split,
                                   batch_size=16) for i, (seed, split) in enumerate(runs)],
                             progress=False, log=lines.append)
    assert lines == []
    assert [s["best_epoch"] for s in summaries] == [1, 2, 1]
    assert [s["error"] for s in summaries] == [None] * 3
    for i in range(3):
        _assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")
        assert summaries[i]["run_dir"] == str(tmp_path / f"packed{i}")


def test_a_packed_run_resumes_with_train_like_any_other(tmp_path, fake_data):
    """Packed for epoch 1, then ``train(resume=True)`` to epoch 2: the run ends as one
    trained alone for 2 epochs."""
    packed = [_cfg(tmp_path / f"packed{i}", "vae", {}, seed, 0, epochs=1)
              for i, seed in enumerate((7, 8))]
    train_packed(packed, progress=False)
    train(dataclasses.replace(packed[1], epochs=2), resume=True, progress=False,
          log=lambda line: None)
    train(_cfg(tmp_path / "alone1", "vae", {}, 8, 0), progress=False)
    _assert_same_run(tmp_path / "packed1", tmp_path / "alone1")


class _Poisoned(VAE):
    """A VAE whose objective turns NaN at its third training step (epoch 2, step 1) if its
    initial weights say so (a buffer fixed at construction: it depends on the seed)."""

    def __init__(self, config, image_shape):
        super().__init__(config, image_shape)
        self.register_buffer("poisoned", (self.decoder.fc[0].bias[0] > 0).float())
        self.register_buffer("steps", torch.zeros(()))

    def training_objective(self, x, n_train):
        objective, diag = super().training_objective(x, n_train)
        self.steps.add_(1)
        bad = (self.steps == 3) & (self.poisoned > 0)
        return torch.where(bad, torch.full_like(objective, math.nan), objective), diag


def test_a_diverging_replica_stops_with_trains_error_and_the_others_go_on(tmp_path,
                                                                           monkeypatch,
                                                                           fake_data):
    monkeypatch.setitem(MODELS, "poisoned", _Poisoned)
    kinds = {}
    for seed in range(40):
        torch.manual_seed(seed)
        kinds.setdefault(bool(build_model("poisoned", (1, 28, 28), latent_dim=2).poisoned),
                         []).append(seed)
    runs = [(kinds[False][0], 0), (kinds[True][0], 1), (kinds[False][1], 1)]
    cfgs = {prefix: [_cfg(tmp_path / f"{prefix}{i}", "poisoned", {}, seed, split)
                     for i, (seed, split) in enumerate(runs)] for prefix in ("alone", "packed")}
    train(cfgs["alone"][0], progress=False)
    with pytest.raises(TrainingDivergedError) as alone_error:
        train(cfgs["alone"][1], progress=False)
    train(cfgs["alone"][2], progress=False)
    lines = []
    summaries = train_packed(cfgs["packed"], progress=False, log=lines.append)
    error = summaries[1]["error"]
    assert isinstance(error, TrainingDivergedError)
    assert "the training loss became nan at epoch 2, step 1 of 2" in str(error)
    assert str(error) == str(alone_error.value).replace("alone1", "packed1")
    assert lines == [f"{tmp_path / 'packed1'}: stopped: {error}"]
    assert summaries[1]["best_epoch"] == 1 and summaries[1]["last_valid_elbo"] is not None
    assert [summaries[i]["error"] for i in (0, 2)] == [None, None]
    assert [summaries[i]["best_epoch"] for i in (0, 2)] != [0, 0]
    for i in range(3):  # the stopped run's directory keeps epoch 1, as train() leaves it
        _assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")
    assert len(_rows(tmp_path / "packed1")) == 1 and len(_rows(tmp_path / "packed2")) == 2


def test_non_finite_weights_stop_each_replica_as_train_does(tmp_path, fake_data):
    """A learning rate that overflows float32: each replica's weights turn non-finite in the
    one step of epoch 1 (finite loss and gradients) and it stops with train's error."""
    cfgs = {prefix: [_cfg(tmp_path / f"{prefix}{i}", "vae", {}, seed, 0, lr=1e39,
                          batch_size=N_TRAIN) for i, seed in enumerate((4, 5))]
            for prefix in ("alone", "packed")}
    errors = []
    for i, cfg in enumerate(cfgs["alone"]):
        with pytest.raises(TrainingDivergedError, match="the weights became non-finite at "
                                                        "epoch 1; no checkpoint") as info:
            train(cfg, progress=False)
        errors.append(str(info.value).replace(f"alone{i}", f"packed{i}"))  # names its --out
    summaries = train_packed(cfgs["packed"], progress=False, log=lambda line: None)
    assert [str(s["error"]) for s in summaries] == errors
    assert [s["best_epoch"] for s in summaries] == [0, 0]
    for i in range(2):
        _assert_same_run(tmp_path / f"packed{i}", tmp_path / f"alone{i}")


# --------------------------------------------------------------------------------------
# The packed step, in float64: the same losses, gradients and Adam steps as each replica
# alone, to float64 rounding
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, options", [
    ("vae", {"likelihood": "bernoulli"}),
    ("gpvae", {}),
    ("gpvae", {"likelihood": "bernoulli", "gp_kl_expectation": "mc", "gp_kl_mc_samples": 2}),
])
def test_packed_steps_equal_each_replica_alone(float64, model, options):
    """Two steps (the random streams run on across steps) with an Adam step between, for
    three replicas with their own weights, batches and seeds: losses, diagnostics,
    gradients and updated weights equal each replica trained alone from a global seed."""
    seeds, stream_seeds, n_train, lr = [1, 2, 3], [101, 202, 303], 50, 1e-2
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(model, (1, 28, 28), latent_dim=2, **options))
    alone = [copy.deepcopy(m) for m in models]
    x = torch.rand(2, len(seeds), 4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = []
    for r, m in enumerate(alone):
        opt = model_optimizer(m, lr)
        torch.manual_seed(stream_seeds[r])
        steps = []
        for s in range(2):
            objective, diag = m.training_objective(m.likelihood.prepare(x[s, r]), n_train)
            loss = -objective.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            steps.append((loss.detach(), diag["rec"], diag["kl"],
                          {n: p.grad.clone() for n, p in m.named_parameters()}))
            opt.step()
        expected.append((steps, {n: p.detach().clone() for n, p in m.named_parameters()}))
    pack = Pack(models, lr, n_train, ReplicaStreams(stream_seeds))
    for s in range(2):
        loss, rec, kl = pack.losses(x[s])
        pack.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        for r in range(len(seeds)):
            e_loss, e_rec, e_kl, e_grads = expected[r][0][s]
            torch.testing.assert_close(loss[r], e_loss, rtol=1e-10, atol=0)
            torch.testing.assert_close(rec[r], e_rec, rtol=1e-10, atol=0)
            torch.testing.assert_close(kl[r], e_kl, rtol=1e-9, atol=1e-12)
            for name, g in e_grads.items():
                _close(pack.params[name].grad[r], g, f"step {s + 1} grad {name}", rtol=1e-8,
                       atol_rel=1e-10)
        pack.optimizer.step()
    for r in range(len(seeds)):
        for name, w in expected[r][1].items():
            # Adam's first steps are lr g / (|g| + eps): for |g| ~ eps a gradient's rounding
            # error e moves the weight by up to lr e / eps, hence the absolute tolerance
            _close(pack.params[name][r], w, f"weights {name}", rtol=1e-9, atol_rel=0,
                   atol=1e-8)


# --------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------
def _draws(p, mean):
    """Every kind of random call the replay handles (p, mean: (4,) each)."""
    return (torch.empty(2, 3).normal_(),   # in place on an unbatched tensor (Normal.rsample)
            torch.bernoulli(p),            # batched input (Bernoulli binarization)
            torch.randn(3),                # factory
            torch.randn_like(p),
            p.clone().uniform_(),          # in place on a batched tensor
            torch.normal(mean, 2.0),
            torch.rand(2, dtype=torch.float64))


@pytest.mark.parametrize("rows", [[0, 1, 2], [2, 0]])
def test_each_replica_draws_its_own_stream(rows):
    """Inside vmap each replica's draws are bit for bit what the same calls draw after
    torch.manual_seed(that replica's seed); ``rows`` maps pack positions to replicas (a pack
    after replicas were dropped)."""
    seeds = [5, 6, 7]
    gen = torch.Generator().manual_seed(0)
    p, mean = torch.rand(len(rows), 4, generator=gen), torch.randn(len(rows), 4, generator=gen)
    streams = ReplicaStreams(seeds)

    def one(p, mean):
        with _ReplicaRandomness(streams, rows):
            return _draws(p, mean)

    packed = vmap(one, randomness="error")(p, mean)
    for i, replica in enumerate(rows):
        torch.manual_seed(seeds[replica])
        for got, want in zip(packed, _draws(p[i], mean[i])):
            assert torch.equal(got[i], want)
    assert not torch.equal(packed[0][0], packed[0][1])


def test_random_calls_that_cannot_be_split_are_refused():
    streams = ReplicaStreams([1, 2])

    def own_generator(x):
        with _ReplicaRandomness(streams, [0, 1]):
            return x + torch.randn(3, generator=torch.Generator())

    with pytest.raises(UnsupportedError, match="with its own torch.Generator"):
        vmap(own_generator, randomness="error")(torch.zeros(2, 3))

    def ignores_the_result(x):  # an in-place draw into an unbatched tensor, result unused
        with _ReplicaRandomness(streams, [0, 1]):
            eps = torch.empty(3)
            eps.normal_()
            return x + eps

    assert vmap(ignores_the_result, randomness="error")(torch.zeros(2, 3)).isnan().all()


class _Dropout(VAE):
    def training_objective(self, x, n_train):
        return super().training_objective(torch.nn.functional.dropout(x, 0.1), n_train)


class _Branching(VAE):
    def training_objective(self, x, n_train):
        objective, diag = super().training_objective(x, n_train)
        return (objective if objective.mean() > -1e30 else -objective), diag


class _NotPackable(VAE):
    @classmethod
    def packable(cls):
        return False


@pytest.mark.parametrize("name, cls, message", [
    ("dropout", _Dropout, "draws random numbers through an operation packed training does "
                          "not replay per replica"),
    ("branching", _Branching, "vmap fails on its training step"),
    ("sa", None, r"sa runs cannot be trained packed \(vmap cannot batch its training step: "
                 r"SA.packable\(\) is False\)"),
    ("declared", _NotPackable, r"declared runs cannot be trained packed \(vmap cannot batch "
                               r"its training step: _NotPackable.packable\(\) is False\)"),
])
def test_methods_that_cannot_be_packed_are_refused_before_any_work(tmp_path, monkeypatch,
                                                                   fake_data, name, cls,
                                                                   message):
    if cls is not None:
        monkeypatch.setitem(MODELS, name, cls)
    cfgs = [_cfg(tmp_path / f"r{i}", name, {}, i, 0) for i in range(2)]
    with pytest.raises(UnsupportedError, match=message):
        train_packed(cfgs, progress=False)
    assert os.listdir(tmp_path) == []


def test_packs_are_fp32_only(tmp_path):
    """The packed trainer has no autocast: a bf16 pack would train in fp32 while its
    config.json said bf16, so it is refused before any work."""
    cfgs = [dataclasses.replace(_cfg(tmp_path / f"r{i}", "vae", {}, i, 0), precision="bf16")
            for i in range(2)]
    with pytest.raises(UnsupportedError, match="fp32 only"):
        train_packed(cfgs, progress=False)
    assert os.listdir(tmp_path) == []


def test_packs_must_differ_only_in_out_and_seeds(tmp_path):
    a = _cfg(tmp_path / "a", "vae", {}, 1, 0)
    b = _cfg(tmp_path / "b", "vae", {}, 2, 3)
    assert pack_key(a) == pack_key(b)
    for change in ({"lr": 1e-3}, {"model_options": {"latent_dim": 3}}, {"epochs": 3}):
        c = dataclasses.replace(b, **change)
        assert pack_key(c) != pack_key(a)
        with pytest.raises(ConfigError, match=f"{next(iter(change))} differ between"):
            train_packed([a, c], progress=False)
    with pytest.raises(ConfigError, match="write the same directory"):
        train_packed([a, dataclasses.replace(b, out=a.out)], progress=False)
    with pytest.raises(ConfigError, match="non-empty list"):
        train_packed([], progress=False)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------
# vmap rules of the GPVAE's custom autograd Functions: vmap over replicas gives, forward and
# backward, what a Python loop over the replicas gives
# --------------------------------------------------------------------------------------
def _vmap_equals_loop(fn, args, in_dims, reps, weights, rtol=1e-12):
    """vmap(fn, in_dims)(*args) and [fn(replica r's args) for r] agree: outputs, and the
    gradients of sum_r <weights[r], outputs_r> (an output whose weight is None left out)
    with respect to every tensor in ``args`` that requires grad (an argument with in_dim
    None is shared by all replicas: its gradient is the sum over them)."""
    def rows(r):
        return [a.select(d, r) if d is not None else a for a, d in zip(args, in_dims)]

    def weighted(outs, w):
        return sum((o * wo).sum() for o, wo in zip(outs, w) if wo is not None)

    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    got = vmap(fn, in_dims=in_dims)(*args)
    got_grads = torch.autograd.grad(weighted(got, weights), inputs)
    want = [fn(*rows(r)) for r in range(reps)]
    want_grads = torch.autograd.grad(
        sum(weighted(w, [None if wo is None else wo[r] for wo in weights])
            for r, w in enumerate(want)), inputs)
    for k, out in enumerate(got):
        for r in range(reps):
            torch.testing.assert_close(out[r], want[r][k], rtol=rtol, atol=rtol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol)


def _blocked_factors(reps, d, p, b, g, dt=torch.float64):
    log_diag = (0.3 * torch.randn(reps, d, p, generator=g, dtype=dt)).requires_grad_()
    blocks = torch.randn(reps, cholesky.chol_storage_rows(p, b), d, b, generator=g, dtype=dt,
                         requires_grad=True)
    return log_diag, blocks


@pytest.mark.parametrize("with_frobenius", [True, False])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("loss", ["q+f", "q", "f"])
def test_vmap_of_the_blocked_quadratic_form_equals_a_loop_over_replicas(with_frobenius,
                                                                         shared, loss):
    """cholesky._BlockedCholeskyQuadratic under vmap (its rule:
    _StackedBlockedCholeskyQuadratic, all replicas in one pass) = the Function per replica:
    q and f, and the gradients in psi, log_diag and blocks of a loss of both or of one of
    them (the other's gradient None in backward).  psi is vmapped along its second
    dimension, the mask is stacked per replica (as the model's buffer is in a pack);
    ``shared``: one log_diag for all replicas (not vmapped: its gradient sums theirs)."""
    reps, lead, d, p, b = 3, (2, 3), 4, 12, 4
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    psi = torch.randn(lead[0], reps, lead[1], p, generator=g, dtype=dt, requires_grad=True)
    log_diag, blocks = _blocked_factors(reps, d, p, b, g)
    if shared:
        log_diag = log_diag[0].detach().requires_grad_()
    mask = cholesky.strict_lower_mask(b, blocks).expand(reps, 1, b, 1, b)
    weights = (torch.randn(reps, *lead, d, generator=g, dtype=dt) if "q" in loss else None,
               torch.randn(reps, generator=g, dtype=dt) if "f" in loss else None)

    def quad(psi, log_diag, blocks, mask):
        return cholesky._quadratic_and_frobenius(psi, log_diag, blocks, b, mask,
                                                 with_frobenius)

    _vmap_equals_loop(quad, (psi, log_diag, blocks, mask), (1, None if shared else 0, 0, 0),
                      reps, weights)
    # and the stacked Function called directly, psi's replica dimension first
    q, f = cholesky._StackedBlockedCholeskyQuadratic.apply(
        psi.transpose(0, 1), log_diag.expand(reps, d, p), blocks, b,
        cholesky.strict_lower_mask(b, blocks), with_frobenius)[:2]
    for r in range(reps):
        qr, fr = quad(psi[:, r], log_diag if shared else log_diag[r], blocks[r], None)
        torch.testing.assert_close(q[r], qr, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f[r], fr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_vmap_of_the_blocked_frobenius_norm_equals_a_loop_over_replicas(shared):
    """cholesky._BlockedFrobenius under vmap (its rule: one call per replica) = the Function
    per replica, value and gradients; ``shared``: one blocks tensor for all replicas."""
    reps, d, p, b = 3, 2, 8, 4
    g = torch.Generator().manual_seed(1)
    log_diag, blocks = _blocked_factors(reps, d, p, b, g)
    if shared:
        blocks = blocks[0].detach().requires_grad_()

    def frob(log_diag, blocks):
        return (cholesky.blocked_frobenius(log_diag, blocks, b),)

    _vmap_equals_loop(frob, (log_diag, blocks), (0, None if shared else 0), reps,
                      (torch.randn(reps, generator=g, dtype=torch.float64),))


@pytest.mark.parametrize("in_dims", [(0, 0), (1, None), (None, 0)])
def test_vmap_of_the_closed_form_expected_log_square_equals_a_loop_over_replicas(monkeypatch,
                                                                                  in_dims):
    """special._ExpectedLogSquare under vmap (its rule: element-wise, one call on the
    stacked operands) = the Function per replica, values and gradients in a and s2, on both
    branches (t = a^2 / (2 s2) below and above T_SWITCH); one operand shared (in_dim None)
    or vmapped along another dimension.  The rule computes the derivatives with the values
    exactly when autograd needs them (a tensor batched by vmap says requires_grad False)."""
    reps, n = 3, 40
    g = torch.Generator().manual_seed(2)
    dt = torch.float64
    shape = {0: (reps, n), 1: (n, reps), None: (n,)}
    a = (10.0 * torch.randn(shape[in_dims[0]], generator=g, dtype=dt)).requires_grad_()
    s2 = (0.01 + torch.rand(shape[in_dims[1]], generator=g, dtype=dt)).requires_grad_()

    def els(a, s2):
        return (special.expected_log_square(a, s2),)

    t = vmap(lambda a, s2: a.square() / (2.0 * s2), in_dims=in_dims)(a, s2)
    assert (t < special.T_SWITCH).sum(1).min() > 5 and (t > special.T_SWITCH).sum(1).min() > 5
    _vmap_equals_loop(els, (a, s2), in_dims, reps, (torch.randn(reps, n, generator=g,
                                                                dtype=dt),))
    needs = []
    exact = special._exact_with_grads

    def recorded(a, s2, need_grad, *args):
        needs.append(need_grad)
        return exact(a, s2, need_grad, *args)

    monkeypatch.setattr(special, "_exact_with_grads", recorded)
    with_grad = vmap(lambda a, s2: els(a, s2)[0], in_dims=in_dims)(a, s2)
    with torch.no_grad():
        without = vmap(lambda a, s2: els(a, s2)[0], in_dims=in_dims)(a, s2)
    assert needs == [True, False]
    assert with_grad.requires_grad and not without.requires_grad
    assert torch.equal(with_grad.detach(), without)
