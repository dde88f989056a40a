"""Reading through a real S3 server (rclone serve s3): the loader (fork and spawn workers), Ray Data
and the decode job give exactly what they give from the same archive on local disk."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from pipeline.decode import decode_archive
from pipeline.loader import ArchiveDataset
from pipeline.ray_data import decode_records, read_archive
from pipeline.storage import open_location

from .pipeline_fixtures import local_ray, s3_server  # noqa: F401 - fixtures
from .read_fixtures import compress, sample, write_shards

pytestmark = pytest.mark.slow
SHARDS = {"s0": [sample(f"a{i}", i) for i in range(3)], "s1": [sample(f"b{i}", 10 + i) for i in range(2)] +
          [sample("a0", 20)]}


@pytest.fixture(scope="module")
def archives(tmp_path_factory, s3_server, local_ray):  # noqa: F811
    """The same archive on local disk and at s3://bucket/archive."""
    folder = tmp_path_factory.mktemp("read-s3")
    local = compress(write_shards(folder / "in", SHARDS), folder / "out", "cdc-hp128")
    bucket = open_location("s3://bucket/archive", s3_server.storage_options)
    for path in local.rglob("*"):
        if path.is_file():
            bucket.write_atomic(str(path.relative_to(local)), path.read_bytes())
    return str(local), "s3://bucket/archive", s3_server.storage_options


def samples(url: str, options: dict, rank: int, context: str) -> list[tuple]:
    dataset = ArchiveDataset(url, options, shuffle=True, seed=3, rank=rank, world_size=2, steps=0)
    dataset.set_epoch(1)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context=context)
    return [(s["__shard__"], s["__key__"], s["image"].numpy().tobytes(), s["extras"]) for s in loader]


def test_loader_over_s3_gives_the_local_samples(archives):
    local, remote, options = archives
    for rank, context in ((0, "spawn"), (1, "fork")):
        here = samples(local, {}, rank, "fork")
        assert here and samples(remote, options, rank, context) == here


def test_ray_data_over_s3_gives_the_local_records(archives):
    local, remote, options = archives
    found = {}
    for url, storage in ((local, {}), (remote, options)):
        rows = decode_records(read_archive(url, storage), steps=0).take_all()
        found[url] = {(r["shard"], r["key"]): (r["image"], dict(r["extras"])) for r in rows}
    assert len(found[local]) == 6 and found[local].keys() == found[remote].keys()
    for record, (image, extras) in found[local].items():
        assert np.array_equal(found[remote][record][0], image) and found[remote][record][1] == extras


def test_decode_job_from_s3_to_s3_writes_the_local_shards(archives, tmp_path, s3_server):  # noqa: F811
    local, remote, options = archives
    decode_archive(local, str(tmp_path / "wds"), steps=0, fmt="wds")
    summary = decode_archive(remote, "s3://bucket/decoded", options, steps=0, fmt="wds")
    assert summary.images == 6 and not summary.errors
    bucket = open_location("s3://bucket/decoded", options)
    for name in ("s0.tar", "s1.tar"):
        assert bucket.read(name) == (tmp_path / "wds" / name).read_bytes()
    assert decode_archive(remote, "s3://bucket/decoded", options, steps=0, fmt="wds").shards_skipped == 2
