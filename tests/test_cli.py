"""The command line: --help everywhere, one-line errors for bad input, train -> evaluate --json."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpvae.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "gpvae", *args], env=env, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300)


def one_line_error(result, *needles):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["train", "evaluate", "demo", "bench-iwae"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: gpvae " + command in capsys.readouterr().out


@pytest.mark.parametrize("argv,needles", [
    (["train", "--out", "x", "--epochs", "-3"], ["--epochs", "-3"]),
    (["train", "--out", "x", "--dataset", "imagenet"], ["--dataset", "imagenet"]),
    (["train", "--out", "x", "--model", "nope"], ["--model", "nope"]),
    (["train", "--out", "x", "--lr", "0"], ["--lr"]),
    (["evaluate", "r", "--iwae-samples", "0"], ["--iwae-samples"]),
])
def test_bad_flags_are_one_line_errors(argv, needles, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and all(n in err[0] for n in needles), err


def test_missing_data_dir_is_a_one_line_error(tmp_path):
    r = run("train", "--dataset", "omniglot", "--out", str(tmp_path / "r"))
    one_line_error(r, "--data-dir")
    r = run("train", "--dataset", "svhn", "--data-dir", str(tmp_path / "nope"),
            "--out", str(tmp_path / "r"))
    one_line_error(r, "train_32x32.mat")
    assert not (tmp_path / "r" / "last.safetensors").exists()


def test_corrupt_file_is_a_one_line_error(tmp_path):
    (tmp_path / "chardata.mat").write_bytes(b"this is not a MATLAB file")
    r = run("train", "--dataset", "omniglot", "--data-dir", str(tmp_path), "--out",
            str(tmp_path / "r"), "--epochs", "1")
    one_line_error(r, "chardata.mat")


def test_negative_epochs_is_a_one_line_error_from_the_real_command(tmp_path):
    r = run("train", "--out", str(tmp_path / "r"), "--model", "vae", "--epochs", "-1")
    one_line_error(r, "--epochs")


def test_evaluate_a_directory_that_is_not_a_run(tmp_path):
    one_line_error(run("evaluate", str(tmp_path)), "not a gpvae run directory")


def test_train_then_evaluate_json(tmp_path):
    out = tmp_path / "vae"
    r = run("train", "--dataset", "mnist", "--model", "vae", "--latent-dim", "4", "--epochs", "1",
            "--limit-train", "500", "--seed", "0", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (out / "best.safetensors").exists() and (out / "metrics.csv").exists()
    r = run("evaluate", str(out), "--iwae-samples", "5", "--limit-test", "20", "--json",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["n"] == 20 and result["iwae_samples"] == 5
    assert result["test_iwae"] >= result["test_elbo"]
    for key in ("test_iwae_se", "test_elbo_se"):
        assert result[key] > 0
