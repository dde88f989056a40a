"""jobs.decode on Ray: each archive shard decoded by a pool of decoder actors into one output shard.

    summary = decode_archive("s3://bucket/out", "s3://bucket/decoded", storage_options, fmt="wds", steps=2)

Output at `to`, per archive shard:

    <shard>.tar              fmt "wds": the shard's records as webdataset samples, same name as the
                             archive shard: <key>.png (the decoded image) + the original extras
    <shard>/<name>.png       fmt "png": one PNG per record, name = safe_name(key), and beside it
                             the record's extras as <name>.<ext> (<name>.cls, <name>.json, ...)
    _decode/<shard>.json     written last, the shard's commit: options, counts, the records that
                             failed and why, output names -> keys

A decoder actor (one per GPU when the cluster has GPUs, else one per CPU) takes a whole shard,
decodes it in batches of `batch_size` and streams its output: memory is bounded by a batch,
not by the shard or the archive. A .tar is written to a temporary file (locally: under
_decode/partial/) and moved into place whole; so a rerun skips the shards whose commit file
exists, redoes the rest, and no half shard is ever visible under its name. A record that
cannot be read or decoded is recorded with its reason and the rest go on.

Names: in .tar shards a sample keeps its true key (members `<key>.<ext>`, PAX headers, so any
length); the decoded image is `png` unless the sample has a `png` extra (a mask, say), then
`decoded.png`: an extra is never overwritten nor dropped. As PNG files, keys become safe file
names: one path component, every character but letters, digits and `_.-` percent-encoded (a
leading `.` or `-` too), so `../../x`, `/abs/x`, `./b` and `b` all stay inside `to` and
apart; urllib.parse.unquote gives the key back, and names over MAX_NAME characters are cut
and end with `~` + a hash of the key. The commit file maps every name to its key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

import ray
import torch
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from model.images import encode_png

from .archive import Archive, ArchiveError
from .cluster import actor_pool, connect_ray, failure, runtime_env
from .storage import Location, open_location

log = logging.getLogger(__name__)
FORMATS = ("png", "wds")
COMMIT_DIR = "_decode"
PARTIAL_DIR = f"{COMMIT_DIR}/partial"
#: characters of a file name before ".png": with write_atomic's ".tmp-<32 hex>" it stays far below 255 bytes
MAX_NAME = 160
SHARDS_PER_ACTOR = 2  # one decoding, one queued


def safe_name(key: str) -> str:
    """A file name (one path component, no extension) for `key`; unique per key (see the module docstring)."""
    name = quote(key, safe="").replace("~", "%7E")
    if name[:1] in (".", "-"):
        name = f"%{ord(name[0]):02X}{name[1:]}"
    if not name or len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 17]}~{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return name


def image_member(extras: Mapping[str, bytes]) -> str:
    """The member name of the decoded image in a .tar sample: "png", unless an extra has it."""
    candidates = ["png", "decoded.png"] + [f"decoded{n}.png" for n in range(2, len(extras) + 2)]
    return next(name for name in candidates if name not in extras)


def commit_path(shard: str) -> str:
    return f"{COMMIT_DIR}/{shard}.json"


@dataclass
class DecodeConfig:
    url: str
    to: str
    storage_options: dict = field(default_factory=dict)
    fmt: str = "png"
    steps: int | None = None
    chunks: int | None = None
    batch_size: int = 8
    autocast: torch.dtype | None = None

    def settings(self, keys: Iterable[str] | None) -> dict:
        """What a shard's output depends on: a rerun with other settings must not mix with it."""
        digest = None if keys is None else hashlib.sha256("\n".join(sorted(set(keys))).encode()).hexdigest()
        precision = {} if self.autocast is None else {"autocast": str(self.autocast)}  # older commits have none
        return {"format": self.fmt, "steps": self.steps, "chunks": self.chunks, "keys": digest, **precision}


@dataclass
class DecodeSummary:
    output: str
    shards: int
    shards_skipped: int
    images: int
    errors: list[dict]                 # {"shard", "key", "reason"} of every record not written
    failed_shards: dict[str, str]      # shard -> why it has no output (it is redone by a rerun)
    run_images: int
    run_seconds: float

    def table(self) -> str:
        rate = self.run_images / self.run_seconds if self.run_seconds else 0.0
        lines = [f"decoded into       {self.output}",
                 f"shards             {self.shards} ({self.shards_skipped} already decoded, skipped)",
                 f"images             {self.images}",
                 f"this run           {self.run_images} images in {self.run_seconds:.1f} s, {rate:.2f} images/s",
                 f"errors             {len(self.errors)}"]
        lines += [f"  {e['shard']}/{e['key']}: {e['reason']}" for e in self.errors[:20]]
        lines += [f"shard failed       {shard}: {reason}" for shard, reason in self.failed_shards.items()]
        return "\n".join(lines)


def decode_archive(url: str, to: str, storage_options: Mapping | None = None, keys: Iterable[str] | None = None,
                   steps: int | None = None, chunks: int | None = None, fmt: str = "png", *,
                   shards: Iterable[str] | None = None, actors: int | None = None,
                   gpus_per_actor: float | None = None, batch_size: int = 8,
                   allow_incomplete: bool = False, autocast: torch.dtype | None = None) -> DecodeSummary:
    """Decode an archive's records (all, those with `keys`, those in `shards`) into `to`, on Ray
    (joined or started in-process). Safe to rerun: shards already decoded are skipped.
    `autocast` (torch.bfloat16): CDC's content decoder in that precision (Archive.decode_options)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    config = DecodeConfig(url, to, dict(storage_options or {}), fmt, steps, chunks, batch_size, autocast)
    archive = Archive(url, config.storage_options, allow_incomplete=allow_incomplete)
    archive.decode_options(steps, chunks, autocast)  # a setting the archive cannot take fails before any work
    if chunks is not None and chunks > archive.codec.n_chunks:  # else every record would fail, one by one
        raise ArchiveError(f"{url} holds {archive.job['codec']} streams of {archive.codec.n_chunks} chunks "
                           f"({archive.codec.n_chunks} = lossless): chunks {chunks} is past their end")
    keys = None if keys is None else list(keys)
    if keys is None:
        sizes = archive.shard_sizes(shards)
        selection: dict[str, list[int] | None] = dict.fromkeys(sizes)
    else:
        selection = dict(archive.locate(keys, shards))
        sizes = {shard: len(rows) for shard, rows in selection.items()}
    target = open_location(to, config.storage_options)
    settings = config.settings(keys)
    done, todo = {}, {}
    for shard, rows in selection.items():
        commit = json.loads(target.read(commit_path(shard))) if target.exists(commit_path(shard)) else None
        if commit is None:
            todo[shard] = rows
        elif commit["settings"] != settings:
            raise ArchiveError(f"{to} already holds shard {shard} decoded with {commit['settings']}; this run asks "
                             f"for {settings}. Decode into another folder.")
        else:
            done[shard] = commit
    log.info("%d shards to decode, %d already decoded", len(todo), len(done))
    _clear_partial(target)  # what a killed run left half written
    started = time.monotonic()
    images = sum(sizes[shard] for shard in todo)
    new, failed = _run(config, settings, todo, images, allow_incomplete, actors, gpus_per_actor) if todo else ({}, {})
    _clear_partial(target)
    commits = {**done, **new}
    return DecodeSummary(
        output=to, shards=len(selection), shards_skipped=len(done),
        images=sum(c["written"] for c in commits.values()),
        errors=[{"shard": shard, **error} for shard, c in commits.items() for error in c["errors"]],
        failed_shards=failed, run_images=sum(c["written"] for c in new.values()),
        run_seconds=time.monotonic() - started)


def _clear_partial(target: Location) -> None:
    """Remove the local folder of half-written .tar files (no actor is writing when this runs)."""
    if isinstance(target.fs, LocalFileSystem) and target.exists(PARTIAL_DIR):
        target.fs.rm(target.path(PARTIAL_DIR), recursive=True)


def _run(config: DecodeConfig, settings: dict, todo: dict[str, list[int] | None], images: int,
         allow_incomplete: bool, actors: int | None, gpus_per_actor: float | None
         ) -> tuple[dict[str, dict], dict[str, str]]:
    """Decode the shards of `todo` (`images` records) on an actor pool; (commits by shard, failures
    by shard). Each shard's call streams its progress (records done per batch), then its commit."""
    connect_ray()
    count, gpus = actor_pool(actors, gpus_per_actor, "decoders")
    remote = ray.remote(ShardDecoder).options(num_cpus=1, num_gpus=gpus, max_restarts=-1, max_task_retries=3,
                                              runtime_env=runtime_env())
    pool = [remote.remote(config, settings, allow_incomplete) for _ in range(min(count, len(todo)))]
    log.info("decoding %d shards with %d actors (%s GPU each)", len(todo), len(pool), gpus)
    queue, running, load = list(todo), {}, [0] * len(pool)
    commits, failed = {}, {}
    try:
        with tqdm(total=images, unit="image", desc="decode", mininterval=1.0) as bar:
            while queue or running:
                while queue and min(load) < SHARDS_PER_ACTOR:
                    actor = load.index(min(load))
                    shard = queue.pop(0)
                    call = pool[actor].decode_shard.options(num_returns="streaming").remote(shard, todo[shard])
                    running[call] = (shard, actor)
                    load[actor] += 1
                [ready], _ = ray.wait(list(running), num_returns=1)
                shard, actor = running[ready]
                try:
                    item = ray.get(next(ready))
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    log.error("shard %s failed: %s", shard, exc)
                    failed[shard] = failure(exc)
                else:
                    if isinstance(item, int):  # records done in a batch
                        bar.update(item)
                        continue
                    commits[shard] = item
                running.pop(ready)
                load[actor] -= 1
                bar.set_postfix_str(f"shards {len(commits) + len(failed)}/{len(todo)}", refresh=False)
    finally:  # free the CPUs/GPUs now, also when the run fails
        for actor in pool:
            ray.kill(actor)
    return commits, failed


class ShardDecoder:
    """A decoder actor: holds the archive reader and its codec (on a GPU when torch sees one)."""

    def __init__(self, config: DecodeConfig, settings: dict, allow_incomplete: bool):
        self.config, self.settings = config, settings
        self.archive = Archive(config.url, config.storage_options, allow_incomplete=allow_incomplete, threads=1)
        self.target = open_location(config.to, config.storage_options)

    def decode_shard(self, shard: str, rows: list[int] | None) -> Iterator[int | dict]:
        """Decode a shard's records (all, or those numbered `rows`), write its output, then its
        commit; yields the number of records done after each batch, then the commit."""
        config = self.config
        records = self.archive.shard_records(shard, rows)
        errors = []
        written: set[str] = set()
        output = (TarOutput if config.fmt == "wds" else PngOutput)(self.target, shard)
        with output:
            for start in range(0, len(records), config.batch_size):
                batch = records[start:start + config.batch_size]
                for row, image in zip(batch, self._decode(batch)):
                    # Compress never writes a key twice in a shard; a damaged manifest may. A second image of
                    # a key would put its members twice in the .tar or, as PNGs, fail the whole shard (one
                    # file name): it is that record's error, one image per key is written.
                    if row["key"] in written:
                        image = ArchiveError(f"record {row['key']!r} of shard {shard}: its key is on two rows of the "
                                             "manifest (damaged: keys are unique in a shard); one is written")
                    if not isinstance(image, ArchiveError):
                        try:
                            output.add(row, encode_png(image))
                            written.add(row["key"])
                            continue
                        except ArchiveError as exc:  # a record this output cannot hold (see TarOutput.add)
                            image = exc
                    log.warning("%s", image)
                    errors.append({"key": row["key"], "reason": str(image)})
                yield len(batch)
            output.commit()
        commit = {"shard": shard, "settings": self.settings, "records": len(records),
                  "written": len(records) - len(errors), "errors": errors, **output.names}
        self.target.write_atomic(commit_path(shard), json.dumps(commit, indent=1).encode())
        self.archive.forget(shard)
        yield commit

    def _decode(self, batch: list[dict]) -> list:
        """Images, or for a record that cannot be read or decoded its ArchiveError (the others still decode)."""
        config = self.config
        try:
            return self.archive.decode_rows(batch, config.steps, config.chunks, config.autocast)
        except ArchiveError as exc:
            if len(batch) == 1:
                return [exc]
        return [image for row in batch for image in self._decode([row])]


class TarOutput:
    """A webdataset shard `<shard>.tar`, streamed to a temporary file and moved into place whole."""

    def __init__(self, target: Location, shard: str):
        self.target, self.relative = target, f"{shard}.tar"
        self.local = isinstance(target.fs, LocalFileSystem)
        if self.local:
            target.fs.makedirs(target.path(PARTIAL_DIR), exist_ok=True)
            self.temporary = target.path(PARTIAL_DIR, f"{shard}.{uuid.uuid4().hex}.tar")
        else:
            handle, self.temporary = tempfile.mkstemp(prefix="decode-", suffix=".tar")
            os.close(handle)
        self.file = open(self.temporary, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.names = {"image_members": {}}  # key -> member, where the decoded image is not "png"

    def add(self, row: dict, png: bytes) -> None:
        if "\0" in row["key"]:  # tar cuts a member name at NUL: "a\0b.png" would be read back as "a"
            raise ArchiveError(f"record {row['key']!r} of shard {self.relative[:-len('.tar')]}: a key with a NUL "
                               "character cannot name tar members; decode it with --format png")
        member = image_member(row["extras"])
        if member != "png":
            self.names["image_members"][row["key"]] = member
        for name, data in [(member, png), *row["extras"].items()]:
            info = tarfile.TarInfo(f"{row['key']}.{name}")
            info.size, info.mode = len(data), 0o444
            self.tar.addfile(info, io.BytesIO(data))

    def commit(self) -> None:
        self.tar.close()
        self.file.close()
        if self.local:
            os.replace(self.temporary, self.target.path(self.relative))
        else:
            self.target.fs.put_file(self.temporary, self.target.path(self.relative))

    def __enter__(self) -> TarOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if os.path.exists(self.temporary):
            os.remove(self.temporary)


class PngOutput:
    """One PNG per record under `<shard>/`, named safe_name(key), and the record's extras beside it
    (`<name>.cls`, `<name>.json`, ...: the labels stay with their images). As in a .tar, an extra
    named `png` keeps its name and the decoded image is `<name>.decoded.png`."""

    def __init__(self, target: Location, shard: str):
        self.target, self.shard = target, shard
        # file name -> key: the decoded images ("files"), and the extras written beside them
        self.names: dict[str, dict[str, str]] = {"files": {}, "extras": {}}

    def add(self, row: dict, png: bytes) -> None:
        stem = safe_name(row["key"])
        name = f"{stem}.{image_member(row['extras'])}"
        if name in self.names["files"]:
            raise ArchiveError(f"keys {self.names['files'][name]!r} and {row['key']!r} map to one file name {name}")
        for extra, data in row["extras"].items():
            # Member suffixes come from the source tar: percent-encoded, so one stays one path component.
            extra_name = f"{stem}.{quote(extra, safe='._-')}"
            self.target.write_atomic(f"{self.shard}/{extra_name}", data)
            self.names["extras"][extra_name] = row["key"]
        self.target.write_atomic(f"{self.shard}/{name}", png)  # last: an image on disk has its extras beside it
        self.names["files"][name] = row["key"]

    def commit(self) -> None:
        pass

    def __enter__(self) -> PngOutput:
        return self

    def __exit__(self, *exc) -> None:
        pass
