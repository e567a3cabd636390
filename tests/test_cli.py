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
    """`evaluate --json` reports exactly what the Python API computes for the run's best
    checkpoint on its test split with the same K and seed (not just numbers that look like
    bounds)."""
    from gpvae.evaluation import estimate
    from gpvae.rundir import load_run, run_test_split

    out = tmp_path / "vae"
    r = run("train", "--dataset", "mnist", "--model", "vae", "--latent-dim", "4", "--epochs", "2",
            "--limit-train", "500", "--seed", "0", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (out / "best.safetensors").exists() and (out / "metrics.csv").exists()
    for which in ("best", "last"):
        r = run("evaluate", str(out), "--iwae-samples", "5", "--limit-test", "20", "--json",
                "--no-progress", "--seed", "3", "--checkpoint", which, "--device", "cpu")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        model, cfg = load_run(out, which)
        expected = estimate(model, run_test_split(cfg, limit_test=20), samples=5, seed=3,
                            progress=False).summary()
        assert result["n"] == 20 and result["iwae_samples"] == 5
        for key in ("test_iwae", "test_elbo", "test_iwae_se", "test_elbo_se"):
            assert result[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


@pytest.fixture(scope="module")
def gp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gp"
    r = run("train", "--model", "gpvae", "--latent-dim", "2", "--epochs", "1", "--limit-train",
            "100", "--out", str(out), "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("argv,needles", [
    (["uncertainty", "{run}", "--png", "{dir}"], ["--png", "is a directory"]),
    (["uncertainty", "{run}", "--csv", "{dir}"], ["--csv", "is a directory"]),
    (["export", "{run}", "--out", "{dir}"], ["--out", "is a directory"]),
    (["export", "{run}", "--out", "{file}/enc.pt2"], ["--out", "not a directory"]),
])
def test_output_paths_are_checked_before_the_work(gp_run, tmp_path, argv, needles):
    (tmp_path / "f").write_text("x")
    argv = [a.format(run=gp_run, dir=tmp_path, file=tmp_path / "f") for a in argv]
    r = run(*argv, "--no-progress" if argv[0] == "uncertainty" else "--checkpoint=best")
    one_line_error(r, *needles)
    assert not (gp_run / "uncertainty.csv").exists()  # stopped before computing anything


def test_mnist_data_dir_typo_is_an_error(tmp_path):
    r = run("train", "--dataset", "mnist", "--data-dir", str(tmp_path / "typo"), "--out",
            str(tmp_path / "r"), "--no-progress")
    one_line_error(r, "MNIST", str(tmp_path / "typo"), "does not exist")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content,needle", [
    ("imagenet", "unknown data set 'imagenet'"),  # a complete config.json, but this data set
    (b'{"dataset": "mnist", "model": "vae", "out": "\xff\xfe"}', "UnicodeDecodeError"),
    (b"[1, 2]", "not a gpvae run configuration"),
    (b'{"dataset": "mnist", "colour": "blue"}', "not a gpvae run configuration"),
    (b'{"dataset": "mnist"}', "not a gpvae run configuration (TypeError: no batch_size"),
])
def test_a_bad_config_json_is_a_one_line_error(tmp_path, content, needle):
    if content == "imagenet":
        from dataclasses import asdict

        from gpvae.rundir import TrainConfig

        content = json.dumps(asdict(TrainConfig(dataset="imagenet"))).encode()
    (tmp_path / "config.json").write_bytes(content)
    one_line_error(run("evaluate", str(tmp_path), "--no-progress"), needle)


def test_disk_full_during_a_checkpoint_write_is_one_line_and_loses_nothing(tmp_path):
    """A file-size limit makes the checkpoint write fail as a full disk does (EFBIG vs
    ENOSPC: the same failed write(2)); the previous checkpoint must survive intact."""
    import resource
    import signal

    out = tmp_path / "r"
    args = ("--latent-dim", "2", "--limit-train", "100", "--no-progress", "--device", "cpu")
    assert run("train", "--out", str(out), "--epochs", "1", *args).returncode == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-m", "gpvae", "train", "--out", str(out), "--resume",
                        "--epochs", "2", *args], env=env, capture_output=True, text=True,
                       timeout=300, preexec_fn=small_files)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    log, error = r.stderr.strip().splitlines()  # "resuming ... after epoch 1", then the error
    assert log.startswith("resuming") and error.startswith("gpvae train: error: could not write")
    assert "safetensors" in error and "previous file is unchanged" in error
    assert sorted(os.listdir(out)) == sorted(before)  # no temporary file left behind
    for name in ("last.safetensors", "best.safetensors", "metrics.csv"):
        assert (out / name).read_bytes() == before[name], name


def test_no_progress_silences_every_bar_of_the_command_and_is_undone_after(monkeypatch):
    """--no-progress reaches bars the command does not draw itself (a data set's decoding,
    grid workers) through GPVAE_PROGRESS=off while the command runs; the environment is
    restored afterwards."""
    import os

    from gpvae import cli

    seen = []
    monkeypatch.setitem(cli.COMMANDS, "evaluate",
                        lambda args: seen.append(os.environ.get("GPVAE_PROGRESS")) or 0)
    monkeypatch.delenv("GPVAE_PROGRESS", raising=False)
    assert cli.main(["evaluate", "somewhere", "--no-progress"]) == 0
    assert seen == ["off"] and "GPVAE_PROGRESS" not in os.environ
    monkeypatch.setenv("GPVAE_PROGRESS", "lines")
    assert cli.main(["evaluate", "somewhere", "--no-progress"]) == 0
    assert cli.main(["evaluate", "somewhere"]) == 0
    assert seen[1:] == ["off", "lines"] and os.environ["GPVAE_PROGRESS"] == "lines"


def test_every_option_of_every_command_is_explained_in_help():
    """--help explains every option and argument (a shared option gets its common text)."""
    from gpvae.cli import build_parser

    parser = build_parser()
    bare = {name: [a.dest for a in sub._actions if not a.help]
            for name, sub in parser.commands.items()}
    assert not {k: v for k, v in bare.items() if v}, bare
    for sub in parser.commands.values():
        sub.format_help()  # every %(default)s resolves


def test_unknown_arguments_are_reported_by_the_command_and_misplaced_options_named(capsys):
    from gpvae.cli import main

    for argv, needle in ((["evaluate", "r", "--bogus"],
                          "gpvae evaluate: error: unrecognized arguments: --bogus"),
                         (["--no-progress", "evaluate", "r"],
                          "gpvae evaluate: error: --no-progress: options go after the command")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(needle), err
