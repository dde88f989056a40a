"""Shared randomness from an integer hash, never a platform's RNG: dither and noise.

The same numbers on every machine and for every batching: pure integer arithmetic on
(seed, stream, index), then integer table look-ups.
"""

from __future__ import annotations

import numpy as np

from .tables import NORMAL_BITS, NORMAL_FRAC, tables

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def random_bits(seed: int, stream: int, count: int) -> np.ndarray:
    """`count` uint32 from a counter-based hash (splitmix64's finalizer) of (seed, stream, index).

    Pure integer arithmetic: the same numbers on every machine and for every batching.
    """
    with np.errstate(over="ignore"):
        key = np.uint64(seed & 0xFFFFFFFF) * _GOLDEN + np.uint64(stream & 0xFFFFFFFFFFFF) * _MIX2
        x = key + np.arange(count, dtype=np.uint64) * _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(32)).astype(np.uint32)


def normal_noise(seed: int, stream: int, count: int) -> np.ndarray:
    """Standard normal samples on a 2^-12 grid, as integers (value = n / 4096), from a quantile table."""
    return tables()["NORMAL"][random_bits(seed, stream, count) >> np.uint32(32 - NORMAL_BITS)]


NOISE_SCALE = 1.0 / (1 << NORMAL_FRAC)


def dither(seed: int, stream: int, count: int, bits: int = 8) -> np.ndarray:
    """Dither u ~ U(-1/2, 1/2) on a grid of 2^-bits, as odd integers in units of 2^-(bits+1)."""
    j = (random_bits(seed, stream, count) >> np.uint32(32 - bits)).astype(np.int64)
    return 2 * j + 1 - (1 << bits)


