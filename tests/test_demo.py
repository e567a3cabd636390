"""``gpvae demo``'s timing column: q(z|x) per full batch of 128, the median of the passes
(as ``gpvae bench-inference`` times it), whatever --limit-test is.  No training here."""
from types import SimpleNamespace

import torch

from gpvae import demo
from gpvae.data import ImageData
from gpvae.models import build_model


def _images(n):
    return ImageData(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2)
                     .contiguous())


def test_full_batches_cycle_the_images_to_fill_every_batch():
    for n, count in ((20, 1), (128, 1), (300, 3)):
        data = _images(n)
        batches = demo.full_batches(data, 128)
        assert [b.shape for b in batches] == [(128, 1, 2, 2)] * count
        got = torch.cat(batches)
        torch.testing.assert_close(got, data.batch(torch.arange(count * 128) % n), rtol=0,
                                   atol=0)


def test_demo_times_full_batches_and_reports_the_median(tmp_path, monkeypatch, capsys):
    """--limit-test 20: the timed batch still holds 128 images (the 20 cycled), the column
    is the median of the passes, and the footnote says what was timed.  Training and the
    timer are stubbed: the timer records its batches and returns known pass times."""
    timed = {}

    def fake_time_posterior(model, batches, repeats, device):
        timed.update(batches=batches, repeats=repeats)
        return [5.0, 1.0, 100.0, 2.0, 3.0][:repeats]

    torch.manual_seed(0)
    model = build_model("vae", (1, 28, 28), latent_dim=2).eval()
    monkeypatch.setattr(demo, "train", lambda cfg, resume, progress: None)
    monkeypatch.setattr(demo, "load_run", lambda run_dir, which, device: (model, None))
    monkeypatch.setattr(demo, "time_posterior", fake_time_posterior)
    monkeypatch.setattr(demo, "reconstructions_and_samples", lambda models, x, path: path)
    args = SimpleNamespace(device="cpu", out=str(tmp_path), models="vae", epochs=1,
                           limit_train=200, limit_test=20, iwae_samples=2, latent_dim=2,
                           seed=0, no_progress=True)
    rows = demo.run_demo(args)
    assert timed["repeats"] == demo.TIMING_REPEATS == 5
    test = demo.load_splits("mnist", limit_train=1, limit_test=20).test
    assert len(timed["batches"]) == 1
    torch.testing.assert_close(timed["batches"][0], test.batch(torch.arange(128) % 20),
                               rtol=0, atol=0)
    assert rows[0]["ms_per_batch"] == 3.0  # median of 5, 1, 100, 2, 3 (the mean is 22.2)
    assert ("a batch of 128 test images, median of 5 passes, the test images repeated to "
            "fill it") in capsys.readouterr().out


def test_a_demo_rerun_with_other_training_settings_is_refused_in_its_own_words(tmp_path):
    """Rerunning the demo into its --out with another training budget is refused naming the
    setting and the demo's --out (not a --resume the user never gave), the run unchanged."""
    import pytest

    from gpvae.errors import ConfigError
    from gpvae.rundir import TrainConfig
    from gpvae.training import train

    run = tmp_path / "vae"
    train(TrainConfig(out=str(run), model_options={"latent_dim": 2}, epochs=1, limit_train=60,
                      limit_test=5, device="cpu"), progress=False, log=lambda *_: None)
    before = (run / "last.safetensors").read_bytes()
    args = SimpleNamespace(device="cpu", out=str(tmp_path), models="vae", epochs=1,
                           limit_train=80, limit_test=5, iwae_samples=2, latent_dim=2,
                           seed=0, no_progress=True)
    with pytest.raises(ConfigError, match=r"--out .* holds a demo run of vae made with other "
                                          r"settings \(limit_train 60 -> 80\)"):
        demo.run_demo(args)
    assert (run / "last.safetensors").read_bytes() == before
