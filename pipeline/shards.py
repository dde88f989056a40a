"""Reading webdataset shards: tar members grouped into samples by key.

webdataset's convention: a member `dir/name.ext1.ext2` belongs to sample `dir/name` as
member `ext1.ext2`. One member per sample is the image (the first with an image
extension); the others (`.cls`, `.txt`, `.json`, ...) travel unchanged as extras.
Whole shards are read into memory: shards are written to be streamed whole (100 MB-1 GB)
and a worker holds one at a time.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass, field

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "pnm", "bmp",
                              "tif", "tiff", "gif", "avif", "jp2", "j2k"})
END_OF_ARCHIVE = 1024  # a complete tar ends with two zeroed 512-byte blocks


@dataclass(frozen=True)
class MemberError:
    """Something in a shard that could not be encoded."""

    key: str
    member: str
    category: str  # short and fixed, to count by: "truncated tar", "cannot decode image", ...
    reason: str    # the whole story: "category: detail"

    @classmethod
    def of(cls, key: str, member: str, category: str, detail: str) -> MemberError:
        return cls(key, member, category, f"{category}: {detail}")


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
    """'dir/abc.seg.png' -> ('dir/abc', 'seg.png'), as webdataset groups members."""
    folder, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, extension if dot else ""


def read_shard(data: bytes) -> ShardContents:
    """Group a tar's members into samples; damage is reported as errors, never raised.

    A truncated tar keeps every sample read completely before the damage; the sample the
    damage cuts into is dropped with a 'truncated tar' error.
    """
    samples: dict[str, Sample] = {}
    errors: list[MemberError] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            end = _read_members(tar, samples, errors)
    except tarfile.ReadError as exc:
        if samples or errors:
            errors.append(MemberError.of("", "", "truncated tar", f"{exc} after {len(samples)} samples"))
        else:
            errors.append(MemberError.of("", "", "not a tar archive", str(exc)))
        return ShardContents(list(samples.values()), errors)
    if end is not None and data[end:end + END_OF_ARCHIVE] != bytes(END_OF_ARCHIVE):
        errors.append(MemberError.of("", "", "truncated tar", f"no end-of-archive marker after byte {end}"))
    return ShardContents(list(samples.values()), errors)


def _read_members(tar: tarfile.TarFile, samples: dict[str, Sample],
                  errors: list[MemberError]) -> int | None:
    """Fill samples from the tar; returns the offset where members end, None if cut inside one."""
    for info in tar:
        if not info.isfile():
            continue
        key, member = split_member_name(info.name)
        try:
            content = tar.extractfile(info).read()
        except tarfile.ReadError as exc:
            samples.pop(key, None)
            errors.append(MemberError.of(key, member, "truncated tar", f"member {info.name} is cut short ({exc})"))
            return None
        sample = samples.setdefault(key, Sample(key))
        if member in sample.members:
            errors.append(MemberError.of(key, member, "duplicate member", f"{info.name} appears twice; kept the first"))
            continue
        sample.members[member] = content
    return tar.offset


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
