"""Exact arithmetic for everything that decides a coding table: same numbers on every machine.

Why: the entropy coder's tables come from network outputs, so encoder and decoder must
compute them identically, on any CPU or GPU, any thread count and batch size, years
apart. Floating-point networks do not: kernels sum in different orders and math
libraries round exp/log differently (measured here: streams written with the default
kernels failed to decode under AVX2 or scalar kernels). The scheme, after Ballé, Johnston
& Minnen, "Integer networks for data compression with latent-variable models" (2019):

- Integer-valued tensors in float64. Weights are integers (|w| < 2^15) with a float scale
  per output channel; activations are integers (|x| < 2^15, or 2^19 where stated) with
  a power-of-two scale 2^-e per tensor. Every product and every partial sum of a
  convolution or matmul is then an integer below 2^53, which float64 represents exactly:
  any summation order, kernel, thread count, batch size or device gives the same bits.
  Convolutions are an explicit im2col matmul (Winograd and FFT algorithms are inexact
  even on integers; float64 has no TF32/bf16 shortcut).
- Between integer stages only correctly rounded IEEE operations (+, -, *, /, sqrt) on
  tensors, in a fixed order, then round-half-even: identical on every IEEE-754 machine.
  Never a division by a Python number (CUDA turns it into a multiplication by the
  reciprocal): constants are multiplied, or divided as tensors.
- Transcendental functions come from integer tables (`tables.py`).
- Coding distributions are integer frequencies summing to 2^24, handed to constriction
  so that its quantization is the identity (see `frequency_rows`).
- Shared randomness (dither, noise) from an integer hash, not a platform's RNG.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .tables import (EXP_FRAC, NORMAL_BITS, NORMAL_FRAC, SIGMOID_FRAC, SIGMOID_LIMIT, SIGMOID_ONE, tables,
                     torch_table)

#: constriction's fixed-point precision: frequencies of a row sum to 2^PRECISION
PRECISION = 24
INT16 = (1 << 15) - 1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


# ------------------------------------------------------------------ randomness
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


# ------------------------------------------------------------------ coding distributions
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


# ------------------------------------------------------------------ integer layers (torch)
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           padding: int = 0) -> torch.Tensor:
    """Integer convolution in float64; exact while partial sums stay below 2^53.

    `weight` (C_out, C_in, k, k) integer-valued float64; `bias` (C_out,) or (B, C_out) in
    accumulator units. Returns the accumulator (B, C_out, H', W').

    An explicit im2col + matmul: every algorithm that sums the exact integer products gives
    the exact integer, but Winograd and FFT convolutions do not (cuDNN may pick them). On a
    CPU, PyTorch's float64 convolution is this same im2col + GEMM (oneDNN, NNPACK and
    XNNPACK take no float64), twice as fast as spelling it out (measured), so it is used there.
    """
    if x.device.type == "cpu":
        acc = F.conv2d(x, weight, stride=stride, padding=padding)
        if bias is not None:
            acc = acc + (bias[:, :, None, None] if bias.dim() == 2 else bias[None, :, None, None])
        return acc
    b, _, h, w = x.shape
    c_out, _, k, _ = weight.shape
    h_out, w_out = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    columns = F.unfold(x, k, padding=padding, stride=stride)            # (B, C_in*k*k, L)
    acc = torch.matmul(weight.reshape(c_out, -1), columns)              # (B, C_out, L)
    if bias is not None:
        acc = acc + (bias[:, :, None] if bias.dim() == 2 else bias[None, :, None])
    return acc.reshape(b, c_out, h_out, w_out)


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                     padding: int, output_padding: int) -> torch.Tensor:
    """Integer transposed convolution (weight as nn.ConvTranspose2d: C_in, C_out, k, k).

    Zero insertion, then an ordinary convolution with the flipped kernel: exact as `conv2d`.
    """
    b, c, h, w = x.shape
    k = weight.shape[-1]
    dilated = x.new_zeros(b, c, (h - 1) * stride + 1, (w - 1) * stride + 1)
    dilated[:, :, ::stride, ::stride] = x
    pad = k - 1 - padding
    dilated = F.pad(dilated, (pad, pad + output_padding, pad, pad + output_padding))
    flipped = weight.flip(-1, -2).transpose(0, 1)
    return conv2d(dilated, flipped.contiguous(), bias)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor | float, bound: int = INT16) -> torch.Tensor:
    """round(acc * multiplier) clamped to [-bound, bound]: one IEEE product, then round-half-even."""
    if isinstance(multiplier, torch.Tensor) and multiplier.dim() == 1:
        multiplier = multiplier[None, :, None, None]
    return torch.round(acc * multiplier).clamp_(-bound, bound)


def sigmoid_lookup(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """sigmoid of x * 2^-exponent (x integer-valued), nearest table entry, in units of 2^-24."""
    table = torch_table("SIGMOID", str(x.device))
    limit = SIGMOID_LIMIT << SIGMOID_FRAC
    index = torch.round(x * float(2.0 ** (SIGMOID_FRAC - exponent))).clamp_(-limit, limit).long() + limit
    return table[index].to(x.dtype)


def silu(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """SiLU on int16 activations x * 2^-exponent, same exponent out: round(x * sigmoid(x)).

    One lookup in a 2^16-entry table made (exactly, from the sigmoid table) per exponent.
    """
    table = _silu_table(exponent, str(x.device))
    return torch.index_select(table, 0, (x + INT16).long().view(-1)).view(x.shape)


@lru_cache(maxsize=64)
def _silu_table(exponent: int, device: str) -> torch.Tensor:
    x = torch.arange(-INT16, INT16 + 1, dtype=torch.float64, device=device)
    return torch.round(x * sigmoid_lookup(x, exponent) * (1.0 / SIGMOID_ONE))


def softplus_lookup(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """softplus of x * 2^-exponent in units of 2^-16 (nearest table entry; linear beyond the table)."""
    table = torch_table("SOFTPLUS", str(x.device)).to(x.dtype)
    limit = SIGMOID_LIMIT << SIGMOID_FRAC
    index = torch.round(x * float(2.0 ** (SIGMOID_FRAC - exponent)))
    inside = table[index.clamp(-limit, limit).long() + limit]
    beyond = torch.round(x * float(2.0 ** (16 - exponent)))
    return torch.where(index > limit, beyond, torch.where(index < -limit, torch.zeros_like(x), inside))


def group_norm(x: torch.Tensor, groups: int, gamma: torch.Tensor, beta: torch.Tensor, eps_scaled: torch.Tensor,
               out_exponent: int) -> torch.Tensor:
    """Exact GroupNorm of integer activations, output as integers at scale 2^-out_exponent.

    `eps_scaled` is eps divided by each group's squared input scale (per group), so
    channels of different scales may share a tensor as long as each group has one scale.
    Sums are exact in float64 (|x| < 2^15, < 2^14 elements a group); the variance's
    numerator n*sum(x^2) - sum(x)^2 needs up to 2^58, so it is formed in int64.
    """
    b, c, h, w = x.shape
    n = (c // groups) * h * w
    grouped = x.reshape(b, groups, -1)
    s1 = grouped.sum(-1, keepdim=True)
    s2 = (grouped * grouped).sum(-1, keepdim=True)
    variance_num = n * s2.long() - s1.long() * s1.long()          # n^2 * variance, exact
    denominator = torch.sqrt(variance_num.to(x.dtype) + eps_scaled.reshape(1, groups, 1) * float(n * n))
    centred = grouped * float(n) - s1                              # n * (x - mean), exact
    scale = float(2 ** out_exponent)
    g = (gamma * scale).reshape(1, groups, -1, 1)
    bt = (beta * scale).reshape(1, groups, -1, 1)
    y = centred.reshape(b, groups, c // groups, h * w) * g / denominator[:, :, :, None] + bt
    return torch.round(y).reshape(b, c, h, w).clamp_(-INT16, INT16)


def quantize_weight(weight: torch.Tensor, bits: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization: (integer weights, scale per output channel)."""
    w = weight.detach().double()
    flat = w.reshape(w.shape[0], -1)
    largest = flat.abs().amax(dim=1).clamp_min(1e-30)
    scale = largest / ((1 << (bits - 1)) - 1)
    q = torch.round(flat / scale[:, None]).reshape(w.shape)
    return q, scale
