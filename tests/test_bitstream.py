import struct
import zlib

import pytest

from model import bitstream
from model.bitstream import BitstreamError

DIGEST = bytes(range(16))


def make(chunks=(b"abc", b"", b"defgh"), params=b"\x01\x02"):
    return bitstream.pack("uqdm", DIGEST, 7, 9, list(chunks), params)


def test_roundtrip_and_prefixes():
    data = make()
    header, chunks = bitstream.unpack(data)
    assert (header.codec, header.weights_digest, header.height, header.width) == ("uqdm", DIGEST, 7, 9)
    assert header.params == b"\x01\x02" and chunks == [b"abc", b"", b"defgh"]
    assert header.total_length == len(data)
    # A stream cut after chunk 1 still yields chunk 1 when only one is asked for.
    cut = data[:header.size + 3]
    assert bitstream.unpack(cut, n_chunks=1)[1] == [b"abc"]
    with pytest.raises(BitstreamError, match="truncated"):
        bitstream.unpack(cut, n_chunks=3)
    with pytest.raises(BitstreamError, match="truncated or padded"):
        bitstream.unpack(cut)


def test_every_truncation_and_bitflip_raises():
    data = make()
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            bitstream.unpack(data[:n])
    for i in range(len(data)):
        for bit in (0, 7):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(BitstreamError):
                bitstream.unpack(bytes(bad))


def test_newer_version_and_foreign_data():
    data = bytearray(make())
    data[4] = bitstream.FORMAT_VERSION + 1
    with pytest.raises(BitstreamError, match="newer"):
        bitstream.unpack(bytes(data))
    with pytest.raises(BitstreamError, match="magic"):
        bitstream.unpack(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)


def test_hostile_header_claiming_huge_image_is_refused_before_allocation():
    name = b"uqdm"
    head = struct.pack(">4sBB", b"DFZC", 1, len(name)) + name + DIGEST
    head += struct.pack(">II", 1 << 16, 1 << 16) + struct.pack(">H", 0) + struct.pack(">B", 1)
    head += struct.pack(">II", 0xFFFFFFF0, 0)
    head += struct.pack(">I", zlib.crc32(head))
    with pytest.raises(BitstreamError, match="outside the supported range"):
        bitstream.unpack(head)


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError):
        bitstream.pack("uqdm", DIGEST, 0, 5, [b"x"])
    with pytest.raises(ValueError):
        bitstream.pack("uqdm", b"short", 5, 5, [b"x"])
    with pytest.raises(ValueError):
        bitstream.pack("uqdm", DIGEST, 5, 5, [])
