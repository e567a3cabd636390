"""Run directories: one writer at a time, never over a user's files, no orphans, the
user's umask, durable renames, and one-line errors for outputs that cannot be written."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gpvae.checkpoint import atomic_write_text, check_output_file, remove_orphan_temps
from gpvae.errors import ConfigError, OutputError
from gpvae.rundir import LOCK_FILE, locked_run_dir
from gpvae.rundir import TrainConfig
from gpvae.training import train

ROOT = Path(__file__).resolve().parents[1]


def tiny(out, **kw):
    return TrainConfig(out=str(out), **{"model_options": {"latent_dim": 2}, "epochs": 1,
                                        "limit_train": 100, "batch_size": 100,
                                        "device": "cpu", **kw})


def quiet(cfg, **kw):
    return train(cfg, progress=False, log=lambda *_: None, **kw)


def gpvae_cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "gpvae", *args], env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stuck_lock(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom gpvae.rundir import locked_run_dir\n"
         "with locked_run_dir(sys.argv[1], create=True):\n"
         "    print('locked', flush=True)\n    time.sleep(120)\n", str(out)],
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = gpvae_cli("train", "--out", str(out), "--latent-dim", "2", "--epochs", "1",
                      "--limit-train", "100", "--no-progress", "--device", "cpu")
        one_line_error(r, str(out), "another gpvae process", f"pid {holder.pid}")
        assert os.listdir(out) == [LOCK_FILE]  # nothing written by the refused run
        with pytest.raises(ConfigError, match="another gpvae process"):
            quiet(tiny(out))
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    quiet(tiny(out))
    assert (out / "last.safetensors").is_file()


def test_the_lock_is_held_while_training_writes(tmp_path, monkeypatch):
    """The trainer holds the lock during its epochs, not just while checking the directory."""
    import gpvae.training as training

    seen = []
    real = training.save_checkpoint

    def probe(path, *args, **kwargs):
        with pytest.raises(ConfigError, match="another gpvae process"):
            with locked_run_dir(Path(path).parent, create=False):
                pass
        seen.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(training, "save_checkpoint", probe)
    quiet(tiny(tmp_path / "run"))
    assert "last.safetensors" in seen


@pytest.mark.parametrize("name,content", [
    ("config.json", b"the user's own file\n"),
    ("config.json", b"{}\n"),  # JSON, even one whose fields all have defaults, is not a run
    ("config.json", b'{"dataset": "mnist", "epochs": 3}\n'),
    ("metrics.csv", b"the user's own file\n"),
    ("best.safetensors", b"the user's own file\n"),
    ("notes.txt", b"the user's own file\n")])
def test_a_users_files_are_never_overwritten(tmp_path, name, content):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_bytes(content)
    with pytest.raises(ConfigError, match="not empty"):
        quiet(tiny(out))
    assert (out / name).read_bytes() == content
    assert sorted(os.listdir(out)) == [name]
    # --resume does not accept it either: it is not a gpvae run
    with pytest.raises(Exception, match="not a gpvae run"):
        quiet(tiny(out), resume=True)
    assert (out / name).read_bytes() == content
    assert sorted(os.listdir(out)) == [name]


def test_an_empty_directory_is_fine_and_a_finished_run_needs_resume(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    quiet(tiny(out))
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        quiet(tiny(out))


def test_out_empty_string_and_a_file_are_refused(tmp_path):
    one_line_error(gpvae_cli("train", "--out", "", "--no-progress", cwd=tmp_path), "--out")
    assert os.listdir(tmp_path) == []
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(gpvae_cli("train", "--out", str(f), "--no-progress"), "not a directory")
    assert f.read_text() == "x"


@pytest.mark.parametrize("out", ["/proc/gpvae-test-run", "/sys/gpvae-test-run"])
def test_unwritable_out_is_one_line(out):
    one_line_error(gpvae_cli("train", "--out", out, "--latent-dim", "2", "--epochs", "1",
                             "--limit-train", "100", "--no-progress", "--device", "cpu"),
                   "cannot write the run directory")


def test_orphan_temporaries_are_removed_on_resume_and_others_kept(tmp_path):
    out = tmp_path / "run"
    quiet(tiny(out))
    orphans = [".last.safetensors.0123456789abcdef.tmp", ".metrics.csv.fedcba9876543210.tmp"]
    keep = [".notes.0123456789abcdef.tmp", ".last.safetensors.tmp", "x.tmp"]
    for name in orphans + keep:
        (out / name).write_text("left by a kill")
    assert sorted(remove_orphan_temps(out, ["metrics.csv"])) == [orphans[1]]
    (out / orphans[1]).write_text("left by a kill")
    quiet(tiny(out, epochs=2), resume=True)
    names = set(os.listdir(out))
    assert not names & set(orphans)
    assert set(keep) <= names


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        quiet(tiny(tmp_path / "run"))
    finally:
        os.umask(old)
    for path in [tmp_path / "f.txt", *(tmp_path / "run").glob("*.*")]:
        if path.is_file() and path.name != LOCK_FILE:
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    atomic_write_text(tmp_path / "f.txt", "x")
    assert synced == [False, True]  # the file, then its directory (after the rename)


def test_check_output_file(tmp_path):
    with pytest.raises(OutputError, match="is a directory"):
        check_output_file(tmp_path, "--png")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_file(tmp_path / "f" / "g.png", "--png")
    assert check_output_file(tmp_path / "new" / "g.png", "--png") == tmp_path / "new" / "g.png"
    assert not (tmp_path / "new").exists()  # checking creates nothing
