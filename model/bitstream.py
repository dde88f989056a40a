"""The self-describing container every codec writes.

Layout (all integers big-endian):

    magic        4  b"DFZC"
    version      1  FORMAT_VERSION
    name_len     1  then the codec name, ASCII
    digest      16  weights digest (model.registry.weights_digest)
    height       4
    width        4
    params_len   2  then codec-specific parameters (opaque bytes)
    n_chunks     1  then n_chunks x (length u32, crc32 u32)
    header_crc   4  CRC32 of every header byte before it
    chunks          the chunk payloads, back to back

Chunks carry their own CRC so a prefix of chunks (progressive decoding) can be
checked without the bytes that follow it. Every length is bounded before anything
is allocated, so a hostile header cannot make the reader allocate or loop.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

MAGIC = b"DFZC"
FORMAT_VERSION = 1
DIGEST_BYTES = 16
MAX_SIDE = 1 << 16
MAX_PIXELS = 1 << 28  # 268 megapixels: far beyond any photo, small enough to bound memory
MAX_CHUNKS = 64
MAX_NAME = 64

_FIXED = struct.Struct(">4sBB")
_SIZE = struct.Struct(">II")
_U16 = struct.Struct(">H")
_U8 = struct.Struct(">B")
_CHUNK = struct.Struct(">II")
_CRC = struct.Struct(">I")


class BitstreamError(ValueError):
    """The bytes are not a stream this codec can decode (corrupt, truncated, foreign, newer)."""


@dataclass(frozen=True)
class Header:
    codec: str
    weights_digest: bytes
    height: int
    width: int
    params: bytes = b""
    chunk_lengths: tuple[int, ...] = ()
    chunk_crcs: tuple[int, ...] = field(default=(), repr=False)
    size: int = 0  # bytes the header occupies in the stream

    @property
    def total_length(self) -> int:
        return self.size + sum(self.chunk_lengths)


def pack(codec: str, weights_digest: bytes, height: int, width: int,
         chunks: list[bytes], params: bytes = b"") -> bytes:
    """Serialize a stream; the inverse of `unpack`."""
    name = codec.encode("ascii")
    if not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"codec name must be 1..{MAX_NAME} ASCII characters: {codec!r}")
    if len(weights_digest) != DIGEST_BYTES:
        raise ValueError(f"weights digest must be {DIGEST_BYTES} bytes")
    _check_size(height, width, ValueError)
    if not 0 < len(chunks) <= MAX_CHUNKS:
        raise ValueError(f"a stream holds 1..{MAX_CHUNKS} chunks, got {len(chunks)}")
    if len(params) >= 1 << 16:
        raise ValueError("codec parameters must be shorter than 64 KiB")
    head = bytearray(_FIXED.pack(MAGIC, FORMAT_VERSION, len(name)))
    head += name + weights_digest + _SIZE.pack(height, width)
    head += _U16.pack(len(params)) + params + _U8.pack(len(chunks))
    for chunk in chunks:
        head += _CHUNK.pack(len(chunk), zlib.crc32(chunk))
    head += _CRC.pack(zlib.crc32(head))
    return bytes(head) + b"".join(chunks)


def read_header(data: bytes) -> Header:
    """Parse and verify the header only; raises BitstreamError on anything off."""
    reader = _Reader(data)
    magic, version, name_len = reader.take(_FIXED)
    if magic != MAGIC:
        raise BitstreamError("not a diffpress bitstream (bad magic bytes)")
    if version > FORMAT_VERSION:
        raise BitstreamError(
            f"stream format version {version} is newer than this reader ({FORMAT_VERSION}); "
            "upgrade diffpress to decode it")
    if version < 1 or not 0 < name_len <= MAX_NAME:
        raise BitstreamError("corrupt header (version or codec name length)")
    try:
        codec = reader.raw(name_len).decode("ascii")
    except UnicodeDecodeError as exc:
        raise BitstreamError("corrupt header (codec name is not ASCII)") from exc
    digest = reader.raw(DIGEST_BYTES)
    height, width = reader.take(_SIZE)
    (params_len,) = reader.take(_U16)
    params = reader.raw(params_len)
    (n_chunks,) = reader.take(_U8)
    if not 0 < n_chunks <= MAX_CHUNKS:
        raise BitstreamError(f"corrupt header ({n_chunks} chunks)")
    chunk_table = [reader.take(_CHUNK) for _ in range(n_chunks)]
    end = reader.pos
    (crc,) = reader.take(_CRC)
    if crc != zlib.crc32(data[:end]):
        raise BitstreamError("header checksum mismatch: the stream is corrupt")
    _check_size(height, width, BitstreamError)
    return Header(codec, digest, height, width, params,
                  tuple(n for n, _ in chunk_table), tuple(c for _, c in chunk_table), reader.pos)


def unpack(data: bytes, n_chunks: int | None = None) -> tuple[Header, list[bytes]]:
    """Verify a stream and return its header and the first `n_chunks` chunks (all by default).

    A stream cut after chunk `n` decodes when at most `n` chunks are asked for: that is
    how progressive prefixes are read without fetching the rest.
    """
    header = read_header(data)
    available = len(header.chunk_lengths)
    wanted = available if n_chunks is None else n_chunks
    if not 0 < wanted <= available:
        raise BitstreamError(f"asked for {wanted} chunks; the stream has {available}")
    if n_chunks is None and len(data) != header.total_length:
        raise BitstreamError(
            f"stream length {len(data)} does not match its header ({header.total_length} bytes): "
            "truncated or padded")
    chunks, pos = [], header.size
    for i in range(wanted):
        length = header.chunk_lengths[i]
        if pos + length > len(data):
            raise BitstreamError(f"stream truncated inside chunk {i}")
        chunk = bytes(data[pos:pos + length])
        if zlib.crc32(chunk) != header.chunk_crcs[i]:
            raise BitstreamError(f"checksum mismatch in chunk {i}: the stream is corrupt")
        chunks.append(chunk)
        pos += length
    return header, chunks


def _check_size(height: int, width: int, error: type[Exception]) -> None:
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE and height * width <= MAX_PIXELS):
        raise error(f"image size {height}x{width} is outside the supported range "
                    f"(1..{MAX_SIDE} per side, {MAX_PIXELS} pixels)")


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BitstreamError("stream truncated inside its header")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def take(self, fmt: struct.Struct) -> tuple:
        return fmt.unpack(self.raw(fmt.size))
