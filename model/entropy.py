"""Entropy coding of integer symbols under exact integer frequency tables (rANS, constriction).

Every distribution handed to the coder is a row of integer frequencies that sums to
2^24 (constriction's precision), built by `model.exact.frequency_rows`: so the coder's
tables are the same on every machine, and a stream decodes wherever it was written.
(constriction's categorical quantizer gives entry i the frequency w_i + 1 when the row's
integers w sum to 2^24 - K: its float arithmetic then only ever sees exact integers.)

Why constriction and not compressai's rANS: compressai's decoder reads past its input
on hostile data (a segfault, measured here on random bytes), while constriction is
memory-safe Rust that reports errors, and takes one row per symbol.

Two ways to code:
- `encode_offsets` / `decode_offsets`: one row per symbol (UQDM: every symbol has its own
  distribution). Offsets lie in a window [-W, W] around a centre both sides know; W is
  the segment's largest offset, written in front of it: no escape codes.
- `encode_grouped` / `decode_grouped`: symbols sharing a table are coded together (CDC:
  one table per channel of z, per scale level of y); `encode_parts` / `PartsDecoder` code
  several such parts in one string, read back in order (CDC's context passes).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import constriction
import numpy as np

from .bitstream import BitstreamError, read_varint, varint
from .exact import PRECISION

#: integer frequency rows of offsets -W..W for each symbol: f(W) -> (n_symbols, 2W+1) float64
FrequencyRows = Callable[[int], np.ndarray]

MAX_WINDOW = 2048
_WINDOW = struct.Struct("<H")
_LAZY = constriction.stream.model.Categorical(perfect=False)


def encode_offsets(offsets: np.ndarray, rows: FrequencyRows) -> bytes:
    """Encode integer offsets; `rows(W)` gives each symbol's frequencies over [-W, W]."""
    offsets = np.asarray(offsets, dtype=np.int64).ravel()
    window = max(1, int(np.abs(offsets).max())) if offsets.size else 1  # at least two symbols a row
    if window > MAX_WINDOW:
        raise ValueError(f"symbol offset {window} exceeds the coder's window {MAX_WINDOW}")
    coder = constriction.stream.stack.AnsCoder()
    if offsets.size:
        coder.encode_reverse((offsets + window).astype(np.int32), _LAZY, _checked(rows(window), offsets.size, window))
    return _WINDOW.pack(window) + coder.get_compressed().astype("<u4").tobytes()


def decode_offsets(data: bytes, count: int, rows: FrequencyRows) -> np.ndarray:
    """Inverse of `encode_offsets`; raises BitstreamError when the data cannot be a segment."""
    if len(data) < _WINDOW.size or (len(data) - _WINDOW.size) % 4:
        raise BitstreamError("corrupt entropy-coded segment (bad length)")
    (window,) = _WINDOW.unpack_from(data)
    if not 1 <= window <= MAX_WINDOW:
        raise BitstreamError(f"corrupt entropy-coded segment (window {window})")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    coder = _coder(data[_WINDOW.size:])
    try:
        symbols = coder.decode(_LAZY, _checked(rows(window), count, window))
    except Exception as exc:  # constriction reports invalid data as plain exceptions
        raise BitstreamError(f"corrupt entropy-coded segment: {exc}") from exc
    _require_empty(coder)
    return symbols.astype(np.int64) - window


def encode_grouped(symbols: np.ndarray, groups: np.ndarray, tables: Sequence[np.ndarray]) -> bytes:
    """Encode symbols (already within each table's support) with table `groups[i]` each.

    `tables[g]` is an integer frequency row over [-W_g, W_g]. Groups are coded in order
    of their number, each group's symbols in their order.
    """
    return encode_parts([(symbols, groups)], tables)


def encode_parts(parts: Sequence[tuple[np.ndarray, np.ndarray]], tables: Sequence[np.ndarray]) -> bytes:
    """Several (symbols, groups) parts in one coded string, for a decoder that learns the groups
    of a part only after decoding the parts before it (CDC's context passes); `PartsDecoder`
    reads them back in order. One part is exactly `encode_grouped`."""
    coder = constriction.stream.stack.AnsCoder()
    for symbols, groups in reversed(parts):  # a stack: encode the last part's last group first
        symbols, groups = np.asarray(symbols, dtype=np.int64).ravel(), np.asarray(groups).ravel()
        for g in sorted(set(groups.tolist()), reverse=True):
            table = tables[g]
            coder.encode_reverse((symbols[groups == g] + table.size // 2).astype(np.int32), _fixed(table))
    return coder.get_compressed().astype("<u4").tobytes()


class PartsDecoder:
    """Reads what `encode_parts` wrote, one part at a time; `finish` checks nothing is left over."""

    def __init__(self, data: bytes):
        if len(data) % 4:
            raise BitstreamError("corrupt entropy-coded chunk (bad length)")
        self._coder = _coder(data)

    def decode(self, groups: np.ndarray, tables: Sequence[np.ndarray]) -> np.ndarray:
        groups = np.asarray(groups).ravel()
        symbols = np.zeros(groups.size, dtype=np.int64)
        for g in sorted(set(groups.tolist())):
            where = np.flatnonzero(groups == g)
            table = tables[g]
            try:
                symbols[where] = self._coder.decode(_fixed(table), where.size).astype(np.int64) - table.size // 2
            except Exception as exc:  # constriction reports invalid data as plain exceptions
                raise BitstreamError(f"corrupt entropy-coded chunk: {exc}") from exc
        return symbols

    def finish(self) -> None:
        _require_empty(self._coder)


def decode_grouped(data: bytes, groups: np.ndarray, tables: Sequence[np.ndarray]) -> np.ndarray:
    """Inverse of `encode_grouped`, given the same groups and tables."""
    decoder = PartsDecoder(data)
    symbols = decoder.decode(groups, tables)
    decoder.finish()
    return symbols


def join_segments(segments: list[bytes]) -> bytes:
    """Frame segments with LEB128 lengths (2 bytes for typical segments, not 4)."""
    return b"".join(varint(len(s)) + s for s in segments)


def split_segments(chunk: bytes, count: int) -> list[bytes]:
    """Split a chunk written by `join_segments` into exactly `count` segments."""
    segments, pos = [], 0
    for _ in range(count):
        if pos >= len(chunk):
            raise BitstreamError(f"chunk holds fewer than the {count} segments its image needs")
        length, pos = read_varint(chunk, pos)
        if pos + length > len(chunk):
            raise BitstreamError("segment runs past the end of its chunk")
        segments.append(chunk[pos:pos + length])
        pos += length
    if pos != len(chunk):
        raise BitstreamError(f"chunk holds more than the {count} segments its image needs")
    return segments


def ideal_bits(rows: np.ndarray, offsets: np.ndarray, window: int) -> float:
    """Bits the coder spends on `offsets` under `rows`, up to its few bytes of overhead."""
    frequencies = rows[np.arange(offsets.size), offsets + window] + 1.0
    return float(PRECISION * offsets.size - np.log2(frequencies).sum())


def _coder(data: bytes) -> constriction.stream.stack.AnsCoder:
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    try:
        return constriction.stream.stack.AnsCoder(words)
    except Exception as exc:
        raise BitstreamError(f"corrupt entropy-coded data: {exc}") from exc


def _require_empty(coder) -> None:
    if not coder.is_empty():
        raise BitstreamError("corrupt entropy-coded data (unused data after the last symbol)")


def _fixed(table: np.ndarray):
    return constriction.stream.model.Categorical(np.asarray(table, dtype=np.float64), perfect=False)


def _checked(rows: np.ndarray, count: int, window: int) -> np.ndarray:
    """The rows as the coder needs them: (count, 2W+1) integers summing to 2^24 - (2W+1)."""
    rows = np.asarray(rows, dtype=np.float64)
    width = 2 * window + 1
    if rows.shape != (count, width):
        raise ValueError(f"frequency rows have shape {rows.shape}, expected {(count, width)}")
    if (rows.sum(axis=1) != (1 << PRECISION) - width).any():
        raise ValueError("frequency rows must sum to 2^24 minus their length (model.exact.frequency_rows)")
    return rows
