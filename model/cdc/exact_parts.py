"""CDC's exact half: the integer hyper-synthesis and the integer coding tables (see `model.exact`).

What decides a CDC stream's symbols: the z tables (one per channel, from the factorized
density), the hyper-synthesis h_s that maps z symbols to each y element's scale level and
mean, and the y tables (one per scale level). All three are integers in the weights
file, made once at export by `export_exact`; the decoder only runs `ExactHyperDecoder`
and integer table look-ups, so it decodes the same symbols on every machine.

Layers of h_s: transposed conv (5x5, stride 2), ReLU, transposed conv, ReLU, conv 3x3.
Weights are int16 with a float64 scale per output channel; activations are integers
below 2^20 at a calibrated power-of-two scale (partial sums < 2^15 * 2^20 * 4800 < 2^53).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import exact

ACTIVATION_BOUND = (1 << 20) - 1
MEAN_EXPONENT = 10            # means live on a 2^-10 grid
TAIL_MASS = 1e-9              # z tables cover all but this much of each channel's density
MAX_HALF_WIDTH = 1024


# ---------------------------------------------------------------------- export (float64, once)
@torch.no_grad()
def export_exact(model, z_calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer h_s, z tables and y tables, as tensors for the weights file.

    `z_calibration`: integer z symbols of training crops, to choose activation exponents.
    """
    out: dict[str, torch.Tensor] = {}
    layers = model.h_s.layers
    h = z_calibration.double()
    exponents = []
    for i, layer in enumerate(layers):
        weight = layer.weight.detach().double()
        transposed = isinstance(layer, torch.nn.ConvTranspose2d)
        q, scale = exact.quantize_weight(weight.transpose(0, 1) if transposed else weight)
        out[f"hs.{i}.weight"] = (q.transpose(0, 1) if transposed else q).to(torch.int16)
        out[f"hs.{i}.scale"] = scale
        out[f"hs.{i}.bias"] = layer.bias.detach().double()
        h = layer.double()(h)
        if i < len(layers) - 1:
            h = torch.relu(h)
            exponents.append(_exponent(float(h.abs().max())))
        layer.float()
    out["hs.exponents"] = torch.tensor(exponents, dtype=torch.int32)
    z_tables, z_widths = _z_tables(model.z_density)
    out["z_tables"], out["z_widths"] = z_tables, z_widths
    y_tables, y_widths = _y_tables(model.config)
    out["y_tables"], out["y_widths"] = y_tables, y_widths
    return out


def _exponent(max_abs: float) -> int:
    return int(math.floor(math.log2(ACTIVATION_BOUND / (2.0 * max(max_abs, 1e-6)))))


def _z_tables(density) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: integer frequencies over [-W_c, W_c], W_c covering all but TAIL_MASS."""
    span = torch.arange(-MAX_HALF_WIDTH, MAX_HALF_WIDTH + 1, dtype=torch.float32)
    channels = density.channels if hasattr(density, "channels") else density.quantiles.shape[0]
    values = span.reshape(1, 1, -1).expand(channels, 1, -1).contiguous()
    pmf, _, _ = density._likelihood(values, stop_gradient=True)
    pmf = pmf[:, 0, :].double().clamp_min(0)
    tables, widths = [], []
    for c in range(channels):
        cumulative = pmf[c].cumsum(0)
        total = float(cumulative[-1])
        inside = [w for w in range(1, MAX_HALF_WIDTH + 1)
                  if total - float(cumulative[MAX_HALF_WIDTH + w] - (cumulative[MAX_HALF_WIDTH - w - 1]
                                                                     if w < MAX_HALF_WIDTH else 0)) < TAIL_MASS * total]
        width = inside[0] if inside else MAX_HALF_WIDTH
        row = pmf[c, MAX_HALF_WIDTH - width:MAX_HALF_WIDTH + width + 1]
        tables.append(_integer_row(row.numpy()))
        widths.append(width)
    return torch.from_numpy(np.concatenate(tables)), torch.tensor(widths, dtype=torch.int32)


def _y_tables(config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scale level: the zero-mean Gaussian discretized on integers, over [-W, W], W ~ 10 sigma."""
    tables, widths = [], []
    for level in range(config.scale_levels):
        sigma = math.exp(math.log(config.scale_min) + config.scale_step * level)
        width = min(MAX_HALF_WIDTH, max(1, math.ceil(10 * sigma)))
        k = np.arange(-width, width + 1, dtype=np.float64)
        cdf = lambda v: 0.5 * np.array([math.erfc(-x / (sigma * math.sqrt(2.0))) for x in v])  # noqa: E731
        tables.append(_integer_row(cdf(k + 0.5) - cdf(k - 0.5)))
        widths.append(width)
    return torch.from_numpy(np.concatenate(tables)), torch.tensor(widths, dtype=torch.int32)


def _integer_row(pmf: np.ndarray) -> np.ndarray:
    weights = np.round(np.clip(pmf, 0, None) * (1 << 30)).astype(np.int64)[None, :]
    return exact.frequency_rows(weights)[0].astype(np.int32)


# ---------------------------------------------------------------------- run time (exact)
class ExactHyperDecoder:
    """z symbols -> (scale level, mean) of every y element, identically on every machine."""

    def __init__(self, tensors: dict[str, torch.Tensor], levels: int, device: torch.device):
        self.device, self.levels = device, levels
        self.layers = []
        i = 0
        while f"hs.{i}.weight" in tensors:
            self.layers.append({k: tensors[f"hs.{i}.{k}"].to(device, torch.float64) for k in ("weight", "scale", "bias")})
            i += 1
        self.exponents = tensors["hs.exponents"].tolist()
        self.z_tables = _split(tensors["z_tables"], tensors["z_widths"])
        self.y_tables = _split(tensors["y_tables"], tensors["y_widths"])
        self.z_widths = tensors["z_widths"].long()
        self.y_widths = tensors["y_widths"].long()

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: integer symbols (B, N, h, w). Returns (levels as int64, means as float64 on a 2^-10 grid)."""
        h, exponent = z.to(self.device, torch.float64), 0
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            unit = layer["scale"] * float(2.0 ** -exponent)
            bias = torch.round(layer["bias"] / unit)
            if i < last:
                acc = exact.conv_transpose2d(h, layer["weight"], bias, stride=2, padding=2, output_padding=1)
                exponent_out = self.exponents[i]
                h = exact.requantize(acc, unit * float(2.0 ** exponent_out), ACTIVATION_BOUND).clamp_(min=0)  # ReLU
                exponent = exponent_out
            else:
                acc = exact.conv2d(h, layer["weight"], bias, padding=1)
        m = acc.shape[1] // 2
        position = torch.round(acc[:, :m] * unit[None, :m, None, None])
        levels = position.clamp_(0, self.levels - 1).long()
        means = torch.round(acc[:, m:] * (unit[m:] * float(2.0 ** MEAN_EXPONENT))[None, :, None, None])
        return levels, means * float(2.0 ** -MEAN_EXPONENT)


def _split(flat: torch.Tensor, widths: torch.Tensor) -> list[np.ndarray]:
    rows, start = [], 0
    for w in widths.tolist():
        rows.append(flat[start:start + 2 * w + 1].numpy().astype(np.float64))
        start += 2 * w + 1
    return rows
