"""jobs.decode on Ray: safe output names for any key, extras never overwritten, one bad record
does not stop the rest, resumable shard by shard; and every reader gives the same pixels."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from jobs import decode as decode_job
from pipeline.archive import Archive, ArchiveError
from pipeline.decode import MAX_NAME, PARTIAL_DIR, commit_path, decode_archive, safe_name
from pipeline.loader import ArchiveDataset
from pipeline.manifest import manifest_path, read_manifest, write_table
from pipeline.ray_data import decode_records, read_archive
from pipeline.shards import read_shard
from pipeline.storage import open_location

from .pipeline_fixtures import encoded, local_ray  # noqa: F401 - fixture
from .read_fixtures import HOSTILE_KEYS, compress, copy_archive, png_pixels, sample, write_shards
from .test_portability import PIXEL_BOUND

MASK = encoded(np.full((32, 40, 3), 255, np.uint8), "PNG")
SHARDS = {"hostile": [sample(key, 2 * i + 1) for i, key in enumerate(HOSTILE_KEYS)],
          # "b" again, in another shard; "masked": a JPEG image with a PNG mask beside it (issue 8.4)
          "plain": [sample("b", 40), sample("masked", 41, png=MASK), sample("m0", 42)]}


@pytest.fixture(scope="module")
def archive(tmp_path_factory, local_ray):  # noqa: F811
    folder = tmp_path_factory.mktemp("decode-job")
    return compress(write_shards(folder / "in", SHARDS), folder / "out", "cdc-hp128")


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_keys_used_as_file_paths_stay_inside_to_apart_and_reversible(archive, tmp_path):
    """Issue 8.1: `../../x`, `/abs/dir/x`, `b` / `./b` / `x/../b`, a 240-character key: every PNG
    lands inside --to under its own name, and the name (or the commit file) gives the key back."""
    to = tmp_path / "a" / "b" / "png"
    assert decode_job.main(["--input", str(archive), "--to", str(to), "--steps", "0", "--actors", "1"]) == 0
    assert files_under(tmp_path) == files_under(to)  # nothing outside --to
    commit = json.loads((to / commit_path("hostile")).read_text())
    assert sorted(commit["files"].values()) == sorted(HOSTILE_KEYS) and commit["written"] == len(HOSTILE_KEYS)
    written = {p.name for p in (to / "hostile").iterdir()}
    assert written == set(commit["files"]) | set(commit["extras"]) and len(commit["files"]) == len(HOSTILE_KEYS)
    reader = Archive(str(archive), threads=1)
    for name, key in commit["files"].items():
        assert name == f"{safe_name(key)}.png" and "/" not in name and not name.startswith((".", "-"))
        assert len(name) <= MAX_NAME + 4
        if "~" not in name:
            assert unquote(name[:-4]) == key
        image = png_pixels((to / "hostile" / name).read_bytes())
        assert np.array_equal(image, reader.decode(key, steps=0, shard="hostile"))
    assert (to / "plain" / "b.png").is_file() and (to / "hostile" / "b.png").is_file()  # "b" in two shards


def test_png_output_writes_each_records_extras_beside_its_image(archive, tmp_path):
    """--format png used to drop the labels: now <name>.cls and <name>.json sit beside <name>.png,
    and a record with a `png` extra (a mask) keeps it, its image being <name>.decoded.png."""
    to = tmp_path / "png"
    summary = decode_archive(str(archive), str(to), steps=0, shards=["plain"], actors=1)
    assert summary.images == 3 and not summary.errors
    originals = {s["__key__"]: s for s in SHARDS["plain"]}
    for key in ("b", "m0"):
        assert (to / "plain" / f"{key}.cls").read_bytes() == originals[key]["cls"]
        assert (to / "plain" / f"{key}.json").read_bytes() == originals[key]["json"]
    assert (to / "plain" / "masked.png").read_bytes() == MASK
    assert np.array_equal(png_pixels((to / "plain" / "masked.decoded.png").read_bytes()),
                          Archive(str(archive), threads=1).decode("masked", steps=0, shard="plain"))
    commit = json.loads((to / commit_path("plain")).read_text())
    assert commit["files"] == {"b.png": "b", "masked.decoded.png": "masked", "m0.png": "m0"}
    assert commit["extras"]["masked.png"] == "masked" and commit["extras"]["b.cls"] == "b"


def test_keys_used_as_file_paths_wds_keeps_true_keys_of_any_length(archive, tmp_path):
    """Issue 8.1: --format wds wrote USTAR tars (100-character names) after decoding everything;
    now one PAX shard per archive shard, same name, true keys."""
    summary = decode_archive(str(archive), str(tmp_path / "wds"), steps=0, fmt="wds", actors=2)
    assert summary.images == len(HOSTILE_KEYS) + 3 and not summary.errors
    assert sorted(p.name for p in (tmp_path / "wds").glob("*.tar")) == ["hostile.tar", "plain.tar"]
    contents = read_shard((tmp_path / "wds" / "hostile.tar").read_bytes())
    assert not contents.errors and [s.key for s in contents.samples] == HOSTILE_KEYS
    originals = {s["__key__"]: s for s in SHARDS["hostile"]}
    for item in contents.samples:
        assert item.members["cls"] == originals[item.key]["cls"] and item.members["json"] == originals[item.key]["json"]
        assert np.array_equal(png_pixels(item.members["png"]), Archive(str(archive), threads=1).decode(item.key, steps=0,
                                                                                              shard="hostile"))


def test_png_extra_never_overwrites_the_decoded_image(archive, tmp_path):
    """Issue 8.4: a sample whose extras hold a `.png` (a mask) keeps it; the image is decoded.png."""
    decode_archive(str(archive), str(tmp_path / "wds"), steps=0, fmt="wds", shards=["plain"], actors=1)
    with tarfile.open(tmp_path / "wds" / "plain.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert members["masked.png"] == MASK
    image = png_pixels(members["masked.decoded.png"])
    assert np.array_equal(image, Archive(str(archive), threads=1).decode("masked", steps=0, shard="plain"))
    assert not np.array_equal(image, png_pixels(MASK))
    assert {"masked.cls", "masked.json", "b.png", "m0.png"} <= set(members)
    commit = json.loads((tmp_path / "wds" / commit_path("plain")).read_text())
    assert commit["image_members"] == {"masked": "decoded.png"}


def test_keys_used_as_file_paths_one_bad_record_does_not_stop_the_rest(archive, tmp_path, capsys):
    """A record that cannot be read is listed with its reason; every other record is written."""
    copy = copy_archive(archive, tmp_path / "copy")
    row = Archive(str(copy)).record("m0")
    blob = copy / "data" / "plain.bin"
    data = bytearray(blob.read_bytes())
    data[row["offset"] + row["length"] - 1] ^= 0xFF
    blob.write_bytes(bytes(data))
    to = tmp_path / "wds"
    assert decode_job.main(["--input", str(copy), "--to", str(to), "--format", "wds", "--steps", "0"]) == 1
    assert "plain/m0: record 'm0' of shard plain" in capsys.readouterr().out
    keys = [s.key for s in read_shard((to / "plain.tar").read_bytes()).samples]
    assert keys == ["b", "masked"] and len(read_shard((to / "hostile.tar").read_bytes()).samples) == len(HOSTILE_KEYS)
    errors = json.loads((to / commit_path("plain")).read_text())["errors"]
    assert [e["key"] for e in errors] == ["m0"] and "crc32" in errors[0]["reason"]


def test_a_failed_shard_is_named_with_its_cause_not_rays_wrapper(archive, tmp_path, capsys):
    """The summary gave the first line of Ray's RayTaskError: the actor's name and pid, never why."""
    copy = copy_archive(archive, tmp_path / "copy")
    location = open_location(str(copy))
    table = read_manifest(location, "plain")
    offsets = pa.array([str(n) + "x" for n in table["offset"].to_pylist()], pa.string())
    write_table(location, manifest_path("plain"), table.set_column(table.schema.get_field_index("offset"), "offset",
                                                                   offsets))
    to = tmp_path / "wds"
    assert decode_job.main(["--input", str(copy), "--to", str(to), "--format", "wds", "--steps", "0"]) == 1
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("shard failed")]
    assert line.startswith("shard failed       plain: ArchiveError: ") and "manifest/plain.parquet" in line
    assert "ray::" not in line and len(read_shard((to / "hostile.tar").read_bytes()).samples) == len(HOSTILE_KEYS)


@pytest.mark.parametrize("fmt", ["png", "wds"])
def test_a_key_twice_in_one_manifest_is_that_records_error_and_the_rest_of_the_shard_decodes(archive, tmp_path,
                                                                                             capsys, fmt):
    """As PNGs the whole shard failed (two records, one file name); in a .tar the key's members were written twice."""
    copy = copy_archive(archive, tmp_path / "copy")
    location = open_location(str(copy))
    table = read_manifest(location, "plain")
    assert table["key"].to_pylist() == ["b", "masked", "m0"]
    write_table(location, manifest_path("plain"), table.set_column(
        table.schema.get_field_index("key"), "key", pa.array(["b", "masked", "b"], pa.string())))
    with pytest.raises(ArchiveError, match="key 'b' is on 2 rows of shard plain .* damaged manifest"):
        Archive(str(copy)).decode("b", shard="plain")
    to = tmp_path / fmt
    assert decode_job.main(["--input", str(copy), "--to", str(to), "--format", fmt, "--steps", "0",
                            "--shards", "plain"]) == 1
    assert "plain/b: record 'b' of shard plain: its key is on two rows" in capsys.readouterr().out
    commit = json.loads((to / commit_path("plain")).read_text())
    assert commit["written"] == 2 and [e["key"] for e in commit["errors"]] == ["b"]
    if fmt == "wds":
        contents = read_shard((to / "plain.tar").read_bytes())
        assert [s.key for s in contents.samples] == ["b", "masked"] and not contents.errors
    else:
        assert sorted(commit["files"]) == ["b.png", "masked.decoded.png"]


def test_a_key_with_a_nul_is_that_records_error_in_a_tar_never_a_cut_member_name(archive, tmp_path, capsys):
    """tar cuts member names at NUL: "m\\0 0.png" and "m\\0 0.cls" were both written as a member "m"."""
    copy = copy_archive(archive, tmp_path / "copy")
    location = open_location(str(copy))
    table = read_manifest(location, "plain")
    write_table(location, manifest_path("plain"), table.set_column(
        table.schema.get_field_index("key"), "key", pa.array(["b", "masked", "m\0 0"], pa.string())))
    to = tmp_path / "wds"
    assert decode_job.main(["--input", str(copy), "--to", str(to), "--format", "wds", "--steps", "0",
                            "--shards", "plain"]) == 1
    assert "a key with a NUL character cannot name tar members" in capsys.readouterr().out
    contents = read_shard((to / "plain.tar").read_bytes())
    assert [s.key for s in contents.samples] == ["b", "masked"] and not contents.errors
    assert [e["key"] for e in json.loads((to / commit_path("plain")).read_text())["errors"]] == ["m\0 0"]


def test_rerun_skips_decoded_shards_and_never_leaves_a_half_shard(archive, tmp_path):
    to = tmp_path / "wds"
    decode_archive(str(archive), str(to), steps=0, fmt="wds", actors=1)
    first = {p.name: p.read_bytes() for p in to.glob("*.tar")}
    untouched = (to / "hostile.tar").stat().st_mtime_ns
    (to / "plain.tar").unlink()               # as if killed while writing plain: no tar, no commit,
    (to / commit_path("plain")).unlink()      # and a half-written temporary file
    (to / PARTIAL_DIR).mkdir(parents=True)
    (to / PARTIAL_DIR / "plain.0123.tar").write_bytes(first["plain.tar"][:1000])
    summary = decode_archive(str(archive), str(to), steps=0, fmt="wds", actors=1)
    assert (summary.shards, summary.shards_skipped, summary.run_images) == (2, 1, 3)
    assert summary.images == len(HOSTILE_KEYS) + 3
    assert (to / "hostile.tar").stat().st_mtime_ns == untouched
    assert {p.name: p.read_bytes() for p in to.glob("*.tar")} == first  # deterministic, whole
    assert not (to / PARTIAL_DIR).exists()
    with pytest.raises(ArchiveError, match="already holds shard .* decoded with"):
        decode_archive(str(archive), str(to), steps=1, fmt="wds", actors=1)


def test_every_reader_gives_the_same_pixels(archive, tmp_path):
    """Archive.decode, jobs.decode, the loader (2 workers) and Ray Data: bit-identical, with
    diffusion steps (float decoders, whose pixels would follow the thread count)."""
    shard = "plain"
    reader = Archive(str(archive), threads=1)
    expected = {row["key"]: reader.decode(row["key"], steps=1, shard=shard) for row in reader.shard_records(shard)}
    assert decode_job.main(["--input", str(archive), "--to", str(tmp_path / "png"), "--steps", "1",
                            "--shards", shard, "--batch-size", "2"]) == 0
    names = json.loads((tmp_path / "png" / commit_path(shard)).read_text())["files"]  # a `png` extra keeps its name
    job = {key: png_pixels((tmp_path / "png" / shard / name).read_bytes()) for name, key in names.items()}
    loader = DataLoader(ArchiveDataset(str(archive), steps=1, shards=[shard], decode_batch=2), batch_size=None,
                        num_workers=2)
    loaded = {item["__key__"]: item["image"].numpy() for item in loader}
    rows = decode_records(read_archive(str(archive), shards=[shard]), steps=1, actors=1).take_all()
    ray_data = {row["key"]: row["image"] for row in rows}
    for found in (job, loaded, ray_data):
        assert found.keys() == expected.keys()
        assert all(np.array_equal(found[key], expected[key]) for key in expected)


def test_bf16_decoding_is_one_setting_for_every_reader_and_stays_within_the_pixel_bound(archive, tmp_path):
    """--bf16 (autocast) runs CDC's content decoder in bfloat16: Archive.decode, jobs.decode and the
    loader agree bit for bit, within PIXEL_BOUND of float32 but not equal to it (or the flag did
    nothing), and a folder decoded in float32 is not resumed in bf16."""
    shard = "plain"
    reader = Archive(str(archive), threads=1)
    keys = [row["key"] for row in reader.shard_records(shard)]
    exact = {key: reader.decode(key, steps=0, shard=shard) for key in keys}
    expected = {key: reader.decode(key, steps=0, shard=shard, autocast=torch.bfloat16) for key in keys}
    assert 0 < max(int(np.abs(expected[k].astype(int) - exact[k]).max()) for k in keys) <= PIXEL_BOUND
    to = tmp_path / "png"
    assert decode_job.main(["--input", str(archive), "--to", str(to), "--steps", "0", "--bf16",
                            "--shards", shard]) == 0
    commit = json.loads((to / commit_path(shard)).read_text())
    assert commit["settings"]["autocast"] == "torch.bfloat16"
    job = {key: png_pixels((to / shard / name).read_bytes()) for name, key in commit["files"].items()}
    loader = ArchiveDataset(str(archive), steps=0, shards=[shard], autocast=torch.bfloat16)
    loaded = {item["__key__"]: item["image"].numpy() for item in loader}
    for found in (job, loaded):
        assert found.keys() == expected.keys() and all(np.array_equal(found[k], expected[k]) for k in keys)
    with pytest.raises(ArchiveError, match="already holds shard .* decoded with"):
        decode_archive(str(archive), str(to), steps=0, shards=[shard], actors=1)


def test_more_decoders_than_the_cluster_holds_are_refused_not_waited_for(archive, tmp_path, capsys):
    """As compress_bucket refuses encoders that cannot fit: 3 decoders on 2 CPUs would wait forever."""
    assert decode_job.main(["--input", str(archive), "--to", str(tmp_path / "never"), "--actors", "3"]) == 2
    assert "3 decoders need a CPU each; the cluster has 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="1 decoders of 1 GPU each need 1 GPUs; the cluster has 0"):
        decode_records(read_archive(str(archive)), actors=1, gpus_per_actor=1)
