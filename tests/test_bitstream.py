"""The container, format 2: byte layout, prefixes, damage, older and newer formats, hostile sizes."""

from __future__ import annotations

import struct
import zlib

import pytest

from model import bitstream
from model.bitstream import DIGEST_BYTES, FAMILY_CODES, BitstreamError

DIGEST = bytes(range(16))


def make(chunks=(b"abc", b"", b"defgh"), params=b"\x01\x02", height=7, width=9, codec="uqdm"):
    return bitstream.pack(codec, DIGEST, height, width, list(chunks), params)


def test_format_2_layout_byte_by_byte():
    chunks = [b"abc", b"", bytes(200)]
    data = bitstream.pack("cdc", DIGEST, 300, 9, chunks, b"\x05")
    expected = b"DFZC" + bytes([2, FAMILY_CODES["cdc"]]) + DIGEST[:DIGEST_BYTES]
    expected += bytes([0xAC, 0x02]) + bytes([9])          # varints: 300 = 0b10_0101100, 9
    expected += bytes([1]) + b"\x05" + bytes([3])          # params length, params, number of chunks
    for chunk in chunks:
        expected += bitstream.varint(len(chunk)) + struct.pack(">I", zlib.crc32(chunk))
    assert bitstream.varint(200) == bytes([0xC8, 0x01])
    expected += struct.pack(">I", zlib.crc32(expected))
    assert data == expected + b"".join(chunks)
    header = bitstream.read_header(data)
    assert header.size == len(expected) == 4 + 1 + 1 + 8 + 2 + 1 + 2 + 1 + (1 + 4) * 2 + (2 + 4) + 4
    assert (header.codec, header.weights_digest, header.height, header.width) == ("cdc", DIGEST[:8], 300, 9)
    assert header.chunk_lengths == (3, 0, 200) and header.params == b"\x05"
    assert header.chunk_crcs == tuple(zlib.crc32(c) for c in chunks)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, (1 << 35) - 1])
def test_varints_round_trip(value):
    encoded = bitstream.varint(value)
    assert len(encoded) == max(1, -(-value.bit_length() // 7))
    assert bitstream.read_varint(encoded + b"tail", 0) == (value, len(encoded))


def test_overlong_or_unfinished_varints_are_refused():
    with pytest.raises(BitstreamError, match="corrupt length"):
        bitstream.read_varint(b"\x80" * 5 + b"\x01", 0)
    with pytest.raises(BitstreamError, match="ends inside"):
        bitstream.read_varint(b"\x80\x80", 0)


def test_roundtrip_and_prefixes():
    data = make()
    header, chunks = bitstream.unpack(data)
    assert (header.codec, header.weights_digest, header.height, header.width) == ("uqdm", DIGEST[:8], 7, 9)
    assert header.params == b"\x01\x02" and chunks == [b"abc", b"", b"defgh"]
    assert header.total_length == len(data)
    # A stream cut after chunk 1 (or 2: chunk 2 is empty) yields those chunks when only they are asked for.
    cut = data[:header.size + 3]
    assert bitstream.unpack(cut, n_chunks=1)[1] == [b"abc"]
    assert bitstream.unpack(cut, n_chunks=2)[1] == [b"abc", b""]
    with pytest.raises(BitstreamError, match="truncated inside chunk 2"):
        bitstream.unpack(cut, n_chunks=3)
    with pytest.raises(BitstreamError, match="truncated or padded"):
        bitstream.unpack(cut)
    with pytest.raises(BitstreamError, match="truncated or padded"):
        bitstream.unpack(data + b"\0")
    for wanted in (0, 4):
        with pytest.raises(BitstreamError, match="asked for"):
            bitstream.unpack(data, n_chunks=wanted)


def test_every_truncation_and_bitflip_raises():
    data = make()
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            bitstream.unpack(data[:n])
    for i in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(BitstreamError):
                bitstream.unpack(bytes(bad))


def test_a_damaged_chunk_is_named_even_when_its_prefix_is_read_alone():
    data = bytearray(make())
    header = bitstream.read_header(bytes(data))
    data[header.size + 1] ^= 0x01  # inside chunk 0
    with pytest.raises(BitstreamError, match="checksum mismatch in chunk 0"):
        bitstream.unpack(bytes(data), n_chunks=1)


def format_1_stream() -> bytes:
    """A stream as diffpress 0.1 wrote it: magic, version 1, the codec's name, a 16-byte digest,
    u32 height and width, u16 params length + params, u8 chunk count, (u32 length, u32 crc) per
    chunk, u32 header CRC, then the chunks."""
    name, chunk = b"uqdm", b"payload"
    head = struct.pack(">4sBB", b"DFZC", 1, len(name)) + name + DIGEST
    head += struct.pack(">II", 64, 64) + struct.pack(">H", 0) + struct.pack(">B", 1)
    head += struct.pack(">II", len(chunk), zlib.crc32(chunk))
    return head + struct.pack(">I", zlib.crc32(head)) + chunk


def test_a_format_1_stream_is_refused_saying_what_reads_it():
    data = format_1_stream()
    for reader in (bitstream.read_header, bitstream.unpack):
        with pytest.raises(BitstreamError, match=r"older format: format 1 .*decode it with diffpress 0\.1\.0"):
            reader(data)


def test_newer_format_and_foreign_data_are_refused():
    data = bytearray(make())
    data[4] = bitstream.FORMAT_VERSION + 1
    with pytest.raises(BitstreamError, match=f"format {bitstream.FORMAT_VERSION + 1} is newer.*upgrade"):
        bitstream.unpack(bytes(data))
    with pytest.raises(BitstreamError, match="magic"):
        bitstream.unpack(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    unknown_family = bytearray(make())
    unknown_family[5] = 99
    with pytest.raises(BitstreamError, match="codec code 99"):
        bitstream.read_header(bytes(unknown_family))


def hostile_header(height: int, width: int, n_chunks: int = 1, chunk_length: int = 0xFFFFFFF) -> bytes:
    """A header with a valid CRC that claims whatever it likes."""
    head = struct.pack(">4sBB", b"DFZC", 2, FAMILY_CODES["uqdm"]) + DIGEST[:8]
    head += bitstream.varint(height) + bitstream.varint(width) + bitstream.varint(0) + bytes([n_chunks])
    head += (bitstream.varint(chunk_length) + struct.pack(">I", 0)) * n_chunks
    return head + struct.pack(">I", zlib.crc32(head))


@pytest.mark.parametrize("height,width", [(1 << 16 | 1, 1), (1, 1 << 17), (1 << 16, 1 << 16), (0, 5)])
def test_hostile_sizes_are_refused_before_anything_is_allocated(height, width):
    with pytest.raises(BitstreamError, match="outside the supported range"):
        bitstream.unpack(hostile_header(height, width))


def test_hostile_chunk_counts_and_lengths_are_refused():
    with pytest.raises(BitstreamError, match="0 chunks"):
        bitstream.read_header(hostile_header(8, 8, n_chunks=0))
    with pytest.raises(BitstreamError, match="65 chunks"):
        bitstream.read_header(hostile_header(8, 8, n_chunks=65))
    # A huge chunk length over no data: refused as truncated, without reading or allocating it.
    with pytest.raises(BitstreamError, match="truncated"):
        bitstream.unpack(hostile_header(8, 8))
    assert bitstream.read_header(hostile_header(8, 8)).chunk_lengths == (0xFFFFFFF,)


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="outside the supported range"):
        bitstream.pack("uqdm", DIGEST, 0, 5, [b"x"])
    with pytest.raises(ValueError, match="digest"):
        bitstream.pack("uqdm", b"short", 5, 5, [b"x"])
    with pytest.raises(ValueError, match="chunks"):
        bitstream.pack("uqdm", DIGEST, 5, 5, [])
    with pytest.raises(ValueError, match="chunks"):
        bitstream.pack("uqdm", DIGEST, 5, 5, [b""] * 65)
    with pytest.raises(ValueError, match="unknown codec family"):
        bitstream.pack("jpeg", DIGEST, 5, 5, [b"x"])
    with pytest.raises(ValueError, match="parameters"):
        bitstream.pack("uqdm", DIGEST, 5, 5, [b"x"], params=bytes(bitstream.MAX_PARAMS + 1))
