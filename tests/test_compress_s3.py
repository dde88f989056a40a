"""compress_bucket against a real S3 server (rclone serve s3 over HTTP): same rows as a local
run, readable back through S3, and the credentials never written anywhere."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from jobs import compress_bucket
from pipeline.archive import Archive
from pipeline.compress import CompressConfig, run_compress
from pipeline.manifest import read_manifests
from pipeline.storage import open_location

from .pipeline_fixtures import build_dataset, local_ray, s3_server  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow
URL_COLUMNS = ("source_url", "data_url")


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without the columns that name where the data lives, in key order."""
    return sorted(({k: v for k, v in row.items() if k not in URL_COLUMNS} for row in rows), key=lambda r: r["key"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_server, local_ray, caplog_module):  # noqa: F811
    dataset = build_dataset(tmp_path_factory.mktemp("in"), n_good=2)
    bucket = open_location("s3://bucket", s3_server.storage_options)
    for tar in sorted(dataset.folder.glob("*.tar")):
        bucket.write_atomic(f"in/{tar.name}", tar.read_bytes())
    local_out = tmp_path_factory.mktemp("local")
    run_compress(CompressConfig(str(dataset.folder), str(local_out), "uqdm-test", actors=2, batch_size=2))
    compress_bucket.main(["--input", "s3://bucket/in/", "--output", "s3://bucket/out", "--codec", "uqdm-test", "--actors", "2",
                          "--batch-size", "2", "--storage-options", json.dumps(s3_server.storage_options)])
    return dataset, local_out


@pytest.fixture(scope="module")
def caplog_module():
    """Every log record of the module's runs, formatted (module-scoped caplog)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(handler.format(record))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)
    root.setLevel(level)


def test_s3_and_local_runs_give_the_same_rows(runs, s3_server):
    dataset, local_out = runs
    s3_rows = read_manifests(open_location("s3://bucket/out", s3_server.storage_options)).to_pylist()
    local_rows = read_manifests(open_location(str(local_out))).to_pylist()
    assert len(s3_rows) == len(dataset.good)
    assert comparable(s3_rows) == comparable(local_rows)
    assert all(r["data_url"].startswith("s3://bucket/out/data/") for r in s3_rows)
    assert all(r["source_url"].startswith("s3://bucket/in/") for r in s3_rows)


def test_archive_reads_records_and_prefixes_over_s3(runs, s3_server, uqdm):
    archive = Archive("s3://bucket/out", s3_server.storage_options, codec=uqdm)
    assert sorted(archive.keys()) == sorted(runs[0].good)
    key = archive.keys()[0]
    assert np.array_equal(archive.decode(key, chunks=3), uqdm.decompress(archive.read(key), chunks=3))


def test_credentials_appear_in_no_output_and_no_log(runs, s3_server, local_ray, caplog_module):  # noqa: F811
    secret, key = s3_server.secret.encode(), s3_server.key.encode()
    assert any("compress_bucket config" in line for line in caplog_module)
    leaks = [str(path) for path in Path(s3_server.root).rglob("*") if path.is_file()
             and (secret in path.read_bytes() or key in path.read_bytes())]
    leaks += [str(path) for path in Path(local_ray).rglob("*")
              if path.is_file() and not path.is_symlink() and secret in _read(path)]
    leaks += [line for line in caplog_module if s3_server.secret in line or s3_server.key in line]
    assert leaks == []
    job = json.loads((Path(s3_server.root) / "bucket" / "out" / "_job.json").read_text())
    assert job["config"]["storage_options"] == {"endpoint_url": s3_server.endpoint, "key": "***", "secret": "***"}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # sockets, files Ray removes while we read
        return b""
