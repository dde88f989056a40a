"""compress_bucket end to end on a private in-process Ray: faults, exactness, resume, readers."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections import Counter

import duckdb
import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from ray._private import state

from jobs import decode as decode_job
from model import decode_image
from pipeline.archive import Archive, ArchiveError
from pipeline.compress import CompressConfig, ConfigError, run_compress
from pipeline.decode import decode_archive
from pipeline.loader import ArchiveDataset
from pipeline.manifest import SUCCESS_FILE, data_path, manifest_path, read_errors, read_manifests
from pipeline.shards import read_shard, write_shard
from pipeline.storage import open_location

from .pipeline_fixtures import (SECRETS, build_dataset, good_sample, local_ray,  # noqa: F401 - fixture
                                one_shard, secret_options)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("in"))


@pytest.fixture(scope="module")
def archive_dir(tmp_path_factory, dataset, local_ray):  # noqa: F811
    out = tmp_path_factory.mktemp("out")
    summary = run_compress(CompressConfig(str(dataset.folder), str(out), "uqdm-test", actors=2, batch_size=2))
    return out, summary


def manifest_rows(folder) -> list[dict]:
    return read_manifests(open_location(str(folder))).to_pylist()


def test_every_good_image_once_and_every_fault_with_its_reason(archive_dir, dataset):
    out, summary = archive_dir
    rows = manifest_rows(out)
    assert sorted(r["key"] for r in rows) == sorted(dataset.good)
    errors = read_errors(open_location(str(out))).to_pylist()
    by_key = {e["key"] or "trunc2": e["category"] for e in errors}
    assert by_key == dataset.faults and all(e["reason"].startswith(e["category"]) for e in errors)
    assert summary.images == len(dataset.good) and sum(summary.errors_by_reason.values()) == len(dataset.faults)
    assert json.loads((out / SUCCESS_FILE).read_text())["images"] == len(dataset.good)
    job = json.loads((out / "_job.json").read_text())
    assert job["codec"] == "uqdm-test" and len(job["inputs"]) == 3 and job["config"]["actors"] == 2


def test_summary_names_codec_quality_and_next_command_and_warns_when_larger_than_source(archive_dir, tmp_path):
    _, summary = archive_dir
    table = summary.table()
    assert "codec              uqdm-test (weights " in table and "lossless with every chunk" in table
    assert "next               diffpress decode --input " in table
    assert ("WARNING" in table) == (summary.compressed_bytes > summary.source_bytes)
    assert "larger than its source" in dataclasses.replace(summary, compressed_bytes=summary.source_bytes + 1).table()
    assert "WARNING" not in dataclasses.replace(summary, compressed_bytes=summary.source_bytes).table()
    # a lossy codec: the PSNR of a sample, as a reader decodes it
    folder = tmp_path / "in"
    folder.mkdir()
    samples = [good_sample(f"k{i}", i, size=(48, 64)) for i in range(3)]
    (folder / "s.tar").write_bytes(write_shard(samples))
    cdc = run_compress(CompressConfig(str(folder), str(tmp_path / "out"), "cdc-hp128:q1", actors=1, batch_size=1))
    assert cdc.sample_images == 2 and "cdc-hp128:q1 (weights " in cdc.table()
    archive = Archive(str(tmp_path / "out"), threads=1)  # the encoders decode the sample on one thread
    errors = [(archive.decode(key).astype(float) - decode_image(sample.members[member])[0]) ** 2
              for sample in samples[:2] for key, member in [(sample.key, archive.record(sample.key)["source_member"])]]
    expected = 10 * np.log10(255 ** 2 / (sum(e.sum() for e in errors) / sum(e.size for e in errors)))
    assert cdc.sample_psnr == pytest.approx(expected, abs=1e-6)
    assert f"PSNR {expected:.2f} dB, default decode of 2 images" in cdc.table()


def test_rows_describe_their_records_and_carry_extras(archive_dir, dataset, uqdm):
    out, _ = archive_dir
    for row in manifest_rows(out):
        sample = dataset.good[row["key"]]
        image, mode = decode_image(sample.members[row["source_member"]])
        assert (row["height"], row["width"], row["source_mode"]) == (*image.shape[:2], mode)
        assert dict(row["extras"]) == {k: v for k, v in sample.members.items() if k != row["source_member"]}
        assert row["weights_digest"] == uqdm.weights_digest.hex() and row["codec"] == "uqdm-test"
        assert row["bpp"] == pytest.approx(8 * row["length"] / (row["width"] * row["height"]))
        assert len(row["chunk_lengths"]) == uqdm.n_chunks


def test_records_are_the_bytes_the_codec_writes_in_process_and_decode_losslessly(archive_dir, dataset, uqdm):
    """The actors' streams equal an in-process encode (exact numerics: any process, any batch)."""
    out, _ = archive_dir
    archive = Archive(str(out), codec=uqdm)
    keys = sorted(archive.keys())
    for key in keys[:3]:
        image, _ = decode_image(dataset.good[key].members[archive.record(key)["source_member"]])
        assert archive.read(key) == uqdm.compress(image), key
    image, _ = decode_image(dataset.good[keys[0]].members[archive.record(keys[0])["source_member"]])
    assert np.array_equal(archive.decode(keys[0]), image)


def test_progressive_prefix_reads_only_the_first_chunks(archive_dir, uqdm):
    out, _ = archive_dir
    archive = Archive(str(out), codec=uqdm)
    key = archive.keys()[0]
    row = archive.record(key)
    prefix = archive.read(key, chunks=2)
    assert len(prefix) == row["length"] - sum(row["chunk_lengths"][2:])
    assert np.array_equal(archive.decode(key, chunks=2), uqdm.decompress(archive.read(key), chunks=2))


def test_corrupt_record_is_refused(archive_dir, tmp_path, uqdm):
    out, _ = archive_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    row = manifest_rows(copy)[0]
    blob_path = copy / "data" / row["data_url"].rsplit("/", 1)[1]
    blob = bytearray(blob_path.read_bytes())
    blob[row["offset"] + row["length"] - 1] ^= 0xFF
    blob_path.write_bytes(bytes(blob))
    with pytest.raises(ArchiveError, match="crc32"):
        Archive(str(copy), codec=uqdm).read(row["key"])


def test_manifests_read_by_pyarrow_and_duckdb(archive_dir, dataset):
    out, _ = archive_dir
    table = pq.read_table(str(out / "manifest"))
    assert table.num_rows == len(dataset.good)
    count, avg_bpp = duckdb.sql(f"SELECT count(*), avg(bpp) FROM '{out}/manifest/*.parquet'").fetchall()[0]
    assert count == len(dataset.good) and avg_bpp == pytest.approx(np.mean(table["bpp"].to_pylist()))
    cls = duckdb.sql(f"SELECT key, decode(extras['cls']) FROM '{out}/manifest/*.parquet' ORDER BY key").fetchall()
    assert dict(cls)["img001"] == "1"


def test_loader_and_decode_job_read_the_archive(archive_dir, dataset, tmp_path):
    out, _ = archive_dir
    samples = {s["__key__"]: s for s in ArchiveDataset(str(out), keys=["img000", "img001"], chunks=1)}
    assert set(samples) == {"img000", "img001"} and samples["img001"]["extras"]["cls"] == b"1"
    source = {key: decode_image(dataset.good[key].members[dataset.good[key].image_member])[0]
              for key in samples}
    assert all(samples[key]["image"].shape == source[key].shape for key in samples)
    decode_job.main(["--input", str(out), "--to", str(tmp_path / "png"), "--keys", "img001"])
    png, _ = decode_image((tmp_path / "png" / "shard-000" / "img001.png").read_bytes())
    assert np.array_equal(png, source["img001"])  # lossless
    assert decode_archive(str(out), str(tmp_path / "wds"), keys=["img001"], chunks=1, fmt="wds").images == 1
    shard = read_shard((tmp_path / "wds" / "shard-000.tar").read_bytes())
    assert [s.key for s in shard.samples] == ["img001"] and not shard.errors
    assert shard.samples[0].extras == dict(samples["img001"]["extras"])
    assert np.array_equal(decode_image(shard.samples[0].members["png"])[0], samples["img001"]["image"].numpy())


def test_rerun_skips_committed_shards_and_redoes_a_crashed_one(archive_dir, tmp_path, dataset):
    """A crash after the blob was written but before the manifest: the rerun redoes that shard."""
    out, _ = archive_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / manifest_path("shard-001")).unlink()
    (copy / data_path("shard-001")).write_bytes(b"partial")
    (copy / SUCCESS_FILE).unlink()
    untouched = (copy / manifest_path("shard-000")).stat().st_mtime_ns
    summary = run_compress(CompressConfig(str(dataset.folder), str(copy), "uqdm-test", actors=1, batch_size=4))
    assert summary.shards_skipped == 2 and summary.run_images == 3
    assert (copy / manifest_path("shard-000")).stat().st_mtime_ns == untouched
    rows = manifest_rows(copy)
    assert Counter(r["key"] for r in rows) == Counter(list(dataset.good))
    assert (copy / SUCCESS_FILE).exists()
    Archive(str(copy)).read("img005")  # the redone shard's records verify


def test_other_weights_are_refused_in_an_existing_archive(archive_dir, dataset, tmp_path):
    out, _ = archive_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    job = json.loads((copy / "_job.json").read_text())
    (copy / "_job.json").write_text(json.dumps({**job, "weights_digest": "00" * 16}))
    with pytest.raises(ValueError, match="already holds an archive made with"):
        run_compress(CompressConfig(str(dataset.folder), str(copy), "uqdm-test", actors=1))


def live_encoders() -> dict[str, int]:
    """Actor id -> PID of every live encoder actor (from the GCS: no dashboard needed)."""
    return {actor_id: a["Pid"] for actor_id, a in state.actors().items()
            if a["ActorClassName"].endswith("Encoder") and a["State"] == "ALIVE" and a["Pid"]}


@pytest.mark.slow
def test_killed_encoder_is_replaced_and_every_image_lands_once(tmp_path, local_ray):  # noqa: F811
    # Enough images that the job is still encoding when an encoder dies, even on an idle machine
    # (the exact UQDM takes about a second per 64x64 tile).
    data = build_dataset(tmp_path / "in", n_good=16, faults=False)
    out = tmp_path / "out"
    result = {}
    worker = threading.Thread(target=lambda: result.update(summary=run_compress(
        CompressConfig(str(data.folder), str(out), "uqdm-test", actors=2, batch_size=1))))
    worker.start()
    deadline = time.monotonic() + 60
    while len(live_encoders()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # let encodes get under way
    encoders = live_encoders()
    assert encoders and worker.is_alive(), "the job finished before an encoder could be killed: give it more images"
    victim, pid = next(iter(encoders.items()))
    os.kill(pid, signal.SIGKILL)
    worker.join(300)
    assert not worker.is_alive() and "summary" in result
    assert state.actors()[victim]["NumRestarts"] >= 1
    assert Counter(r["key"] for r in manifest_rows(out)) == Counter(list(data.good))
    assert read_errors(open_location(str(out))).num_rows == 0


# ---------------------------------------------------------------------- nothing lost, nothing leaked
def test_another_source_under_a_committed_shard_name_is_refused_not_skipped(tmp_path, local_ray):  # noqa: F811
    """dirA/s.tar then dirB/s.tar into one output: the second used to be skipped (its images
    never encoded) and _SUCCESS written."""
    out = tmp_path / "out"
    first = run_compress(CompressConfig(one_shard(tmp_path / "dirA", "s", ["a0"]), str(out), "uqdm-test", actors=1))
    assert first.images == 1 and (out / SUCCESS_FILE).exists()
    with pytest.raises(ConfigError, match=r"(?s)s: committed from file://.*/dirA/s.tar, this run's input is "
                                          r"file://.*/dirB/s.tar"):
        run_compress(CompressConfig(one_shard(tmp_path / "dirB", "s", ["b0"]), str(out), "uqdm-test", actors=1))
    assert [r["key"] for r in manifest_rows(out)] == ["a0"]
    # The same source again is a resume: skipped, and the archive complete.
    again = run_compress(CompressConfig(str(tmp_path / "dirA"), str(out), "uqdm-test", actors=1))
    assert (again.shards_skipped, again.images, again.complete) == (1, 1, True)


def live_encoder_pids() -> set[int]:
    return set(live_encoders().values())


@pytest.mark.slow
def test_transient_encoder_failure_leaves_the_shard_uncommitted_and_a_rerun_encodes_it(tmp_path, local_ray):  # noqa: F811
    """An encoder killed on a batch on every retry used to turn the batch into permanent
    'encoder crashed' rows: the shard committed, a rerun skipped it, the images were lost."""
    folder, out = tmp_path / "in", tmp_path / "out"
    one_shard(folder, "part", ["k0", "k1"], size=(64, 192))  # 3 tiles each: an encode lasts seconds
    config = CompressConfig(str(folder), str(out), "uqdm-test", actors=1, batch_size=1)
    result, killed = {}, set()
    worker = threading.Thread(target=lambda: result.update(summary=run_compress(config)))
    worker.start()
    seen: dict[int, float] = {}
    while worker.is_alive():  # kill every encoder half a second into its life, as long as the run lasts
        for pid in live_encoder_pids() - killed:
            if time.monotonic() - seen.setdefault(pid, time.monotonic()) > 0.5:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.1)
    summary = result["summary"]
    assert not (out / manifest_path("part")).exists() and not (out / SUCCESS_FILE).exists()
    assert len(killed) >= 4 and not summary.complete and summary.shards_committed == 0
    assert list(summary.uncommitted) == ["part"] and "encoder crashed" in summary.uncommitted["part"][0]
    assert "NOT COMMITTED" in summary.table() and "rerun" in summary.table()
    rerun = run_compress(config)
    assert rerun.complete and rerun.shards_committed == 1 and rerun.images == 2 and not rerun.errors_by_reason
    assert sorted(r["key"] for r in manifest_rows(out)) == ["k0", "k1"] and (out / SUCCESS_FILE).exists()


def test_a_shard_the_workers_cannot_read_is_not_committed_and_the_run_says_so(tmp_path, local_ray):  # noqa: F811
    """A memory:// shard exists in this process only: the decode task's read fails, as a
    storage outage would. That is no fault of the input: no manifest, no _SUCCESS."""
    fsspec.filesystem("memory").pipe_file("/dp-only-here/lost.tar", write_shard([good_sample("m0", 0)]))
    out = tmp_path / "out"
    summary = run_compress(CompressConfig(["memory://dp-only-here/lost.tar", one_shard(tmp_path / "in", "fine", ["f0"])],
                                          str(out), "uqdm-test", actors=1))
    assert not summary.complete and summary.shards_committed == 1 and summary.images == 1
    assert list(summary.uncommitted) == ["lost"]
    assert "cannot read shard: FileNotFoundError" in summary.uncommitted["lost"][0]
    assert not (out / manifest_path("lost")).exists() and not (out / SUCCESS_FILE).exists()
    assert read_errors(open_location(str(out))).num_rows == 0  # nothing recorded as the input's fault


def test_no_credential_reaches_the_job_file_the_archive_or_the_log(tmp_path, local_ray, caplog):  # noqa: F811
    """connection_string, passphrase, a password in endpoint_url, a token in a list of
    headers used to be written to _job.json and logged in clear."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    run_compress(CompressConfig(one_shard(tmp_path / "in", "s", ["c0"]), str(out), "uqdm-test", actors=1,
                                storage_options=secret_options()))
    secrets = [secret.encode() for secret in SECRETS]
    leaks = [str(path) for path in out.rglob("*") if path.is_file() and any(s in path.read_bytes() for s in secrets)]
    leaks += [line for line in caplog.messages if any(s.decode() in line for s in secrets)]
    leaks += [str(path) for path in local_ray.rglob("*") if path.is_file() and not path.is_symlink()
              and any(s in _read(path) for s in secrets)]
    assert leaks == []
    assert any("compress_bucket config" in line for line in caplog.messages)
    job = json.loads((out / "_job.json").read_text())
    assert job["config"]["storage_options"]["endpoint_url"] == "https://***@store.example:9000"


def test_encoders_the_cluster_cannot_hold_are_refused(tmp_path, local_ray):  # noqa: F811
    """Three encoders of one CPU on two CPUs: one would wait forever, and the batches sent to it."""
    with pytest.raises(ConfigError, match="3 encoders need a CPU each; the cluster has 2"):
        run_compress(CompressConfig(one_shard(tmp_path / "in", "s", ["x"]), str(tmp_path / "out"), "uqdm-test",
                                    actors=3))


def _read(path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # sockets, files Ray removes while we read
        return b""
