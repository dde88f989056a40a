"""The work of each pipeline stage, as plain functions (Ray-free, so each is testable alone).

    read_shard_batches     a shard's URL -> batches of decoded RGB images, read as a stream
    encode_batch           a codec turns a batch into bitstreams (failures become errors)
    commit_shard           bitstreams -> data/<shard>.bin, errors/, then manifest/ (the commit)

Errors travel with the batches. An error is final when the input is at fault (damage in
the tar, an undecodable image), transient otherwise (storage, an encoder that died, a codec
error on a decodable image): a shard with a transient error is not committed, so that a
rerun tries it again (pipeline.compress).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO, Generic, TypeVar

import numpy as np
import pyarrow as pa

from model import Codec, ImageDecodeError, decode_image

from .manifest import (ERRORS_SCHEMA, MANIFEST_SCHEMA, ShardTotals, data_path, errors_path, manifest_path,
                       shard_metadata, to_table, write_table)
from .shards import READ_SIZE, MemberError, Sample, iter_shard
from .storage import Location, Shard, file_version, open_location, redact_url

log = logging.getLogger(__name__)
ImageT = TypeVar("ImageT")
READ_FAILED = "cannot read shard"
CHANGED = "changed since listing"
ROWS_PER_TABLE = 4096  # manifest rows held as dicts before they are turned into columns


class TransientFailure(RuntimeError):
    """A shard cannot be committed now; a rerun will try it again."""


@dataclass(frozen=True)
class CodecInfo:
    """What the manifest records about the codec, as the encoders report it."""

    name: str
    weights_digest: str  # hex
    progressive: bool


@dataclass(frozen=True)
class Source:
    """Where an image came from; travels with it from decoding to its manifest row."""

    key: str
    index: int         # position of the sample in the shard: the order of the shard's records
    member: str        # the image member's name, e.g. "jpg"
    mode: str          # the conversion decode_image applied to reach RGB
    size: int          # bytes of the original image member
    extras: Mapping[str, bytes] = field(default_factory=dict)  # the key's other members, unchanged


@dataclass
class DecodedImage:
    source: Source
    pixels: np.ndarray


@dataclass
class EncodedImage:
    source: Source
    width: int
    height: int
    data: bytes
    chunk_lengths: tuple[int, ...]


@dataclass
class Batch(Generic[ImageT]):
    """Images on their way through a stage, with the errors met on the way."""

    images: list[ImageT] = field(default_factory=list)
    errors: list[MemberError] = field(default_factory=list)


DecodedBatch = Batch[DecodedImage]
EncodedBatch = Batch[EncodedImage]


def read_shard_batches(shard: Shard, storage_options: Mapping, batch_size: int) -> Iterator[DecodedBatch]:
    """decode_shard_batches over the shard's file, streamed from storage. A failure to read
    it (or any other failure here) ends the shard with a transient error: not its fault.

    So does a file that is not the one listed, before or after it was read (replaced, or
    truncated: which the tar reader would take for damage, a final error): the shard is not
    committed, and a rerun lists and reads it as it is then."""
    try:
        location = open_location(shard.url, storage_options)
        _check_unchanged(location, shard)
        with location.fs.open(location.root, "rb", block_size=READ_SIZE) as file:
            yield from decode_shard_batches(file, batch_size)
        _check_unchanged(location, shard)
    except ShardChanged as exc:
        log.warning("shard %s %s", shard.public_url, exc)
        yield DecodedBatch(errors=[MemberError.of("", "", CHANGED, str(exc), transient=True)])
    except Exception as exc:  # noqa: BLE001 - storage, or a bug: either way, try again on a rerun
        log.warning("reading shard %s failed", shard.public_url, exc_info=True)
        yield DecodedBatch(errors=[MemberError.of("", "", READ_FAILED, f"{type(exc).__name__}: {exc}",
                                                  transient=True)])


class ShardChanged(RuntimeError):
    """The shard's file is not the one list_shards found."""


def _check_unchanged(location: Location, shard: Shard) -> None:
    change = shard.change_since_listing(location.info())
    if change:
        raise ShardChanged(change)


def decode_shard_batches(file: BinaryIO, batch_size: int) -> Iterator[DecodedBatch]:
    """DecodedBatches of at most `batch_size` images, in shard order, with the errors met."""
    batch = DecodedBatch()
    index = 0
    for item in iter_shard(file):
        if isinstance(item, MemberError):
            batch.errors.append(item)
            continue
        error = _decode(item, index, batch)
        index += 1
        if error is not None:
            batch.errors.append(error)
        elif len(batch.images) == batch_size:
            yield batch
            batch = DecodedBatch()
    if batch.images or batch.errors:
        yield batch


def _decode(sample: Sample, index: int, batch: DecodedBatch) -> MemberError | None:
    member = sample.image_member
    if member is None:
        found = ", ".join(sample.members) or "nothing"
        return MemberError.of(sample.key, found, "no image member", f"found {found}")
    source = sample.members[member]
    try:
        pixels, mode = decode_image(source)
    except ImageDecodeError as exc:
        return MemberError(sample.key, member, exc.category, str(exc))
    batch.images.append(DecodedImage(Source(sample.key, index, member, mode, len(source), sample.extras), pixels))
    return None


def encode_batch(codec: Codec, batch: DecodedBatch) -> EncodedBatch:
    """Encode a batch; if the codec fails on it, retry image by image so one failure costs
    one error row, not the batch. A codec failing on a decoded image is not the image's
    fault: that error is transient (the shard is not committed; a rerun tries again)."""
    result = EncodedBatch(errors=list(batch.errors))
    try:
        datas = codec.compress_batch([image.pixels for image in batch.images]) if batch.images else []
    except Exception:  # noqa: BLE001 - any codec failure is retried per image below
        log.warning("batch encode failed; encoding its %d images one by one", len(batch.images), exc_info=True)
        datas = None
    for i, image in enumerate(batch.images):
        try:
            data = datas[i] if datas is not None else codec.compress(image.pixels)
            result.images.append(_encoded(codec, image, data))
        except Exception as exc:  # noqa: BLE001 - recorded as this image's error
            result.errors.append(MemberError.of(image.source.key, image.source.member, "encode failed",
                                                f"{type(exc).__name__}: {exc}", transient=True))
    return result


def _encoded(codec: Codec, image: DecodedImage, data: bytes) -> EncodedImage:
    header = codec.read_header(data)
    if header.total_length != len(data):
        raise ValueError(f"codec returned {len(data)} bytes but its header describes {header.total_length}")
    height, width = image.pixels.shape[:2]
    return EncodedImage(image.source, width, height, data, tuple(header.chunk_lengths))


def transient_reasons(batch: Batch) -> list[str]:
    """Why this batch's shard must not be committed now (empty: it may be)."""
    return [f"{error.key or 'shard'}: {error.reason}" for error in batch.errors if error.transient]


def commit_shard(output: Location, shard: Shard, batches: Iterable[EncodedBatch], codec: CodecInfo) -> ShardTotals:
    """Write the shard's blob, then its errors, then its manifest: the manifest is the commit,
    so whatever interrupts this leaves the shard uncommitted and a rerun redoes it.

    `batches` (in shard order) are consumed one at a time: the blob is streamed to storage,
    and only the manifest's rows (no image bytes) are held. A transient error in a batch
    raises TransientFailure before the manifest is written, and the blob is discarded.
    """
    data_url = redact_url(output.url(data_path(shard.name)))
    totals, tables, rows, errors, offset = ShardTotals(), [], [], [], 0
    with output.open_atomic(data_path(shard.name)) as blob:
        for batch in batches:
            if transient_reasons(batch):
                raise TransientFailure(f"shard {shard.name} not committed: {transient_reasons(batch)[0]}")
            for image in batch.images:
                blob.write(image.data)
                rows.append(_manifest_row(image, shard, codec, data_url, offset))
                offset += len(image.data)
                totals.add(image.width * image.height, image.source.size, len(image.data))
            errors += batch.errors
            if len(rows) >= ROWS_PER_TABLE:  # columns take a tenth of the room of row dicts
                tables.append(to_table(rows, MANIFEST_SCHEMA))
                rows = []
    written = output.info(data_path(shard.name))
    totals.errors.update(error.category for error in errors)
    write_table(output, errors_path(shard.name), to_table(
        ({"key": e.key, "source_url": shard.public_url, "member": e.member, "reason": e.reason,
          "category": e.category} for e in errors), ERRORS_SCHEMA))
    manifest = pa.concat_tables(tables + [to_table(rows, MANIFEST_SCHEMA)])
    check_blob_is_ours(output, shard.name, written, offset)
    write_table(output, manifest_path(shard.name), manifest, shard_metadata(shard.public_url, totals))
    return totals


def check_blob_is_ours(output: Location, shard: str, written: Mapping, length: int) -> None:
    """Raise TransientFailure unless the shard's blob is still the `length` bytes this commit
    wrote (`written`: its details then). Another job committing the same shard at the same
    time (a race the output's lease narrows but cannot close on object stores) may have
    replaced it, and this manifest would then point at that job's bytes."""
    now = output.info(data_path(shard))
    if not (written["size"] == now["size"] == length and file_version(now) == file_version(written)):
        raise TransientFailure(f"shard {shard} not committed: {data_path(shard)} was replaced while it was "
                               "committed (another job writing this output?)")


def _manifest_row(image: EncodedImage, shard: Shard, codec: CodecInfo, data_url: str, offset: int) -> dict:
    source = image.source
    return {"key": source.key, "source_url": shard.public_url, "width": image.width, "height": image.height,
            "codec": codec.name, "weights_digest": codec.weights_digest, "data_url": data_url,
            "offset": offset, "length": len(image.data), "chunk_lengths": list(image.chunk_lengths),
            "crc32": zlib.crc32(image.data), "bpp": 8 * len(image.data) / (image.width * image.height),
            "extras": list(source.extras.items()), "source_member": source.member,
            "source_mode": source.mode, "source_bytes": source.size}
