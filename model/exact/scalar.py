"""Numbers made once, at import or export, defined exactly: arbitrary precision, rounded once.

Why: what a weights file stores decides coded numbers, so it must come out the same on
every machine that makes it. Float64 arithmetic does not guarantee that: a matmul sums in
the order its kernel picks, and exp, sin and cos come from math libraries (or vectorized
kernels) that differ in the last bit. Measured on uqdm-tiny's import: 5 to 11 of the 128
values of each per-step bias differed between AVX-512 and scalar kernels, and the import
gave three digests on one AMD machine.

So such numbers are computed here with mpmath at `PRECISION` bits, whose arithmetic is
integer arithmetic underneath, in the fixed order the code spells out, and rounded to the
nearest float64 once, at the end. Inputs (float32 or float64 checkpoint values) convert
exactly. Each stored float64 is the float nearest to the formula's value computed to 256
bits: a tie within 2^-200 of a rounding boundary would be needed for any two machines (or
mpmath releases whose last bits differ) to disagree.

    from model.exact import scalar
    x = scalar.real(0.1)                        # exact value of the float
    y = scalar.to_float(scalar.exp(x) * 3)      # one rounding, at the end
    v = scalar.matvec(weight, [x, y, ...])      # at 256 bits, summed in index order
"""

from __future__ import annotations

from collections.abc import Sequence

import mpmath
import torch

PRECISION = 256

_CONTEXT = mpmath.MPContext()
_CONTEXT.prec = PRECISION

Real = mpmath.mpf  # what the functions below return (values of _CONTEXT)

exp, expm1, sqrt, sin, cos, log = _CONTEXT.exp, _CONTEXT.expm1, _CONTEXT.sqrt, _CONTEXT.sin, _CONTEXT.cos, _CONTEXT.log
pi = _CONTEXT.pi


def real(value: float | int | str) -> Real:
    """The exact value of a float or integer (a decimal string is rounded to PRECISION bits)."""
    return _CONTEXT.mpf(value)


def to_float(value: Real) -> float:
    """The float64 nearest to `value` (round half to even)."""
    return float(_CONTEXT.mpf(value))


def nearest(value: Real) -> int:
    """The integer nearest to `value` (half to even)."""
    return int(_CONTEXT.nint(value))


def normal_cdf(x: Real) -> Real:
    return _CONTEXT.ncdf(x)


def sigmoid(x: Real) -> Real:
    return 1 / (1 + exp(-x))


def silu(x: Real) -> Real:
    return x * sigmoid(x)


def values(tensor: torch.Tensor) -> list[Real]:
    """A 1-d float tensor's entries as exact reals."""
    return [real(v) for v in tensor.detach().double().reshape(-1).tolist()]


def matvec(matrix: torch.Tensor, vector: Sequence[Real], bias: torch.Tensor | None = None) -> list[Real]:
    """matrix @ vector (+ bias) for a float (rows, cols) matrix, at PRECISION bits, summed in index order."""
    rows = matrix.detach().double().tolist()
    if any(len(row) != len(vector) for row in rows):
        raise ValueError(f"matrix of {len(rows[0])} columns times a vector of {len(vector)}")
    offsets = values(bias) if bias is not None else [real(0)] * len(rows)
    out = []
    for row, offset in zip(rows, offsets):
        total = offset
        for a, b in zip(row, vector):
            total += real(a) * b
        out.append(total)
    return out


def tensor(reals: Sequence[Real] | Sequence[Sequence[Real]]) -> torch.Tensor:
    """A float64 tensor of the nearest floats (one rounding per entry)."""
    nested = [[to_float(v) for v in row] for row in reals] if reals and isinstance(reals[0], (list, tuple)) \
        else [to_float(v) for v in reals]
    return torch.tensor(nested, dtype=torch.float64)
