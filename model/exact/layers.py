"""Integer layers in integer-valued float64: convolutions, requantization, GroupNorm, lookups.

Every product and partial sum is an integer below 2^53, so any summation order, kernel,
thread count, batch size or device gives the same bits (see the package docstring).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from . import digits
from .tables import SIGMOID_FRAC, SIGMOID_LIMIT, SIGMOID_ONE, torch_table

INT16 = (1 << 15) - 1
_DIGITS_FROM = 1 << 20  # products in a convolution from which the int8 digit GEMMs win (measured)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           padding: int = 0) -> torch.Tensor:
    """Integer convolution in float64; exact while partial sums stay below 2^53.

    `weight` (C_out, C_in, k, k) integer-valued float64; `bias` (C_out,) or (B, C_out) in
    accumulator units. Returns the accumulator (B, C_out, H', W').

    An explicit im2col + matmul: every algorithm that sums the exact integer products gives
    the exact integer, but Winograd and FFT convolutions do not (cuDNN may pick them). On a
    CPU, PyTorch's float64 convolution is this same im2col + GEMM (oneDNN, NNPACK and
    XNNPACK take no float64), twice as fast as spelling it out (measured), so it is used there.
    Large convolutions run on int8 GEMMs instead where `digits` can (the same integers:
    int16 operands, a CPU whose int8 GEMM passes its probe; 3.6-4.2x faster on UQDM's 3x3
    convolutions; below ~1M products its fixed cost loses, measured).
    """
    products = x.shape[0] * weight.shape[0] * weight[0].numel() * (x.shape[2] // stride) * (x.shape[3] // stride)
    if products >= _DIGITS_FROM and weight[0].numel() <= digits.MAX_TERMS and digits.fits(x, weight):
        return digits.conv2d(x, weight, bias, stride, padding)
    if x.device.type == "cpu":
        acc = F.conv2d(x, weight, stride=stride, padding=padding)
        if bias is not None:
            acc = acc + (bias[:, :, None, None] if bias.dim() == 2 else bias[None, :, None, None])
        return acc
    return im2col_conv2d(x, weight, bias, stride, padding)


def im2col_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                  padding: int = 0) -> torch.Tensor:
    """`conv2d` spelled out as unfold + matmul (what runs on GPUs, where cuDNN may pick Winograd)."""
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
    """Integer transposed convolution (weight as nn.ConvTranspose2d: C_in, C_out, k, k), exact as `conv2d`.

    On a CPU PyTorch's own float64 transposed convolution: a GEMM then col2im, which only adds
    exact integer products, twice as fast as the zero-inserted form at stride 2 (measured on
    h_s: it skips the products with inserted zeros). Elsewhere (cuDNN may pick FFT or
    Winograd) `zero_inserted_conv_transpose2d`.
    """
    if x.device.type != "cpu":
        return zero_inserted_conv_transpose2d(x, weight, bias, stride, padding, output_padding)
    acc = F.conv_transpose2d(x, weight, stride=stride, padding=padding, output_padding=output_padding)
    if bias is not None:
        acc = acc + (bias[:, :, None, None] if bias.dim() == 2 else bias[None, :, None, None])
    return acc


def zero_inserted_conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                                   padding: int, output_padding: int) -> torch.Tensor:
    """`conv_transpose2d` as zero insertion, then `im2col_conv2d` with the flipped kernel."""
    b, c, h, w = x.shape
    k = weight.shape[-1]
    dilated = x.new_zeros(b, c, (h - 1) * stride + 1, (w - 1) * stride + 1)
    dilated[:, :, ::stride, ::stride] = x
    pad = k - 1 - padding
    dilated = F.pad(dilated, (pad, pad + output_padding, pad, pad + output_padding))
    flipped = weight.flip(-1, -2).transpose(0, 1)
    return im2col_conv2d(dilated, flipped.contiguous(), bias)


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
    return torch.index_select(table, 0, (x + INT16).int().view(-1)).view(x.shape)


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
