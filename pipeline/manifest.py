"""The archive's storage layout and its Parquet schemas: a contract with every reader
(README.md, "compress_bucket and decoding").

    _job.json                  codec, weights digest, config, versions, input list
    manifest/<shard>.parquet   one row per encoded image (MANIFEST_SCHEMA)
    data/<shard>.bin           that shard's bitstreams, concatenated
    errors/<shard>.parquet     inputs that could not be encoded (ERRORS_SCHEMA)
    _SUCCESS                   written last, with totals
    _RUNNING                   while a compress job writes here: its lease (pipeline.lease)

A shard is committed when its manifest exists. Manifest columns `key` to `extras` are the
contract; three more say what the archive replaced: `source_member` (the image's member
name, e.g. "jpg"), `source_mode` (the conversion applied to reach RGB, from
model.images.decode_image) and `source_bytes` (size of the original image member).
Each manifest's Parquet key-value metadata `diffpress.shard` holds, as JSON, the shard's
source URL and totals (images, pixels, bytes, errors by category): a resumed run learns
what is committed, and from where, from one listing and each manifest's footer.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from .storage import Location

JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
MANIFEST_DIR, DATA_DIR, ERRORS_DIR = "manifest", "data", "errors"

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source_url", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("codec", pa.string()),
    ("weights_digest", pa.string()),         # hex
    ("data_url", pa.string()),
    ("offset", pa.int64()),
    ("length", pa.int64()),
    ("chunk_lengths", pa.list_(pa.int64())),  # header bytes = length - sum(chunk_lengths)
    ("crc32", pa.int64()),                    # of the record's bytes; int64 as Spark has no uint32
    ("bpp", pa.float64()),
    ("extras", pa.map_(pa.string(), pa.binary())),
    ("source_member", pa.string()),
    ("source_mode", pa.string()),
    ("source_bytes", pa.int64()),
])

ERRORS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source_url", pa.string()),
    ("member", pa.string()),
    ("reason", pa.string()),    # the whole story: "category: detail"
    ("category", pa.string()),  # short and fixed, to count by (e.g. "cannot decode image")
])


SHARD_METADATA_KEY = b"diffpress.shard"
FOOTER_BYTES = 64 << 10  # read from a manifest's end to find its footer; more only if it is larger


class DamagedManifest(ValueError):
    """A manifest that is not Parquet, or whose columns or footer are not the manifest's."""


@dataclass
class ShardTotals:
    """What a committed shard holds, summed."""

    images: int = 0
    pixels: int = 0
    source_bytes: int = 0
    compressed_bytes: int = 0
    errors: Counter = field(default_factory=Counter)  # by category

    def add(self, pixels: int, source_bytes: int, compressed_bytes: int) -> None:
        """Count one image."""
        self.images += 1
        self.pixels += pixels
        self.source_bytes += source_bytes
        self.compressed_bytes += compressed_bytes

    def __iadd__(self, other: ShardTotals) -> ShardTotals:
        self.images += other.images
        self.pixels += other.pixels
        self.source_bytes += other.source_bytes
        self.compressed_bytes += other.compressed_bytes
        self.errors.update(other.errors)
        return self

    def to_json(self) -> dict:
        return {"images": self.images, "pixels": self.pixels, "source_bytes": self.source_bytes,
                "compressed_bytes": self.compressed_bytes, "errors": dict(self.errors)}

    @classmethod
    def from_json(cls, data: Mapping) -> ShardTotals:
        return cls(data["images"], data["pixels"], data["source_bytes"], data["compressed_bytes"],
                   Counter(data["errors"]))


@dataclass
class CommittedShard:
    source_url: str | None  # None: an old manifest of no rows, whose source is not recorded
    totals: ShardTotals
    rows: int  # the manifest's rows, from its Parquet footer: the records readers will serve


def shard_metadata(source_url: str, totals: ShardTotals) -> dict[bytes, bytes]:
    """The manifest's key-value metadata: where the shard came from and what it holds."""
    return {SHARD_METADATA_KEY: json.dumps({"source_url": source_url, "totals": totals.to_json()}).encode()}


def read_committed(location: Location) -> dict[str, CommittedShard]:
    """Every committed shard of the archive, by name: one listing of manifest/, then the
    last FOOTER_BYTES of each manifest (concurrent requests where the filesystem can),
    never their rows; manifests written before the metadata existed are read whole."""
    sizes = location.sizes(MANIFEST_DIR, ".parquet")
    committed = {}
    for path, tail in zip(sizes, location.read_tails(sizes, FOOTER_BYTES)):
        name = posixpath.basename(path)[:-len(".parquet")]
        try:
            committed[name] = _from_footer(tail, location, path) or _from_rows(location, name)
        except (pa.ArrowException, ValueError, KeyError, TypeError) as exc:  # not Parquet, or a foreign footer
            raise DamagedManifest(f"{manifest_path(name)} is not a readable manifest: "
                                  f"{type(exc).__name__}: {exc}") from exc
    return committed


def _from_footer(tail: bytes, location: Location, path: str) -> CommittedShard | None:
    try:
        footer = pq.read_metadata(pa.BufferReader(tail))
    except pa.ArrowInvalid:  # the footer is longer than the tail read
        footer = pq.read_metadata(io.BytesIO(location.read(path)))
    metadata = footer.metadata or {}
    if SHARD_METADATA_KEY not in metadata:
        return None
    shard = json.loads(metadata[SHARD_METADATA_KEY])
    return CommittedShard(shard["source_url"], ShardTotals.from_json(shard["totals"]), footer.num_rows)


def _from_rows(location: Location, name: str) -> CommittedShard:
    """Totals of a manifest written before the metadata: from its rows and its errors file."""
    columns = ["source_url", "width", "height", "length", "source_bytes"]
    rows = pq.read_table(io.BytesIO(location.read(manifest_path(name))), columns=columns).to_pylist()
    errors = (pq.read_table(io.BytesIO(location.read(errors_path(name))), columns=["source_url", "reason"]).to_pylist()
              if location.exists(errors_path(name)) else [])
    totals = ShardTotals(errors=Counter(e["reason"].split(":", 1)[0].strip() for e in errors))
    for row in rows:
        totals.add(row["width"] * row["height"], row["source_bytes"], row["length"])
    sources = [r["source_url"] for r in rows + errors if r["source_url"]]
    return CommittedShard(sources[0] if sources else None, totals, len(rows))


def manifest_path(shard: str) -> str:
    return f"{MANIFEST_DIR}/{shard}.parquet"


def data_path(shard: str) -> str:
    return f"{DATA_DIR}/{shard}.bin"


def errors_path(shard: str) -> str:
    return f"{ERRORS_DIR}/{shard}.parquet"


def to_table(rows: Iterable[dict], schema: pa.Schema) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()


def write_table(location: Location, relative: str, table: pa.Table,
                metadata: Mapping[bytes, bytes] | None = None) -> None:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    location.write_atomic(relative, buffer.getvalue())


def read_tables(location: Location, folder: str, schema: pa.Schema) -> pa.Table:
    """Every Parquet file of a layout folder as one table (empty when there are none)."""
    tables = [pq.read_table(io.BytesIO(location.read(path)), schema=schema)
              for path in location.list(folder, ".parquet")]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_manifests(location: Location) -> pa.Table:
    return read_tables(location, MANIFEST_DIR, MANIFEST_SCHEMA)


def read_manifest(location: Location, shard: str, columns: list[str] | None = None) -> pa.Table:
    """One shard's manifest (only `columns`, when given); DamagedManifest if its columns cannot be
    read as the manifest's (not Parquet, or another type: offsets as strings, say)."""
    data = location.read(manifest_path(shard))
    try:
        return pq.read_table(io.BytesIO(data), schema=MANIFEST_SCHEMA, columns=columns)
    except pa.ArrowException as exc:
        raise DamagedManifest(f"{manifest_path(shard)} is not a readable manifest: {exc}") from exc


def read_errors(location: Location) -> pa.Table:
    table = read_tables(location, ERRORS_DIR, ERRORS_SCHEMA)
    if table["category"].null_count == 0:
        return table
    # Shards committed before errors had a category column: their reasons start with it.
    categories = [category if category is not None else reason.split(":", 1)[0].strip()
                  for category, reason in zip(table["category"].to_pylist(), table["reason"].to_pylist())]
    return table.set_column(table.schema.get_field_index("category"), "category", pa.array(categories, pa.string()))
