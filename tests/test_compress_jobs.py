"""The compress_bucket command itself: under `ray job submit`, stopped halfway and rerun, and
with no arguments at all (the embedded default), followed by README's examples as written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.lease import LEASE_FILE
from pipeline.manifest import SUCCESS_FILE, read_errors, read_manifests
from pipeline.shards import write_shard
from pipeline.storage import open_location

from .pipeline_fixtures import (S3_ENV, build_dataset, free_port, good_sample, pids_mentioning,
                                private_temp_dir, stop_pids)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
HEAD_PORTS = ("--port", "--dashboard-port", "--node-manager-port", "--object-manager-port",
              "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port")


def job_env(weights_dir: Path, temp_root: str) -> dict[str, str]:
    """Environment of a command that must start (or reach) only our own Ray, and run this
    checkout's code: an editable install may point at another checkout (a git worktree's)."""
    env = {**os.environ, **S3_ENV, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": temp_root,
           "DIFFPRESS_WEIGHTS": str(weights_dir), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def private_ray_root():
    """A temp root for Ray; afterwards every process still mentioning it is stopped by PID."""
    root = private_temp_dir()
    yield root
    stop_pids(pids_mentioning(root))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ray_head(weights_dir, private_ray_root):
    """`ray start --head` on free private ports, token auth off; yields (dashboard URL, env)."""
    env = job_env(weights_dir, private_ray_root)
    ports = {flag: free_port() for flag in HEAD_PORTS}
    command = [str(RAY), "start", "--head", "--num-cpus", "2", "--temp-dir", private_ray_root,
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--disable-usage-stats",
               "--min-worker-port", "0", "--max-worker-port", "0"]
    command += [str(part) for flag, port in ports.items() for part in (flag, port)]
    subprocess.run(command, env=env, check=True, timeout=180, capture_output=True)
    yield f"http://127.0.0.1:{ports['--dashboard-port']}", env


def keys_in(output: Path) -> Counter:
    return Counter(read_manifests(open_location(str(output)))["key"].to_pylist())


def test_ray_job_submit_end_to_end(ray_head, weights_dir, tmp_path):
    address, env = ray_head
    data = build_dataset(tmp_path / "in", n_good=4, faults=False)
    output = tmp_path / "out"
    runtime_env = {"env_vars": {"DIFFPRESS_WEIGHTS": str(weights_dir), **S3_ENV}}
    result = subprocess.run(
        [str(RAY), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         sys.executable, "-m", "jobs.compress_bucket", "--input", str(data.folder), "--output", str(output),
         "--codec", "uqdm-test", "--actors", "1", "--batch-size", "3"],
        env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "images             4" in result.stdout
    assert keys_in(output) == Counter(list(data.good))
    config = json.loads((output / "_job.json").read_text())["config"]
    assert (config["actors"], config["batch_size"]) == (1, 3)


def write_parts(folder: Path, shards: int, size: tuple[int, int]) -> list:
    """`shards` shards part-N.tar of 2 images each; their samples."""
    samples = [good_sample(f"img{i:03d}", i, size=size) for i in range(2 * shards)]
    folder.mkdir()
    for number in range(shards):
        (folder / f"part-{number}.tar").write_bytes(write_shard(samples[2 * number:2 * number + 2]))
    return samples


def compress_command(folder: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.compress_bucket", "--input", str(folder), "--output", str(output),
            "--codec", "uqdm-test", "--actors", "1", "--batch-size", "1"]


def wait_for_a_commit(job: subprocess.Popen, output: Path) -> float:
    """Seconds until the job's first shard is committed (it must still be running then)."""
    started = time.monotonic()
    while not list((output / "manifest").glob("*.parquet")) and time.monotonic() < started + 240:
        assert job.poll() is None, job.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    return time.monotonic() - started


def committed_midway(output: Path, shards: int, job: subprocess.Popen, first_commit: float) -> int:
    committed = len(list((output / "manifest").glob("*.parquet")))
    assert 1 <= committed < shards and not (output / SUCCESS_FILE).exists(), (
        f"{committed} of {shards} shards committed when stopped (first after {first_commit:.1f} s)\n"
        + job.stdout.read().decode()[-3000:])
    return committed


def test_stopped_halfway_then_rerun_gives_one_row_per_image(weights_dir, private_ray_root, tmp_path):
    # 8 shards of 2 images of 3 tiles: 7/8 of the encoding remains when the first shard is
    # committed. (With 4 shards, all were committed once when Ctrl-C came, in a full run on a
    # loaded machine: the first commit, which waits for a Ray worker to start, came late.)
    shards = 8
    samples = write_parts(tmp_path / "in", shards, size=(64, 160))
    output = tmp_path / "out"
    command = compress_command(tmp_path / "in", output)
    env = job_env(weights_dir, private_ray_root)
    # Ctrl-C as in a terminal: a shell's background job (CI under `&`, nohup) starts with SIGINT
    # ignored, which the child would inherit and Python would then never raise KeyboardInterrupt.
    first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first_commit = wait_for_a_commit(first, output)
    first.send_signal(signal.SIGINT)  # Ctrl-C
    first.wait(60)
    committed = committed_midway(output, shards, first, first_commit)
    assert not (output / LEASE_FILE).exists()  # released on the way out
    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"({committed} already committed, skipped)" in rerun.stdout
    assert keys_in(output) == Counter(s.key for s in samples)
    assert read_errors(open_location(str(output))).num_rows == 0


def test_a_driver_killed_mid_run_leaves_its_lease_to_the_rerun_which_duplicates_nothing(
        weights_dir, private_ray_root, tmp_path):
    """SIGKILL: no finally runs, the lease stays behind. On its host, a lease whose process is
    gone is taken over at once; the rerun commits the rest, each image once."""
    shards = 6
    samples = write_parts(tmp_path / "in", shards, size=(32, 32))
    output = tmp_path / "out"
    command = compress_command(tmp_path / "in", output)
    env = job_env(weights_dir, private_ray_root)
    first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first_commit = wait_for_a_commit(first, output)
    first.kill()
    first.wait(60)
    committed_midway(output, shards, first, first_commit)
    assert json.loads((output / LEASE_FILE).read_text())["pid"] == first.pid
    stop_pids(pids_mentioning(private_ray_root))  # its Ray, which a driver killed so leaves behind
    rerun = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"taking over the lease on {output} from the compress job on" in rerun.stderr
    assert f"its process {first.pid} no longer runs on this host" in rerun.stderr
    assert keys_in(output) == Counter(s.key for s in samples)
    assert read_errors(open_location(str(output))).num_rows == 0
    assert (output / SUCCESS_FILE).exists() and not (output / LEASE_FILE).exists()


README_MARK = "<!-- run as written by tests/test_compress_jobs.py -->"


def readme_examples() -> list[tuple[str, str]]:
    """(language, code) of every README block marked as run by this file."""
    lines, blocks = (REPO / "README.md").read_text().splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() == README_MARK:
            language, end = lines[i + 1].removeprefix("```"), lines.index("```", i + 2)
            blocks.append((language, "\n".join(lines[i + 2:end])))
    return blocks


def test_set_up_command_then_readme_examples_run_as_written(weights_dir, private_ray_root, tmp_path):
    """README's command 1 (`diffpress compress`, no arguments: the sample shards), then each of
    its marked examples, exactly as written, in the folder where command 1 ran."""
    env = job_env(weights_dir, private_ray_root)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's commands, as after set-up
    result = subprocess.run(["diffpress", "compress"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "images             6" in result.stdout and "errors             0" in result.stdout
    assert len(list((tmp_path / "out" / "sample_shards").glob("*.tar"))) == 2
    assert (tmp_path / "out" / "compress_bucket" / SUCCESS_FILE).exists()
    examples = readme_examples()
    assert [language for language, _ in examples] == ["python", "bash", "python"]
    for language, code in examples:
        command = [sys.executable, "-c", code] if language == "python" else ["bash", "-e", "-c", code]
        run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, f"README example failed:\n{code}\n" + run.stdout[-3000:] + run.stderr[-3000:]
    assert len(list((tmp_path / "out" / "decoded").rglob("*.png"))) == 6
