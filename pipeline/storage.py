"""Object storage through fsspec: resolving URLs, listing input shards, atomic writes, redaction.

Every URL the pipeline takes (a local folder, `file://`, `s3://`, `memory://`, ...) goes
through `open_location` with the user's storage options (for S3: endpoint_url, key,
secret, ...). Those options may hold credentials, and so may URLs (user:password@, signed
queries): only `redact(options)` and `redact_url(url)` (`Shard.public_url`) may be logged
or written anywhere.
"""

from __future__ import annotations

import contextlib
import posixpath
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

REDACTED = "***"
# Shard files: tars, plain or compressed (read as a stream either way, see pipeline.shards).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
GLOB_CHARS = "*?["
# Storage options whose values are shown (in the log, in _job.json); every other option's
# value is replaced by '***'. Redacting by default: a credential under a name nobody listed
# (connection_string, passphrase, sas_token, headers, ...) is never shown. Values under
# these names are walked too: nested options are redacted by the same rule, and URLs lose
# their user:password@ and their query values.
SHOWN_OPTIONS = frozenset({
    # fsspec, any filesystem
    "auto_mkdir", "block_size", "default_block_size", "default_cache_type", "default_fill_cache",
    "asynchronous", "skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths",
    "timeout", "connect_timeout", "read_timeout",
    # s3fs / botocore
    "anon", "endpoint_url", "region_name", "use_ssl", "verify", "requester_pays", "version_aware",
    "cache_regions", "max_concurrency", "fixed_upload_size", "client_kwargs", "config_kwargs",
    "s3", "addressing_style", "signature_version", "retries", "max_attempts", "mode", "profile",
    # gcsfs, adlfs: names, not secrets
    "project", "default_location", "consistency", "account_name", "account_host",
})


def redact(options: Mapping) -> dict:
    """A copy of storage options safe to log or store: only the values of SHOWN_OPTIONS
    stay, themselves redacted (nested options, URLs); every other value becomes '***'."""
    return {name: _shown(value) if str(name).lower() in SHOWN_OPTIONS else REDACTED
            for name, value in options.items()}


def _shown(value):
    if isinstance(value, Mapping):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return [_shown(item) for item in value]
    if isinstance(value, str):
        return redact_url(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return REDACTED  # objects (sessions, credential providers) print who knows what


def redact_url(url: str) -> str:
    """A URL safe to log or store: no user:password@, and for http(s) no query values (signed
    URLs carry their signature there). Anything that is not a URL is returned as it is."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query and parts.scheme in ("http", "https"):  # elsewhere '?' is a glob character
        query = urlencode([(name, REDACTED) for name, _ in parse_qsl(query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class Location:
    """A folder in some filesystem: the fsspec filesystem plus the folder's path in it."""

    fs: fsspec.AbstractFileSystem
    root: str

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        # Other processes write here: a listing cached by s3fs would hide their files.
        self.fs.invalidate_cache(self.path(*parts))
        return self.fs.exists(self.path(*parts))

    def info(self, *parts: str) -> dict:
        """The filesystem's details of a file (size, ETag or inode and mtime, ...), fresh."""
        self.fs.invalidate_cache(self.path(*parts))  # a cached listing would hide other writers' changes
        return self.fs.info(self.path(*parts))

    def read(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_tails(self, sizes: Mapping[str, int], length: int) -> list[bytes]:
        """The last `length` bytes of each file of `sizes` ({relative path: size}), in one
        batch of requests (concurrent where the filesystem is asynchronous, e.g. s3fs)."""
        paths = list(sizes)
        if not paths:
            return []
        tails = self.fs.cat_ranges([self.path(p) for p in paths], [max(0, sizes[p] - length) for p in paths],
                                   [sizes[p] for p in paths])
        for tail in tails:
            if isinstance(tail, Exception):
                raise tail
        return tails

    def read_range(self, relative: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path(relative), start=start, end=end)

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Write a whole file so readers see the old state or the new one, never a part.

        Locally: write a temporary name beside it, then rename (atomic on POSIX); a failed
        write (a full disk) removes the temporary file. Object stores: one PUT (s3fs uploads
        small files in one request and large ones as a multipart upload that only appears
        when completed), which is atomic already.
        """
        with self.open_atomic(relative) as file:
            file.write(data)

    @contextlib.contextmanager
    def open_atomic(self, relative: str) -> Iterator:
        """A file to stream into that appears whole when the block ends, or not at all if it
        raises (write_atomic for data that does not fit in memory at once)."""
        target = self.path(relative)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            temporary = f"{target}.tmp-{uuid.uuid4().hex}"
            try:
                with self.fs.open(temporary, "wb") as file:
                    yield file
                self.fs.mv(temporary, target)
            finally:
                if self.fs.exists(temporary):
                    self.fs.rm_file(temporary)
            return
        # Object stores: the upload (one PUT, or a multipart upload completed on close)
        # only appears on close; on failure it is discarded (the multipart upload aborted).
        file = self.fs.open(target, "wb")
        try:
            yield file
        except BaseException:
            if hasattr(file, "discard"):
                file.discard()
                file.closed = True
            raise
        file.close()

    def remove(self, relative: str) -> None:
        if self.exists(relative):
            self.fs.rm_file(self.path(relative))

    def list(self, folder: str, suffix: str) -> list[str]:
        """Paths relative to the root of the files in `folder` whose names end with `suffix`."""
        return sorted(self.sizes(folder, suffix))

    def sizes(self, folder: str, suffix: str) -> dict[str, int]:
        """{path relative to the root: size} of the files in `folder` whose names end with
        `suffix`: one listing request, nothing read."""
        self.fs.invalidate_cache(self.path(folder))  # other processes write here
        try:
            entries = self.fs.ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.join(folder, posixpath.basename(e["name"].rstrip("/"))): e["size"]
                for e in entries if e["type"] == "file" and e["name"].endswith(suffix)}


def open_location(url: str, storage_options: Mapping | None = None) -> Location:
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return Location(fs, root.rstrip("/") or root)


# Fields of fsspec's file details that change when a file's contents are replaced, by
# filesystem: an object store's ETag (quoted by HEAD, not by a listing), GCS's generation, a
# local file's inode (a new file moved in) and mtime (written in place), memory://'s creation.
VERSION_FIELDS = (("ETag",), ("etag",), ("generation",), ("ino", "mtime"), ("created",))


def file_version(info: Mapping) -> str:
    """What identifies this version of a file's contents ('' where the filesystem tells nothing)."""
    for fields in VERSION_FIELDS:
        if all(info.get(name) is not None for name in fields):
            return ":".join(str(info[name]).strip('"') for name in fields)
    return ""


@dataclass(frozen=True, order=True)
class Shard:
    """One input tar: its name (the file name without .tar, used for every output file), URL,
    and the size and version its listing found (None, '': not listed, nothing to compare)."""

    name: str
    url: str
    size: int | None = field(default=None, compare=False)
    version: str = field(default="", compare=False)

    @property
    def public_url(self) -> str:
        """The URL as it may be logged or stored (no credentials in it)."""
        return redact_url(self.url)

    def change_since_listing(self, info: Mapping) -> str | None:
        """How the file with these details differs from the one listed; None if it does not
        (a shard replaced or truncated after listing must not be committed as listed)."""
        now = (info.get("size"), file_version(info))
        if self.size is None or now == (self.size, self.version):
            return None
        return (f"listed with {self.size} bytes (version {self.version or '?'}), now {now[0]} bytes "
                f"(version {now[1] or '?'})")


def list_shards(inputs: str | Sequence[str], storage_options: Mapping | None = None) -> list[Shard]:
    """Expand inputs (comma-separated or a list: folders, globs, tar URLs) to shards, by name.

    Output files are named after the shard, so two inputs with the same file name would
    overwrite each other: that raises instead.
    """
    entries = inputs.split(",") if isinstance(inputs, str) else list(inputs)
    shards: dict[str, Shard] = {}
    for entry in filter(None, (e.strip() for e in entries)):
        for shard in _expand(entry, storage_options or {}):
            previous = shards.setdefault(shard.name, shard)
            if previous.url != shard.url:
                raise ValueError(f"two input shards share the name {shard.name!r} ({previous.public_url}, "
                                 f"{shard.public_url}); output files are named after shards, so rename one")
    if not shards:
        raise FileNotFoundError(f"no shards ({', '.join(TAR_SUFFIXES)}) found in {redact_url(str(inputs))!r}")
    return sorted(shards.values())


def _expand(entry: str, storage_options: Mapping) -> list[Shard]:
    fs, path = fsspec.core.url_to_fs(entry, **dict(storage_options))
    if any(c in path for c in GLOB_CHARS):
        found = fs.glob(path, detail=True)
    elif fs.isdir(path):
        found = {p: info for p, info in fs.find(path, detail=True).items() if p.endswith(TAR_SUFFIXES)}
    elif fs.isfile(path):
        found = {path: fs.info(path)}
    else:
        raise FileNotFoundError(f"input {redact_url(entry)!r} is neither a shard, a folder nor a glob that exists")
    return [Shard(shard_name(p), fs.unstrip_protocol(p), info.get("size"), file_version(info))
            for p, info in found.items()]


def shard_name(path: str) -> str:
    """'dir/part-0001.tar.gz' -> 'part-0001': the name every output file of the shard takes."""
    name = posixpath.basename(path.rstrip("/"))
    suffix = next((suffix for suffix in TAR_SUFFIXES if name.endswith(suffix)), "")
    return name[:len(name) - len(suffix)]
