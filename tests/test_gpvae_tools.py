"""GPVAE tooling: the exported fused encoder, uncertainty CLI, inference benchmark, compare."""
import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from gpvae.data import ImageData
from gpvae.export import export_encoder
from gpvae.models import LatentVariableModel, ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]


def _trained_like_gpvae(d=6, seed=0):
    """A GPVAE with non-trivial q(W,U) (random mu, eta, Cholesky factors)."""
    torch.manual_seed(seed)
    model = build_model("gpvae", (1, 28, 28), latent_dim=d)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("mu", "eta"):
                p.normal_(0, 0.05)
            elif "offdiag" in name:
                p.normal_(0, 0.01)
            elif "log_diag" in name:
                p.uniform_(-4, -2)
    return model.eval()


def _dense_uncertainty(model, x):
    """Brute force (float64): Tr V(f(x)|D) = psi^m^T (sum_j L_j L_j^T) psi^m and Tr V(h(x)|D)
    likewise, from the dense factors of ``model.cholesky_factors()`` and its features."""
    with torch.no_grad():
        feats = model.features(x)
        out = []
        for psi, chol in zip((feats["psi_m"], feats["psi_s"]), model.cholesky_factors()):
            chol, psi = chol.double(), psi.double()
            out.append(torch.einsum("bk,kl,bl->b", psi, (chol @ chol.mT).sum(0), psi))
    return out


def _average_ranks(values):
    """Ranks 1..n by hand; tied values share the mean of the ranks they span."""
    v = [float(t) for t in values]
    order = sorted(range(len(v)), key=v.__getitem__)
    ranks, i = [0.0] * len(v), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman_by_hand(a, b):
    """Pearson correlation of the average ranks."""
    ra, rb = (torch.tensor(_average_ranks(t), dtype=torch.float64) for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.square().sum() * rb.square().sum()).sqrt())


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageData(torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8))


def test_spearman_matches_hand_computed_rank_correlations():
    from gpvae.uncertainty import spearman

    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    # no ties: 1 - 6 sum d_i^2 / (n (n^2 - 1)) = 1 - 6 * 4 / 120
    assert spearman(a, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8, abs=1e-12)
    # ties: b's ranks are (1, 2, 3.5, 5, 3.5); centred, sum of products 8, of squares 10, 9.5
    assert spearman(a, torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])) == pytest.approx(
        8 / math.sqrt(95), abs=1e-12)
    # ranks, not values: any increasing transform gives 1 (Pearson's r here is 0.73)
    assert spearman(a, torch.exp(3 * a)) == pytest.approx(1.0, abs=1e-12)
    # the hand-written reference used below, on data with many ties
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (60,), generator=g).double()
    y = x + torch.randint(0, 4, (60,), generator=g).double()
    assert spearman(x, y) == pytest.approx(_spearman_by_hand(x, y), abs=1e-12)


def test_instance_uncertainty_is_the_variance_of_the_random_encoder_functions():
    """Sec. 3.3 step 3, batch by batch (7 images in batches of 3): Tr V(f(x)|D) and
    Tr V(h(x)|D) equal psi^T (sum_j Sigma_j) psi from dense Sigma_j = L_j L_j^T, and the
    summed variance of f(x) = b + W psi^m, h(x) = c + U psi^s over 4000 draws of
    (W, U) ~ q(W, U) (eq. 11), within 5 Monte Carlo standard errors (~5%)."""
    from gpvae.uncertainty import instance_uncertainty

    model, data = _trained_like_gpvae(), _images(7)
    u = instance_uncertainty(model, data, batch_size=3, progress=False)
    x = data.batch(slice(None))
    tr_f, tr_h = _dense_uncertainty(model, x)
    torch.testing.assert_close(u["tr_f"], tr_f, rtol=1e-4, atol=0)
    torch.testing.assert_close(u["tr_h"], tr_h, rtol=1e-4, atol=0)
    torch.testing.assert_close(u["total"], tr_f + tr_h, rtol=1e-4, atol=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        feats = model.features(x)
        for key, mean, chol, psi in zip(("tr_f", "tr_h"), (model.mu, model.eta),
                                        model.cholesky_factors(), (feats["psi_m"], feats["psi_s"])):
            eps = torch.randn(4000, *mean.shape, generator=g, dtype=torch.float64)
            # w_j = mu_j + L_j e_j, so f(x) - E f(x) = (W - mu) psi^m
            W = mean.double() + torch.einsum("jkl,sjl->sjk", chol.double(), eps)
            dev = torch.einsum("sjk,bk->sbj", W - mean.double(), psi.double())
            dev2 = dev.square().sum(-1)  # (S, B): summed over j
            se = dev2.std(0) / math.sqrt(dev2.shape[0])
            assert torch.all((dev2.mean(0) - u[key]).abs() <= 5 * se), (key, dev2.mean(0), u[key])


def test_uncertainty_report_rows_and_summary():
    """Each row: the brute-force uncertainties and estimate()'s IWAE, ELBO and their gap;
    the summary: numpy's statistics of the rows and the hand-computed Spearman correlation
    of total uncertainty and gap."""
    from gpvae.evaluation import estimate
    from gpvae.uncertainty import uncertainty_report

    model, data = _trained_like_gpvae(), _images(9)
    rows, summary, _ = uncertainty_report(model, data, device="cpu", gap_samples=5, seed=3,
                                          progress=False)

    def col(key):
        return torch.tensor([r[key] for r in rows], dtype=torch.float64)

    assert [r["index"] for r in rows] == list(range(9)) and summary["n"] == 9
    tr_f, tr_h = _dense_uncertainty(model, data.batch(slice(None)))
    torch.testing.assert_close(col("tr_f"), tr_f, rtol=1e-4, atol=0)
    torch.testing.assert_close(col("tr_h"), tr_h, rtol=1e-4, atol=0)
    torch.testing.assert_close(col("total"), tr_f + tr_h, rtol=1e-4, atol=0)
    est = estimate(model, data, samples=5, seed=3, progress=False)
    torch.testing.assert_close(col("iwae"), est.iwae, rtol=0, atol=0)
    torch.testing.assert_close(col("gap"), est.iwae - est.elbo, rtol=0, atol=0)
    assert summary["gap_samples"] == 5
    for key in ("tr_f", "tr_h", "total", "gap"):
        v, s = col(key).numpy(), summary[key]
        ref = {"mean": v.mean(), "sd": v.std(ddof=1), "min": v.min(), "max": v.max(),
               "median": np.median(v), "p05": np.quantile(v, 0.05),
               "p95": np.quantile(v, 0.95)}
        assert s == pytest.approx(ref, rel=1e-12), key
    assert summary["spearman_total_vs_gap"] == pytest.approx(
        _spearman_by_hand(col("total"), col("gap")), abs=1e-12)


def test_exported_encoder_matches_in_a_process_without_gpvae(tmp_path):
    model = _trained_like_gpvae()
    path = export_encoder(model, tmp_path / "enc.pt2")
    x = torch.rand(5, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        m, v = model.marginal_moments(x)
    torch.save({"m": m, "v": v}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        enc = torch.export.load({str(path)!r}).module()
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
        m, v = enc(x)
        assert not any(k == "gpvae" or k.startswith("gpvae.") for k in sys.modules), "gpvae imported"
        print((m - ref["m"]).abs().max().item(), (v - ref["v"]).abs().max().item(),
              ((v - ref["v"]).abs() / ref["v"]).max().item())
        m7, v7 = enc(torch.rand(7, 1, 28, 28))   # the batch dimension is dynamic
        assert m7.shape == (7, {model.latent_dim}) and v7.shape == m7.shape
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    dm, dv, rel_v = map(float, r.stdout.split())
    assert dm < 1e-5 and dv < 1e-5 and rel_v < 1e-4, (dm, dv, rel_v)


def test_vae_encoder_exports_too(tmp_path):
    torch.manual_seed(0)
    model = build_model("vae", (1, 28, 28), latent_dim=3).eval()
    enc = torch.export.load(str(export_encoder(model, tmp_path / "vae.pt2"))).module()
    x = torch.rand(2, 1, 28, 28)
    q = model.posterior(x)
    m, v = enc(x)
    torch.testing.assert_close(m, q.mean)
    torch.testing.assert_close(v, q.variance)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "gpvae", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_train_gpvae_then_uncertainty_and_export_cli(tmp_path):
    run = tmp_path / "gp"
    r = _cli("train", "--dataset", "mnist", "--model", "gpvae", "--latent-dim", "4",
             "--epochs", "1", "--limit-train", "300", "--out", str(run), "--no-progress",
             "--gp-init-std", "0.01")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["model_options"]["gp_init_std"] == 0.01
    r = _cli("uncertainty", str(run), "--limit-test", "40", "--gap-samples", "10", "--json",
             "--no-progress", "--png", str(tmp_path / "u.png"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    lines = (run / "uncertainty.csv").read_text().splitlines()
    assert lines[0].startswith("index,tr_f,tr_h,total") and len(lines) == 41
    rows = list(csv.DictReader(lines))

    def col(key):
        return torch.tensor([float(row[key]) for row in rows], dtype=torch.float64)

    # the run's best checkpoint on its first 40 test images, against brute force
    from gpvae.data import load_splits
    from gpvae.rundir import load_run

    model, cfg = load_run(run, "best", "cpu")
    test = load_splits("mnist", split_seed=cfg.split_seed, limit_train=1, limit_test=40).test
    tr_f, tr_h = _dense_uncertainty(model, test.batch(slice(None)))
    torch.testing.assert_close(col("tr_f"), tr_f, rtol=1e-4, atol=0)
    torch.testing.assert_close(col("total"), tr_f + tr_h, rtol=1e-4, atol=0)
    assert summary["n"] == 40
    assert summary["total"]["mean"] == pytest.approx(float(col("total").mean()), rel=1e-12)
    assert summary["spearman_total_vs_gap"] == pytest.approx(
        _spearman_by_hand(col("total"), col("gap")), abs=1e-12)
    assert (tmp_path / "u.png").stat().st_size > 0
    r = _cli("export", str(run))
    assert r.returncode == 0 and (run / "encoder.pt2").exists(), r.stderr
    # an option that belongs to another model is refused, in one line
    r = _cli("train", "--out", str(tmp_path / "v"), "--model", "vae", "--gp-init-std", "0.1")
    assert r.returncode == 2 and "not an option of model 'vae'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_uncertainty_of_a_vae_run_is_a_clear_error(tmp_path):
    run = tmp_path / "v"
    assert _cli("train", "--model", "vae", "--latent-dim", "2", "--epochs", "1",
                "--limit-train", "100", "--out", str(run), "--no-progress").returncode == 0
    r = _cli("uncertainty", str(run), "--limit-test", "5")
    assert r.returncode == 2 and "GPVAE" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _gpvae_encoder_flops(model) -> int:
    """FLOPs of one image's q(z|x) as documented in bench._encoder_floor_flops, recounted:
    three networks (forward_flops, checked against FlopCounterMode below) + mu^T psi^m,
    eta^T psi^s (2 x 2dp) + the 2d symmetric quadratic forms (2 x (2d + 1) p (p + 1) / 2)."""
    from gpvae.flops import forward_flops

    x = torch.zeros(1, *model.image_shape)
    d, p = model.latent_dim, model.arch.hidden
    return (sum(forward_flops(net, x) for net in (model.encoder, model.psi_m, model.psi_s))
            + 4 * d * p + (2 * d + 1) * p * (p + 1))


def test_bench_inference_json_reports_ratios_and_flop_floor():
    from gpvae.flops import forward_flops

    r = _cli("bench-inference", "--models", "vae,gpvae", "--latent-dim", "8", "--limit-test",
             "256", "--repeats", "1", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["batches"] == 2 and out["batch_size"] == 128
    vae, gp = out["models"]["vae"], out["models"]["gpvae"]
    assert vae["flops_per_image"] == forward_flops(build_model("vae", (1, 28, 28), latent_dim=8)
                                                   .encoder, torch.zeros(1, 1, 28, 28))
    assert gp["flops_per_image"] == _gpvae_encoder_flops(build_model("gpvae", (1, 28, 28),
                                                                     latent_dim=8))
    assert gp["flop_ratio_to_vae"] == pytest.approx(gp["flops_per_image"] / vae["flops_per_image"])
    assert gp["flop_ratio_to_vae"] > 3  # three networks + eq. 13
    assert gp["ratio_to_vae"] == pytest.approx(gp["ms_per_batch"] / vae["ms_per_batch"])


class _SleepyModel(LatentVariableModel):
    """Stands in for build_model in the benchmarks: q(z|x) and the training objective take
    ``ms`` milliseconds per call (time.sleep sleeps at least that long)."""

    def __init__(self, ms, latent_dim):
        super().__init__(ModelConfig(latent_dim=latent_dim), (1, 28, 28))
        self.ms = ms
        self.encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, latent_dim))
        self.decoder = torch.nn.Linear(latent_dim, 784)
        self.scale = torch.nn.Parameter(torch.ones(()))  # the only trained parameter

    def posterior(self, x):
        time.sleep(self.ms / 1e3)
        z = x.new_zeros(x.shape[0], self.latent_dim)
        return Independent(Normal(z, torch.ones_like(z)), 1)

    def training_objective(self, x, n_train):
        time.sleep(self.ms / 1e3)
        return self.scale * x.new_ones(x.shape[0]), {}


def test_bench_inference_decoder_flag_reaches_the_models():
    """--decoder fc builds every model with the FC decoder (VLAE's floor depends on it: its
    Jacobian runs through the decoder), and GFLOP/s is the floor over the measured time."""
    r = _cli("bench-inference", "--models", "vae,vlae:1", "--decoder", "fc", "--latent-dim",
             "2", "--limit-test", "128", "--repeats", "1", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["decoder"] == "fc"
    vlae = out["models"]["vlae:1"]
    fc = build_model("vlae", (1, 28, 28), latent_dim=2, decoder="fc").posterior_flops(1)
    conv = build_model("vlae", (1, 28, 28), latent_dim=2).posterior_flops(1)
    assert vlae["flops_per_image"] == fc != conv
    assert vlae["gflops_per_s"] == pytest.approx(fc * 128 / vlae["ms_per_batch"] / 1e6)


def test_bench_times_are_per_batch_and_per_step(monkeypatch):
    """bench-inference and bench-train on models of known speed (20 and 60 ms per call):
    milliseconds per batch of q(z|x) over 3 batches (300 images) and per training step over
    3 steps, their ratio, not the time of a whole pass or round.  The lower bounds are firm
    (sleep never returns early); the upper ones leave 75% for a busy machine."""
    from gpvae import bench

    ms = {"vae": 20, "gpvae": 60}
    monkeypatch.setattr(bench, "build_model",
                        lambda name, shape, latent_dim, **_: _SleepyModel(ms[name], latent_dim))
    args = SimpleNamespace(device="cpu", models="gpvae", dataset="mnist", data_dir=None,
                           decoder="conv",
                           batch_size=128, limit_test=300, latent_dim=2, repeats=3, steps=3,
                           json=True, profile=False)
    out = bench.bench_inference(args)
    assert out["batches"] == 3
    res = out["models"]
    for name in ms:
        assert ms[name] <= res[name]["ms_per_batch"] < 1.75 * ms[name], (name, res)
    assert res["gpvae"]["ratio_to_vae"] == pytest.approx(res["gpvae"]["ms_per_batch"]
                                                         / res["vae"]["ms_per_batch"])
    args.batch_size = 8
    res = bench.bench_train(args)["models"]
    for name in ms:
        assert ms[name] <= res[name]["ms_per_step"] < 1.75 * ms[name], (name, res)
    assert res["gpvae"]["ratio_to_vae"] == pytest.approx(res["gpvae"]["ms_per_step"]
                                                         / res["vae"]["ms_per_step"])


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_flop_counts_match_torch_flop_counter(shape):
    """The analytic counts behind every 'FLOP floor' equal PyTorch's own FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    from gpvae.flops import forward_flops

    model = build_model("gpvae", shape, latent_dim=10)
    for net, x in ((model.encoder, torch.zeros(2, *shape)), (model.psi_m, torch.zeros(2, *shape)),
                   (model.decoder, torch.zeros(2, 10))):
        with FlopCounterMode(display=False) as counter:
            net(x)
        assert forward_flops(net, x) == counter.get_total_flops() > 0


def test_bench_train_and_quadratic_json():
    from gpvae.flops import forward_flops

    r = _cli("bench-train", "--models", "gpvae", "--latent-dim", "8", "--steps", "1",
             "--repeats", "1", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["models"]) == {"vae", "gpvae"}
    vae, gp = out["models"]["vae"], out["models"]["gpvae"]
    # one example's forward: q(z|x) plus one decoder pass
    model = build_model("gpvae", (1, 28, 28), latent_dim=8)
    decoder = forward_flops(model.decoder, torch.zeros(1, 8))
    assert gp["flops_per_image"] == _gpvae_encoder_flops(model) + decoder
    assert vae["flops_per_image"] == forward_flops(model.encoder,
                                                   torch.zeros(1, 1, 28, 28)) + decoder
    assert gp["flop_ratio_to_vae"] == pytest.approx(gp["flops_per_image"] / vae["flops_per_image"])
    assert gp["flop_ratio_to_vae"] > 2  # three encoders + one decoder
    assert gp["ratio_to_vae"] == pytest.approx(gp["ms_per_step"] / vae["ms_per_step"])
    r = _cli("bench-quadratic", "--latent-dims", "4", "--blocks", "8,16", "--features", "32",
             "--repeats", "1", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)["rows"][0]
    assert {"chol_ms", "blocked_ms", "packed_b8_ms", "packed_b16_ms"} <= set(row)


def test_bench_profile_prints_where_the_time_goes_and_refuses_json():
    r = _cli("bench-train", "--models", "gpvae", "--latent-dim", "4", "--steps", "1",
             "--repeats", "1", "--device", "cpu", "--profile")
    assert r.returncode == 0, r.stderr
    assert "gpvae: where the time goes" in r.stdout and "Self CPU" in r.stdout
    r = _cli("bench-inference", "--profile", "--json")
    assert r.returncode == 2 and "--profile" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_layout_script_runs():
    """scripts/bench_layout.py produces the layout table quoted in docs/benchmarks.md."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench_layout.py")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "NCHW: encoder trunk" in r.stdout and "NHWC: encoder trunk" in r.stdout


def test_instance_uncertainty_of_a_float64_model():
    """Batches are cast to the model's dtype (a float64 model used to crash here)."""
    import copy

    from gpvae.uncertainty import instance_uncertainty

    model, data = _trained_like_gpvae(), _images(5)
    u32 = instance_uncertainty(model, data, batch_size=2, progress=False)
    u64 = instance_uncertainty(copy.deepcopy(model).double(), data, batch_size=2,
                               progress=False)
    assert u64["total"].dtype == torch.float64
    torch.testing.assert_close(u64["total"], u32["total"], rtol=1e-4, atol=0)


def test_bench_gp_quadratic_both_times_the_blocked_and_the_dense_forms_side_by_side(
        monkeypatch):
    """--gp-quadratic both: a +dense row for the GPVAE only (the VAE has no quadratic forms),
    each ratio to the VAE, the same FLOP floor; the +dense row's model computes the dense
    form and the plain row's does not."""
    import gpvae.models.gpvae as gpvae_module
    from gpvae import bench

    calls = []
    real = gpvae_module.dense_quadratic_and_frobenius
    monkeypatch.setattr(gpvae_module, "dense_quadratic_and_frobenius",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    common = dict(dataset="mnist", data_dir=None, models="gpvae", latent_dim=2, batch_size=2,
                  repeats=1, device="cpu", json=True, profile=False, decoder="conv",
                  compile="off", fused_trunks="off", gp_quadratic="both")
    for out in (bench.bench_inference(SimpleNamespace(**common, limit_test=3)),
                bench.bench_train(SimpleNamespace(**common, steps=1))):
        rows = out["models"]
        assert list(rows) == ["vae", "gpvae", "gpvae+dense"] and out["gp_quadratic"] == "both"
        assert [r["dense_quadratic_forms"] for r in rows.values()] == [False, False, True]
        key = "ms_per_batch" if "ms_per_batch" in rows["vae"] else "ms_per_step"
        dense = rows["gpvae+dense"]
        assert dense["ratio_to_vae"] == pytest.approx(dense[key] / rows["vae"][key])
        assert dense["flops_per_image"] == rows["gpvae"]["flops_per_image"]
    assert calls  # the +dense rows ran the dense form...
    calls.clear()
    bench.bench_inference(SimpleNamespace(**{**common, "gp_quadratic": "blocked"},
                                          limit_test=3))
    assert not calls  # ...and the default rows never do
