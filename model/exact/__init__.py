"""Exact arithmetic for everything that decides a coding table: same numbers on every machine.

Why: the entropy coder's tables come from network outputs, so encoder and decoder must
compute them identically, on any CPU or GPU, any thread count and batch size, years
apart. Floating-point networks do not: kernels sum in different orders and math
libraries round exp/log differently (measured here: streams written with the default
kernels failed to decode under AVX2 or scalar kernels; an import gave three digests on
one AMD machine). The scheme, after Ballé, Johnston & Minnen, "Integer networks for data
compression with latent-variable models" (2019):

- Integer-valued tensors in float64 (`layers`; large int16 convolutions on exact int8
  GEMMs, `digits`). Weights are integers (|w| < 2^15) with a float scale per output
  channel; activations are integers (|x| < 2^15, or 2^20 where stated) with a
  power-of-two scale 2^-e per tensor. Every product and every partial sum of a
  convolution or matmul is then an integer below 2^53, which float64 represents exactly:
  any summation order, kernel, thread count, batch size or device gives the same bits.
  Convolutions are GEMMs that only add exact products (im2col, col2im), never
  Winograd or FFT algorithms (inexact even on integers); float64 has no TF32/bf16 shortcut.
- Between integer stages only correctly rounded IEEE operations (+, -, *, /, sqrt) on
  tensors, in a fixed order, then round-half-even: identical on every IEEE-754 machine.
  Never a division by a Python number (CUDA turns it into a multiplication by the
  reciprocal): constants are multiplied, or divided as tensors.
- Transcendental functions at run time come from integer tables (`tables`).
- Numbers made once, when weights are imported or exported (schedules, folded biases),
  come from arbitrary-precision scalar maths rounded once to float64 (`scalar`), never
  from float kernels.
- Coding distributions are integer frequencies summing to 2^24, handed to constriction
  so that its quantization is the identity (`coding.frequency_rows`).
- Shared randomness (dither, noise) from an integer hash, not a platform's RNG (`noise`).

Modules: layers (integer conv, GroupNorm, SiLU/softplus/sigmoid lookups, weight
quantization), digits (the same int16 convolutions on int8 GEMMs, where this machine's
int8 GEMM passes an exactness probe), coding (integer rows, fixed-point sigmoid and exp), noise (counter hash,
normal noise, dither), tables (the committed function tables), scalar (import-time maths).
Their public names are re-exported here: `from model import exact; exact.conv2d(...)`.
Tests: tests/test_exact.py.
"""

from .coding import PRECISION, exp_fixed, frequency_rows, sigmoid_fixed
from .layers import (INT16, conv2d, conv_transpose2d, group_norm, im2col_conv2d, quantize_weight, requantize,
                     sigmoid_lookup, silu, softplus_lookup, zero_inserted_conv_transpose2d)
from .noise import NOISE_SCALE, dither, normal_noise, random_bits

__all__ = ["INT16", "NOISE_SCALE", "PRECISION", "conv2d", "conv_transpose2d", "dither", "exp_fixed",
           "frequency_rows", "group_norm", "im2col_conv2d", "normal_noise", "quantize_weight", "random_bits", "requantize",
           "sigmoid_fixed", "sigmoid_lookup", "silu", "softplus_lookup", "zero_inserted_conv_transpose2d"]
