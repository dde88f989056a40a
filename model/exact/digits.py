"""Exact int16 x int16 products on int8 GEMMs: each operand as two signed base-256 digits.

Why: an integer-valued float64 GEMM runs at ~7 GMAC/s per core here, an int8 GEMM with
int32 accumulation (`torch._int_mm`, VNNI on x86) at 110-170 (measured on an AMD EPYC
Zen 4, shapes of UQDM's 3x3 convolutions: (16384 x 288) @ (288 x 32)). Integers are
exact in any summation order, so the result is the same integer the float64 path gives:
not a new definition, only a faster way to compute the old one.

Only where the int8 GEMM IS exact: oneDNN's kernels for CPUs without VNNI (AVX2, SSE4.1,
AVX-512 without VNNI; measured under ONEDNN_MAX_CPU_ISA) sum u8 x s8 pairs into
saturating int16 and return wrong sums for large digits. So `int8_gemm_is_exact` probes
this process's kernel once with worst-case operands, and everything falls back to float64
(same integers, slower) where the probe fails.

The split: an int16 value u is 256 hi + lo + 128 with hi = u >> 8 and lo = (u & 255) - 128,
both in [-128, 127] (the offset keeps every digit signed int8, 32767 included). A dot
product over K terms of activations x and weights w is then

    sum x w = 256 (256 <wh, xh> + <wl, xh> + 128 sum xh) + (256 <wh, xl> + <wl, xl> + 128 sum xl)
              + 128 sum w

and every inner product comes out of ONE int8 GEMM: [wh; wl; ones] (2N + 1 rows) times
[xh | xl] (x's digits side by side). Each int32 partial sum is below K 2^14 (< 2^31 for
K < 2^17); the recombination in float64 stays below K 2^30 < 2^53.

Not for CDC's hyper-synthesis: its activations reach 2^20, and three digits (six int8
products per product) measured only 1.12x the float64 convolution there (0.168 vs 0.188 s,
(1, 288, 32, 48) x (384, 288, 3, 3), one thread), so it keeps float64.
"""

from __future__ import annotations

from functools import lru_cache

import torch

MAX_TERMS = 1 << 15        # K bound: int32 partial sums < K 2^14 < 2^31 with margin


def fits(*tensors: torch.Tensor) -> bool:
    """True when the digit kernels are exact here: CPU tensors of int16 values, an exact int8 GEMM."""
    return all(t.device.type == "cpu" and t.numel() > 0 and _int16(t) for t in tensors) and int8_gemm_is_exact()


def _int16(t: torch.Tensor) -> bool:
    low, high = torch.aminmax(t)
    return float(low) >= -(1 << 15) and float(high) < (1 << 15)


@lru_cache(maxsize=1)
def int8_gemm_is_exact() -> bool:
    """Whether `torch._int_mm` here returns the exact int32 sums, on operands that make
    saturating kernels fail: runs of equal-signed extremes (the largest pair sums), mixed
    extremes and random digits, at several shapes (tails of K, M and N included)."""
    generator = torch.Generator().manual_seed(0)
    extremes = torch.tensor([-128, 127], dtype=torch.int8)
    try:
        for m, k, n in ((17, 40, 8), (64, 579, 33), (130, 1031, 65)):
            a = extremes[torch.randint(0, 2, (m, k), generator=generator)]
            b = extremes[torch.randint(0, 2, (k, n), generator=generator)]
            a[0], b[:, 0], a[1], b[:, 1] = 127, 127, -128, -128   # all-equal rows and columns
            a[2] = torch.randint(-128, 128, (k,), generator=generator, dtype=torch.int8)
            if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):
                return False
    except RuntimeError:  # no int8 GEMM for this build or device
        return False
    return True


def split(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) int8 digits of integer-valued u in int16 range: u = 256 hi + lo + 128."""
    u16 = u.to(torch.int16)
    return (u16 >> 8).to(torch.int8), ((u16 & 255) - 128).to(torch.int8)


def weight_digits(w: torch.Tensor) -> torch.Tensor:
    """The (2N + 1, K) int8 left operand for integer-valued w (N, K): rows [wh; wl; ones]."""
    hi, lo = split(w)
    return torch.cat([hi, lo, torch.ones_like(hi[:1])])


def recombine(products: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
    """sum x w (float64, N x M) from the digit GEMM's int32 output (2N + 1, 2M) plus `constant` (N, 1)."""
    n, m = (products.shape[0] - 1) // 2, products.shape[1] // 2
    p = products.to(torch.float64)  # every term and sum below is an integer < 2^53: exact in any order
    acc = (p[:n, :m] * 256.0 + p[n:2 * n, :m] + p[2 * n:, :m] * 128.0) * 256.0   # the xh block
    acc += p[:n, m:] * 256.0
    acc += p[n:2 * n, m:]
    acc += p[2 * n:, m:] * 128.0
    acc += constant
    return acc


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           padding: int = 0) -> torch.Tensor:
    """Exact accumulator of a convolution, x (B, C, H, W) and weight (N, C, k, k) in int16 range.

    The same integers as `model.exact.conv2d`'s float64 path (bias (N,) or (B, N) in
    accumulator units); returns float64 (B, N, H', W'). `fits` says when it applies.
    """
    b, c, h, w = x.shape
    n, _, k, _ = weight.shape
    if c * k * k > MAX_TERMS:
        raise ValueError(f"digit conv2d sums {c * k * k} terms; at most {MAX_TERMS} stay exact")
    hp, wp = h + 2 * padding, w + 2 * padding
    h_out, w_out = (hp - k) // stride + 1, (wp - k) // stride + 1
    # Digits (C, [hi, lo], B, Hp, Wp) of x padded with zeros: a zero is the digit pair (0, -128).
    digits = torch.empty(c, 2, b, hp, wp, dtype=torch.int8)
    digits[:, 0], digits[:, 1] = 0, -128
    hi, lo = split(x.transpose(0, 1))
    digits[:, 0, :, padding:padding + h, padding:padding + w] = hi
    digits[:, 1, :, padding:padding + h, padding:padding + w] = lo
    # im2col, one strided copy per kernel position: rows (C, ky, kx) as the weights, columns (digit, B, y, x).
    columns = torch.empty(c, k, k, 2, b, h_out, w_out, dtype=torch.int8)
    for ky in range(k):
        for kx in range(k):
            columns[:, ky, kx] = digits[..., ky:ky + stride * (h_out - 1) + 1:stride,
                                        kx:kx + stride * (w_out - 1) + 1:stride]
    flat = weight.reshape(n, -1)
    constant = flat.to(torch.float64).sum(dim=1, keepdim=True) * 128.0
    products = torch._int_mm(weight_digits(flat), columns.reshape(c * k * k, 2 * b * h_out * w_out))
    acc = recombine(products, constant).reshape(n, b, h_out * w_out)
    if bias is not None:
        acc += bias.t()[:, :, None] if bias.dim() == 2 else bias[:, None, None]
    return acc.transpose(0, 1).reshape(b, n, h_out, w_out)
