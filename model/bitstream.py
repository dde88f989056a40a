"""The self-describing container every codec writes (format 2).

Layout (fixed-size integers big-endian; varints are LEB128):

    magic        4  b"DFZC"
    version      1  FORMAT_VERSION
    codec        1  codec family code (FAMILY_CODES)
    digest       8  the weights' digest (first 8 bytes of model.registry.weights_digest)
    height       varint
    width        varint
    params_len   varint, then codec-specific parameters (opaque bytes)
    n_chunks     1  then n_chunks x (length varint, crc32 u32)
    header_crc   4  CRC32 of every header byte before it
    chunks          the chunk payloads, back to back

Format 2 (this one) is the first whose streams decode identically on every machine
(integer coding tables); format 1 streams (float numerics) are refused with a message
that says what reads them. The header is compact for small images (55 bytes for a
64x64 UQDM stream, 89 in format 1): 8 bytes of digest still tell any two sets of
weights apart. Chunks carry their own CRC so a prefix of chunks (progressive decoding)
can be checked without the bytes that follow it. Every length is bounded before anything
is allocated, so a hostile header cannot make the reader allocate or loop.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

MAGIC = b"DFZC"
FORMAT_VERSION = 2
DIGEST_BYTES = 8
MAX_SIDE = 1 << 16
MAX_PIXELS = 1 << 28  # 268 megapixels: far beyond any photo, small enough to bound memory
MAX_CHUNKS = 64
MAX_PARAMS = 1 << 12
FAMILY_CODES = {"uqdm": 1, "cdc": 2}
_NAMES = {code: name for name, code in FAMILY_CODES.items()}
_FIXED = struct.Struct(">4sBB")
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_OLD_FORMATS = {
    1: "format 1 was written by diffpress 0.1 with float numerics, which decode only on the kind of machine "
       "that encoded them; decode it with diffpress 0.1.0 there, then re-encode it with this version",
}


class BitstreamError(ValueError):
    """The bytes are not a stream this codec can decode (corrupt, truncated, foreign, newer, older)."""


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
    if codec not in FAMILY_CODES:
        raise ValueError(f"unknown codec family {codec!r}; known: {sorted(FAMILY_CODES)}")
    if len(weights_digest) < DIGEST_BYTES:
        raise ValueError(f"weights digest must have at least {DIGEST_BYTES} bytes")
    _check_size(height, width, ValueError)
    if not 0 < len(chunks) <= MAX_CHUNKS:
        raise ValueError(f"a stream holds 1..{MAX_CHUNKS} chunks, got {len(chunks)}")
    if len(params) > MAX_PARAMS:
        raise ValueError(f"codec parameters must be at most {MAX_PARAMS} bytes")
    head = bytearray(_FIXED.pack(MAGIC, FORMAT_VERSION, FAMILY_CODES[codec]))
    head += weights_digest[:DIGEST_BYTES] + varint(height) + varint(width)
    head += varint(len(params)) + params + _U8.pack(len(chunks))
    for chunk in chunks:
        head += varint(len(chunk)) + _U32.pack(zlib.crc32(chunk))
    head += _U32.pack(zlib.crc32(head))
    return bytes(head) + b"".join(chunks)


def read_header(data: bytes) -> Header:
    """Parse and verify the header only; raises BitstreamError on anything off."""
    reader = _Reader(data)
    magic, version, code = reader.take(_FIXED)
    if magic != MAGIC:
        raise BitstreamError("not a diffpress bitstream (bad magic bytes)")
    if version > FORMAT_VERSION:
        raise BitstreamError(f"stream format {version} is newer than this reader (format {FORMAT_VERSION}); "
                             "upgrade diffpress to decode it")
    if version in _OLD_FORMATS:
        raise BitstreamError(f"this stream uses an older format: {_OLD_FORMATS[version]}")
    if version != FORMAT_VERSION or code not in _NAMES:
        raise BitstreamError(f"corrupt header (format {version}, codec code {code})")
    digest = reader.raw(DIGEST_BYTES)
    height, width = reader.varint(), reader.varint()
    _check_size(height, width, BitstreamError)
    params_len = reader.varint()
    if params_len > MAX_PARAMS:
        raise BitstreamError(f"corrupt header ({params_len} parameter bytes)")
    params = reader.raw(params_len)
    (n_chunks,) = reader.take(_U8)
    if not 0 < n_chunks <= MAX_CHUNKS:
        raise BitstreamError(f"corrupt header ({n_chunks} chunks)")
    chunk_table = [(reader.varint(), reader.take(_U32)[0]) for _ in range(n_chunks)]
    end = reader.pos
    (crc,) = reader.take(_U32)
    if crc != zlib.crc32(data[:end]):
        raise BitstreamError("header checksum mismatch: the stream is corrupt")
    return Header(_NAMES[code], digest, height, width, params,
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


def varint(n: int) -> bytes:
    """LEB128: 7 bits a byte, low bits first."""
    out = bytearray()
    while n >= 0x80:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); at most 5 bytes (values below 2^35), else BitstreamError."""
    value = 0
    for shift in range(0, 35, 7):
        if pos >= len(data):
            raise BitstreamError("data ends inside a length")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise BitstreamError("corrupt length")


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

    def varint(self) -> int:
        try:
            value, self.pos = read_varint(self.data, self.pos)
        except BitstreamError as exc:
            raise BitstreamError(f"stream truncated or corrupt inside its header ({exc})") from exc
        return value
