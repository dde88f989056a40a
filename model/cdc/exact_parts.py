"""CDC's exact half: the integer hyper-synthesis, context model and coding tables (see `model.exact`).

What decides a CDC stream's symbols: the z tables (one per channel, from the factorized
density), the hyper-synthesis h_s that maps z symbols to each y element's scale level and
mean, the context model's nets that refine them (weights with `context_groups`), and the y
tables (one per scale level). All are integers in the weights file, made once at export
(`export_exact`, `export_context`); the decoder only runs `ExactChain`s (`ExactHyperDecoder`,
`ExactContext`) and integer table look-ups, so it decodes the same symbols on every machine.

Layers of h_s: transposed conv (5x5, stride 2), ReLU, transposed conv, ReLU, conv 3x3.
Weights are int16 with a float64 scale per output channel; hidden activations are integers
at a calibrated power-of-two scale, int16 in exports since 2026-12-08 (each chain's
`activation_bound` tensor), below 2^20 in the releases before (no such tensor: cdc-hp128,
cdc-hp128-ctx); partial sums < 2^15 * 2^20 * 4800 < 2^53 either way. Why int16: h_s is most
of decode_latents, and int16 activations let its 3x3 conv run on exact int8 GEMMs
(`exact.digits`): 44 -> 25 ms a 768x512 photo on an AMX Xeon, one thread, while levels moved on
0.03% of y's elements and means by at most 0.002 (measured on cdc-hp128's h_s, exponents - 5).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .. import exact
from .context import anchors, group_slices

#: one coding pass: (channel slice, levels, means, mask) -> the group's symbols, valid at mask
CodePass = Callable[[slice, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

HIDDEN_BOUND = exact.INT16           # hidden activations of new exports
LEGACY_HIDDEN_BOUND = (1 << 20) - 1  # ... of chains exported before (no activation_bound tensor)
MEAN_EXPONENT = 10            # means live on a 2^-10 grid
INPUT_EXPONENT = MEAN_EXPONENT  # the context nets' inputs too (levels, means, y-hat = k + mean)
INPUT_BOUND = (1 << 20) - 1   # ... as integers below 2^20: values below 1024
INPUT_LIMIT = INPUT_BOUND / 2.0 ** INPUT_EXPONENT
TAIL_MASS = 1e-9              # z tables cover all but this much of each channel's density
MAX_HALF_WIDTH = 1024


# ---------------------------------------------------------------------- export (float64, once)
#: how h_s's layers are applied: transposed conv (stride 2) twice, then a 3x3 conv
HYPER_GEOMETRY = ("up", "up", "same")


@torch.no_grad()
def export_exact(model, z_calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer h_s, z tables and y tables, as tensors for the weights file.

    `z_calibration`: integer z symbols of training crops, to choose activation exponents.
    """
    out = export_chain(list(model.h_s.layers), HYPER_GEOMETRY, z_calibration.double(), "hs")
    z_tables, z_widths = _z_tables(model.z_density)
    out["z_tables"], out["z_widths"] = z_tables, z_widths
    y_tables, y_widths = _y_tables(model.config)
    out["y_tables"], out["y_widths"] = y_tables, y_widths
    return out


def export_chain(layers: list[torch.nn.Module], geometry: tuple[str, ...], calibration: torch.Tensor,
                 prefix: str) -> dict[str, torch.Tensor]:
    """Conv layers with ReLU between them as int16 weights, a float64 scale per output channel,
    float64 biases and one activation exponent per hidden layer (int16 activations, half the
    range as margin), calibrated on `calibration` (float64 inputs of the first layer)."""
    out: dict[str, torch.Tensor] = {}
    h, exponents = calibration, []
    for i, (layer, kind) in enumerate(zip(layers, geometry)):
        weight = layer.weight.detach().double()
        transposed = kind == "up"
        q, scale = exact.quantize_weight(weight.transpose(0, 1) if transposed else weight)
        out[f"{prefix}.{i}.weight"] = (q.transpose(0, 1) if transposed else q).to(torch.int16)
        out[f"{prefix}.{i}.scale"] = scale
        out[f"{prefix}.{i}.bias"] = layer.bias.detach().double()
        h = layer.double()(h)
        layer.float()
        if i < len(layers) - 1:
            h = torch.relu(h)
            exponents.append(_exponent(float(h.abs().max())))
    out[f"{prefix}.exponents"] = torch.tensor(exponents, dtype=torch.int32)
    out[f"{prefix}.activation_bound"] = torch.tensor([HIDDEN_BOUND], dtype=torch.int32)
    return out


@torch.no_grad()
def export_context(context, y: torch.Tensor, base_levels: torch.Tensor, base_means: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """The context model's nets as exact chains, calibrated on the inputs they see when coding
    `y` (float, B x M x h x w) of training crops, with the exact hyperprior's base levels and means."""
    out: dict[str, torch.Tensor] = {}
    inputs = _context_inputs(context, y.double(), base_levels.double(), base_means.double())
    for g, (net, (spatial_in, param_in)) in enumerate(zip(context.nets, inputs)):
        out.update(export_chain([net.spatial], ("same",), spatial_in, f"ctx.{g}.spatial"))
        out.update(export_chain(list(net.layers), ("same",) * len(net.layers), param_in, f"ctx.{g}.params"))
    return out


def _context_inputs(context, y, base_levels, base_means) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per group: the spatial conv's and the parameter net's inputs over both passes (float64)."""
    context.double()
    anchor = anchors(*y.shape[-2:])[None, None]
    decoded, inputs = [], []
    for net, part in zip(context.nets, context.slices):
        earlier = torch.cat(decoded, 1) if decoded else y.new_zeros(y.shape[0], 0, *y.shape[2:])
        level, mean = base_levels[:, part], base_means[:, part]
        _, mean_a = net(level, mean, None, earlier)
        hat_a = (torch.round(y[:, part] - mean_a) + mean_a) * anchor
        _, mean_n = net(level, mean, hat_a, earlier)
        params_in = [torch.cat([level, mean, net.spatial(hat), earlier], 1) for hat in (torch.zeros_like(hat_a), hat_a)]
        inputs.append((torch.cat([torch.zeros_like(hat_a), hat_a]), torch.cat(params_in)))
        mean_g = torch.where(anchor, mean_a, mean_n)
        decoded.append(torch.round(y[:, part] - mean_g) + mean_g)
    largest = max(float(x.abs().max()) for pair in inputs for x in pair)
    if largest >= INPUT_LIMIT:
        raise ValueError(f"context inputs reach {largest:.0f}, past the exact model's {INPUT_LIMIT} (2^-10 grid)")
    context.float()
    return inputs


def _exponent(max_abs: float) -> int:
    return int(math.floor(math.log2(HIDDEN_BOUND / (2.0 * max(max_abs, 1e-6)))))


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
class ExactChain:
    """Integer conv layers (exported by `export_chain`) with ReLU between, in integer float64."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str, geometry: tuple[str, ...],
                 device: torch.device):
        self.geometry = geometry
        self.layers = [{k: tensors[f"{prefix}.{i}.{k}"].to(device, torch.float64) for k in ("weight", "scale", "bias")}
                       for i in range(len(geometry))]
        self.exponents = tensors[f"{prefix}.exponents"].tolist()
        bound = tensors.get(f"{prefix}.activation_bound")
        self.bound = LEGACY_HIDDEN_BOUND if bound is None else int(bound[0])

    def __call__(self, h: torch.Tensor, exponent: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer input at scale 2^-exponent -> (last layer's integer accumulator, its unit per channel)."""
        last = len(self.layers) - 1
        for i, (layer, kind) in enumerate(zip(self.layers, self.geometry)):
            unit = layer["scale"] * float(2.0 ** -exponent)
            bias = torch.round(layer["bias"] / unit)
            if kind == "up":
                acc = exact.conv_transpose2d(h, layer["weight"], bias, stride=2, padding=2, output_padding=1)
            else:
                acc = exact.conv2d(h, layer["weight"], bias, padding=layer["weight"].shape[-1] // 2)
            if i < last:
                h = exact.requantize(acc, unit * float(2.0 ** self.exponents[i]), self.bound).clamp_(min=0)
                exponent = self.exponents[i]
        return acc, unit


class ExactHyperDecoder:
    """z symbols -> (scale level, mean) of every y element, identically on every machine."""

    def __init__(self, tensors: dict[str, torch.Tensor], levels: int, device: torch.device):
        self.device, self.levels = device, levels
        self.chain = ExactChain(tensors, "hs", HYPER_GEOMETRY, device)
        self.z_tables = _split(tensors["z_tables"], tensors["z_widths"])
        self.y_tables = _split(tensors["y_tables"], tensors["y_widths"])
        self.z_widths = tensors["z_widths"].long()
        self.y_widths = tensors["y_widths"].long()

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: integer symbols (B, N, h, w). Returns (levels as int64, means as float64 on a 2^-10 grid)."""
        acc, unit = self.chain(z.to(self.device, torch.float64), 0)
        m = acc.shape[1] // 2
        position = torch.round(acc[:, :m] * unit[None, :m, None, None])
        levels = position.clamp_(0, self.levels - 1).long()
        return levels, _mean_on_grid(acc[:, m:], unit[m:])


class ExactContext:
    """The context model's parameters of one coding pass, identically on every machine.

    Inputs (base levels, base means, decoded y) lie on the 2^-10 grid; each is taken as
    the integer value * 2^10, clamped to the exact layers' bound.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], groups: tuple[int, ...], levels: int, device: torch.device):
        self.groups, self.levels = groups, levels
        self.spatial = [ExactChain(tensors, f"ctx.{g}.spatial", ("same",), device) for g in range(len(groups))]
        depth = sum(1 for k in tensors if k.startswith("ctx.0.params.") and k.endswith(".weight"))
        self.params = [ExactChain(tensors, f"ctx.{g}.params", ("same",) * depth, device) for g in range(len(groups))]

    def __call__(self, g: int, base_level: torch.Tensor, base_mean: torch.Tensor, decoded_anchors: torch.Tensor,
                 earlier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group g's (levels as int64, means on the 2^-10 grid) from values on the 2^-10 grid."""
        acc, unit = self.spatial[g](_on_grid(decoded_anchors), INPUT_EXPONENT)
        spatial = exact.requantize(acc, unit * float(2.0 ** INPUT_EXPONENT), INPUT_BOUND)
        inputs = torch.cat([_on_grid(base_level), _on_grid(base_mean), spatial, _on_grid(earlier)], 1)
        acc, unit = self.params[g](inputs, INPUT_EXPONENT)
        c = acc.shape[1] // 2
        position = base_level + acc[:, :c] * unit[None, :c, None, None]
        levels = torch.round(position).clamp_(0, self.levels - 1).long()
        return levels, base_mean + _mean_on_grid(acc[:, c:], unit[c:])

    def code(self, base_levels: torch.Tensor, base_means: torch.Tensor, code_pass: CodePass
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every pass in the decoder's order: group by group, anchors first.

        `code_pass(part, levels, means, mask)` gets one pass's tables and means (over the
        group's channels `part`) and returns the group's symbols, valid where `mask` is:
        the encoder rounds y there, the decoder decodes. Returns every element's (means, k).
        """
        anchor = anchors(*base_levels.shape[-2:], device=base_levels.device)[None, None]
        means, symbols, decoded = torch.zeros_like(base_means), torch.zeros_like(base_means), []
        for g, part in enumerate(group_slices(self.groups)):
            earlier = torch.cat(decoded, 1) if decoded else base_means.new_zeros(base_means.shape[0], 0,
                                                                                 *base_means.shape[2:])
            hat = torch.zeros_like(base_means[:, part])
            for mask in (anchor, ~anchor):
                mask = mask.expand_as(hat)
                levels, mean = self(g, base_levels[:, part].double(), base_means[:, part], hat, earlier)
                k = code_pass(part, levels, mean, mask).double()
                hat = torch.where(mask, k + mean, hat)
                means[:, part] = torch.where(mask, mean, means[:, part])
                symbols[:, part] = torch.where(mask, k, symbols[:, part])
            decoded.append(hat)
        return means, symbols


def _on_grid(values: torch.Tensor) -> torch.Tensor:
    """Values on the 2^-10 grid as the integers the exact layers take (exact: a power-of-two product)."""
    return (values * float(2.0 ** INPUT_EXPONENT)).clamp_(-INPUT_BOUND, INPUT_BOUND)


def _mean_on_grid(acc: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    means = torch.round(acc * (unit * float(2.0 ** MEAN_EXPONENT))[None, :, None, None])
    return means * float(2.0 ** -MEAN_EXPONENT)


def _split(flat: torch.Tensor, widths: torch.Tensor) -> list[np.ndarray]:
    rows, start = [], 0
    for w in widths.tolist():
        rows.append(flat[start:start + 2 * w + 1].numpy().astype(np.float64))
        start += 2 * w + 1
    return rows
