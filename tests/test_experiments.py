"""gpvae compare: per-seed runs, statistics against scipy, resumable."""
import json

import pytest
from scipy import stats

from gpvae.experiments import compare


def test_compare_tiny_and_rerun_reuses_runs(tmp_path):
    kw = dict(out=tmp_path / "cmp", epochs=1, latent_dim=2, limit_train=200, limit_test=20,
              iwae_samples=3, device="cpu", progress=False, log=lambda m: None)
    res = compare(["vae", "gpvae"], [0, 1], **kw)
    table = res["models"]
    for name in ("vae", "gpvae"):
        assert len(table[name]["iwae_per_seed"]) == 2
    vae, gp = table["vae"]["iwae_per_seed"], table["gpvae"]["iwae_per_seed"]
    assert table["gpvae"]["p_welch"] == pytest.approx(
        stats.ttest_ind(gp, vae, equal_var=False).pvalue)
    assert table["gpvae"]["diff_to_vae"] == pytest.approx(sum(g - v for g, v in zip(gp, vae)) / 2)
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["models"]["gpvae"]["iwae_per_seed"] == gp
    assert "| gpvae |" in (tmp_path / "cmp" / "results.md").read_text()
    logs = []
    again = compare(["vae", "gpvae"], [0, 1], **{**kw, "log": logs.append})
    assert not any("training" in m for m in logs)  # finished runs are reused, not retrained
    assert again["models"]["gpvae"]["iwae_per_seed"] == gp
