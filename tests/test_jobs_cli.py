"""The `diffpress` command: one parser, every mistake one line and exit 2 before Ray starts."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli
from jobs import decode as decode_job
from jobs import evaluate as evaluate_job
from jobs._cli import RAY_JOB_ENV, check_codec
from model.paths import REPO
from model.registry import USER_DIR, catalog, file_digest, resolve

from .read_fixtures import sample, write_shards
from .uqdm_fixtures import TEST_NAME

SECRET = "s3cr3t-never-shown"


def test_only_the_cli_helper_configures_logging():
    """Logging is set up once, by jobs._cli.setup_logging (called by cli.main); the libraries never do."""
    offenders = [str(path.relative_to(REPO)) for folder in ("jobs", "model", "pipeline")
                 for path in (REPO / folder).rglob("*.py")
                 if "basicConfig(" in path.read_text() and path != REPO / "jobs" / "_cli.py"]
    assert offenders == []


def run_command(argv: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m ARGV` in an empty folder, this checkout's code first, with a Ray temp root of its own."""
    ray_root = tmp_path / "ray"
    ray_root.mkdir(exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_root), **env}
    environment.pop("RAY_ADDRESS", None)
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", *argv], cwd=work, env=environment, capture_output=True,
                          text=True, timeout=300)


def errors_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " error: " in line]


@pytest.mark.parametrize("argv, message", [
    (["jobs.cli", "compress", "--codec", "cdc-hp12", "--input", "."], "Did you mean cdc-hp128"),
    (["jobs.cli", "compress", "--input", "no/such/shards"], "input 'no/such/shards' is neither a shard"),
    (["jobs.compress_bucket", "--codec", "cdc-hp128:q9"], "unknown rate point 'q9'"),
    (["jobs.cli", "decode", "--input", "a", "--to", "b", "--steps", "-1"], "argument --steps: must be a whole number >= 0"),
    (["jobs.decode", "--input", "a", "--to", "b", "--actors", "-1"], "argument --actors: must be a whole number >= 1"),
    (["jobs.cli", "decode", "--input", "no/such/archive", "--to", "b"], "no/such/archive"),
    (["jobs.cli", "evaluate", "--images", "no/such/*.png", "--out", "e"], "no images match"),
    (["jobs.import_uqdm", "no/such/folder"], "holds no config.json"),
    (["jobs.cli", "train", "--name", "x"], "no training photos at"),
    (["jobs.cli", "train-hyper", "--source", "cdc-hp128-ctx", "--name", "x", "--run-dir", "r"], "has a context model"),
    (["jobs.train_hyper", "--source", "cdc-hp128", "--name", "x", "--run-dir", "r", "--hyper-widths", "8,8,8"],
     "hyper_widths must be two positive widths"),
    (["jobs.cli", "train-context", "--source", "cdc-hp128", "--init-from", "cdc-hp128", "--name", "x", "--run-dir",
      "r"], "cdc-hp128 has context groups none"),
    # a URL of a protocol fsspec does not know was a traceback
    (["jobs.cli", "decode", "--input", "foo://x", "--to", "b"], "--input 'foo://x': Protocol not known: foo"),
    (["jobs.cli", "decode", "--input", "a", "--to", "foo://y"], "--to 'foo://y': Protocol not known: foo"),
    (["jobs.cli", "compress", "--input", ".", "--output", "foo://y"], "--output 'foo://y': Protocol not known: foo"),
])
def test_a_mistake_is_one_line_exit_2_and_ray_never_starts(argv, message, tmp_path):
    """A mistyped --codec used to start Ray and print 126 lines of actor tracebacks."""
    result = run_command(argv, tmp_path, DIFFPRESS_SHARED=str(tmp_path / "no-shared"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "FutureWarning" not in result.stderr
    command = argv[1] if argv[0] == "jobs.cli" else {module: name for name, module in cli.COMMANDS.items()}[argv[0]]
    [error] = errors_of(result.stderr)
    assert error.startswith(f"diffpress {command}: error: ") and message in error, error
    assert list((tmp_path / "ray").iterdir()) == [], "Ray was started"
    assert list((tmp_path / "cwd").iterdir()) == [], "something was written"


def test_verbose_shows_the_trace_of_a_mistake(tmp_path):
    result = run_command(["jobs.cli", "decode", "--input", "no/such/archive", "--to", "b", "--verbose"], tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr and len(errors_of(result.stderr)) == 1


@pytest.mark.parametrize("options", ['{"key": "k", "secret": "' + SECRET + '"', '["' + SECRET + '"]'])
def test_storage_options_are_checked_and_never_echoed(options, tmp_path, capsys):
    for command in (["compress", "--input", str(tmp_path)], ["decode", "--input", str(tmp_path), "--to", "b"]):
        assert cli.main([*command, "--storage-options", options]) == 2
        error = capsys.readouterr().err
        assert "--storage-options" in error and SECRET not in error, error


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_names_every_command_diffpress_and_every_flag_has_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([command, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: diffpress {command} ")
    sub = next(action for action in cli.build_parser()._actions
               if isinstance(action, argparse._SubParsersAction)).choices[command]
    undocumented = [action.dest for action in sub._actions if not action.help]
    assert undocumented == []


def test_python_m_aliases_are_the_same_commands(capsys):
    with pytest.raises(SystemExit):
        evaluate_job.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: diffpress evaluate ")
    assert decode_job.main(["--input", "a", "--to", "b", "--chunks", "0"]) == 2
    assert capsys.readouterr().err.startswith("diffpress decode: error: argument --chunks: must be a whole number >= 1")


def test_a_relative_output_under_a_ray_job_is_refused(tmp_path, monkeypatch, capsys):
    """`ray job submit` runs the command in a temporary copy of --working-dir: a relative output would be lost."""
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    assert cli.main(["compress", "--input", str(tmp_path), "--output", "out/archive"]) == 2
    assert "--output 'out/archive' is a relative path, and this runs as a Ray job" in capsys.readouterr().err
    assert cli.main(["decode", "--input", str(tmp_path), "--to", "decoded"]) == 2
    assert "--to 'decoded' is a relative path" in capsys.readouterr().err
    # An absolute path passes that check and fails on what is wrong with it (no shards there).
    assert cli.main(["compress", "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "no shards" in capsys.readouterr().err


def test_an_output_that_is_a_file_or_under_one_is_refused_before_any_work(tmp_path):
    """--output a file was a NotADirectoryError traceback (from the lease); --to a file started Ray
    and failed every shard in its actor."""
    write_shards(tmp_path / "in", {"s": [sample("a", 1)]})
    (tmp_path / "a-file").write_bytes(b"x")
    for argv, flag in [(["compress", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "a-file")], "--output"),
                       (["decode", "--input", str(tmp_path / "in"), "--to", str(tmp_path / "a-file" / "png")], "--to")]:
        result = run_command(["jobs.cli", *argv], tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        [error] = errors_of(result.stderr)
        assert error.startswith(f"diffpress {argv[0]}: error: {flag} ") and f"{tmp_path / 'a-file'} is a file" in error
        assert list((tmp_path / "ray").iterdir()) == [], "Ray was started"
    assert (tmp_path / "a-file").read_bytes() == b"x"


@pytest.fixture
def uqdm_installed(weights_dir, tmp_path, monkeypatch) -> Path:
    """A weights folder where `uqdm-tiny-exact2` is installed (the seeded test UQDM under that name)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(weights_dir / f"{TEST_NAME}.safetensors", folder / "uqdm-tiny-exact2.safetensors")
    monkeypatch.setenv("DIFFPRESS_WEIGHTS", str(folder))
    return folder


def test_uqdm_tiny_means_the_imported_weights_and_a_typo_is_not_told_to_import(uqdm_installed, capsys):
    assert check_codec("uqdm-tiny") == "uqdm-tiny-exact2"
    assert check_codec("cdc:q2") == "cdc-hp128:q2"
    assert cli.main(["compress", "--codec", "uqdm-tny", "--input", str(uqdm_installed)]) == 2
    error = capsys.readouterr().err
    assert "Did you mean uqdm-tiny" in error and "import" not in error


def test_a_release_that_is_not_installed_is_refused_with_how_to_get_it(tmp_path, monkeypatch, capsys):
    """README's `--codec uqdm-tiny` before the import: one line that says how to import the weights."""
    if (USER_DIR / "uqdm-tiny-exact2.safetensors").exists():
        pytest.skip(f"this machine has imported uqdm-tiny-exact2 into {USER_DIR}: nothing is missing")
    monkeypatch.setenv("DIFFPRESS_WEIGHTS", str(tmp_path))  # an empty weights folder
    assert cli.main(["compress", "--codec", "uqdm-tiny", "--input", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "unknown codec weights 'uqdm-tiny'" in error and "diffpress import-uqdm PATH/TO/uqdm-tiny" in error
    assert "uqdm-tiny-exact2 is a release that is not installed here" in error


def test_info_lists_installed_codecs_with_digests_and_how_to_get_the_others(uqdm_installed, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    installed, _, missing = out.partition("released weights not installed:")
    shipped = resolve("cdc-hp128")
    assert f"digest {file_digest(shipped).hex()}  {shipped}" in installed and "rate points q1" in installed
    assert f"uqdm-tiny-exact2     uqdm  digest {file_digest(uqdm_installed / 'uqdm-tiny-exact2.safetensors').hex()}" \
        in installed
    for entry in catalog():
        assert entry["digest"] in out
    assert "uqdm-tiny-exact " in missing and "torch " in out and "uqdm-tiny = uqdm-tiny-exact2" in out


def test_the_console_script_is_declared():
    """pyproject's [project.scripts] runs jobs.cli:main, the function these tests call."""
    assert '[project.scripts]\ndiffpress = "jobs.cli:main"' in (REPO / "pyproject.toml").read_text()
