"""The format's fixed function tables, as integers: the only transcendental numbers a decoder uses.

Exact decoding on every machine needs every number that chooses a coding table to be
computed identically everywhere. +, -, *, / and sqrt are correctly rounded on every
IEEE-754 machine; exp, log, sin and erf come from math libraries that differ in the last
bit. So the few functions the codecs need are tabulated once, as integers, in
`tables.safetensors` beside this file, and read from there: never recomputed at run time.
`build_tables()` is how that file was made (`python -m model.exact.tables` rewrites it): each
entry is the integer nearest to its function's value, computed at 256 bits (`scalar`), so it
rebuilds to the same integers on any machine; tests/test_exact.py checks the committed file
against it.

    SIGMOID      logistic CDF / sigmoid, x = i / 2^10 for x in [-17, 17], in units of 2^-24
    SOFTPLUS     log(1 + e^x) on the same grid, in units of 2^-16
    EXP          exp(-d), d = i / 2^8 for d in [0, 16), in units of 2^-24
    NORMAL       standard normal quantiles of (i + 1/2) / 2^16, in units of 2^-12 (noise)
    SIN          sin(2 pi i / 128), in units of 2^-14 (Fourier features)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import scalar

PATH = Path(__file__).with_name("tables.safetensors")
SIGMOID_FRAC, SIGMOID_LIMIT, SIGMOID_ONE = 10, 17, 1 << 24
SOFTPLUS_ONE = 1 << 16
EXP_FRAC, EXP_LIMIT, EXP_ONE = 8, 16, 1 << 24
NORMAL_BITS, NORMAL_FRAC = 16, 12
SIN_PERIOD, SIN_FRAC = 128, 14


def build_tables() -> dict[str, np.ndarray]:
    grid = [scalar.real(i) / (1 << SIGMOID_FRAC)
            for i in range(-SIGMOID_LIMIT << SIGMOID_FRAC, (SIGMOID_LIMIT << SIGMOID_FRAC) + 1)]
    sigmoid = [scalar.nearest(SIGMOID_ONE * scalar.sigmoid(x)) for x in grid]
    softplus = [scalar.nearest(SOFTPLUS_ONE * scalar.log(1 + scalar.exp(x))) for x in grid]
    exp = [scalar.nearest(EXP_ONE * scalar.exp(-scalar.real(i) / (1 << EXP_FRAC))) for i in range(EXP_LIMIT << EXP_FRAC)]
    sin = [scalar.nearest(scalar.sin(2 * scalar.pi * i / SIN_PERIOD) * (1 << SIN_FRAC)) for i in range(SIN_PERIOD)]
    normal = [_normal_quantile((i + scalar.real(0.5)) / (1 << NORMAL_BITS)) for i in range(1 << NORMAL_BITS)]
    return {name: np.array(values, dtype=np.int64) for name, values in
            {"SIGMOID": sigmoid, "SOFTPLUS": softplus, "EXP": exp, "NORMAL": normal, "SIN": sin}.items()}


def _normal_quantile(p: scalar.Real) -> int:
    """The integer n nearest to 2^NORMAL_FRAC times the standard normal quantile of p: a float guess,
    then moved until Phi((n - 1/2) / 2^F) <= p < Phi((n + 1/2) / 2^F) holds at 256 bits."""
    n = round(NormalDist().inv_cdf(scalar.to_float(p)) * (1 << NORMAL_FRAC))
    while scalar.normal_cdf((n - scalar.real(0.5)) / (1 << NORMAL_FRAC)) > p:
        n -= 1
    while scalar.normal_cdf((n + scalar.real(0.5)) / (1 << NORMAL_FRAC)) <= p:
        n += 1
    return n


@lru_cache(maxsize=1)
def tables() -> dict[str, np.ndarray]:
    """The committed tables (int64 numpy arrays)."""
    return {k: v.numpy().astype(np.int64) for k, v in load_file(str(PATH)).items()}


@lru_cache(maxsize=8)
def torch_table(name: str, device: str) -> torch.Tensor:
    return torch.from_numpy(tables()[name]).to(device)


if __name__ == "__main__":
    save_file({k: torch.from_numpy(v.astype(np.int32)) for k, v in build_tables().items()}, str(PATH))
    print(f"wrote {PATH}")
