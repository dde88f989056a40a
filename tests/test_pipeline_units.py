"""The pipeline's pieces without Ray: tar reading, shard listing, redaction, stages, layout."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import stages
from pipeline.manifest import (MANIFEST_SCHEMA, data_path, errors_path, manifest_path, read_errors, read_manifests,
                               write_table)
from pipeline.shards import MemberError, Sample, read_shard, split_member_name, write_shard
from pipeline.storage import Shard, list_shards, open_location, redact

from .pipeline_fixtures import FAULTS, build_dataset, good_sample, middle_of_member


def test_member_names_split_like_webdataset():
    assert split_member_name("dir/abc.seg.png") == ("dir/abc", "seg.png")
    assert split_member_name("abc.jpg") == ("abc", "jpg")
    assert split_member_name("README") == ("README", "")
    assert split_member_name("dir/.hidden.png") == ("dir/.hidden", "png")  # never an empty key


def test_read_shard_groups_members_and_separates_extras():
    samples = [good_sample("a", 1), good_sample("b", 2)]
    contents = read_shard(write_shard(samples))
    assert contents.errors == []
    assert [s.key for s in contents.samples] == ["a", "b"]
    assert contents.samples[0].image_member == "jpg" and contents.samples[1].image_member == "png"
    assert set(contents.samples[0].extras) == {"cls", "json"}
    assert contents.samples[0].members == samples[0].members


@pytest.mark.parametrize("where", ["inside a member", "inside a header"])
def test_truncated_tar_keeps_complete_samples(where):
    data = write_shard([good_sample(f"k{i}", i) for i in range(3)])
    cut = middle_of_member(data, "k2.")
    if where == "inside a header":
        cut = cut - cut % 512 - 512 + 100  # 100 bytes into k2's first member header
    contents = read_shard(data[:cut])
    assert [s.key for s in contents.samples] == ["k0", "k1"]
    assert len(contents.errors) == 1 and contents.errors[0].reason.startswith("truncated tar")
    assert contents.errors[0].category == "truncated tar"


def test_not_a_tar_is_an_error_not_an_exception():
    contents = read_shard(b"hello, not a tar")
    assert contents.samples == [] and contents.errors[0].reason.startswith("not a tar archive")
    assert contents.errors[0].category == "not a tar archive"


def test_errors_written_before_the_category_column_read_with_one(tmp_path):
    output = open_location(str(tmp_path))
    old = pa.table({"key": ["a"], "source_url": ["file:///s.tar"], "member": ["jpg"],
                    "reason": ["cannot decode image: OSError: broken"]})
    write_table(output, errors_path("old"), old)
    new = stages.commit_shard(output, Shard("new", "file:///new.tar"),
                              [stages.EncodedBatch(errors=[MemberError.of("b", "png", "decompression bomb", "big")])],
                              stages.CodecInfo("c", "00", False))
    assert new.errors == {"decompression bomb": 1}
    rows = sorted(read_errors(output).to_pylist(), key=lambda r: r["key"])
    assert [(r["key"], r["category"]) for r in rows] == [("a", "cannot decode image"), ("b", "decompression bomb")]
    assert rows[1]["reason"] == "decompression bomb: big"


def test_list_shards_from_folder_glob_and_list(tmp_path):
    build_dataset(tmp_path / "in", n_good=2)
    names = ["shard-000", "shard-001", "shard-002"]
    assert [s.name for s in list_shards(str(tmp_path / "in"))] == names
    assert [s.name for s in list_shards(str(tmp_path / "in" / "shard-00[01].tar"))] == names[:2]
    listed = list_shards(f"{tmp_path}/in/shard-000.tar,{tmp_path}/in/shard-002.tar")
    assert [s.name for s in listed] == ["shard-000", "shard-002"]
    assert listed[0].url == f"file://{tmp_path}/in/shard-000.tar"


def test_list_shards_refuses_missing_inputs_and_name_clashes(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a shard"):
        list_shards(str(tmp_path / "nothing"))
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.tar").write_bytes(write_shard([good_sample("x", 1)]))
    with pytest.raises(ValueError, match="share the name 'same'"):
        list_shards([str(tmp_path / "a"), str(tmp_path / "b")])


def test_redact_hides_every_credential():
    options = {"endpoint_url": "http://h", "key": "AK", "secret": "SK", "token": "T",
               "client_kwargs": {"aws_secret_access_key": "SK2", "region_name": "r"}}
    safe = redact(options)
    assert "AK" not in str(safe) and "SK" not in str(safe) and "T'" not in str(safe)
    assert safe["endpoint_url"] == "http://h" and safe["client_kwargs"]["region_name"] == "r"


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    location = open_location(str(tmp_path / "out"))
    location.write_atomic("manifest/a.parquet", b"x")
    location.write_atomic("manifest/a.parquet", b"y")
    assert location.read("manifest/a.parquet") == b"y"
    assert [p.name for p in (tmp_path / "out" / "manifest").iterdir()] == ["a.parquet"]


def test_decode_stage_reports_each_fault_with_its_reason():
    samples = [good_sample("ok", 3)] + [Sample(key, members) for key, (members, _) in FAULTS.items()]
    batches = list(stages.decode_shard_batches(io.BytesIO(write_shard(samples)), batch_size=8))
    errors = [e for b in batches for e in b.errors]
    assert {e.key: e.category for e in errors} == {k: r for k, (_, r) in FAULTS.items()}
    assert all(e.reason.startswith(f"{e.category}: ") or e.reason == e.category for e in errors)
    assert not any(e.transient for e in errors)  # the input's own faults: final
    assert [i.source.key for b in batches for i in b.images] == ["ok"]
    assert set(batches[0].images[0].source.extras) == {"cls", "json"}


def test_commit_writes_blob_errors_then_a_manifest_any_reader_reads(tmp_path, uqdm):
    samples = [good_sample(f"k{i}", i) for i in range(2)] + [Sample("notes", {"txt": b"x"})]
    shard = Shard("s0", "file:///in/s0.tar")
    items = list(stages.decode_shard_batches(io.BytesIO(write_shard(samples)), batch_size=1))
    encoded = [stages.encode_batch(uqdm, batch) for batch in items]
    codec = stages.CodecInfo(uqdm.name, uqdm.weights_digest.hex(), uqdm.progressive)
    output = open_location(str(tmp_path))
    totals = stages.commit_shard(output, shard, encoded, codec)
    assert totals.images == 2 and totals.errors == {"no image member": 1}
    table = pq.read_table(tmp_path / manifest_path("s0"))
    assert table.schema.equals(MANIFEST_SCHEMA) and read_manifests(output).num_rows == 2
    rows = table.to_pylist()
    blob = (tmp_path / data_path("s0")).read_bytes()
    assert rows[0]["offset"] == 0 and rows[1]["offset"] == rows[0]["length"]
    assert len(blob) == sum(r["length"] for r in rows)
    for row in rows:
        record = blob[row["offset"]:row["offset"] + row["length"]]
        header = uqdm.read_header(record)
        assert row["length"] - sum(row["chunk_lengths"]) == header.size
        assert dict(row["extras"]) == {k: v for k, v in samples[int(row["key"][1])].members.items()
                                       if k in ("cls", "json")}
    error = pq.read_table(tmp_path / errors_path("s0")).to_pylist()[0]
    assert error["category"] == "no image member" and error["reason"] == "no image member: found txt"


def test_encode_failure_isolated_to_its_image(uqdm):
    batch = stages.DecodedBatch([
        stages.DecodedImage(stages.Source("good", 0, "png", "RGB", 10), np.full((8, 8, 3), 100, np.uint8)),
        stages.DecodedImage(stages.Source("bad", 1, "png", "RGB", 10), np.zeros((8, 8), np.float32))])
    result = stages.encode_batch(uqdm, batch)
    assert [i.source.key for i in result.images] == ["good"]
    assert result.errors[0].key == "bad" and result.errors[0].reason.startswith("encode failed: ")
    assert result.errors[0].category == "encode failed"
    assert result.errors[0].transient  # a codec failing on a decoded image: not the image's fault
