"""The archive's storage layout and its Parquet schemas: a contract with every reader
(README.md, "compress_bucket and decoding").

    _job.json                  codec, weights digest, config, versions, input list
    manifest/<shard>.parquet   one row per encoded image (MANIFEST_SCHEMA)
    data/<shard>.bin           that shard's bitstreams, concatenated
    errors/<shard>.parquet     inputs that could not be encoded (ERRORS_SCHEMA)
    _SUCCESS                   written last, with totals

A shard is committed when its manifest exists. Manifest columns `key` to `extras` are the
contract; three more say what the archive replaced: `source_member` (the image's member
name, e.g. "jpg"), `source_mode` (the conversion applied to reach RGB, from
model.images.decode_image) and `source_bytes` (size of the original image member).
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable

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


def manifest_path(shard: str) -> str:
    return f"{MANIFEST_DIR}/{shard}.parquet"


def data_path(shard: str) -> str:
    return f"{DATA_DIR}/{shard}.bin"


def errors_path(shard: str) -> str:
    return f"{ERRORS_DIR}/{shard}.parquet"


def to_table(rows: Iterable[dict], schema: pa.Schema) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()


def write_table(location: Location, relative: str, table: pa.Table) -> None:
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


def committed_shards(location: Location) -> list[str]:
    """Names of the committed shards (those with a manifest), sorted."""
    suffix = ".parquet"
    return [posixpath.basename(path)[:-len(suffix)] for path in location.list(MANIFEST_DIR, suffix)]


def read_manifest(location: Location, shard: str, columns: list[str] | None = None) -> pa.Table:
    """One shard's manifest (only `columns`, when given)."""
    return pq.read_table(io.BytesIO(location.read(manifest_path(shard))), schema=MANIFEST_SCHEMA, columns=columns)


def manifest_rows_count(location: Location, shard: str) -> int:
    """Rows in a shard's manifest, from the Parquet footer alone."""
    with location.fs.open(location.path(manifest_path(shard)), "rb") as file:
        return pq.read_metadata(file).num_rows


def read_errors(location: Location) -> pa.Table:
    table = read_tables(location, ERRORS_DIR, ERRORS_SCHEMA)
    if table["category"].null_count == 0:
        return table
    # Shards committed before errors had a category column: their reasons start with it.
    categories = [category if category is not None else reason.split(":", 1)[0].strip()
                  for category, reason in zip(table["category"].to_pylist(), table["reason"].to_pylist())]
    return table.set_column(table.schema.get_field_index("category"), "category", pa.array(categories, pa.string()))
