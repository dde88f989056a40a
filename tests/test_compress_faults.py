"""Red team round 3, faults around a run: a full disk. Each gets a clear error or an error
row, loses nothing, commits nothing by halves; a rerun finishes what was left and duplicates
nothing. (An encoder killed mid-run: test_compress_local.py.)"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from jobs import compress_bucket
from pipeline.manifest import SUCCESS_FILE, read_manifests
from pipeline.storage import open_location

from .pipeline_fixtures import local_ray, mounted, one_shard  # noqa: F401 - fixture


def keys_in(output: Path) -> Counter:
    return Counter(read_manifests(open_location(str(output)))["key"].to_pylist())


def files_in(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


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
