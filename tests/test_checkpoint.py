"""Checkpoints: round trip, atomic writes, and refusal of code-executing files."""
import os
import pickle

import pytest
import torch

from gpvae.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from gpvae.errors import CheckpointError
from gpvae.models import build_model


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_with_optimizer(tmp_path):
    torch.manual_seed(0)
    model = build_model("vae", (1, 28, 28), latent_dim=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = -model.training_objective(torch.rand(3, 1, 28, 28), 10)[0].mean()
    loss.backward()
    opt.step()
    save_checkpoint(tmp_path / "c.safetensors", model, {"epoch": 3, "note": "x"}, opt)
    model2 = build_model("vae", (1, 28, 28), latent_dim=4)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    meta = load_checkpoint(tmp_path / "c.safetensors", model2, opt2)
    assert meta["epoch"] == 3
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in s1["state"][k]:
            assert torch.equal(torch.as_tensor(s1["state"][k][name]),
                               torch.as_tensor(s2["state"][k][name]))
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "best.safetensors"
    path.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(CheckpointError, match="not a valid gpvae checkpoint"):
        read_checkpoint(path)
    assert not marker.exists()
    # the same payload as a torch.save file (zip + pickle) is refused too
    torch.save({"x": Evil(marker)}, path)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


def test_mismatched_model_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c.safetensors", build_model("vae", (1, 28, 28), latent_dim=4), {})
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tmp_path / "c.safetensors", build_model("vae", (1, 28, 28), latent_dim=5))


def test_mismatch_message_names_the_tensors(tmp_path):
    """The one-line message lists what differs, not just torch's header line."""
    save_checkpoint(tmp_path / "c.safetensors", build_model("vae", (1, 28, 28), latent_dim=4), {})
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "c.safetensors", build_model("vae", (1, 28, 28), latent_dim=5))
    msg = str(exc.value)
    assert "\n" not in msg and "size mismatch for decoder." in msg and "[256, 4]" in msg, msg
    with pytest.raises(CheckpointError, match=r"Missing key\(s\).*psi_m"):
        load_checkpoint(tmp_path / "c.safetensors", build_model("gpvae", (1, 28, 28),
                                                                latent_dim=4))


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.update(epoch="x"), "epoch, history or best-epoch record"),
    (lambda m: m.update(history=5), "epoch, history or best-epoch record"),
    (lambda m: m.update(best=None), "epoch, history or best-epoch record"),
    (lambda m: m["optimizer"].update(param_groups=[]), "optimizer state cannot be restored"),
    (lambda m: m["optimizer"].update(scalars={"0": 7}), "optimizer state cannot be restored"),
    (None, "metadata is not a JSON object"),
])
def test_resume_from_a_checkpoint_with_malformed_metadata_is_one_line_and_changes_nothing(
        tmp_path, edit, needle):
    """A last.safetensors that is valid safetensors but whose gpvae metadata was damaged or
    edited stops --resume before any training with a one-line CheckpointError."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from gpvae.rundir import TrainConfig
    from gpvae.training import train

    out = tmp_path / "r"
    cfg = TrainConfig(out=str(out), model_options={"latent_dim": 2}, epochs=1,
                      limit_train=60, batch_size=30, device="cpu")
    train(cfg, progress=False, log=lambda *_: None)
    last = out / "last.safetensors"
    with safe_open(str(last), framework="pt") as f:
        meta = json.loads(f.metadata()["gpvae"])
    if edit is None:
        meta = []
    else:
        edit(meta)
    save_file(load_file(str(last)), str(last), metadata={"gpvae": json.dumps(meta)})
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    cfg.epochs = 2
    with pytest.raises(CheckpointError, match=needle):
        train(cfg, resume=True, progress=False, log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_outputs_never_overwrite_a_runs_files_or_a_users_other_files(tmp_path):
    """check_output_file: a run's own files (checkpoints, config, metrics, lock) are refused
    as outputs; an existing file is replaced only when it is of the kind written (an
    earlier output); a new file is fine."""
    import zipfile

    from gpvae.checkpoint import PNG, TORCH_EXPORT, OutputKind, check_output_file
    from gpvae.errors import OutputError
    from gpvae.rundir import TrainConfig
    from gpvae.training import train

    run = tmp_path / "run"
    train(TrainConfig(out=str(run), model_options={"latent_dim": 2}, epochs=1, limit_train=60,
                      batch_size=30, device="cpu"), progress=False, log=lambda *_: None)
    for name in ("best.safetensors", "last.safetensors", "config.json", "metrics.csv",
                 ".gpvae.lock"):
        with pytest.raises(OutputError, match="is a file of the run"):
            check_output_file(run / name, "--out")
    assert check_output_file(run / "encoder.pt2", "--out", TORCH_EXPORT) == run / "encoder.pt2"
    mine = tmp_path / "mine.csv"
    mine.write_text("my precious notes\n")
    gap_kind = OutputKind.csv("a gap CSV", "index,log_px")
    with pytest.raises(OutputError, match="exists and is not a gap CSV"):
        check_output_file(mine, "--csv", gap_kind)
    mine.write_text("index,log_px,elbo_q\n0,1,2\n")  # an earlier output: replaced
    assert check_output_file(mine, "--csv", gap_kind) == mine
    picture = tmp_path / "p.png"
    picture.write_text("not a png")
    with pytest.raises(OutputError, match="is not a PNG image"):
        check_output_file(picture, "--png", PNG)
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8))
    assert check_output_file(picture, "--png", PNG) == picture
    archive = tmp_path / "user.pt2"
    archive.write_text("keep")
    with pytest.raises(OutputError, match="torch.export archive"):
        check_output_file(archive, "--out", TORCH_EXPORT)
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("user/archive_format", "pt2")
    assert check_output_file(archive, "--out", TORCH_EXPORT) == archive
