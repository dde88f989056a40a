"""Hostile input: every damaged UQDM stream raises BitstreamError quickly and never crashes.

On the seeded test UQDM (the authors' architecture): the coder's behaviour on garbage does
not depend on which weights made the tables.
"""

from __future__ import annotations

import subprocess
import sys
import time

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
    _, data = stream
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


def test_streams_with_other_chunk_counts_or_parameters_are_refused(uqdm, stream):
    _, data = stream
    header, chunks = bitstream.unpack(data)
    for bad_chunks, params, message in [(chunks[:4], header.params, "has 4 chunks"),
                                        (chunks, header.params[:-1], "parameters"),
                                        (chunks, b"\x00\x20" + header.params[2:], "tiling"),
                                        (chunks, header.params[:2] + b"\x00\x00" + header.params[4:], "tiling")]:
        stream_bytes = bitstream.pack("uqdm", header.weights_digest, header.height, header.width, bad_chunks, params)
        with pytest.raises(BitstreamError, match=message):
            uqdm.decompress(stream_bytes)


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
from model import load_codec, BitstreamError
from tests.test_uqdm_robustness import _repack_with_mutated_payload
codec = load_codec("uqdm-test", device="cpu")
rng = np.random.default_rng(int(sys.argv[1]))
img = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
data = codec.compress(img)
trials, consistent_every = int(sys.argv[2]), int(sys.argv[3])
counts = {"plain": [0, 0], "consistent": [0, 0]}  # kind -> [trials, BitstreamErrors]
same = wrong = 0
slowest = 0.0
for trial in range(trials):
    if trial % consistent_every:  # plain mutations: caught by the CRCs
        kind, bad = "plain", bytearray(data)
        for _ in range(1 + trial % 3):
            bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        bad = bytes(bad[: len(bad) - int(rng.integers(0, 3))])
    else:  # CRC-consistent mutations: must be caught by the decoder
        kind, bad = "consistent", _repack_with_mutated_payload(data, rng)
    counts[kind][0] += 1
    started = time.perf_counter()
    try:
        out = codec.decompress(bad)
    except BitstreamError:
        counts[kind][1] += 1
    else:
        if np.array_equal(out, img):
            same += 1
        else:
            wrong += 1
    slowest = max(slowest, time.perf_counter() - started)
print(*counts["plain"], *counts["consistent"], same, wrong, slowest)
"""


def test_thousands_of_mutated_streams_never_crash_hang_or_decode_wrongly(weights_dir):
    """2000 damaged streams, 16 of them with recomputed CRCs (each of those runs the network up to
    the damaged chunk: about a second a step here, so they are few)."""
    trials, consistent_every = 2000, 125
    result = subprocess.run([sys.executable, "-c", FUZZ_CHILD, "11", str(trials), str(consistent_every)],
                            cwd=REPO, capture_output=True, text=True, timeout=800)
    assert result.returncode == 0, result.stderr[-2000:]  # a segfault would show as -11
    *counts, slowest = result.stdout.split()
    plain, plain_errors, consistent, consistent_errors, same, wrong = map(int, counts)
    assert wrong == 0, "a damaged stream decoded to a wrong image"
    assert (plain, consistent) == (trials - trials // consistent_every, trials // consistent_every)
    assert plain_errors == plain  # every plain mutation is caught by a CRC
    # A CRC-consistent mutation may still decode right (bytes the coder never reads), but rarely.
    assert consistent_errors + same == consistent and consistent_errors >= consistent - 3, (consistent_errors, same)
    assert float(slowest) < 60, slowest  # no decode hangs: a whole lossless decode takes a few seconds
