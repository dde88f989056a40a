"""Hostile input: every damaged UQDM stream raises BitstreamError quickly and never crashes."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from model import BitstreamError, bitstream
from model.paths import REPO


@pytest.fixture(scope="module")
def stream(uqdm):
    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    return img, uqdm.compress(img)


def test_truncations_and_bit_flips_raise(uqdm, stream):
    img, data = stream
    for n in range(0, len(data), 7):
        with pytest.raises(BitstreamError):
            uqdm.decompress(data[:n])
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(BitstreamError):
            uqdm.decompress(bytes(bad))


def test_header_claiming_a_huge_image_is_refused_quickly(uqdm, stream):
    _, data = stream
    header, chunks = bitstream.unpack(data)
    huge = bitstream.pack("uqdm", header.weights_digest, 16384, 16384, chunks, header.params)
    started = time.perf_counter()
    with pytest.raises(BitstreamError, match="segments"):
        uqdm.decompress(huge)
    assert time.perf_counter() - started < 5


def _repack_with_mutated_payload(data: bytes, rng: np.random.Generator) -> bytes:
    """Damage chunk bytes but recompute every CRC, so only the decoder itself can notice."""
    header, chunks = bitstream.unpack(data)
    chunks = [bytearray(c) for c in chunks]
    victim = chunks[int(rng.integers(len(chunks)))]
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(3)
        pos = int(rng.integers(len(victim))) if victim else 0
        if kind == 0 and victim:
            victim[pos] ^= 1 << int(rng.integers(8))
        elif kind == 1 and victim:
            del victim[pos:pos + int(rng.integers(1, 9))]
        else:
            victim[pos:pos] = rng.bytes(int(rng.integers(1, 9)))
    return bitstream.pack("uqdm", header.weights_digest, header.height, header.width,
                          [bytes(c) for c in chunks], header.params)


FUZZ_CHILD = """
import sys, time, numpy as np
from model import load_codec, BitstreamError, bitstream
from tests.test_uqdm_robustness import _repack_with_mutated_payload
codec = load_codec("uqdm-tiny", device="cpu")
rng = np.random.default_rng(int(sys.argv[1]))
img = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
data = codec.compress(img)
raw = wrong = errors = same = 0
for trial in range(int(sys.argv[2])):
    if trial % 10:  # plain mutations: caught by the CRCs
        bad = bytearray(data)
        for _ in range(1 + trial % 3):
            bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        bad = bytes(bad[: len(bad) - int(rng.integers(0, 3))])
        raw += 1
    else:  # CRC-consistent mutations: must be caught by the decoder
        bad = _repack_with_mutated_payload(data, rng)
    started = time.perf_counter()
    try:
        out = codec.decompress(bad)
    except BitstreamError:
        errors += 1
    else:
        if np.array_equal(out, img):
            same += 1
        else:
            wrong += 1
    assert time.perf_counter() - started < 10, "a decode took too long"
print(raw, errors, same, wrong)
"""


def test_thousands_of_mutated_streams_never_crash_hang_or_decode_wrongly(weights_dir):
    result = subprocess.run([sys.executable, "-c", FUZZ_CHILD, "11", "2000"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]  # a segfault would show as -11
    raw, errors, same, wrong = map(int, result.stdout.split())
    assert wrong == 0
    assert errors + same == 2000 and errors >= 1900 and raw == 1800
