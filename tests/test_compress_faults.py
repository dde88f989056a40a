"""Red team round 3, faults around a run: two jobs on one output, a full disk, a read-only
output, an input changed between listing and reading. Each gets a clear error or an error
row, loses nothing, commits nothing by halves; a rerun finishes what was left and duplicates
nothing. (An encoder killed mid-run: test_compress_local.py; the driver killed with SIGKILL:
test_compress_jobs.py.)"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from ray._private import state

from jobs import compress_bucket
from pipeline import lease, stages
from pipeline.compress import CompressConfig, ConfigError, run_compress
from pipeline.lease import LEASE_FILE, STALE_AFTER_SECONDS, OutputLease, OutputUnavailable
from pipeline.manifest import SUCCESS_FILE, data_path, manifest_path, read_manifests
from pipeline.storage import list_shards, open_location

from .pipeline_fixtures import local_ray, mounted, one_shard  # noqa: F401 - fixture


def keys_in(output: Path) -> Counter:
    return Counter(read_manifests(open_location(str(output)))["key"].to_pylist())


def files_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def run_in_background(config: CompressConfig) -> tuple[threading.Thread, dict]:
    """run_compress(config) in a thread, once it holds the output's lease (its inputs are listed)."""
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=run_compress(config)))
    job.start()
    while not Path(config.output, LEASE_FILE).exists():
        assert job.is_alive(), "the job ended without taking the output's lease"
        time.sleep(0.05)
    return job, result


# ---------------------------------------------------------------------- two jobs on one output
def test_a_second_job_on_an_output_in_use_is_refused_naming_the_first(tmp_path, local_ray):  # noqa: F811
    """Both used to encode and commit every pending shard, one's manifest possibly over the
    other's blob (other bytes where encodes differ), their _job.json updates racing."""
    folder, out = tmp_path / "in", tmp_path / "out"
    one_shard(folder, "a", ["a0", "a1"])
    one_shard(folder, "b", ["b0"])
    config = CompressConfig(str(folder), str(out), "uqdm-test", actors=1, batch_size=1)
    first, result = run_in_background(config)
    holder = rf"the compress job on {re.escape(platform.node())} \(pid {os.getpid()}, started [^)]+, last heartbeat"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(out))} is in use by {holder}"):
        run_compress(config)
    first.join(300)
    assert result["summary"].complete and result["summary"].images == 3
    assert keys_in(out) == Counter(["a0", "a1", "b0"])
    assert not (out / LEASE_FILE).exists() and (out / SUCCESS_FILE).exists()


def write_lease(folder: Path, host: str, pid: int, heartbeat_age: float, space: str | None = None) -> None:
    moment = (datetime.now(timezone.utc) - timedelta(seconds=heartbeat_age)).isoformat(timespec="seconds")
    (folder / LEASE_FILE).write_text(json.dumps({"token": "theirs", "host": host, "pid": pid, "started": moment,
                                                 "heartbeat": moment,
                                                 "process_space": lease._process_space() if space is None else space}))


def test_a_lease_whose_job_is_gone_is_taken_over_with_a_warning_and_a_live_one_is_not(tmp_path, caplog):
    output = open_location(str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = {(platform.node(), gone.pid, 0): f"its process {gone.pid} no longer runs on this host",
             ("elsewhere", 1, STALE_AFTER_SECONDS + 60): "its heartbeat is over 10 minutes old"}
    for (host, pid, age), why in stale.items():
        write_lease(tmp_path, host, pid, age)
        with OutputLease.take(output, "OUT"):
            held = json.loads((tmp_path / LEASE_FILE).read_text())
            assert (held["host"], held["pid"]) == (platform.node(), os.getpid())
        assert f"taking over the lease on OUT from the compress job on {host} (pid {pid}" in caplog.text
        assert why in caplog.text and not (tmp_path / LEASE_FILE).exists()  # released at the block's end
    write_lease(tmp_path, "elsewhere", 1, 60)  # another host's pid cannot be checked: its heartbeat is fresh
    with pytest.raises(OutputUnavailable, match=r"OUT is in use by the compress job on elsewhere \(pid 1, .*"
                                                r"last heartbeat 6\d s ago\).* delete _RUNNING"):
        OutputLease.take(output, "OUT")
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == "theirs"  # left as it was


def test_a_dead_pid_in_another_pid_namespace_of_this_host_does_not_make_a_lease_stale(tmp_path):
    """Containers may share the host name, not process numbers: only the heartbeat tells there."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_lease(tmp_path, platform.node(), gone.pid, 60, space="other-boot:pid:[1]")
    with pytest.raises(OutputUnavailable, match="is in use by"):
        OutputLease.take(open_location(str(tmp_path)), "OUT")


def test_a_lease_this_version_cannot_read_is_refused_not_replaced(tmp_path):
    (tmp_path / LEASE_FILE).write_text(json.dumps({"token": "t", "format": "from a newer version"}))
    with pytest.raises(OutputUnavailable, match="cannot read .* delete _RUNNING"):
        OutputLease.take(open_location(str(tmp_path)), "OUT")
    assert "newer" in (tmp_path / LEASE_FILE).read_text()


def test_of_two_jobs_taking_a_free_lease_at_once_one_is_refused(tmp_path, monkeypatch):
    """Locally the lease is created exclusively: the job whose look found no lease, but which
    comes second, is refused (object stores rely on reading the lease back)."""
    write_lease(tmp_path, "elsewhere", 1, 0)  # the first job's, written after the second one looked
    looks, real_read = [], lease._read

    def first_look_finds_nothing(output):
        looks.append(output)
        return None if len(looks) == 1 else real_read(output)

    monkeypatch.setattr(lease, "_read", first_look_finds_nothing)
    with pytest.raises(OutputUnavailable, match="taken at the same moment by the compress job on elsewhere"):
        OutputLease.take(open_location(str(tmp_path)), "OUT")
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == "theirs"


def test_a_run_whose_lease_is_taken_over_commits_nothing_more(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.02)
    with OutputLease.take(open_location(str(tmp_path)), "OUT") as held:
        write_lease(tmp_path, "elsewhere", 1, 0)  # another job took it over
        assert held.lost.wait(5), "the heartbeat did not notice the takeover"
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == "theirs"  # theirs is left in place


def test_a_manifest_is_not_written_over_a_blob_another_job_replaced(tmp_path):
    """What remains of two jobs starting at the same moment (no create-if-absent on object
    stores): the later blob must not be described by the earlier commit's manifest."""
    output = open_location(str(tmp_path))
    output.write_atomic(data_path("s"), b"ours")
    written = output.info(data_path("s"))
    stages.check_blob_is_ours(output, "s", written, 4)  # still ours: no complaint
    output.write_atomic(data_path("s"), b"them")  # the other job's bytes, of the same length
    with pytest.raises(stages.TransientFailure, match="data/s.bin was replaced while it was committed"):
        stages.check_blob_is_ours(output, "s", written, 4)


# ---------------------------------------------------------------------- the output's filesystem
def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def test_a_full_disk_leaves_the_shard_uncommitted_with_its_os_error_and_a_rerun_completes_it(
        tmp_path, local_ray, capsys):  # noqa: F811
    folder = tmp_path / "in"
    one_shard(folder, "big", ["k0", "k1"])  # about 10 KB of records
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=1m", "tmpfs") as disk:
        ballast = disk / "ballast"
        ballast.write_bytes(bytes(free_bytes(disk) - 12 * 1024))  # room for the lease and _job.json, not the blob
        out = disk / "out"
        argv = ["--input", str(folder), "--output", str(out), "--codec", "uqdm-test", "--actors", "1",
                "--batch-size", "2"]
        assert compress_bucket.main(argv) == compress_bucket.INCOMPLETE
        table = capsys.readouterr().out
        assert re.search(r"NOT COMMITTED .*\n  big .*commit failed: OSError: \[Errno 28\] No space "
                         "left on device", table)
        assert files_in(out) == ["_job.json"]  # no blob under its name, no temporary file, no lease, no _SUCCESS
        with pytest.raises(OSError, match="No space left on device"):  # the atomic write of small files too
            open_location(str(out)).write_atomic("big.json", bytes(64 << 10))
        assert files_in(out) == ["_job.json"]
        ballast.unlink()  # space is back
        assert compress_bucket.main(argv) == 0
        assert keys_in(out) == Counter(["k0", "k1"]) and (out / SUCCESS_FILE).exists()
        assert not (out / LEASE_FILE).exists()


def test_a_read_only_output_is_refused_up_front_in_one_line(tmp_path, local_ray, capsys):  # noqa: F811
    """Root ignores file modes, not a read-only mount. Every shard's commit used to fail the
    same way, after all of them were encoded."""
    shard = one_shard(tmp_path / "in", "s", ["x0"])
    (tmp_path / "archive").mkdir()
    actors = len(state.actors())
    with mounted(tmp_path / "ro", "--bind", "-o", "ro", str(tmp_path / "archive")) as read_only:
        status = compress_bucket.main(["--input", shard, "--output", str(read_only / "out"), "--codec", "uqdm-test",
                                       "--actors", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if " error: " in line]
    assert status == 2 and errors == [
        f"diffpress compress: error: cannot write to {read_only / 'out'} (OSError: [Errno 30] Read-only file "
        f"system: '{read_only / 'out'}'); give a writable --output"]
    assert len(state.actors()) == actors  # refused before any encoder started


# ---------------------------------------------------------------------- inputs that change
def test_a_shard_truncated_after_listing_is_a_change_to_retry_not_a_truncated_tar(tmp_path):
    """The tar reader alone took the cut for damage: a final 'truncated tar' row, the shard
    committed without the images that were there when it was listed."""
    path = Path(one_shard(tmp_path, "s", ["k0", "k1"]))
    [listed] = list_shards(str(path))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    [error] = [e for batch in stages.read_shard_batches(listed, {}, 4) for e in batch.errors]
    assert (error.category, error.transient) == ("changed since listing", True)
    assert f"listed with {len(data)} bytes" in error.reason and f"now {len(data) // 2} bytes" in error.reason
    [relisted] = list_shards(str(path))  # a rerun takes the file as it is now: its damage is final
    errors = [(e.category, e.transient) for batch in stages.read_shard_batches(relisted, {}, 4) for e in batch.errors]
    assert errors == [("truncated tar", False)]


def test_a_shard_replaced_between_listing_and_reading_is_not_committed_and_a_rerun_takes_the_new_content(
        tmp_path, local_ray):  # noqa: F811
    folder, out = tmp_path / "in", tmp_path / "out"
    one_shard(folder, "s0", ["a0", "a1", "a2"])
    one_shard(folder, "s1", ["b0", "b1", "b2"])
    changing = one_shard(folder, "s2", ["c0"])
    config = CompressConfig(str(folder), str(out), "uqdm-test", actors=1, batch_size=1)
    # Its inputs are listed once the lease exists; s2 is read only after s0 or s1 is wholly
    # decoded (one encoder: two shards decode at a time), i.e. after some encodes.
    job, result = run_in_background(config)
    replacement = one_shard(tmp_path / "new", "s2", ["n0", "n1"])
    os.replace(replacement, changing)
    job.join(300)
    summary = result["summary"]
    assert summary.shards_committed == 2 and list(summary.uncommitted) == ["s2"] and not summary.complete
    assert "shard: changed since listing: listed with" in summary.uncommitted["s2"][0]
    assert not (out / manifest_path("s2")).exists() and not (out / SUCCESS_FILE).exists()
    rerun = run_compress(config)
    assert (rerun.shards_skipped, rerun.shards_committed, rerun.complete) == (2, 1, True)
    assert keys_in(out) == Counter(["a0", "a1", "a2", "b0", "b1", "b2", "n0", "n1"])
