"""Object storage through fsspec: resolving URLs, listing input shards, atomic writes, redaction.

Every URL the pipeline takes (a local folder, `file://`, `s3://`, `memory://`, ...) goes
through `open_location` with the user's storage options (for S3: endpoint_url, key,
secret, ...). Those options may hold credentials: only `redact(options)` may be logged
or written anywhere.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Option names holding any of these words are credentials (key, secret, token, password, ...).
SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session", "auth")
REDACTED = "***"
GLOB_CHARS = "*?["


def redact(options: Mapping) -> dict:
    """A copy of storage options safe to log: credential values replaced by '***'."""
    safe = {}
    for name, value in options.items():
        if isinstance(value, Mapping):
            safe[name] = redact(value)
        elif any(word in str(name).lower() for word in SECRET_WORDS):
            safe[name] = REDACTED
        else:
            safe[name] = value
    return safe


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

    def read(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_range(self, relative: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path(relative), start=start, end=end)

    def write_atomic(self, relative: str, data: bytes) -> None:
        """Write a whole file so readers see the old state or the new one, never a part.

        Locally: write a temporary name beside it, then rename (atomic on POSIX).
        Object stores: one PUT (s3fs uploads small files in one request and large ones as
        a multipart upload that only appears when completed), which is atomic already.
        """
        target = self.path(relative)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            temporary = f"{target}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(temporary, data)
            self.fs.mv(temporary, target)
        else:
            self.fs.pipe_file(target, data)

    def remove(self, relative: str) -> None:
        if self.exists(relative):
            self.fs.rm_file(self.path(relative))

    def list(self, folder: str, suffix: str) -> list[str]:
        """Paths relative to the root of the files in `folder` whose names end with `suffix`."""
        if not self.exists(folder):
            return []
        self.fs.invalidate_cache(self.path(folder))
        names = (posixpath.basename(p) for p in self.fs.ls(self.path(folder), detail=False))
        return sorted(posixpath.join(folder, n) for n in names if n.endswith(suffix))


def open_location(url: str, storage_options: Mapping | None = None) -> Location:
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return Location(fs, root.rstrip("/") or root)


@dataclass(frozen=True, order=True)
class Shard:
    """One input tar: its name (the file name without .tar, used for every output file) and URL."""

    name: str
    url: str


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
                raise ValueError(f"two input shards share the name {shard.name!r} ({previous.url}, "
                                 f"{shard.url}); output files are named after shards, so rename one")
    if not shards:
        raise FileNotFoundError(f"no .tar shards found in {inputs!r}")
    return sorted(shards.values())


def _expand(entry: str, storage_options: Mapping) -> list[Shard]:
    fs, path = fsspec.core.url_to_fs(entry, **dict(storage_options))
    if any(c in path for c in GLOB_CHARS):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = [p for p in fs.find(path) if p.endswith(".tar")]
    elif fs.isfile(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"input {entry!r} is neither a shard, a folder nor a glob that exists")
    return [Shard(shard_name(p), fs.unstrip_protocol(p)) for p in paths]


def shard_name(path: str) -> str:
    name = posixpath.basename(path.rstrip("/"))
    return name[:-len(".tar")] if name.endswith(".tar") else name
