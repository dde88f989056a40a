"""The work of each pipeline stage, as plain functions (Ray-free, so each is testable alone).

    decode_shard_batches   shard bytes -> ShardInfo, then batches of decoded RGB images
    encode_batch           a codec turns a batch into bitstreams (failures become errors)
    commit_shard           bitstreams -> data/<shard>.bin, errors/, then manifest/ (the commit)
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from model import Codec, ImageDecodeError, decode_image

from .manifest import (ERRORS_SCHEMA, MANIFEST_SCHEMA, data_path, errors_path, manifest_path, to_table,
                       write_table)
from .shards import MemberError, read_shard
from .storage import Location, Shard

log = logging.getLogger(__name__)
ImageT = TypeVar("ImageT")


@dataclass(frozen=True)
class CodecInfo:
    """What the manifest records about the codec, as the encoders report it."""

    name: str
    weights_digest: str  # hex
    progressive: bool


@dataclass
class ShardInfo:
    """Everything about a shard except its pixels: extras per key, damage found in the tar."""

    shard: Shard
    extras: dict[str, dict[str, bytes]]
    errors: list[MemberError]


@dataclass(frozen=True)
class Source:
    """Where an image came from; travels with it from decoding to its manifest row."""

    key: str
    index: int         # position of the sample in the shard: the order of the shard's records
    member: str        # the image member's name, e.g. "jpg"
    mode: str          # the conversion decode_image applied to reach RGB
    size: int          # bytes of the original image member


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


@dataclass
class ShardTotals:
    images: int = 0
    pixels: int = 0
    source_bytes: int = 0
    compressed_bytes: int = 0
    errors: Counter = field(default_factory=Counter)  # by category


def decode_shard_batches(shard: Shard, data: bytes, batch_size: int) -> Iterator[ShardInfo | DecodedBatch]:
    """Yield the ShardInfo first, then DecodedBatches of at most `batch_size` images."""
    contents = read_shard(data)
    errors = list(contents.errors)
    with_image = []
    for sample in contents.samples:
        if sample.image_member is None:
            found = ", ".join(sample.members) or "nothing"
            errors.append(MemberError.of(sample.key, found, "no image member", f"found {found}"))
        else:
            with_image.append(sample)
    yield ShardInfo(shard, {s.key: s.extras for s in with_image}, errors)
    batch = DecodedBatch()
    for index, sample in enumerate(with_image):
        member = sample.image_member
        source = sample.members[member]
        try:
            pixels, mode = decode_image(source)
        except ImageDecodeError as exc:
            batch.errors.append(MemberError(sample.key, member, exc.category, str(exc)))
            continue
        batch.images.append(DecodedImage(Source(sample.key, index, member, mode, len(source)), pixels))
        if len(batch.images) == batch_size:
            yield batch
            batch = DecodedBatch()
    if batch.images or batch.errors:
        yield batch


def encode_batch(codec: Codec, batch: DecodedBatch) -> EncodedBatch:
    """Encode a batch; if the codec fails on it, retry image by image so one bad input
    costs one error row, not the batch."""
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
        except Exception as exc:  # noqa: BLE001 - recorded as this image's error row
            result.errors.append(MemberError.of(image.source.key, image.source.member, "encode failed",
                                                f"{type(exc).__name__}: {exc}"))
    return result


def _encoded(codec: Codec, image: DecodedImage, data: bytes) -> EncodedImage:
    header = codec.read_header(data)
    if header.total_length != len(data):
        raise ValueError(f"codec returned {len(data)} bytes but its header describes {header.total_length}")
    height, width = image.pixels.shape[:2]
    return EncodedImage(image.source, width, height, data, tuple(header.chunk_lengths))


def failed_batch(batch: DecodedBatch, category: str, detail: str) -> EncodedBatch:
    """The result of a batch whose encoder died on every retry: each image gets the error."""
    return EncodedBatch(errors=list(batch.errors) + [MemberError.of(i.source.key, i.source.member, category, detail)
                                                     for i in batch.images])


def commit_shard(output: Location, info: ShardInfo, batches: Sequence[EncodedBatch],
                 codec: CodecInfo) -> ShardTotals:
    """Write the shard's blob, then its errors, then its manifest: the manifest is the commit,
    so whatever interrupts this leaves the shard uncommitted and a rerun redoes it."""
    shard = info.shard
    images = sorted((image for batch in batches for image in batch.images), key=lambda image: image.source.index)
    errors = list(info.errors) + [error for batch in batches for error in batch.errors]
    output.write_atomic(data_path(shard.name), b"".join(image.data for image in images))
    write_table(output, errors_path(shard.name), to_table(
        ({"key": e.key, "source_url": shard.url, "member": e.member, "reason": e.reason, "category": e.category}
         for e in errors),
        ERRORS_SCHEMA))
    write_table(output, manifest_path(shard.name), to_table(
        _manifest_rows(images, info, codec, output.url(data_path(shard.name))), MANIFEST_SCHEMA))
    return ShardTotals(images=len(images), pixels=sum(i.width * i.height for i in images),
                       source_bytes=sum(i.source.size for i in images),
                       compressed_bytes=sum(len(i.data) for i in images),
                       errors=Counter(e.category for e in errors))


def _manifest_rows(images: list[EncodedImage], info: ShardInfo, codec: CodecInfo, data_url: str) -> Iterator[dict]:
    offset = 0
    for image in images:
        source = image.source
        yield {"key": source.key, "source_url": info.shard.url, "width": image.width, "height": image.height,
               "codec": codec.name, "weights_digest": codec.weights_digest, "data_url": data_url,
               "offset": offset, "length": len(image.data), "chunk_lengths": list(image.chunk_lengths),
               "crc32": zlib.crc32(image.data), "bpp": 8 * len(image.data) / (image.width * image.height),
               "extras": list(info.extras.get(source.key, {}).items()), "source_member": source.member,
               "source_mode": source.mode, "source_bytes": source.size}
        offset += len(image.data)
