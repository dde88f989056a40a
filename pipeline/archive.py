"""Reading an archive written by compress_bucket: list keys, fetch records by byte range, decode.

    archive = Archive("s3://bucket/out", storage_options)
    archive.keys()                          # every committed image
    archive.read("0001")                    # the record's bytes, crc32 verified
    archive.read("0001", chunks=2)          # progressive: header + first 2 chunks only
    archive.decode("0001", chunks=2)        # HxWx3 uint8 via the archive's codec
    decode_archive("s3://bucket/out", "out/png")   # every image to PNG (or webdataset shards)

Records are located by the archive's own layout (data/<basename of data_url>) so an
archive still reads after being copied or moved elsewhere.
"""

from __future__ import annotations

import json
import logging
import posixpath
import zlib
from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
from tqdm import tqdm

from model import BitstreamError, Codec, load_codec
from model.images import encode_png

from .manifest import DATA_DIR, JOB_FILE, read_manifests
from .shards import Sample, write_shard
from .storage import open_location

log = logging.getLogger(__name__)
SAMPLES_PER_SHARD = 1000


class ArchiveError(RuntimeError):
    """An archive record is missing, ambiguous or does not match its manifest."""


class Archive:
    def __init__(self, url: str, storage_options: Mapping | None = None, codec: Codec | None = None):
        self.url = url
        self.location = open_location(url, storage_options)
        if not self.location.exists(JOB_FILE):
            raise ArchiveError(f"{url} is not a compress_bucket archive (no {JOB_FILE})")
        self.job = json.loads(self.location.read(JOB_FILE))
        self._codec = codec

    @cached_property
    def manifest(self):
        """Every committed manifest row, as one pyarrow Table."""
        return read_manifests(self.location)

    @cached_property
    def _rows(self) -> dict[str, int | None]:
        rows: dict[str, int | None] = {}
        for i, key in enumerate(self.manifest["key"].to_pylist()):
            rows[key] = None if key in rows else i  # None: the key is in several shards
        return rows

    def keys(self) -> list[str]:
        return list(self._rows)

    def record(self, key: str) -> dict:
        """The manifest row of `key`."""
        if key not in self._rows:
            raise ArchiveError(f"no image with key {key!r} in {self.url}")
        row = self._rows[key]
        if row is None:
            raise ArchiveError(f"key {key!r} appears in several shards of {self.url}; keys must be unique")
        return self.manifest.slice(row, 1).to_pylist()[0]

    @property
    def codec(self) -> Codec:
        if self._codec is None:
            self._codec = load_codec(self.job["codec"])
        if self._codec.weights_digest.hex() != self.job["weights_digest"]:
            raise ArchiveError(f"the archive was written with weights {self.job['weights_digest']}; codec "
                               f"{self._codec.name!r} has {self._codec.weights_digest.hex()}")
        return self._codec

    def read(self, key: str, chunks: int | None = None) -> bytes:
        """A record's bytes, or only its header and first `chunks` chunks (progressive prefix).

        A whole record is checked against the manifest's crc32; a prefix is checked by the
        codec, chunk by chunk, when decoded.
        """
        row = self.record(key)
        lengths = row["chunk_lengths"]
        size = row["length"]
        if chunks is not None:
            if not 0 < chunks <= len(lengths):
                raise ArchiveError(f"record {key!r} has {len(lengths)} chunks; asked for {chunks}")
            size = row["length"] - sum(lengths) + sum(lengths[:chunks])
        relative = posixpath.join(DATA_DIR, posixpath.basename(row["data_url"]))
        data = self.location.read_range(relative, row["offset"], row["offset"] + size)
        if len(data) != size:
            raise ArchiveError(f"{relative} ends before record {key!r} does ({len(data)} of {size} bytes)")
        if chunks is None and zlib.crc32(data) != row["crc32"]:
            raise ArchiveError(f"record {key!r} in {relative} does not match its manifest crc32: corrupt")
        return data

    def decode(self, key: str, steps: int | None = None, chunks: int | None = None) -> np.ndarray:
        """Decode one image; `steps` diffusion steps (CDC), `chunks` progressive prefix (UQDM)."""
        data = self.read(key, chunks)
        options = {"steps": steps} if steps is not None else {}
        if chunks is not None:
            options["chunks"] = chunks
        try:
            return self.codec.decompress(data, **options)
        except BitstreamError as exc:
            raise ArchiveError(f"record {key!r} of {self.url} does not decode: {exc}") from exc


def decode_archive(url: str, to: str, storage_options: Mapping | None = None, keys: Sequence[str] | None = None,
                   steps: int | None = None, chunks: int | None = None, fmt: str = "png") -> int:
    """Decode an archive's images (all, or `keys`) into the folder URL `to`; returns how many.

    fmt "png": <key>.png each. fmt "wds": webdataset shards decoded-000000.tar, ... with each
    key's PNG and its original extras (.cls, .txt, ...), like the input dataset.
    """
    archive = Archive(url, storage_options)
    target = open_location(to, storage_options)
    keys = keys or archive.keys()
    samples = []
    for key in tqdm(keys, unit="image", desc="decode"):
        png = encode_png(archive.decode(key, steps=steps, chunks=chunks))
        if fmt == "png":
            target.write_atomic(f"{key}.png", png)
        else:
            samples.append(Sample(key, {"png": png, **dict(archive.record(key)["extras"])}))
    for number, start in enumerate(range(0, len(samples), SAMPLES_PER_SHARD)):
        target.write_atomic(f"decoded-{number:06d}.tar", write_shard(samples[start:start + SAMPLES_PER_SHARD]))
    log.info("decoded %d images into %s", len(keys), to)
    return len(keys)
