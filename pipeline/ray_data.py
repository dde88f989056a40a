"""Ray Data over an archive: its records as a Dataset, decoded by an actor pool.

    records = read_archive("s3://bucket/out", storage_options, chunks=2)   # one read task per shard
    images = decode_records(records, batch_size=8)    # actors: one GPU each when the cluster has GPUs
                                                      # (then the exact half runs on CPU actors first)
    for batch in images.iter_torch_batches(batch_size=32, collate_fn=TorchCollate(layout="CHW")): ...

Record columns (RECORD_SCHEMA): shard, key, width, height, codec, weights_digest, chunks (the
prefix fetched, null for whole records), extras (map name -> bytes), data (the record's bytes,
or only its prefix). decode_records replaces `data` with `image` (HxWx3 uint8, a variable-shaped
tensor column) and keeps the rest, extras included, untouched (batches stay in Arrow: a numpy
round trip would turn extras' bytes into strings). A record is (shard, key): a key repeated in
two shards gives two rows. TorchCollate makes torch batches of those columns for
iter_torch_batches (whose default conversion refuses string columns).

The decoders load the codec named by the records' `codec` column (checking `weights_digest`)
and decode through the same path as Archive.decode and the loader, on one thread each: the
pixels of the loader's workers and of Archive(url, threads=1).
With GPU decoders (or split=True) decoding runs in two stages: LatentDecoder (CPU actors:
`data` -> pickled `latents`; UQDM's streams as they are), then LatentSynthesizer (GPU actors:
`latents` -> `image`).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.data import Datasource, ReadTask
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.data.block import BlockMetadata
from ray.data.extensions import ArrowVariableShapedTensorArray

from model import Codec
from model.registry import WeightsNotInstalled, load_codec_for

from .archive import Archive, ArchiveError, decode_latents, decode_options, decompress, synthesize_on_device
from .cluster import ConfigError, actor_pool, runtime_env
from .loader import check_image_format, image_tensor, stack_if_equal
from .manifest import MANIFEST_SCHEMA

RECORDS_PER_BLOCK = 256
MANIFEST_FIELDS = ("key", "width", "height", "codec", "weights_digest")  # copied from the manifest rows
# The manifest's own field types (the contract), plus where each record is and what was fetched.
RECORD_SCHEMA = pa.schema([pa.field("shard", pa.string()), *(MANIFEST_SCHEMA.field(name) for name in MANIFEST_FIELDS),
                           pa.field("chunks", pa.int32()), MANIFEST_SCHEMA.field("extras"),
                           pa.field("data", pa.binary())])


def read_archive(url: str, storage_options: Mapping | None = None, *, chunks: int | None = None,
                 keys: Iterable[str] | None = None, shards: Iterable[str] | None = None,
                 allow_incomplete: bool = False, **read_args) -> ray.data.Dataset:
    """The archive's records (every one, or those with `keys`, in `shards`), with their bytes or
    only the first `chunks` chunks (UQDM). `read_args` go to ray.data.read_datasource; by default
    the read tasks reserve no CPU (they fetch bytes), so decoder actors may hold every CPU
    without starving them."""
    return ray.data.read_datasource(ArchiveDatasource(url, storage_options, chunks=chunks, keys=keys, shards=shards,
                                                      allow_incomplete=allow_incomplete),
                                    **{"num_cpus": 0, "runtime_env": runtime_env(), **read_args})


class ArchiveDatasource(Datasource):
    """One read task per shard: it reads that shard's manifest and its records' byte ranges only."""

    def __init__(self, url: str, storage_options: Mapping | None = None, *, chunks: int | None = None,
                 keys: Iterable[str] | None = None, shards: Iterable[str] | None = None,
                 allow_incomplete: bool = False):
        self.url, self.storage_options, self.chunks = url, dict(storage_options or {}), chunks
        self.allow_incomplete = allow_incomplete
        archive = Archive(url, self.storage_options, allow_incomplete=allow_incomplete)
        archive.decode_options(chunks=chunks)
        if keys is not None:
            self.pieces: dict[str, list[int] | None] = archive.locate(keys, shards)
            self.sizes = {shard: len(rows) for shard, rows in self.pieces.items()}
        else:
            self.sizes = archive.shard_sizes(None if shards is None else list(shards))
            self.pieces = dict.fromkeys(self.sizes)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        return [ReadTask(self._reader(shard, rows), BlockMetadata(
                    num_rows=self.sizes[shard], size_bytes=None,
                    exec_stats=None, input_files=(shard,)), schema=RECORD_SCHEMA, per_task_row_limit=per_task_row_limit)
                for shard, rows in self.pieces.items()]

    def _reader(self, shard: str, rows: list[int] | None):
        url, options, chunks, allow = self.url, self.storage_options, self.chunks, self.allow_incomplete

        def read() -> Iterator[pa.Table]:
            archive = Archive(url, options, allow_incomplete=allow)
            records = archive.shard_records(shard, rows)
            for start in range(0, len(records), RECORDS_PER_BLOCK):
                block = records[start:start + RECORDS_PER_BLOCK]
                datas = archive.fetch(block, chunks)
                yield pa.Table.from_pylist(
                    [{"shard": row["shard"], **{name: row[name] for name in MANIFEST_FIELDS}, "chunks": chunks,
                      "extras": list(row["extras"].items()), "data": data} for row, data in zip(block, datas)],
                    schema=RECORD_SCHEMA)
        return read


def decode_records(records: ray.data.Dataset, steps: int | None = None, *, batch_size: int = 8,
                   actors: int | None = None, gpus_per_actor: float | None = None, split: bool | None = None,
                   **map_args) -> ray.data.Dataset:
    """Decode read_archive's records with map_batches over a pool of decoder actors (one per GPU
    when the cluster has GPUs, else one per CPU; `actors` and `gpus_per_actor` choose).
    `steps`: CDC's diffusion steps (UQDM's prefix was chosen when reading, with chunks).

    `split` (default: when the decoders have GPUs) decodes in two stages, as the loader's
    decode_on="device" does: CDC's exact half (entropy decoding, integer hyper-synthesis) on CPU
    actors using the CPUs the GPU actors leave, then the rest batched on the GPU actors (UQDM,
    whose exact half is its whole decode, is decoded there whole)."""
    count, gpus = actor_pool(actors, gpus_per_actor, "decoders")
    options = {"batch_size": batch_size, "batch_format": "pyarrow", "runtime_env": runtime_env(), **map_args}
    if not (gpus > 0 if split is None else split):
        return records.map_batches(RecordDecoder, fn_constructor_kwargs={"steps": steps}, concurrency=count,
                                   num_cpus=1, num_gpus=gpus, **options)
    # CPUs free now, not in all: a pool sized past them would wait for its missing actors
    cpus_left = int(ray.available_resources().get("CPU", 0)) - count
    if cpus_left < 1:
        raise ConfigError(f"decoding in two stages needs a free CPU beside the {count} synthesis actors; the "
                          f"cluster has {cpus_left + count} free: lower actors, or split=False")
    latents = records.map_batches(LatentDecoder, concurrency=(1, cpus_left), num_cpus=1, **options)
    return latents.map_batches(LatentSynthesizer, fn_constructor_kwargs={"steps": steps}, concurrency=count,
                               num_cpus=1, num_gpus=gpus, **options)


class RecordDecoder:
    """map_batches callable: Arrow batch of records -> the same batch with `image` instead of `data`."""

    def __init__(self, steps: int | None = None):
        self.steps = steps
        self.codecs: dict[tuple[str, str], Codec] = {}

    def codec(self, name: str, digest: str) -> Codec:
        if (name, digest) not in self.codecs:
            try:
                self.codecs[name, digest] = load_codec_for(name, digest)
            except WeightsNotInstalled as error:
                raise ArchiveError(f"records were {error}") from None
        return self.codecs[name, digest]

    def groups(self, rows: list[dict]) -> Iterator[tuple[Codec, str, list[int]]]:
        """(codec, a name for errors, row indices) of each run of rows of one codec and prefix."""
        for group in _runs(rows, lambda r: (r["codec"], r["weights_digest"], r["chunks"])):
            first = rows[group[0]]
            yield self.codec(first["codec"], first["weights_digest"]), f"records of {first['codec']}", group

    def __call__(self, batch: pa.Table) -> pa.Table:
        images: list[np.ndarray] = []
        rows, datas = batch.drop_columns(["data", "extras"]).to_pylist(), batch["data"].to_pylist()
        for codec, what, group in self.groups(rows):
            options = decode_options(codec.progressive, what, self.steps, rows[group[0]]["chunks"])
            images += decompress(codec, [datas[i] for i in group], [rows[i] for i in group], options,
                                 url=f"a Dataset of {what}")
        return batch.drop_columns(["data"]).append_column("image", _tensor_column(images))


class LatentDecoder(RecordDecoder):
    """The exact half, on a CPU actor: `data` -> `latents` (the codec's Latents, pickled: they
    are our own objects passing between our own stages). A progressive codec's exact half is
    its whole decode, faster on the GPU: its records pass on as their bytes."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        latents: list[bytes] = []
        rows, datas = batch.drop_columns(["data", "extras"]).to_pylist(), batch["data"].to_pylist()
        for codec, what, group in self.groups(rows):
            if codec.progressive:
                latents += [datas[i] for i in group]
                continue
            options = decode_options(codec.progressive, what, None, rows[group[0]]["chunks"])
            decoded = decode_latents(codec, [datas[i] for i in group], [rows[i] for i in group], options,
                                     url=f"a Dataset of {what}")
            latents += [pickle.dumps(item) for item in decoded]
        return batch.drop_columns(["data"]).append_column("latents", pa.array(latents, pa.binary()))


class LatentSynthesizer(RecordDecoder):
    """The device half, batched on the actor's device: `latents` -> `image`."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        images: list[np.ndarray] = []
        rows, blobs = batch.drop_columns(["latents", "extras"]).to_pylist(), batch["latents"].to_pylist()
        for codec, what, group in self.groups(rows):
            items = [blobs[i] if codec.progressive else pickle.loads(blobs[i]) for i in group]
            options = decode_options(codec.progressive, what, self.steps, rows[group[0]]["chunks"])
            tensors = synthesize_on_device(codec, items, options, [rows[i] for i in group], f"a Dataset of {what}")
            images += [np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()) for image in tensors]
        return batch.drop_columns(["latents"]).append_column("image", _tensor_column(images))


class TorchCollate(ArrowBatchCollateFn):
    """`collate_fn` for iter_torch_batches over decode_records: "image" as in the loader (one
    B x ... tensor when the images share a shape, else a list; HWC or CHW, uint8 or float in
    [0, 1]), width and height as int64 tensors, strings, chunks and extras (dicts of bytes) as
    lists. Tensors are moved to iter_torch_batches' `device`."""

    def __init__(self, layout: str = "HWC", dtype: torch.dtype = torch.uint8):
        check_image_format(layout, dtype)
        self.layout, self.dtype = layout, dtype

    def __call__(self, batch: pa.Table) -> dict:
        out = {}
        for name in batch.column_names:
            column = batch[name]
            if name == "image":
                arrays = column.combine_chunks().to_numpy(zero_copy_only=False)
                out[name] = stack_if_equal([image_tensor(np.ascontiguousarray(a), self.layout, self.dtype)
                                            for a in arrays])
            elif name in ("width", "height"):
                out[name] = torch.tensor(column.to_pylist(), dtype=torch.int64)
            elif name == "extras":
                out[name] = [dict(pairs) for pairs in column.to_pylist()]
            else:
                out[name] = column.to_pylist()
        return out


def _tensor_column(images: list[np.ndarray]) -> pa.Array:
    """Images as a variable-shaped tensor column (always: blocks of other sizes must concatenate)."""
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return ArrowVariableShapedTensorArray.from_numpy(column)


def _runs(rows: list[dict], key) -> list[list[int]]:
    """Indices of rows, in runs of consecutive rows with the same key(row)."""
    runs: list[list[int]] = []
    for i, row in enumerate(rows):
        if runs and key(rows[runs[-1][0]]) == key(row):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
