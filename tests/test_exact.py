"""The exact-arithmetic layer (model/exact/): each piece gives the integers its definition says.

Unit tests of the pieces the codecs build on; tests/test_portability.py shows the whole codecs
decoding alike on other kernels, and the import making one digest everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import exact
from model.exact import digits, scalar
from model.exact.tables import SIGMOID_FRAC, SIGMOID_ONE, build_tables, tables


def integer_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """Reference: the same convolution in int64 (exact by construction)."""
    b, _, h, w = x.shape
    c_out, _, k, _ = weight.shape
    columns = F.unfold(x, k, padding=padding, stride=stride).long()
    acc = weight.reshape(c_out, -1).long() @ columns
    return acc.reshape(b, c_out, (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 2)])
def test_integer_convolutions_give_the_exact_integers_at_the_bounds(stride, padding):
    generator = torch.Generator().manual_seed(0)
    # int16 weights times activations below 2^20 over 64 x 5 x 5 terms: sums up to ~2^46
    x = torch.randint(-(1 << 20) + 1, 1 << 20, (2, 64, 9, 9), generator=generator).double()
    weight = torch.randint(-exact.INT16, exact.INT16 + 1, (8, 64, 5, 5), generator=generator).double()
    expected = integer_conv(x, weight, stride, padding)
    for conv in (exact.conv2d, exact.im2col_conv2d):
        found = conv(x, weight, stride=stride, padding=padding)
        assert torch.equal(found.long(), expected) and torch.equal(found, found.round())


@pytest.mark.skipif(not digits.int8_gemm_is_exact(), reason="this machine's int8 GEMM is not exact (no VNNI)")
@pytest.mark.parametrize("stride,padding,k", [(1, 1, 3), (2, 2, 5), (1, 0, 1)])
def test_digit_convolutions_give_the_exact_integers_at_the_int16_extremes(stride, padding, k):
    generator = torch.Generator().manual_seed(3)
    bound = 1 << 15
    x = torch.randint(-bound, bound, (2, 64, 11, 10), generator=generator).double()
    weight = torch.randint(-exact.INT16, exact.INT16 + 1, (9, 64, k, k), generator=generator).double()
    # the digit split's edge cases: the extremes, -2^15, 0 (which padding also adds) and 255/256
    x.view(-1)[:7] = torch.tensor([bound - 1, 1 - bound, -bound, 0, 255, 256, -129], dtype=torch.float64)
    weight.view(-1)[:4] = torch.tensor([exact.INT16, -32768, 0, -1], dtype=torch.float64)
    bias = torch.randint(-(1 << 40), 1 << 40, (2, 9), generator=generator).double()  # per image, as UQDM's
    found = digits.conv2d(x, weight, bias, stride=stride, padding=padding)
    expected = integer_conv(x, weight, stride, padding) + bias.long()[:, :, None, None]
    assert found.dtype == torch.float64 and torch.equal(found.long(), expected)


def test_conv2d_takes_the_digit_kernels_only_where_the_operands_fit_int16(monkeypatch):
    calls = []
    monkeypatch.setattr(digits, "int8_gemm_is_exact", lambda: True)
    monkeypatch.setattr(digits, "conv2d", lambda *args: calls.append(args) or torch.zeros(()))
    big = torch.full((1, 32, 64, 64), 7.0, dtype=torch.float64)
    weight = torch.ones(32, 32, 3, 3, dtype=torch.float64)
    exact.conv2d(big, weight, padding=1)
    assert len(calls) == 1
    exact.conv2d(big * 2 ** 13, weight, padding=1)          # activations past int16: float64 path
    exact.conv2d(big, weight * 2 ** 15, padding=1)          # weights past int16: float64 path
    exact.conv2d(big[:, :, :8, :8], weight, padding=1)      # too small to pay: float64 path
    assert len(calls) == 1


PROBE_CHILD = """
import torch
from model.exact import digits
a = torch.full((64, 256), 127, dtype=torch.int8)
exact = torch.equal(torch._int_mm(a, a.t().contiguous()).long(), a.long() @ a.long().t())
print(digits.int8_gemm_is_exact(), exact)
"""


@pytest.mark.parametrize("isa", ["AVX2", "SSE41", "AVX512_CORE", None])
def test_the_int8_probe_turns_the_digit_kernels_off_where_int8_gemms_saturate(isa):
    # oneDNN's kernels without VNNI sum pairs in saturating int16: 127 x 127 runs come out wrong
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"} | ({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})
    result = subprocess.run([sys.executable, "-c", PROBE_CHILD], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=120)
    probe, exact_here = result.stdout.split()
    assert result.returncode == 0 and probe == exact_here, result.stderr[-2000:]


def test_digits_refuse_sums_that_could_leave_the_exact_range():
    with pytest.raises(ValueError, match="stay exact"):
        digits.conv2d(torch.zeros(1, 4096, 3, 3, dtype=torch.float64), torch.zeros(1, 4096, 3, 3, dtype=torch.float64))


def integer_conv_transpose(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                           output_padding: int) -> torch.Tensor:
    """The definition in int64: each input pixel scatters weight x value into the output."""
    b, _, h, w = x.shape
    _, c_out, k, _ = weight.shape
    full = torch.zeros(b, c_out, (h - 1) * stride + k + output_padding, (w - 1) * stride + k + output_padding,
                       dtype=torch.long)
    for i in range(h):
        for j in range(w):
            full[:, :, i * stride:i * stride + k, j * stride:j * stride + k] += torch.einsum(
                "bc,cokl->bokl", x[:, :, i, j].long(), weight.long())
    h_out, w_out = (h - 1) * stride - 2 * padding + k + output_padding, (w - 1) * stride - 2 * padding + k + output_padding
    return full[:, :, padding:padding + h_out, padding:padding + w_out]


def test_transposed_convolutions_give_the_exact_integers_at_the_bounds():
    generator = torch.Generator().manual_seed(1)
    # int16 activations and weights over 192 x 5 x 5 terms, as in h_s: bounded by 2^42, here past
    # 2^34 (float32 or int32 accumulators would round or wrap)
    x = torch.randint(-exact.INT16, exact.INT16 + 1, (2, 192, 5, 4), generator=generator).double()
    weight = torch.randint(-exact.INT16, exact.INT16 + 1, (192, 3, 5, 5), generator=generator).double()
    bias = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    expected = integer_conv_transpose(x, weight, 2, 2, 1) + bias.long()[None, :, None, None]
    assert expected.shape == (2, 3, 10, 8) and expected.abs().max() > 2 ** 34
    for conv in (exact.conv_transpose2d, exact.zero_inserted_conv_transpose2d):
        found = conv(x, weight, bias, stride=2, padding=2, output_padding=1)
        assert torch.equal(found.long(), expected) and torch.equal(found, found.round())


def test_requantize_rounds_half_to_even_and_clamps():
    acc = torch.tensor([2.5, 3.5, -2.5, 1e12, -1e12], dtype=torch.float64)
    assert exact.requantize(acc, 1.0).tolist() == [2.0, 4.0, -2.0, exact.INT16, -exact.INT16]


def test_group_norm_is_the_float_group_norm_rounded():
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(-20000, 20000, (2, 8, 6, 6), generator=generator).double()
    gamma, beta = torch.linspace(0.5, 1.5, 8, dtype=torch.float64), torch.linspace(-0.2, 0.2, 8, dtype=torch.float64)
    e_in, e_out = 10, 11
    eps = torch.full((4,), 1e-5 * 4.0 ** e_in, dtype=torch.float64)
    found = exact.group_norm(x, 4, gamma, beta, eps, e_out)
    reference = F.group_norm(x * 2.0 ** -e_in, 4, gamma, beta, eps=1e-5) * 2.0 ** e_out
    assert torch.equal(found, found.round()) and (found - reference).abs().max() <= 0.5 + 1e-6


def test_silu_and_softplus_lookups_stay_within_a_unit_of_the_functions():
    x = torch.arange(-exact.INT16, exact.INT16 + 1, 7, dtype=torch.float64)
    e = 11
    real = x * 2.0 ** -e
    assert (exact.silu(x, e) - F.silu(real) * 2.0 ** e).abs().max() <= 1.0
    softplus = exact.softplus_lookup(x, e) * 2.0 ** -16
    assert (softplus - F.softplus(real)).abs().max() <= 2.0 ** -SIGMOID_FRAC


def test_fixed_point_sigmoid_interpolates_the_table_exactly():
    x = np.array([-(17 << 16) - 5, -70000, -1, 0, 1, 12345, 17 << 16])
    found = exact.sigmoid_fixed(x, 16)
    assert found[3] == SIGMOID_ONE // 2 and np.all(np.diff(found) >= 0)
    assert np.abs(found / SIGMOID_ONE - 1 / (1 + np.exp(-x / 2.0 ** 16))).max() < 1e-6


def test_frequency_rows_sum_to_the_coders_total_and_keep_every_symbol_codable():
    rng = np.random.default_rng(3)
    weights = np.concatenate([rng.integers(0, 1 << 30, (20, 9)), np.eye(9, dtype=np.int64)[:3] * 5])
    rows = exact.frequency_rows(weights)
    assert np.all(rows.sum(axis=1) == (1 << exact.PRECISION) - 9) and np.all(rows >= 0)
    assert np.all(rows == np.round(rows))
    with pytest.raises(ValueError, match="positive"):
        exact.frequency_rows(np.zeros((1, 4), dtype=np.int64))


PINNED_BITS = [675862180, 3139425692, 3997897555, 3288026570]  # recorded when the format was defined


def test_shared_randomness_is_pinned_integers():
    """The hash's first outputs are part of the format: streams' dither and noise depend on them."""
    assert exact.random_bits(0, 1, 4).tolist() == PINNED_BITS
    assert np.array_equal(exact.random_bits(7, 3, 1000)[:10], exact.random_bits(7, 3, 10))  # counter-based
    u = exact.dither(5, 2, 10000, bits=8)
    assert u.min() >= -255 and u.max() <= 255 and np.all(u % 2 == 1)
    noise = exact.normal_noise(5, 2, 100000) * exact.NOISE_SCALE
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02


def test_the_committed_tables_are_what_their_definition_rebuilds():
    rebuilt, committed = build_tables(), tables()
    assert rebuilt.keys() == committed.keys()
    for name in committed:
        np.testing.assert_array_equal(rebuilt[name], committed[name], err_msg=name)


def test_quantized_weights_are_within_half_a_step_and_use_the_full_range():
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    q, scale = exact.quantize_weight(weight)
    assert q.abs().amax(dim=(1, 2, 3)).tolist() == [exact.INT16] * 4
    assert ((q * scale[:, None, None, None] - weight).abs() <= scale[:, None, None, None] / 2 + 1e-18).all()


def test_scalar_maths_rounds_once_to_the_nearest_float():
    third = scalar.real(1) / 3
    assert scalar.to_float(third) == 1 / 3
    # 0.1 + 0.2 in floats is 0.30000000000000004; the exact sum of the two floats rounds the same way,
    # and the sum of the exact decimals rounds to 0.3
    assert scalar.to_float(scalar.real(0.1) + scalar.real(0.2)) == 0.1 + 0.2
    assert scalar.to_float(scalar.real("0.1") + scalar.real("0.2")) == 0.3
    matrix = torch.tensor([[0.1, 0.2, 0.3], [1e16, 1.0, -1e16]], dtype=torch.float32)
    vector = [scalar.real(3), scalar.real(5), scalar.real(7)]
    exact_rows = [sum(Fraction(float(a)) * b for a, b in zip(row, (3, 5, 7))) for row in matrix.double().tolist()]
    found = scalar.tensor(scalar.matvec(matrix, vector))
    assert found.tolist() == [float(v) for v in exact_rows]  # float64 sums would lose the 5 in the second row
    assert scalar.nearest(scalar.real(2.5)) == 2 and scalar.nearest(scalar.real(-3.5)) == -4
