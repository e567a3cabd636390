"""GPVAE tooling: the exported fused encoder, uncertainty CLI, inference benchmark, compare."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gpvae.export import export_encoder
from gpvae.models import build_model

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
    assert summary["n"] == 40 and summary["total"]["mean"] > 0
    assert -1 <= summary["spearman_total_vs_gap"] <= 1
    lines = (run / "uncertainty.csv").read_text().splitlines()
    assert lines[0].startswith("index,tr_f,tr_h,total") and len(lines) == 41
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


def test_bench_inference_json_reports_ratios_and_flop_floor():
    r = _cli("bench-inference", "--models", "vae,gpvae", "--latent-dim", "8", "--limit-test",
             "256", "--repeats", "1", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["models"]["vae"]["ratio_to_vae"] == 1.0
    gp = out["models"]["gpvae"]
    assert gp["ms_per_batch"] > 0 and gp["flop_ratio_to_vae"] > 3  # three networks + eq. 13


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
    r = _cli("bench-train", "--models", "gpvae", "--latent-dim", "8", "--steps", "1",
             "--repeats", "1", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["models"]) == {"vae", "gpvae"} and out["models"]["vae"]["ratio_to_vae"] == 1.0
    assert out["models"]["gpvae"]["ms_per_step"] > 0
    assert out["models"]["gpvae"]["flop_ratio_to_vae"] > 2  # three encoders + one decoder
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
