"""Coding distributions as integers: rows of frequencies that constriction uses unchanged,
and the fixed-point sigmoid and exp that build them."""

from __future__ import annotations

import numpy as np

from .tables import SIGMOID_FRAC, SIGMOID_LIMIT, tables

#: constriction's fixed-point precision: frequencies of a row sum to 2^PRECISION
PRECISION = 24


def frequency_rows(weights: np.ndarray) -> np.ndarray:
    """Non-negative integer weights (n, K) -> rows whose entries are integers summing to 2^24 - K.

    constriction's fast categorical quantizer gives symbol i the frequency
    floor(cumsum_{<i+1} * s) - floor(cumsum_{<i} * s) + 1 with s = (2^24 - K) / sum(row):
    with integer rows summing to 2^24 - K, s is exactly 1, so every symbol's frequency is
    exactly our integer + 1 (every symbol stays codable), whatever machine runs it.
    The remainder of the rounding goes to the row's most likely entry (the first, on ties).
    """
    weights = np.asarray(weights, dtype=np.int64)
    n, k = weights.shape
    target = (1 << PRECISION) - k
    total = weights.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("every row needs some positive weight")
    scaled = weights * target // total
    top = weights.argmax(axis=1)
    scaled[np.arange(n), top] += target - scaled.sum(axis=1)
    return scaled.astype(np.float64)


def sigmoid_fixed(x: np.ndarray, frac_bits: int) -> np.ndarray:
    """sigmoid(x / 2^frac_bits) in units of 2^-24, for integer x: table + exact linear interpolation."""
    shift = frac_bits - SIGMOID_FRAC
    if shift < 0:
        raise ValueError("arguments need at least the table's resolution")
    table = tables()["SIGMOID"]
    limit = SIGMOID_LIMIT << frac_bits
    x = np.clip(np.asarray(x, dtype=np.int64), -limit, limit)
    position = x + limit  # >= 0
    index = position >> shift
    frac = position - (index << shift)
    lo = table[index]
    hi = table[np.minimum(index + 1, table.size - 1)]
    return lo + (((hi - lo) * frac) >> shift)


def exp_fixed(d: np.ndarray) -> np.ndarray:
    """exp(-d / 2^8) in units of 2^-24 for integer d >= 0 (0 beyond the table)."""
    table = tables()["EXP"]
    d = np.asarray(d, dtype=np.int64)
    return np.where(d < table.size, table[np.clip(d, 0, table.size - 1)], 0)


