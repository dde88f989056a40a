"""Reading webdataset shards as a stream: tar members grouped into samples by key.

webdataset's convention: a member `dir/name.ext1.ext2` belongs to sample `dir/name` as
member `ext1.ext2`, and a sample's members are contiguous in the tar. One member per
sample is the image (the first with an image extension); the others (`.cls`, `.txt`,
`.json`, ...) travel unchanged as extras.

A shard is read front to back from its file object (plain tar, or gzip, bzip2, xz
compressed: told by its first bytes, not its name), and each sample is handed on as soon
as its last member is read, so memory is bounded by the largest sample, not the shard.
Every member is either part of a sample or reported: damage (truncation, garbage), a
duplicate member, a member after other keys' members (not contiguous), a link, device or
FIFO, an oversized member. Damage is reported, never raised; a failure of storage while
reading (the network, a vanished file) raises ShardReadError: it is not the input's fault.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "pnm", "bmp",
                              "tif", "tiff", "gif", "avif", "jp2", "j2k"})
BLOCK = tarfile.BLOCKSIZE     # a complete tar ends with two zeroed blocks
READ_SIZE = 1 << 20           # bytes asked of storage at a time
MAX_MEMBER_BYTES = 1 << 30    # a member larger than this is refused, not read into memory
# (magic, name, reader) of the compressions read; and of some that are recognized, to say so.
COMPRESSIONS = ((b"\x1f\x8b", "gzip", lambda file: gzip.GzipFile(fileobj=file, mode="rb")),
                (b"BZh", "bzip2", bz2.BZ2File), (b"\xfd7zXZ\x00", "xz", lzma.LZMAFile))
UNREAD_COMPRESSIONS = ((b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"))
# What a damaged tar or compressed stream raises while being read (besides ShardReadError).
DAMAGE = (tarfile.ReadError, EOFError, zlib.error, lzma.LZMAError, OSError)


class ShardReadError(OSError):
    """Storage failed while the shard was read (a transient failure, not damage in the tar)."""


@dataclass(frozen=True)
class MemberError:
    """Something in a shard that could not be encoded.

    `transient`: the failure was not the input's (storage, an encoder that died, a codec
    error on a decodable image); a shard with such an error is not committed, so that a
    rerun tries again. Otherwise the input itself is at fault and the error is final.
    """

    key: str
    member: str
    category: str  # short and fixed, to count by: "truncated tar", "cannot decode image", ...
    reason: str    # the whole story: "category: detail"
    transient: bool = False

    @classmethod
    def of(cls, key: str, member: str, category: str, detail: str, transient: bool = False) -> MemberError:
        return cls(key, member, category, f"{category}: {detail}", transient)


@dataclass
class Sample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_member(self) -> str | None:
        return next((m for m in self.members if m.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS), None)

    @property
    def extras(self) -> dict[str, bytes]:
        image = self.image_member
        return {name: data for name, data in self.members.items() if name != image}


@dataclass
class ShardContents:
    samples: list[Sample]
    errors: list[MemberError]


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'), as webdataset groups members. A leading dot
    belongs to the key ('.hidden.png' -> ('.hidden', 'png')): a key is never empty."""
    folder, base = posixpath.split(name)
    stem, dot, extension = base[1:].partition(".")
    stem = base[:1] + stem
    return posixpath.join(folder, stem) if folder else stem, extension if dot else ""


def read_shard(data: bytes) -> ShardContents:
    """A whole shard in memory, grouped into samples (iter_shard, collected)."""
    contents = ShardContents([], [])
    for item in iter_shard(io.BytesIO(data)):
        (contents.errors if isinstance(item, MemberError) else contents.samples).append(item)
    return contents


def iter_shard(file: BinaryIO) -> Iterator[Sample | MemberError]:
    """The shard's samples in tar order, each complete, and the errors met, as they come.

    A truncated tar keeps every sample read completely before the damage; the sample the
    damage cuts into is dropped with a 'truncated tar' error. Raises ShardReadError only.
    """
    storage = _Storage(file)
    stream = io.BufferedReader(storage, READ_SIZE)
    try:
        yield from _read_stream(stream)
    except ShardReadError:
        raise
    except DAMAGE as exc:
        if storage.failure is not None:  # a reader above storage wrapped its error
            raise ShardReadError(storage.failure) from exc
        raise


def _read_stream(stream: io.BufferedReader) -> Iterator[Sample | MemberError]:
    magic = stream.peek(8)[:8]
    unread = next((name for prefix, name, in UNREAD_COMPRESSIONS if magic.startswith(prefix)), None)
    if unread:
        yield MemberError.of("", "", "not a tar archive", f"{unread}-compressed; shards are read as plain tars "
                             "or gzip, bzip2 or xz compressed ones: recompress it")
        return
    compression = next(((name, reader) for prefix, name, reader in COMPRESSIONS if magic.startswith(prefix)), None)
    if compression:
        stream = _CutIsEnd(compression[1](stream))
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_Header)
    except ShardReadError:
        raise
    except DAMAGE as exc:
        if compression and stream.cut:
            yield MemberError.of("", "", "truncated tar", f"the {compression[0]} stream is cut short before the "
                                 "first member")
        elif compression and stream.failure:
            yield MemberError.of("", "", "damaged tar", f"{compression[0]} stream: {stream.failure}")
        else:
            detail = f"{compression[0]} data, not a tar inside ({exc})" if compression else str(exc)
            yield MemberError.of("", "", "not a tar archive", detail)
        return
    damaged = False
    for item in _members(tar):
        damaged = damaged or (isinstance(item, MemberError) and item.category in ("truncated tar", "damaged tar"))
        yield item
    if compression and not damaged:  # read to the stream's end: its checksum covers the tar
        try:
            while stream.read(READ_SIZE):
                pass
        except ShardReadError:
            raise
        except DAMAGE as exc:
            yield MemberError.of("", "", "damaged tar", f"{compression[0]} stream after the tar's end: {exc}")
            return
        if stream.cut:
            yield MemberError.of("", "", "truncated tar", f"the {compression[0]} stream is cut short after the "
                                 "tar's end")


def _members(tar: tarfile.TarFile) -> Iterator[Sample | MemberError]:
    seen: set[str] = set()  # keys whose members are behind us: only their names are kept
    current: Sample | None = None
    samples = 0
    while True:
        try:
            info = tar.next()
        except ShardReadError:
            raise
        except DAMAGE as exc:
            yield from _complete(current)
            yield _damage("", "", exc, f"at byte {tar.offset}, after {samples + (current is not None)} samples")
            return
        if info is None:
            break
        tar.members.clear()  # a TarFile remembers every header; a stream needs none of them
        if info.isdir():
            continue
        key, member = split_member_name(info.name)
        if current is not None and key != current.key:
            seen.add(current.key)
            samples += 1
            yield current
            current = None
        if key in seen:
            yield MemberError.of(key, member, "non-contiguous member",
                                 f"{info.name} comes after other keys' members; a sample's members must be "
                                 "contiguous (kept the earlier ones)")
            continue
        current = current or Sample(key)
        if not info.isfile():
            yield MemberError.of(key, member, "unsupported tar member",
                                 f"{info.name} is {_kind(info)}; only regular files are read")
            continue
        if info.size > MAX_MEMBER_BYTES:
            yield MemberError.of(key, member, "member too large",
                                 f"{info.name} has {info.size} bytes, over {MAX_MEMBER_BYTES}")
            try:
                skipped = _skip_data(tar, info)
            except ShardReadError:
                raise
            except DAMAGE as exc:
                yield _damage(key, member, exc, f"in member {info.name}")
                return
            if not skipped:
                yield MemberError.of(key, member, "truncated tar",
                                     f"{info.name} claims {info.size} bytes; the shard ends before them")
                return
            continue
        try:
            content = tar.extractfile(info).read()
        except ShardReadError:
            raise
        except DAMAGE as exc:
            yield _damage(key, member, exc, f"in member {info.name}")
            return
        if member in current.members:
            yield MemberError.of(key, member, "duplicate member", f"{info.name} appears twice; kept the first")
            continue
        current.members[member] = content
    yield from _complete(current)
    yield from _end_of_archive(tar)


def _skip_data(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bool:
    """Read past a member's data here, a buffer at a time; False if the shard ends first.

    Why: in a stream, tarfile skips data by reading block after block up to the claimed size,
    also past the end of the shard, so a PAX header claiming 10^15 bytes never finished.
    """
    end = info.offset_data + -(-info.size // BLOCK) * BLOCK
    while tar.fileobj.pos < end:
        if not tar.fileobj.read(min(READ_SIZE, end - tar.fileobj.pos)):
            return False
    return True


def _complete(sample: Sample | None) -> Iterator[Sample]:
    if sample is not None:
        yield sample


def _end_of_archive(tar: tarfile.TarFile) -> Iterator[MemberError]:
    """tarfile ends its iteration alike on the end-of-archive marker, a cut header or garbage."""
    stopped = getattr(tar, "stopped_by", None)
    if isinstance(stopped, tarfile.EOFHeaderError):  # a zeroed block: the marker's second must follow
        try:
            complete = tar.fileobj.read(BLOCK) == bytes(BLOCK)
        except ShardReadError:
            raise
        except DAMAGE:
            complete = False
        if complete:
            return
    if isinstance(stopped, tarfile.InvalidHeaderError):
        yield MemberError.of("", "", "damaged tar", f"{stopped} at byte {tar.offset}; nothing after it was read")
    elif isinstance(stopped, tarfile.TruncatedHeaderError):
        yield MemberError.of("", "", "truncated tar", f"cut inside a member header at byte {tar.offset}")
    else:
        yield MemberError.of("", "", "truncated tar", f"no end-of-archive marker after byte {tar.offset}")


def _damage(key: str, member: str, exc: BaseException, where: str) -> MemberError:
    """The error for what reading the tar (or its compressed stream) raised; the sample it
    cuts into is dropped."""
    if isinstance(exc, tarfile.ReadError):
        return MemberError.of(key, member, "truncated tar", f"{exc} {where}")
    return MemberError.of(key, member, "damaged tar", f"compressed stream: {type(exc).__name__}: {exc} {where}")


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"a symbolic link to {info.linkname}"
    if info.islnk():
        return f"a hard link to {info.linkname}"
    if info.isfifo():
        return "a FIFO"
    if info.ischr() or info.isblk():
        return "a device file"
    return f"of tar type {info.type!r}"


class _Header(tarfile.TarInfo):
    """A TarInfo that records on its TarFile why reading headers stopped: tarfile ends its
    iteration silently on a cut or invalid header, as on the end-of-archive marker."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.stopped_by = exc
            raise


class _CutIsEnd:
    """A decompressing reader whose stream, cut short, just ends, as a cut plain tar does
    (the tar reader then says where), instead of raising EOFError."""

    def __init__(self, reader: BinaryIO):
        self.reader = reader
        self.cut = False
        self.failure: BaseException | None = None  # the decompressor's complaint, if any

    def read(self, size: int = -1) -> bytes:
        try:  # read1: one step of decompression, so that nothing decompressed is lost with the error
            return self.reader.read1(size)
        except EOFError:
            self.cut = True
            return b""
        except ShardReadError:
            raise
        except DAMAGE as exc:
            self.failure = exc
            raise


class _Storage(io.RawIOBase):
    """The shard's file as a raw stream; a failure of storage becomes ShardReadError, so that
    it is never mistaken for damage in the tar."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.failure: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            data = self.file.read(len(buffer))
        except Exception as exc:  # noqa: BLE001 - whatever the filesystem raises
            self.failure = exc
            raise ShardReadError(f"reading the shard failed: {type(exc).__name__}: {exc}") from exc
        buffer[:len(data)] = data
        return len(data)


def write_shard(samples: list[Sample]) -> bytes:
    """A webdataset tar of these samples (members `<key>.<member>`), the inverse of read_shard."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for member, data in sample.members.items():
                info = tarfile.TarInfo(f"{sample.key}.{member}")
                info.size, info.mode = len(data), 0o444
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
