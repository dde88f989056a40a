"""The write side's guarantees, piece by piece and without Ray: every tar member accounted
for, shards streamed, storage failures kept apart from damage, credentials redacted by
default, flags validated, and a resumed run's state learnt from one listing and the footers."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from jobs import compress_bucket
from model import decode_image
from pipeline import stages
from pipeline.compress import CompressConfig, ConfigError
from pipeline.manifest import (FOOTER_BYTES, MANIFEST_SCHEMA, ShardTotals, manifest_path, read_committed, to_table,
                               write_table)
from pipeline.shards import READ_SIZE, ShardReadError, iter_shard, read_shard, write_shard
from pipeline.storage import Location, Shard, list_shards, open_location, redact, redact_url, shard_name

from .pipeline_fixtures import SECRETS, good_sample, secret_options, special_member, tar_of


# ---------------------------------------------------------------------- every member accounted for
def test_every_tar_member_is_part_of_a_sample_or_has_an_error_row():
    """Links, FIFOs, duplicates and members of a key met again later used to vanish or merge
    silently; each now lands in a sample or in an error row that names it."""
    a, b = good_sample("a", 1).members, good_sample("b", 2).members
    data = tar_of([("a.jpg", a["jpg"]), ("a.cls", a["cls"]), ("a.cls", b"again"),
                 special_member("dir", tarfile.DIRTYPE),  # folders are structure, not content
                 special_member("b.png", tarfile.SYMTYPE, "a.jpg"), ("b.cls", b["cls"]),
                 special_member("c.jpg", tarfile.LNKTYPE, "a.jpg"),
                 special_member("d.jpg", tarfile.FIFOTYPE),
                 ("a.json", a["json"]),  # key a again, after other keys: not contiguous
                 ("e.png", b["png"])])
    contents = read_shard(data)
    assert [(s.key, sorted(s.members)) for s in contents.samples] == [
        ("a", ["cls", "jpg"]), ("b", ["cls"]), ("c", []), ("d", []), ("e", ["png"])]
    rows = {(e.key, e.member): e for e in contents.errors}
    assert {k: e.category for k, e in rows.items()} == {
        ("a", "cls"): "duplicate member", ("b", "png"): "unsupported tar member",
        ("c", "jpg"): "unsupported tar member", ("d", "jpg"): "unsupported tar member",
        ("a", "json"): "non-contiguous member"}
    assert "symbolic link to a.jpg" in rows["b", "png"].reason and "hard link to a.jpg" in rows["c", "jpg"].reason
    assert "FIFO" in rows["d", "jpg"].reason
    assert not any(e.transient for e in contents.errors)  # the input's own faults: final
    # Down the pipeline, samples left without an image say so too: no key disappears.
    errors = [e for batch in stages.decode_shard_batches(io.BytesIO(data), 8) for e in batch.errors]
    keys = {e.key for e in errors} | {i.source.key for batch in stages.decode_shard_batches(io.BytesIO(data), 8)
                                      for i in batch.images}
    assert keys == {"a", "b", "c", "d", "e"}
    assert Counter(e.category for e in errors)["no image member"] == 3  # b, c, d


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_compressed_shards_are_read_and_their_damage_reported(compress):
    samples = [good_sample(f"k{i}", i) for i in range(3)]
    data = write_shard(samples)
    contents = read_shard(compress(data))
    assert contents.errors == [] and [s.members for s in contents.samples] == [s.members for s in samples]
    cut = read_shard(compress(data)[:-30])
    assert cut.errors and all(e.category == "truncated tar" for e in cut.errors)


def test_unread_compression_is_named_and_compressed_files_are_listed_by_name(tmp_path):
    zstd = read_shard(b"\x28\xb5\x2f\xfd" + bytes(100))
    assert [e.category for e in zstd.errors] == ["not a tar archive"] and "zstd" in zstd.errors[0].reason
    for name in ("a.tar", "b.tar.gz", "c.tgz", "d.tar.xz", "e.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [s.name for s in list_shards(str(tmp_path))] == ["a", "b", "c", "d"]
    assert shard_name("s3://bucket/part-7.tar.bz2") == "part-7"


class CountingFile(io.RawIOBase):
    """A storage file that counts what was asked of it, and can fail after `fail_after` bytes."""

    def __init__(self, data: bytes, fail_after: int | None = None):
        self.data, self.position, self.fail_after = data, 0, fail_after

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = len(self.data) - self.position if size < 0 else size
        if self.fail_after is not None:
            if self.position >= self.fail_after:
                raise ConnectionResetError("connection reset by peer")
            size = min(size, self.fail_after - self.position)
        chunk = self.data[self.position:self.position + size]
        self.position += len(chunk)
        return chunk


def test_shard_is_read_as_a_stream_one_sample_at_a_time():
    """Memory is bounded by a sample, not the shard: the first sample is handed on long
    before the shard is read."""
    big = {"png": os.urandom(3 * READ_SIZE)}  # 3 MiB samples in a 30 MiB shard
    file = CountingFile(write_shard([good_sample(f"k{i}", i) for i in range(1)] + [
        type(good_sample("x", 0))(f"big{i}", big) for i in range(10)]))
    samples = iter_shard(file)
    assert next(samples).key == "k0"
    assert file.position <= 2 * READ_SIZE
    assert next(samples).key == "big0" and file.position <= 5 * READ_SIZE
    assert len(list(samples)) == 9 and file.position == len(file.data)


def test_storage_failure_while_reading_is_transient_never_damage(tmp_path):
    """A connection that drops mid-shard is not a truncated tar: it raises (a rerun
    retries the shard) instead of turning the rest of the shard into final error rows."""
    data = write_shard([good_sample(f"k{i}", i) for i in range(20)])
    with pytest.raises(ShardReadError, match="connection reset"):
        list(iter_shard(CountingFile(data, fail_after=len(data) // 2)))
    with pytest.raises(ShardReadError, match="connection reset"):
        list(iter_shard(CountingFile(gzip.compress(data), fail_after=len(data) // 3)))
    # The decode task's view: one transient error, whatever storage raised (here: the file is gone).
    batches = list(stages.read_shard_batches(Shard("gone", f"file://{tmp_path}/gone.tar"), {}, 4))
    assert [(e.category, e.transient) for b in batches for e in b.errors] == [("cannot read shard", True)]
    assert "FileNotFoundError" in batches[-1].errors[0].reason


# ---------------------------------------------------------------------- source_mode tells the truth
def _image_bytes(frames: list[np.ndarray], fmt: str, **options) -> bytes:
    out = io.BytesIO()
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(out, format=fmt, **({"save_all": True, "append_images": rest} if rest else {}), **options)
    return out.getvalue()


def test_source_mode_says_only_what_was_done():
    """Pillow 13's exif_transpose returns a copy even when it turns nothing, and every image
    was said to be turned; an animation kept its first frame without a word."""
    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    assert decode_image(_image_bytes([pixels], "PNG"))[1] == "RGB"
    assert decode_image(_image_bytes([pixels], "JPEG"))[1] == "RGB"
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 1  # "normal": nothing to turn
    assert decode_image(_image_bytes([pixels], "JPEG", exif=exif.tobytes()))[1] == "RGB"
    exif[0x0112] = 6
    turned, mode = decode_image(_image_bytes([pixels], "JPEG", exif=exif.tobytes()))
    assert turned.shape == (6, 4, 3) and mode == "RGB (EXIF orientation 6 applied)"
    frames = [np.full((8, 8, 3), 60 * i, np.uint8) for i in range(3)]
    assert decode_image(_image_bytes(frames, "GIF"))[1].endswith("(first of 3 frames)")
    assert "frames" not in decode_image(_image_bytes(frames[:1], "GIF"))[1]


# ---------------------------------------------------------------------- credentials
def test_credentials_are_redacted_by_default_in_options_and_urls():
    safe = redact(secret_options())
    assert not any(secret in json.dumps(safe) for secret in SECRETS)
    assert safe["endpoint_url"] == "https://***@store.example:9000"
    assert safe["client_kwargs"] == {"sas_token": "***", "region_name": "r1"}
    assert safe["anon"] is False and safe["config_kwargs"] == {"retries": {"max_attempts": 3}}
    assert safe["headers"] == safe["connection_string"] == safe["passphrase"] == "***"
    assert redact_url("https://h.example/a.tar?sv=1&sig=s3cr3t") == "https://h.example/a.tar?sv=***&sig=***"
    assert redact_url("s3://bucket/part-00?.tar") == "s3://bucket/part-00?.tar"  # a glob, not a query
    assert redact_url("data/shards") == "data/shards"
    config = CompressConfig(["https://u:s3cr3t@h.example/a.tar"], "s3://k:s3cr3t@bucket/out", "c",
                            storage_options=secret_options())
    assert "s3cr3t" not in json.dumps(config.public())


# ---------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags, message", [
    (["--actors", "-1"], "--actors"), (["--actors", "0"], "--actors"), (["--batch-size", "0"], "--batch-size"),
    (["--gpus-per-actor", "-1"], "--gpus-per-actor"), (["--storage-options", "[1]"], "JSON object"),
    (["--storage-options", "{key: s3cr3t"], "not JSON")])
def test_bad_flags_are_refused_with_a_clear_error_before_any_work(flags, message, capsys, tmp_path):
    """--actors -1 used to end in an IndexError after Ray had started."""
    assert compress_bucket.main(["--input", str(tmp_path), "--output", str(tmp_path / "out"), *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and "s3cr3t" not in error
    with pytest.raises(ConfigError, match="batch_size"):
        CompressConfig("in", "out", "c", batch_size=0)


# ---------------------------------------------------------------------- resuming: what is committed
class CountingFS(LocalFileSystem):
    """The local filesystem, counting listings, existence checks and bytes read."""

    cachable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.bytes_read = Counter(), 0

    def ls(self, path, detail=False, **kwargs):
        self.calls["ls"] += 1
        return super().ls(path, detail=detail, **kwargs)

    def exists(self, path, **kwargs):
        self.calls["exists"] += 1
        return super().exists(path, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        data = super().cat_file(path, start=start, end=end, **kwargs)
        self.bytes_read += len(data)
        return data


def _committed_archive(folder, shards: int) -> dict[str, int]:
    """An archive of `shards` committed shards whose manifests are far larger than their footers."""
    output = open_location(str(folder))
    codec = stages.CodecInfo("c", "00", False)
    for number in range(shards):
        shard = Shard(f"s{number}", f"file:///in/s{number}.tar")
        images = [stages.EncodedImage(stages.Source(f"k{number}-{i}", i, "png", "RGB", 1000 + i,
                                                    {"npy": os.urandom(3 * FOOTER_BYTES)}), 8, 4, b"x" * (10 + i), ())
                  for i in range(2)]
        batch = stages.EncodedBatch(images, [stages.MemberError.of("bad", "jpg", "cannot decode image", "x")])
        stages.commit_shard(output, shard, [batch], codec)
    return {p.name: p.stat().st_size for p in (folder / "manifest").iterdir()}


def test_resumed_run_learns_the_archive_from_one_listing_and_the_footers(tmp_path):
    sizes = _committed_archive(tmp_path, 3)
    assert min(sizes.values()) > 2 * FOOTER_BYTES
    fs = CountingFS()
    committed = read_committed(Location(fs, str(tmp_path)))
    assert fs.calls == {"ls": 1} and fs.bytes_read <= 3 * FOOTER_BYTES  # no exists per shard, no rows read
    assert sorted(committed) == ["s0", "s1", "s2"]
    assert committed["s1"].source_url == "file:///in/s1.tar"
    assert committed["s1"].totals == ShardTotals(2, 64, 2001, 21, Counter({"cannot decode image": 1}))


def test_manifests_written_before_the_footer_metadata_are_read_from_their_rows(tmp_path):
    output = open_location(str(tmp_path))
    row = {"key": "k", "source_url": "file:///old/s.tar", "width": 4, "height": 2, "codec": "c",
           "weights_digest": "00", "data_url": "file:///o/data/s.bin", "offset": 0, "length": 5,
           "chunk_lengths": [], "crc32": 0, "bpp": 5.0, "extras": [], "source_member": "png",
           "source_mode": "RGB", "source_bytes": 40}
    write_table(output, manifest_path("old"), to_table([row], MANIFEST_SCHEMA))
    committed = read_committed(output)
    assert committed["old"].source_url == "file:///old/s.tar"
    assert committed["old"].totals == ShardTotals(1, 8, 40, 5, Counter())
