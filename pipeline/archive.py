"""Reading an archive written by compress_bucket: shards, records, byte ranges, decoding.

    archive = Archive("s3://bucket/out", storage_options)
    archive.keys()                          # every key (a key may be in several shards)
    archive.record("0001")                  # its manifest row (shard="..." if the key is in several)
    archive.read("0001")                    # the record's bytes: one ranged read, crc32 verified
    archive.read("0001", chunks=2)          # progressive: header + first 2 chunks only
    archive.decode("0001", chunks=2)        # HxWx3 uint8 via the archive's codec
    archive.shards(); archive.shard_sizes() # committed shards, their image counts (Parquet footers)
    rows = archive.shard_records("part-0")  # a shard's rows, in blob order
    archive.decode_rows(rows[:8], steps=2)  # batched: adjacent records in one read, decompress_batch
    archive.latents_of_rows(rows[:8])       # only the exact half (codec.decode_latents), for a Synthesizer

A record is identified by (shard, key): keys are unique within a shard but may repeat across
shards, as in webdataset datasets. Whole-archive readers (pipeline.decode, pipeline.loader,
pipeline.ray_data) iterate records, shard by shard; random access by key alone refuses an
ambiguous key and takes `shard=` to choose.

Every reader checks the archive against `_SUCCESS`: a committed manifest that has gone
missing raises ArchiveError (or only warns with allow_incomplete=True) rather than serving
fewer images than the run counted. Records are located by the archive's own layout
(data/<basename of data_url>), so an archive still reads after being copied or moved.

Threads: the float decoders (CDC) give pixels that depend on torch's thread count, within
the codecs' tested bound of two levels. An Archive decodes with torch's threads (by default
one per physical core); `threads=1` gives bit for bit the pixels of the parallel readers
(loader workers, decode actors, Ray Data), which decode on one thread each since their
parallelism is across processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TypeVar

import numpy as np
import pyarrow as pa
import torch

from model import BitstreamError, Codec
from model.codec import MAX_STEPS
from model.codec import Latents
from model.registry import WeightsNotInstalled, load_codec_for

from .manifest import (DATA_DIR, JOB_FILE, SUCCESS_FILE, CommittedShard, DamagedManifest, read_committed,
                       read_manifest)
from .storage import open_location, shard_name

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
#: manifests and footers read at once (object stores answer requests in parallel)
READ_THREADS = 16
#: bytes of one ranged read above which the blob's size is checked first (see Archive.fetch)
CHECKED_SPAN = 64 << 20


class ArchiveError(RuntimeError):
    """An archive record is missing, ambiguous or does not match its manifest; a read the archive cannot serve."""


class MissingKey(ArchiveError, KeyError):
    """No record has this key: an ArchiveError, and a KeyError so that `archive.get(key)` works."""

    __str__ = ArchiveError.__str__  # the message as written, not KeyError's repr of it


class Archive(Mapping):
    """An archive at `url`. `allow_incomplete`: warn instead of raising when manifests that
    `_SUCCESS` counted are missing. `device`: where the codec decodes (default: cuda if seen).

    A read-only Mapping from key to decoded image (HxWx3 uint8, the codec's default decode: CDC's
    mean image, UQDM lossless): `len(archive)`, `key in archive`, `archive[key]`, `for key in
    archive`, `archive.get(key)`. Its keys are the distinct keys; a key in several shards is one
    key, and `archive[key]` refuses it (ArchiveError): `decode(key, shard=...)` chooses. A missing
    key raises MissingKey, a KeyError. Only `archive[key]` decodes: `in`, `len` and iteration read
    the manifests' key columns.
    """

    # Mapping's == would decode every image of both archives; two readers are equal only if one.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, url: str, storage_options: Mapping | None = None, codec: Codec | None = None,
                 device: str | torch.device | None = None, allow_incomplete: bool = False,
                 threads: int | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1 (or None: torch's setting), got {threads!r}")
        self.url, self.threads = url, threads
        self.location = open_location(url, storage_options)
        if not self.location.exists(JOB_FILE):
            raise ArchiveError(f"{url} is not a compress_bucket archive (no {JOB_FILE})")
        self.job = self._read_json(JOB_FILE)
        damaged = [name for name in ("codec", "weights_digest") if not isinstance(self.job.get(name), str)]
        if damaged:  # every reader needs them to choose the codec: say so here, not as a KeyError later
            raise ArchiveError(f"{url}/{JOB_FILE} is damaged: it names no {' and no '.join(damaged)}")
        self._codec, self.device, self.allow_incomplete = codec, device, allow_incomplete
        self._tables: dict[str, pa.Table] = {}

    # ------------------------------------------------------------------ shards and their records
    @cached_property
    def _committed(self) -> dict[str, CommittedShard]:
        """The committed shards by name (one listing, one footer each), checked against _SUCCESS."""
        with self._damaged_manifests():
            committed = dict(sorted(read_committed(self.location).items()))
        shards = list(committed)
        success = self._success
        if success is None:
            log.warning("%s has no %s: its compress run is still going or stopped early; reading the %d shards "
                        "committed so far", self.url, SUCCESS_FILE, len(shards))
        elif len(shards) < success.get("archive_shards", success.get("shards", 0)):  # "shards": older runs
            expected = {shard_name(url) for url in self.job.get("inputs", [])}
            missing = sorted(expected - set(shards)) or ["(unknown names)"]
            counted = success.get("archive_shards", success.get("shards"))
            self._incomplete(f"{SUCCESS_FILE} counts {counted} shards but only {len(shards)} manifests "
                             f"are present; missing: {', '.join(missing[:10])}")
        return committed

    @property
    def _shards(self) -> list[str]:
        return list(self._committed)

    def shards(self) -> list[str]:
        """The committed shards (those with a manifest), by name."""
        return list(self._shards)

    @cached_property
    def _success(self) -> dict | None:
        return self._read_json(SUCCESS_FILE) if self.location.exists(SUCCESS_FILE) else None

    def _read_json(self, name: str) -> dict:
        """A layout file that holds a JSON object; ArchiveError naming it when it does not (damaged,
        emptied, or another tool's: Hadoop writes an empty _SUCCESS)."""
        try:
            value = json.loads(self.location.read(name))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ArchiveError(f"{self.url}/{name} is damaged: not JSON ({exc})") from None
        if not isinstance(value, dict):
            raise ArchiveError(f"{self.url}/{name} is damaged: a JSON object is needed, it holds a "
                               f"{type(value).__name__}")
        return value

    def _incomplete(self, what: str) -> None:
        message = f"archive {self.url} is incomplete: {what}"
        if not self.allow_incomplete:
            raise ArchiveError(f"{message}. A manifest was deleted or lost; rerun compress_bucket to redo those "
                               "shards, or pass allow_incomplete=True to read what is left")
        log.warning(message)

    def _check_images(self, counted: int) -> None:
        expected = (self._success or {}).get("images", 0)
        if counted < expected:
            self._incomplete(f"{SUCCESS_FILE} counts {expected} images but the manifests hold {counted}")

    @contextlib.contextmanager
    def _damaged_manifests(self) -> Iterator[None]:
        """A manifest that cannot be read is an ArchiveError naming it (jobs.decode: one line, not a traceback)."""
        try:
            yield
        except DamagedManifest as exc:
            raise ArchiveError(f"archive {self.url} is damaged: {exc}") from exc

    def shard_sizes(self, shards: Sequence[str] | None = None) -> dict[str, int]:
        """Images per shard (all committed shards by default), read from the Parquet footers only."""
        names = self.shards() if shards is None else self._known(shards)
        sizes = {name: self._committed[name].rows for name in names}
        if shards is None:
            self._check_images(sum(sizes.values()))
        return sizes

    def _known(self, shards: Iterable[str]) -> list[str]:
        names = list(shards)
        unknown = sorted(set(names) - set(self._shards))
        if unknown:
            raise ArchiveError(f"no committed shards {unknown[:10]} in {self.url}")
        return names

    def shard_table(self, shard: str) -> pa.Table:
        """A shard's manifest (cached)."""
        if shard not in self._tables:
            self._known([shard])
            with self._damaged_manifests():
                self._tables[shard] = read_manifest(self.location, shard)
        return self._tables[shard]

    def shard_records(self, shard: str, rows: Sequence[int] | None = None) -> list[dict]:
        """Manifest rows of a shard (all, or those numbered `rows`), each with its "shard" and
        its "extras" as a dict."""
        table = self.shard_table(shard)
        if rows is not None:
            table = table.take(pa.array(rows, pa.int64()))
        records = table.to_pylist()
        for record in records:
            record["shard"], record["extras"] = shard, dict(record["extras"])
        return records

    def forget(self, shard: str) -> None:
        """Drop a shard's cached manifest (whole-archive readers go shard by shard)."""
        self._tables.pop(shard, None)

    # ------------------------------------------------------------------ random access by key
    @cached_property
    def _index(self) -> dict[str, list[tuple[str, int]]]:
        """key -> [(shard, row), ...]: a key appears once per shard at most, maybe in several shards."""
        shards = self.shards()
        with self._damaged_manifests():
            columns = _parallel(lambda s: read_manifest(self.location, s, columns=["key"])["key"].to_pylist(), shards)
        index: dict[str, list[tuple[str, int]]] = {}
        for shard, keys in zip(shards, columns):
            for row, key in enumerate(keys):
                index.setdefault(key, []).append((shard, row))
        self._check_images(sum(map(len, columns)))
        return index

    def keys(self) -> list[str]:
        """Every key once, in shard order (a key in several shards is listed once)."""
        return list(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __getitem__(self, key: str) -> np.ndarray:
        return self.decode(key)

    def locate(self, keys: Iterable[str], shards: Iterable[str] | None = None) -> dict[str, list[int]]:
        """shard -> row numbers of the records with these keys (in every shard, or only in `shards`).
        Raises ArchiveError naming the keys that are in none of them."""
        wanted, allowed = set(keys), None if shards is None else set(self._known(shards))
        found: dict[str, list[int]] = {}
        missing = []
        for key in sorted(wanted):
            places = [(s, r) for s, r in self._index.get(key, []) if allowed is None or s in allowed]
            if not places:
                missing.append(key)
            for shard, row in places:
                found.setdefault(shard, []).append(row)
        if missing:
            raise ArchiveError(f"{len(missing)} keys are not in {self.url}"
                               f"{'' if allowed is None else ' (in the shards chosen)'}: {missing[:10]}")
        return {shard: sorted(found[shard]) for shard in self._shards if shard in found}

    def record(self, key: str, shard: str | None = None) -> dict:
        """The manifest row of `key` (in `shard`, needed when the key is in several shards)."""
        places = self._index.get(key, [])
        if shard is not None:
            places = [place for place in places if place[0] == shard]
        if not places:
            where = f" in shard {shard!r}" if shard is not None else ""
            raise MissingKey(f"no image with key {key!r}{where} in {self.url}")
        if len({s for s, _ in places}) < len(places):  # compress never writes this
            raise ArchiveError(f"key {key!r} is on {len(places)} rows of shard {places[0][0]} of {self.url}: a damaged "
                               "manifest (keys are unique within a shard)")
        if len(places) > 1:
            raise ArchiveError(f"key {key!r} is in {len(places)} shards of {self.url} "
                               f"({', '.join(s for s, _ in places)}): pass shard= to choose one")
        (shard, row), = places
        return self.shard_records(shard, rows=[row])[0]

    def read(self, key: str, chunks: int | None = None, shard: str | None = None) -> bytes:
        """A record's bytes, or only its header and first `chunks` chunks (progressive prefix):
        one ranged read. A whole record is checked against the manifest's crc32; a prefix is
        checked by the codec, chunk by chunk, when decoded."""
        self.decode_options(chunks=chunks)
        return self.fetch([self.record(key, shard)], chunks)[0]

    def decode(self, key: str, steps: int | None = None, chunks: int | None = None,
               shard: str | None = None, autocast: torch.dtype | None = None) -> np.ndarray:
        """Decode one image; `steps` diffusion steps (CDC), `chunks` progressive prefix (UQDM),
        `autocast` (torch.bfloat16) CDC's content decoder precision (see decode_options)."""
        return self.decode_rows([self.record(key, shard)], steps, chunks, autocast)[0]

    # ------------------------------------------------------------------ batched reading and decoding
    @property
    def progressive(self) -> bool:
        return self.job["progressive"] if "progressive" in self.job else self.codec.progressive

    def decode_options(self, steps: int | None = None, chunks: int | None = None,
                       autocast: torch.dtype | None = None) -> dict:
        """The codec options for `steps`, `chunks` and `autocast`; ArchiveError for what this archive
        cannot take."""
        return decode_options(self.progressive, f"{self.url} holds {self.job['codec']} streams", steps, chunks,
                              autocast)

    @property
    def codec(self) -> Codec:
        if self._codec is None:
            try:
                self._codec = load_codec_for(self.job["codec"], self.job["weights_digest"], device=self.device)
            except WeightsNotInstalled as error:
                raise ArchiveError(f"{self.url} was {error}") from None
        if self._codec.weights_digest.hex() != self.job["weights_digest"]:
            raise ArchiveError(f"the archive was written with weights {self.job['weights_digest']}; codec "
                               f"{self._codec.name!r} has {self._codec.weights_digest.hex()}")
        return self._codec

    def _span(self, row: dict, chunks: int | None) -> tuple[str, int, int]:
        """(blob path, start, end) of a record, or of its first `chunks` chunks."""
        lengths, size = row["chunk_lengths"], row["length"]
        if any(row.get(name) is None for name in ("offset", "length", "crc32", "data_url")) or row["offset"] < 0 \
                or size < 0:
            raise ArchiveError(f"{_where(row, self.url)} has a damaged manifest row (offset {row.get('offset')}, "
                               f"length {size}, crc32 {row.get('crc32')}, data_url {row.get('data_url')!r})")
        if chunks is not None:
            # A prefix ends where the manifest's chunk lengths say: they must fit in the record.
            if lengths is None or any(n is None or n < 0 for n in lengths) or sum(lengths) > size:
                raise ArchiveError(f"{_where(row, self.url)} has a damaged manifest row (chunk lengths {lengths} "
                                   f"in a record of {size} bytes)")
            if not 0 < chunks <= len(lengths):
                raise ArchiveError(f"record {row['key']!r} has {len(lengths)} chunks; asked for {chunks}")
            size -= sum(lengths[chunks:])
        blob = self.location.path(DATA_DIR, posixpath.basename(row["data_url"]))
        return blob, row["offset"], row["offset"] + size

    def fetch(self, rows: Sequence[dict], chunks: int | None = None) -> list[bytes]:
        """The bytes of these records (or of their prefixes): adjacent ones in one ranged read,
        the rest in ranged reads issued together (concurrently on object stores)."""
        spans = [self._span(row, chunks) for row in rows]
        runs: list[list] = []  # [blob, start, end, indices]: records that follow each other in a blob
        for i, (blob, start, end) in enumerate(spans):
            if runs and runs[-1][0] == blob and runs[-1][2] == start:
                runs[-1][2] = end
                runs[-1][3].append(i)
            else:
                runs.append([blob, start, end, [i]])
        for blob, start, end, members in runs:
            # A local read allocates the bytes it is asked for before reading them: a length from a
            # damaged manifest (a petabyte, say) is checked against the blob first. Records are KBs,
            # so only such a span costs the extra request.
            if end - start > CHECKED_SPAN:
                try:
                    size = self.location.fs.size(blob)
                except OSError as exc:
                    raise ArchiveError(f"cannot read {_where(rows[members[0]], self.url)}: "
                                       f"{type(exc).__name__}: {exc}") from exc
                for i in members:
                    if spans[i][2] > size:
                        raise ArchiveError(f"{blob} ends before {_where(rows[i], self.url)} does ({size} bytes, the "
                                           f"record ends at {spans[i][2]})")
        blobs = self.location.fs.cat_ranges([r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs],
                                            on_error="return")
        out: list[bytes] = [b""] * len(rows)
        for (blob, first, _, members), data in zip(runs, blobs):
            for i in members:
                row, (_, start, end) = rows[i], spans[i]
                where = _where(row, self.url)
                if isinstance(data, Exception):
                    raise ArchiveError(f"cannot read {where}: {type(data).__name__}: {data}") from data
                record = bytes(data[start - first:end - first])
                if len(record) != end - start:
                    raise ArchiveError(f"{blob} ends before {where} does ({len(record)} of {end - start} bytes)")
                if chunks is None and zlib.crc32(record) != row["crc32"]:
                    raise ArchiveError(f"{where} does not match its manifest crc32: corrupt")
                out[i] = record
        return out

    def decode_rows(self, rows: Sequence[dict], steps: int | None = None, chunks: int | None = None,
                    autocast: torch.dtype | None = None) -> list[np.ndarray]:
        """Fetch and decode records (manifest rows) in one batch: HxWx3 uint8 images."""
        options = self.decode_options(steps, chunks, autocast)
        return decompress(self.codec, self.fetch(rows, chunks), rows, options, self.url, self.threads)

    def latents_of_rows(self, rows: Sequence[dict], chunks: int | None = None) -> list[Latents | bytes]:
        """Fetch records and run only the exact half of their decoding (codec.decode_latents): what
        `synthesize_on_device` turns into images on a GPU. A progressive codec's exact half is its
        whole decode (UQDM: 0.39 MP/s on an H100, 0.014 per CPU loader worker, benchmarks/results), so
        its records come back as their (prefix) bytes, for the device to decode."""
        options = self.decode_options(chunks=chunks)
        datas = self.fetch(rows, chunks)
        if self.codec.progressive:
            return datas
        return decode_latents(self.codec, datas, rows, options, self.url, self.threads)


#: the precisions CDC's content decoder may run in (autocast), each within the tested pixel bound
AUTOCAST = (torch.bfloat16, torch.float16)


def decode_options(progressive: bool, what: str, steps: int | None, chunks: int | None,
                   autocast: torch.dtype | None = None) -> dict:
    """Codec options for `steps`, `chunks` and `autocast`, or a clear ArchiveError; `what` says whose
    streams these are. autocast (bf16: 2.6x faster 0-step decoding on a CPU with AMX, within 2
    levels) applies to CDC only: UQDM's pixels are exact."""
    if autocast is not None:
        if progressive:
            raise ArchiveError(f"{what}, which decode exactly: autocast (bf16) is CDC's speed option")
        if autocast not in AUTOCAST:
            raise ArchiveError(f"autocast must be one of {AUTOCAST} (or None: float32), got {autocast!r}")
    if chunks is not None:
        if not progressive:
            raise ArchiveError(f"{what}, which are not progressive: a prefix of chunks applies to UQDM archives "
                               "only; choose CDC's decoding work with steps")
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ArchiveError(f"chunks must be a positive number of chunks, got {chunks!r}")
    if steps is not None and progressive:
        raise ArchiveError(f"{what}: UQDM spends one diffusion step per chunk, so choose the prefix with chunks, "
                           "not steps")
    # Bounded here as the codec bounds it: past MAX_STEPS every decoder would fail, record by record.
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS):
        raise ArchiveError(f"steps must be a whole number of diffusion steps in 0..{MAX_STEPS} (0: the mean image), "
                           f"got {steps!r}")
    return {name: value for name, value in (("steps", steps), ("chunks", chunks), ("autocast", autocast))
            if value is not None}


def decompress(codec: Codec, datas: Sequence[bytes], rows: Sequence[dict], options: Mapping,
               url: str, threads: int | None = 1) -> list[np.ndarray]:
    """decompress_batch on `threads` torch threads (CPU; None: as set); a stream that does not decode
    raises ArchiveError naming its record (rows: the records' manifest rows, with "key" and "shard";
    url: the archive's)."""
    return _naming_damaged(codec, codec.decompress_batch, datas, rows, options, url, threads)


def decode_latents(codec: Codec, datas: Sequence[bytes], rows: Sequence[dict], options: Mapping,
                   url: str, threads: int | None = 1) -> list[Latents]:
    """decode_latents as decompress does decompress_batch (exact: the same latents on any thread count)."""
    return _naming_damaged(codec, codec.decode_latents, datas, rows, options, url, threads)


def _naming_damaged(codec: Codec, decode: Callable[..., list[R]], datas: Sequence[bytes], rows: Sequence[dict],
                    options: Mapping, url: str, threads: int | None) -> list[R]:
    with torch_threads(codec.device, threads):
        try:
            return decode(list(datas), **options)
        except BitstreamError as exc:
            if len(datas) == 1:
                raise ArchiveError(f"{_where(rows[0], url)} does not decode: {exc}") from exc
    # Which stream is damaged: decode them one by one to name it.
    return [_naming_damaged(codec, decode, [data], [row], options, url, threads)[0] for data, row in zip(datas, rows)]


def synthesize_on_device(codec: Codec, items: Sequence[Latents | bytes], options: Mapping, rows: Sequence[dict],
                         url: str, threads: int | None = 1) -> list[torch.Tensor]:
    """The device half of decoding (latents_of_rows' output -> 3xHxW uint8 tensors on codec.device):
    streams of a progressive codec are decoded first (options["chunks"]), then everything is
    synthesized batched (options: steps, autocast, channels_last), on `threads` (CPU)."""
    items = list(items)
    streams = [i for i, item in enumerate(items) if isinstance(item, bytes)]
    if streams:
        latent_options = {"chunks": options["chunks"]} if options.get("chunks") else {}
        decoded = decode_latents(codec, [items[i] for i in streams], [rows[i] for i in streams], latent_options,
                                 url, threads)
        for i, item in zip(streams, decoded):
            items[i] = item
    with torch_threads(codec.device, threads):
        return codec.synthesize_tensors(items, **{k: v for k, v in options.items() if k != "chunks"})


def _where(row: dict, url: str) -> str:
    return f"record {row['key']!r} of shard {row.get('shard', '?')} in {url}"


@contextlib.contextmanager
def torch_threads(device: torch.device, threads: int | None = 1) -> Iterator[None]:
    """torch on `threads` threads while decoding on a CPU (see the module docstring), then as before;
    None changes nothing."""
    if device.type != "cpu" or threads is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _parallel(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    if len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(READ_THREADS, len(items))) as pool:
        return list(pool.map(function, items))
