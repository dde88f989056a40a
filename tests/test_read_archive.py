"""Reading archives back: random access, prefixes fetched alone, duplicate keys across shards,
settings an archive cannot take, lost manifests; Ray Data's reader and decoders."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs import decode as decode_job
from pipeline.archive import Archive, ArchiveError
from pipeline.decode import decode_archive
from pipeline.loader import ArchiveDataset, Synthesizer
from pipeline.manifest import manifest_path, read_manifest, write_table
from pipeline.ray_data import TorchCollate, decode_records, read_archive
from pipeline.storage import open_location

from .pipeline_fixtures import local_ray  # noqa: F401 - fixture
from .read_fixtures import compress, copy_archive, counting_fs, sample, sources, write_shards
from .test_decode_split import levels_apart
from .test_portability import PIXEL_BOUND

UQDM_SHARDS = {"u-000": [sample("a", 1), sample("b", 2, (40, 24))], "u-001": [sample("c", 3)]}
# "dup" is in both shards: allowed across shards, as in webdataset datasets (issue 8.3)
CDC_SHARDS = {"c-000": [sample("dup", 1), sample("p", 2), sample("q", 3, (48, 56))],
              "c-001": [sample("dup", 4, (24, 40)), sample("r", 5)]}


@pytest.fixture(scope="module")
def uqdm_archive(tmp_path_factory, local_ray):  # noqa: F811
    folder = tmp_path_factory.mktemp("read-uqdm")
    return compress(write_shards(folder / "in", UQDM_SHARDS), folder / "out", "uqdm-test")


@pytest.fixture(scope="module")
def cdc_archive(tmp_path_factory, local_ray):  # noqa: F811
    folder = tmp_path_factory.mktemp("read-cdc")
    return compress(write_shards(folder / "in", CDC_SHARDS), folder / "out", "cdc-hp128")


def test_random_access_is_one_ranged_read_of_the_record(uqdm_archive, uqdm):
    fs = counting_fs()
    archive = Archive(f"counting://{uqdm_archive}", codec=uqdm)
    row = archive.record("b")  # the manifests are read once, here
    fs.reads.clear()
    data = archive.read("b")
    assert [n for path, n in fs.reads] == [row["length"]] and len(data) == row["length"]
    fs.reads.clear()
    assert np.array_equal(archive.decode("b"), sources(UQDM_SHARDS)["u-000", "b"])  # lossless
    assert [n for path, n in fs.reads] == [row["length"]]


def test_an_archive_is_a_read_only_mapping_from_key_to_image(uqdm_archive, cdc_archive, uqdm):
    """len, in, [], iteration and get, as on a dict; a key in several shards is one key that [] refuses."""
    archive = Archive(str(uqdm_archive), codec=uqdm)
    assert isinstance(archive, Mapping) and len(archive) == 3 and list(archive) == ["a", "b", "c"]
    assert "b" in archive and "zz" not in archive and archive.get("zz") is None
    assert np.array_equal(archive["b"], sources(UQDM_SHARDS)["u-000", "b"])  # lossless
    with pytest.raises(KeyError, match="no image with key 'zz'"):
        archive["zz"]
    with pytest.raises(TypeError):
        archive["a"] = archive["a"]  # read-only
    assert archive != Archive(str(uqdm_archive), codec=uqdm) and archive == archive  # never decodes to compare
    cdc = Archive(str(cdc_archive))
    assert len(cdc) == 4 and sorted(cdc) == ["dup", "p", "q", "r"]
    with pytest.raises(ArchiveError, match="key 'dup' is in 2 shards"):
        cdc["dup"]


def test_prefix_reads_fetch_only_the_prefix_bytes(uqdm_archive, uqdm):
    """Archive.read and the loader fetch header + first chunks, nothing more (counted through fsspec)."""
    fs = counting_fs()
    url = f"counting://{uqdm_archive}"
    archive = Archive(url, codec=uqdm)
    rows = {key: archive.record(key) for key in ("a", "b", "c")}
    prefix = {key: row["length"] - sum(row["chunk_lengths"][n:]) for key, row in rows.items() for n in [2]}
    fs.reads.clear()
    data = archive.read("a", chunks=2)
    assert len(data) == prefix["a"] < rows["a"]["length"] and fs.bytes_read("data") == prefix["a"]
    whole = Archive(str(uqdm_archive), codec=uqdm).read("a")
    assert data == whole[:prefix["a"]]
    assert np.array_equal(archive.decode("a", chunks=2), uqdm.decompress(whole, chunks=2))

    fs.reads.clear()
    samples = list(ArchiveDataset(url, chunks=2, decode_batch=2))
    assert sorted(s["__key__"] for s in samples) == ["a", "b", "c"]
    assert fs.bytes_read("data") == sum(prefix.values())
    for item in samples:
        assert np.array_equal(item["image"].numpy(), archive.decode(item["__key__"], chunks=2))


def test_missing_key_is_a_clear_error(uqdm_archive):
    archive = Archive(str(uqdm_archive))
    with pytest.raises(ArchiveError, match="no image with key 'nope'"):
        archive.read("nope")
    with pytest.raises(ArchiveError, match=r"1 keys are not in .*\['nope'\]"):
        ArchiveDataset(str(uqdm_archive), keys=["a", "nope"])
    with pytest.raises(ArchiveError, match="nope"):
        decode_archive(str(uqdm_archive), str(uqdm_archive.parent / "never"), keys=["nope"])
    assert not (uqdm_archive.parent / "never").exists()


def test_empty_keys_yield_nothing(uqdm_archive):
    """Issue 8.7: keys=[] is an empty selection, not 'every key'."""
    dataset = ArchiveDataset(str(uqdm_archive), keys=[])
    assert len(dataset) == 0 and list(dataset) == []
    assert len(ArchiveDataset(str(uqdm_archive))) == 3


def test_progressive_prefix_on_a_cdc_archive_is_a_clear_error(cdc_archive, uqdm_archive, tmp_path, capsys):
    """Issue 8.7: --chunks on a CDC archive ended in TypeError deep in the codec; every reader now
    refuses it up front, saying why; and steps on a UQDM archive likewise."""
    archive = Archive(str(cdc_archive))
    for attempt in (lambda: archive.read("p", chunks=1), lambda: archive.decode("p", chunks=1),
                    lambda: ArchiveDataset(str(cdc_archive), chunks=1),
                    lambda: read_archive(str(cdc_archive), chunks=1),
                    lambda: decode_archive(str(cdc_archive), str(tmp_path / "never"), chunks=1)):
        with pytest.raises(ArchiveError, match="not progressive"):
            attempt()
    assert decode_job.main(["--input", str(cdc_archive), "--to", str(tmp_path / "never"), "--chunks", "2"]) == 2
    assert "not progressive" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    with pytest.raises(ArchiveError, match="choose the prefix with chunks"):
        Archive(str(uqdm_archive)).decode("a", steps=2)
    with pytest.raises(ArchiveError, match="has 5 chunks; asked for 6"):
        Archive(str(uqdm_archive)).read("a", chunks=6)


def test_steps_past_the_codecs_maximum_are_refused_before_any_decoding(cdc_archive, tmp_path, capsys):
    """--steps 5000 started Ray and failed every shard in its actor (the codec's ValueError, exit 1)."""
    with pytest.raises(ArchiveError, match=r"steps must be a whole number of diffusion steps in 0\.\.1000"):
        Archive(str(cdc_archive)).decode("p", steps=5000)
    with pytest.raises(ArchiveError, match=r"in 0\.\.1000"):
        ArchiveDataset(str(cdc_archive), steps=5000)
    assert decode_job.main(["--input", str(cdc_archive), "--to", str(tmp_path / "never"), "--steps", "5000"]) == 2
    assert "got 5000" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_same_key_in_two_shards_random_access_names_the_shards(cdc_archive):
    """Issue 8.3: random access by an ambiguous key says where it is; shard= chooses."""
    archive = Archive(str(cdc_archive))
    assert archive.keys().count("dup") == 1 and sorted(archive.keys()) == ["dup", "p", "q", "r"]
    with pytest.raises(ArchiveError, match=r"'dup' is in 2 shards .*\(c-000, c-001\): pass shard="):
        archive.read("dup")
    one, other = archive.record("dup", shard="c-000"), archive.record("dup", shard="c-001")
    assert (one["shard"], other["shard"]) == ("c-000", "c-001") and one["extras"]["cls"] == b"1"
    assert archive.decode("dup", shard="c-001", steps=0).shape == (24, 40, 3)
    with pytest.raises(ArchiveError, match="no image with key 'p' in shard 'c-001'"):
        archive.record("p", shard="c-001")


def test_same_key_in_two_shards_whole_archive_readers_read_both(cdc_archive, tmp_path):
    """Issue 8.3: the loader, Ray Data and the decode job read records, (shard, key): both 'dup's."""
    expected = sorted((shard, s["__key__"]) for shard, samples in CDC_SHARDS.items() for s in samples)
    assert sorted((s["__shard__"], s["__key__"]) for s in ArchiveDataset(str(cdc_archive))) == expected
    dups = ArchiveDataset(str(cdc_archive), keys=["dup"])
    assert sorted(s["__shard__"] for s in dups) == ["c-000", "c-001"]
    rows = read_archive(str(cdc_archive)).drop_columns(["data"]).take_all()
    assert sorted((r["shard"], r["key"]) for r in rows) == expected
    summary = decode_archive(str(cdc_archive), str(tmp_path / "png"), steps=0, actors=1)
    assert summary.images == 5 and not summary.errors
    assert (tmp_path / "png" / "c-000" / "dup.png").is_file() and (tmp_path / "png" / "c-001" / "dup.png").is_file()


def test_ray_data_decodes_what_archive_decode_decodes(cdc_archive, uqdm_archive, uqdm):
    """read_archive + decode_records (actor pool): the same pixels as Archive.decode, extras as bytes."""
    archive = Archive(str(cdc_archive), threads=1)
    rows = decode_records(read_archive(str(cdc_archive)), steps=1, batch_size=2).take_all()
    assert len(rows) == 5 and "data" not in rows[0]
    for row in rows:
        assert np.array_equal(row["image"], archive.decode(row["key"], steps=1, shard=row["shard"]))
        assert dict(row["extras"]) == archive.record(row["key"], row["shard"])["extras"]
    prefixes = decode_records(read_archive(str(uqdm_archive), chunks=2, keys=["b"]), actors=1).take_all()
    assert [r["key"] for r in prefixes] == ["b"] and prefixes[0]["chunks"] == 2
    assert np.array_equal(prefixes[0]["image"], Archive(str(uqdm_archive), codec=uqdm).decode("b", chunks=2))


def test_ray_data_records_iterate_as_torch_batches(cdc_archive):
    """iter_torch_batches with TorchCollate: string columns and extras pass as lists, images as CHW tensors."""
    archive = Archive(str(cdc_archive), threads=1)
    images = decode_records(read_archive(str(cdc_archive), shards=["c-000"]), batch_size=2)
    batches = list(images.iter_torch_batches(batch_size=3, collate_fn=TorchCollate(layout="CHW")))
    assert sum(len(b["key"]) for b in batches) == 3
    for batch in batches:
        assert isinstance(batch["key"][0], str) and isinstance(batch["extras"][0]["cls"], bytes)
        images = batch["image"] if isinstance(batch["image"], list) else list(batch["image"])
        for key, shard, image, width in zip(batch["key"], batch["shard"], images, batch["width"].tolist()):
            assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.shape[2] == width
            assert np.array_equal(image.permute(1, 2, 0).numpy(), archive.decode(key, steps=0, shard=shard))


def test_deleted_manifest_is_detected_not_served_short(cdc_archive, tmp_path, caplog):
    """Issue 8.7: a manifest lost after _SUCCESS counted it: every reader says so instead of
    serving fewer images; allow_incomplete=True reads the rest with a warning."""
    copy = copy_archive(cdc_archive, tmp_path / "copy")
    (copy / manifest_path("c-001")).unlink()
    for attempt in (lambda: Archive(str(copy)).keys(), lambda: ArchiveDataset(str(copy)),
                    lambda: read_archive(str(copy)), lambda: decode_archive(str(copy), str(tmp_path / "never"))):
        with pytest.raises(ArchiveError, match=r"counts 2 shards but only 1 manifests are present; missing: c-001"):
            attempt()
    with caplog.at_level(logging.WARNING):
        assert sorted(s["__key__"] for s in ArchiveDataset(str(copy), allow_incomplete=True)) == ["dup", "p", "q"]
    assert "is incomplete" in caplog.text

    (copy / manifest_path("c-001")).write_bytes((cdc_archive / manifest_path("c-001")).read_bytes())
    location = open_location(str(copy))
    write_table(location, manifest_path("c-000"), read_manifest(location, "c-000").slice(0, 2))  # a row lost
    with pytest.raises(ArchiveError, match="counts 5 images but the manifests hold 4"):
        ArchiveDataset(str(copy))
    with pytest.raises(ArchiveError, match="counts 5 images"):
        Archive(str(copy)).record("p")


def test_manifest_helpers_read_one_shard(cdc_archive):
    location = open_location(str(cdc_archive))
    table = read_manifest(location, "c-001", columns=["key"])
    assert table.column_names == ["key"] and table["key"].to_pylist() == ["dup", "r"]
    assert isinstance(table, pa.Table) and Archive(str(cdc_archive)).shard_sizes() == {"c-000": 3, "c-001": 2}


def test_an_archive_names_the_weights_it_needs_and_finds_them_under_any_name(cdc_archive, tmp_path, monkeypatch):
    """The archive's weights digest decides: installed under another name, they are found; not
    installed, one line names them (name, digest) and how to get them."""
    import json

    from model import registry

    renamed = copy_archive(cdc_archive, tmp_path / "renamed")
    job = json.loads((renamed / "_job.json").read_text())
    (renamed / "_job.json").write_text(json.dumps({**job, "codec": "cdc-renamed:q4"}))
    np.testing.assert_array_equal(Archive(str(renamed)).decode("p"), Archive(str(cdc_archive)).decode("p"))

    old = copy_archive(cdc_archive, tmp_path / "old")
    (old / "_job.json").write_text(json.dumps({**job, "codec": "uqdm-tiny-exact",
                                               "weights_digest": "4c1fe047c28370c48ccd1c7552c90450"}))
    monkeypatch.setenv("DIFFPRESS_WEIGHTS", str(tmp_path / "none"))
    monkeypatch.setattr(registry, "USER_DIR", tmp_path / "none-either")
    with pytest.raises(ArchiveError) as raised:
        Archive(str(old)).decode("p")
    message = str(raised.value)
    assert "\n" not in message and "uqdm-tiny-exact (digest 4c1fe047c28370c48ccd1c7552c90450)" in message
    assert "not installed here" in message and "the copy of uqdm-tiny-exact.safetensors" in message  # how to get them


def _set_column(table: pa.Table, name: str, values: list) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))


HOSTILE_MANIFESTS = {
    "offset beyond the blob": (lambda t: _set_column(t, "offset", [10 ** 9] * t.num_rows), "ends before"),
    "negative length": (lambda t: _set_column(t, "length", [-5] * t.num_rows), "damaged manifest row"),
    "negative offset": (lambda t: _set_column(t, "offset", [-100] * t.num_rows), "damaged manifest row"),
    "overlapping records": (lambda t: _set_column(t, "offset", [t["offset"][0].as_py()] * t.num_rows), "crc32"),
    "missing column": (lambda t: t.drop_columns(["crc32"]), "damaged manifest row"),
    # a local read allocated what it was asked for: this was a MemoryError (or, smaller, a huge allocation)
    "a length of a petabyte": (lambda t: _set_column(t, "length", [10 ** 15] * t.num_rows), "ends before"),
    "no data_url": (lambda t: _set_column(t, "data_url", [None] * t.num_rows), "damaged manifest row"),
}


@pytest.mark.parametrize("case", list(HOSTILE_MANIFESTS))
def test_hostile_manifests_are_clear_errors_never_wrong_images(cdc_archive, tmp_path, case):
    edit, message = HOSTILE_MANIFESTS[case]
    copy = copy_archive(cdc_archive, tmp_path / "copy")
    location = open_location(str(copy))
    write_table(location, manifest_path("c-000"), edit(read_manifest(location, "c-000")))
    with pytest.raises(ArchiveError, match=message):
        Archive(str(copy)).decode("p")


def test_chunk_lengths_that_do_not_fit_their_record_are_a_damaged_row_for_a_prefix_read(uqdm_archive, tmp_path, uqdm):
    copy = copy_archive(uqdm_archive, tmp_path / "copy")
    location = open_location(str(copy))
    table = read_manifest(location, "u-000")
    lengths = table["chunk_lengths"].to_pylist()
    hostile = [[n * 1000 for n in lengths[0]], [-n for n in lengths[1]]]  # past the record; negative
    write_table(location, manifest_path("u-000"), _set_column(table, "chunk_lengths", hostile))
    archive = Archive(str(copy), codec=uqdm)
    for key in ("a", "b"):
        with pytest.raises(ArchiveError, match=f"record '{key}' .* damaged manifest row .*chunk lengths"):
            archive.read(key, chunks=2)
    assert archive.read("a") == Archive(str(uqdm_archive), codec=uqdm).read("a")  # the whole record is crc-checked


def test_a_blob_truncated_after_its_commit_is_refused_by_every_reader(cdc_archive, tmp_path):
    copy = copy_archive(cdc_archive, tmp_path / "copy")
    [blob] = (copy / "data").glob("c-000*")
    blob.write_bytes(blob.read_bytes()[:-10])
    with pytest.raises(ArchiveError, match="ends before"):
        Archive(str(copy)).decode("q")  # the shard's last record
    assert np.array_equal(Archive(str(copy)).decode("p"), Archive(str(cdc_archive)).decode("p"))  # the rest reads
    for decode_on in ("worker", "device"):
        with pytest.raises(ArchiveError, match="ends before"):
            list(ArchiveDataset(str(copy), shards=["c-000"], decode_on=decode_on))


DAMAGED_LAYOUT_FILES = {
    "a _job.json that is not JSON": ("_job.json", b'{"codec": "cdc-hp128'),
    "a _job.json that is a list": ("_job.json", b"[]"),
    "a _job.json naming no codec": ("_job.json", b'{"format": "diffpress-archive/1"}'),
    "an empty _SUCCESS, as Hadoop writes": ("_SUCCESS", b""),
    "a manifest that is not Parquet": (manifest_path("c-000"), b"not parquet" * 10),
}


@pytest.mark.parametrize("case", list(DAMAGED_LAYOUT_FILES))
def test_a_damaged_job_success_or_manifest_file_is_one_line_naming_it_not_a_traceback(cdc_archive, tmp_path, capsys,
                                                                                      case):
    name, content = DAMAGED_LAYOUT_FILES[case]
    copy = copy_archive(cdc_archive, tmp_path / "copy")
    (copy / name).write_bytes(content)
    with pytest.raises(ArchiveError, match=f"{name} is (damaged|not a readable manifest)"):
        Archive(str(copy)).decode("p")
    assert decode_job.main(["--input", str(copy), "--to", str(tmp_path / "never")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("diffpress decode: error: ") and name in line
    assert not (tmp_path / "never").exists()


def test_a_manifest_column_of_another_type_is_an_archive_error_naming_the_manifest(cdc_archive, tmp_path):
    copy = copy_archive(cdc_archive, tmp_path / "copy")
    location = open_location(str(copy))
    table = read_manifest(location, "c-000")
    index = table.schema.get_field_index("offset")
    write_table(location, manifest_path("c-000"),
                table.set_column(index, "offset", pa.array(["x"] * table.num_rows, pa.string())))
    with pytest.raises(ArchiveError, match=r"manifest/c-000.parquet is not a readable manifest: .*'x'"):
        Archive(str(copy)).decode("p")
    assert np.array_equal(Archive(str(copy)).decode("r"), Archive(str(cdc_archive)).decode("r"))  # other shards read


def test_latents_of_a_uqdm_archive_synthesize_to_its_exact_prefix_images(uqdm_archive, uqdm):
    """UQDM's exact half is its whole decode: the workers pass the (prefix) streams on and the
    Synthesizer decodes them on its device; steps and CDC's speed options are refused."""
    archive = Archive(str(uqdm_archive), codec=uqdm)
    rows = archive.shard_records("u-000")
    synthesize = Synthesizer(str(uqdm_archive), device="cpu", chunks=2)
    images = synthesize(archive.latents_of_rows(rows, chunks=2))
    assert isinstance(images, list)  # two sizes: not stacked
    for row, image in zip(rows, images):
        assert np.array_equal(image.numpy(), archive.decode(row["key"], chunks=2, shard="u-000"))
    assert all(isinstance(item, bytes) for item in archive.latents_of_rows(rows, chunks=2))
    with pytest.raises(ArchiveError, match="choose the prefix with chunks"):
        Synthesizer(str(uqdm_archive), steps=2)
    with pytest.raises(ArchiveError, match="which decode exactly: autocast"):
        Synthesizer(str(uqdm_archive), autocast=torch.bfloat16)
    with pytest.raises(ValueError, match="UQDM decodes exactly"):
        Synthesizer(str(uqdm_archive), channels_last=True)


def test_ray_data_in_two_stages_decodes_what_archive_decode_decodes(cdc_archive, uqdm_archive):
    """split=True (the default with GPU decoders): latents on CPU actors, then batched synthesis."""
    archive = Archive(str(cdc_archive), threads=1)
    rows = decode_records(read_archive(str(cdc_archive)), steps=1, batch_size=3, actors=1, split=True).take_all()
    assert len(rows) == 5 and not {"data", "latents"} & rows[0].keys()
    for row in rows:
        assert np.array_equal(row["image"], archive.decode(row["key"], steps=1, shard=row["shard"]))
        assert dict(row["extras"]) == archive.record(row["key"], row["shard"])["extras"]
    prefixes = decode_records(read_archive(str(uqdm_archive), chunks=2), actors=1, split=True).take_all()
    reader = Archive(str(uqdm_archive))
    assert all(np.array_equal(r["image"], reader.decode(r["key"], chunks=2, shard=r["shard"])) for r in prefixes)


def test_an_archive_decodes_on_all_threads_within_the_pixel_bound_of_the_one_thread_readers(cdc_archive):
    """threads=None (the default) uses torch's threads; threads=1 gives the parallel readers' pixels."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one, every = Archive(str(cdc_archive), threads=1), Archive(str(cdc_archive))
        for key in ("p", "q"):
            assert levels_apart([every.decode(key, steps=1)], [one.decode(key, steps=1)]) <= PIXEL_BOUND
            assert torch.get_num_threads() == 2  # restored after the one-thread decode
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        Archive(str(cdc_archive), threads=0)


def test_a_prefix_past_the_streams_end_is_refused_before_any_decoding(uqdm_archive, tmp_path):
    """It used to decode every record into an error row, one by one."""
    with pytest.raises(ArchiveError, match="chunks 99 is past their end"):
        decode_archive(str(uqdm_archive), str(tmp_path / "out"), chunks=99)
    assert not (tmp_path / "out").exists()
