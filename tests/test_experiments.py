"""gpvae compare: the split protocol, each run scored on its own test split, statistics
against hand-computed t-tests, resumable."""
import json
import math

import pytest
from scipy import stats

import gpvae.grid.runs as grid_runs
from gpvae.data import load_splits
from gpvae.experiments import compare, score_table
from gpvae.rundir import read_config


def test_score_table_against_hand_computed_t_tests():
    ref, other = [10.0, 12.0, 11.0, 13.0], [12.0, 15.0, 12.0, 16.0]
    scores = {"vae": {s: {"test_iwae": v, "test_elbo": v - 5} for s, v in enumerate(ref)},
              "gpvae": {s: {"test_iwae": v, "test_elbo": v - 4} for s, v in enumerate(other)}}
    row = score_table(scores, ["vae", "gpvae"], [0, 1, 2, 3])["gpvae"]
    n = 4
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    var = lambda v: sum((x - mean(v)) ** 2 for x in v) / (len(v) - 1)  # noqa: E731
    # paired: the differences 2, 3, 1, 3
    diffs = [o - r for o, r in zip(other, ref)]
    se = math.sqrt(var(diffs) / n)
    assert row["diff_to_vae"] == pytest.approx(2.25)
    assert row["diff_se"] == pytest.approx(se) == pytest.approx(math.sqrt(2.75 / 3 / 4))
    assert row["p_paired"] == pytest.approx(2 * stats.t.sf(2.25 / se, n - 1), rel=1e-9)
    # Welch: unequal variances, Welch-Satterthwaite degrees of freedom
    a, b = var(other) / n, var(ref) / n
    t = (mean(other) - mean(ref)) / math.sqrt(a + b)
    df = (a + b) ** 2 / (a ** 2 / (n - 1) + b ** 2 / (n - 1))
    assert row["p_welch"] == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)
    assert row["iwae_sd"] == pytest.approx(math.sqrt(var(other)))
    assert row["elbo_mean"] == pytest.approx(mean(other) - 4)


def test_compare_follows_the_split_protocol_and_reuses_runs(tmp_path):
    kw = dict(out=tmp_path / "cmp", epochs=1, latent_dim=2, limit_train=200, limit_test=20,
              iwae_samples=3, device="cpu", progress=False, log=lambda m: None)
    res = compare(["vae", "gpvae"], [0, 1], **kw)
    for name in ("vae", "gpvae"):
        for seed in (0, 1):
            cfg = read_config(tmp_path / "cmp" / name / f"seed{seed}")
            # seed s: initialization s and split s, shared by every model
            assert (cfg.model, cfg.seed, cfg.split_seed, cfg.epochs) == (name, seed, seed, 1)
            assert res["runs"][name][seed]["n"] == 20
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["models"]["gpvae"]["iwae_per_seed"] == res["models"]["gpvae"]["iwae_per_seed"]
    logs = []
    again = compare(["vae", "gpvae"], [0, 1], **{**kw, "log": logs.append})
    assert not any("training" in m or "resuming" in m for m in logs)  # reused, not retrained
    assert again["models"] == res["models"]
    # a comparison directory written before runs kept eval.json: trained runs are only
    # scored again, to the same numbers
    for path in (tmp_path / "cmp").glob("*/seed*/eval.json"):
        path.unlink()
    logs.clear()
    third = compare(["vae", "gpvae"], [0, 1], **{**kw, "log": logs.append})
    assert not any("training" in m or "resuming" in m for m in logs)
    assert len(logs) == 4 and third["models"] == res["models"]
    assert len(list((tmp_path / "cmp").glob("*/seed*/eval.json"))) == 4


def test_compare_on_celeba_scores_each_run_on_its_own_test_split(tmp_path, monkeypatch):
    """CelebA has no test partition: each split seed cuts its own.  A run must be scored on
    test images disjoint from its own training and validation images."""
    from test_data import celeba_ids, celeba_jpeg

    images = tmp_path / "img_align_celeba"
    images.mkdir()
    for i in range(30):
        celeba_jpeg(images / f"{i + 1:06d}.jpg", i)
    scored = {}
    real = grid_runs.estimate  # compare scores each run through the grid's run_one

    def spy(model, data, **kwargs):
        scored[kwargs["seed"]] = celeba_ids(data)
        return real(model, data, **kwargs)

    monkeypatch.setattr(grid_runs, "estimate", spy)
    compare(["vae"], [0, 1, 2], out=tmp_path / "cmp", dataset="celeba", data_dir=str(tmp_path),
            epochs=1, latent_dim=2, iwae_samples=2, device="cpu", progress=False,
            log=lambda m: None)
    assert sorted(scored) == [0, 1, 2]
    for seed, test_ids in scored.items():
        own = load_splits("celeba", tmp_path, split_seed=seed)
        assert test_ids == celeba_ids(own.test) and len(test_ids) == 3
        assert not set(test_ids) & set(celeba_ids(own.train) + celeba_ids(own.valid)), seed
    assert scored[0] != scored[1]  # the seeds really cut different test splits


def test_compare_refuses_runs_trained_longer_than_asked(tmp_path):
    from gpvae.errors import ConfigError

    kw = dict(out=tmp_path / "cmp", latent_dim=2, limit_train=100, limit_test=10,
              iwae_samples=2, device="cpu", progress=False, log=lambda m: None)
    compare(["vae"], [0], epochs=2, **kw)
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        compare(["vae"], [0], epochs=1, **kw)


def test_compare_refuses_a_rerun_with_other_settings_and_changes_nothing(tmp_path):
    """A finished run in OUT/MODEL/seedS is reused only for the same settings: a rerun of
    the comparison with another latent dimension, training set size or data set must not
    report the old runs' scores under the new settings."""
    from gpvae.errors import ConfigError

    kw = dict(out=tmp_path / "cmp", epochs=1, limit_test=10, iwae_samples=2, device="cpu",
              progress=False, log=lambda m: None)
    compare(["vae"], [0], latent_dim=2, limit_train=100, **kw)
    run = tmp_path / "cmp" / "vae" / "seed0"
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    results = (tmp_path / "cmp" / "results.json").read_bytes()
    with pytest.raises(ConfigError, match=r"model_options.latent_dim 2 -> 3.*another --out"):
        compare(["vae"], [0], latent_dim=3, limit_train=100, **kw)
    with pytest.raises(ConfigError, match=r"limit_train 100 -> 50"):
        compare(["vae"], [0], latent_dim=2, limit_train=50, **kw)
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before
    assert (tmp_path / "cmp" / "results.json").read_bytes() == results
    # every existing run is checked before any is trained: a new model listed first is not
    # trained into a directory the comparison then refuses
    with pytest.raises(ConfigError, match=r"limit_train 100 -> 50"):
        compare(["gpvae", "vae"], [0], latent_dim=2, limit_train=50, **kw)
    assert not (tmp_path / "cmp" / "gpvae").exists()
    # an option given at its default is the same run as one left out
    compare(["vae"], [0], latent_dim=2, limit_train=100,
            model_options={"vae": {"sigma_x": 0.1}}, **kw)
    # more epochs continue the same runs
    compare(["vae"], [0], latent_dim=2, limit_train=100, **{**kw, "epochs": 2})
    assert read_config(run).epochs == 2


def test_compare_writes_only_into_a_new_empty_or_comparison_directory(tmp_path):
    """A user's files are never overwritten: --out holding anything but a comparison's own
    results and MODEL/seedS runs is refused before any work, the files untouched."""
    from gpvae.errors import ConfigError

    kw = dict(epochs=1, latent_dim=2, limit_train=60, limit_test=5, iwae_samples=2,
              device="cpu", progress=False, log=lambda m: None)
    for name, text in (("results.md", "my precious notes\n"), ("notes.txt", "keep\n")):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text(text)
        with pytest.raises(ConfigError, match=rf"not a comparison's directory \(it holds {name}"):
            compare(["vae"], [0], out=out, **kw)
        assert [p.name for p in out.iterdir()] == [name]
        assert (out / name).read_text() == text
    out = tmp_path / "cmp"
    compare(["vae"], [0], out=out, **kw)  # new: fine; and its own directory again, also
    (out / ".results.json.0123456789abcdef.tmp").write_text("{")  # after a kill mid-write
    compare(["vae"], [0, 1], out=out, **kw)
    assert sorted(p.name for p in out.iterdir()) == [".results.json.0123456789abcdef.tmp",
                                                     "results.json", "results.md", "vae"]


@pytest.mark.parametrize("seeds,needle", [([0, 0], "names 0 more than once"),
                                          ([1, 2, 1], "names 1 more than once"),
                                          ([-1], "from 0 to"), ([2**63], "from 0 to"),
                                          ([], "at least one")])
def test_compare_refuses_repeated_or_out_of_range_seeds_before_any_work(tmp_path, seeds,
                                                                         needle):
    """A seed given twice would count one run twice (sd 0, p = 0): refused, as a grid
    refuses repeated split seeds; so are seeds torch cannot take."""
    from gpvae.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        compare(["vae", "gpvae"], seeds, out=tmp_path / "cmp", epochs=1, latent_dim=2,
                limit_train=60, limit_test=5, iwae_samples=2, device="cpu", progress=False,
                log=lambda m: None)
    assert not (tmp_path / "cmp").exists()


def test_compare_rescores_for_another_limit_test_without_retraining(tmp_path):
    """--limit-test decides which test images are scored, not what is trained: a rerun with
    another one scores the same runs again."""
    kw = dict(out=tmp_path / "cmp", epochs=1, latent_dim=2, limit_train=60, iwae_samples=2,
              device="cpu", progress=False)
    compare(["vae"], [0], limit_test=5, log=lambda m: None, **kw)
    logs = []
    res = compare(["vae"], [0], limit_test=7, log=logs.append, **kw)
    assert not any("training" in m or "resuming" in m for m in logs), logs
    assert res["runs"]["vae"][0]["n"] == 7


def test_bernoulli_scores_from_before_the_fixed_binarization_are_scored_again(tmp_path):
    """An eval.json written when a Bernoulli run's test images were binarized with the
    evaluation seed (no binarization_seed recorded) is not reused next to today's scores;
    a Gaussian run's is (its images never depended on a seed)."""
    import json

    kw = dict(out=tmp_path / "cmp", epochs=1, latent_dim=2, limit_train=60, limit_test=5,
              iwae_samples=2, device="cpu", progress=False,
              model_options={"vae": {"likelihood": "bernoulli"}})
    compare(["vae", "hf:1"], [0], log=lambda m: None, **kw)
    for name in ("vae", "hf-1"):
        path = tmp_path / "cmp" / name / "seed0" / "eval.json"
        ev = json.loads(path.read_text())
        assert ev["binarization_seed"] == 0
        del ev["binarization_seed"]  # as written before
        path.write_text(json.dumps(ev))
    logs = []
    compare(["vae", "hf:1"], [0], log=logs.append, **kw)
    scored = [m for m in logs if "IWAE-2" in m]
    assert len(scored) == 1 and scored[0].startswith("[compare] vae seed 0"), logs
