"""Turning a float UQDM network into the exact integer one: schedule, calibration, quantization.

Done once, when weights are imported (`importer.import_checkpoint`) or made for tests;
the decoder never runs any of this. Every number stored comes out the same on every
machine: the schedule's sigmoid, exp and sqrt, the time embedding (sin, cos, two linear
layers and SiLU) and its projection into each block's bias are computed with
`model.exact.scalar` (256-bit arithmetic in a fixed order, one rounding to float64); the
weights are quantized by elementwise IEEE operations. Calibration is the exception: it
runs the float network, so its exponents are recorded once (uqdm-tiny.calibration.json)
and read from there, never recomputed by an import.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .. import exact
from ..exact import INT16, scalar
from ..registry import Weights
from .codec import PixelConstants, StepConstants
from .int_net import FOURIER_EXPONENT, SOFTPLUS_SHIFT, Z_EXPONENT, site_names
from .net import ScoreNet

CALIBRATION_TILES = 16


def float_network(weights: Weights) -> ScoreNet:
    net = ScoreNet(weights.config)
    net.load_state_dict({k[len("net."):]: v.float() for k, v in weights.tensors.items() if k.startswith("net.")})
    return net.eval()


def log_snrs(weights: Weights) -> list[scalar.Real]:
    """gamma_T, ..., gamma_0 of the learned linear schedule (T + 1 exact values)."""
    cfg = weights.config
    steps = cfg["n_timesteps"]
    slope, gamma_max = abs(scalar.real(float(weights.tensors["gamma_slope"]))), scalar.real(cfg["gamma_max"])
    return [gamma_max + slope * (scalar.real(t) / steps - 1) for t in range(steps, -1, -1)]


def step_constants(gamma_t: scalar.Real, gamma_s: scalar.Real) -> StepConstants:
    expm1 = -scalar.expm1(gamma_s - gamma_t)
    alpha_t, alpha_s = scalar.sqrt(scalar.sigmoid(-gamma_t)), scalar.sqrt(scalar.sigmoid(-gamma_s))
    sigma_t, sigma_s = scalar.sqrt(scalar.sigmoid(gamma_t)), scalar.sqrt(scalar.sigmoid(gamma_s))
    delta = sigma_s * scalar.sqrt(12 * expm1)
    exact = dict(
        loc_scale=alpha_s / alpha_t, eps_scale=sigma_t * expm1,
        prior_scale=sigma_t * scalar.sqrt(expm1) * (scalar.sqrt(3) / scalar.pi) / delta / 65536,
        delta=delta, inv_delta=1 / delta, q_z=alpha_s * (1 - expm1) / alpha_t, q_x=alpha_s * expm1,
        inv_alpha_t=1 / alpha_t, sigma_t=sigma_t)
    return StepConstants(**{k: scalar.to_float(v) for k, v in exact.items()})


def pixel_constants(gamma_0: scalar.Real) -> PixelConstants:
    alpha_0 = scalar.sqrt(scalar.sigmoid(-gamma_0))
    return PixelConstants(centre_scale=scalar.to_float(128 / ((1 << Z_EXPONENT) * alpha_0)),
                          inv_alpha_0=scalar.to_float(1 / alpha_0),
                          density=scalar.to_float(scalar.exp(-gamma_0) / 2 / 128 ** 2 / 256))


def calibrate(weights: Weights, tiles: np.ndarray, seed: int = 0) -> dict[str, list[int]]:
    """Activation exponents per site and step: the float network's largest magnitudes along
    encoding trajectories of `tiles` (N, 3, 64, 64 uint8), with 2x headroom."""
    net = float_network(weights)
    exact_gammas = log_snrs(weights)
    steps = [step_constants(a, b) for a, b in zip(exact_gammas, exact_gammas[1:])]
    gammas = [scalar.to_float(g) for g in exact_gammas]
    generator = torch.Generator().manual_seed(seed)
    largest: dict[str, list[float]] = {}
    for first in range(0, len(tiles), 4):
        x = torch.from_numpy(tiles[first:first + 4]).float().add(0.5).div(128).sub(1)
        z = torch.randn(x.shape, generator=generator)
        for i, step in enumerate(steps):
            for site, value in float_sites(net, z, gammas[i]).items():
                row = largest.setdefault(site, [0.0] * len(steps))
                row[i] = max(row[i], float(value.abs().max()))
            eps, _ = net(z, torch.tensor(gammas[i]))
            p_loc = step.loc_scale * (z - step.eps_scale * eps)
            q_loc = step.q_z * z + step.q_x * x
            u = torch.rand(x.shape, generator=generator) - 0.5
            z = p_loc + (torch.round((q_loc - p_loc) / step.delta + u) - u) * step.delta
    return {site: [exponent_for(v) for v in values] for site, values in largest.items()}


def to_exact(weights: Weights, exponents: dict[str, list[int]], name: str) -> Weights:
    """The exact codec's weights: integer network, step and pixel constants, calibration record."""
    net = float_network(weights)
    gammas = log_snrs(weights)
    tensors = {f"net.{k}": v for k, v in quantize_net(net, gammas[:-1], exponents).items()}
    steps = [step_constants(a, b) for a, b in zip(gammas, gammas[1:])]
    tensors["schedule"] = torch.tensor([list(vars(s).values()) for s in steps], dtype=torch.float64)
    tensors["pixel"] = torch.tensor(list(vars(pixel_constants(gammas[-1])).values()), dtype=torch.float64)
    config = {**weights.config, "numerics": "exact-int16"}
    return Weights("uqdm", name, config, tensors, weights.provenance)


# ---------------------------------------------------------------------- float reference, for calibration
@torch.no_grad()
def float_sites(net, z: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    """The float network's value at every site (the authors' computation, step by step)."""
    values: dict[str, torch.Tensor] = {}
    cond = net.time_embed(net._time_features(torch.tensor([gamma], dtype=z.dtype), net.time_embed[0].in_features))
    h = net.conv_in(torch.cat([z, *net._fourier(z)], dim=1))
    values["conv_in"] = h
    skips = [h]

    def block(name, module, x):
        n1 = module.net1[0](x)
        hidden = module.net1[2](F.silu(n1)) + module.cond_proj(cond)[:, :, None, None]
        n2 = module.net2[0](hidden)
        out = module.skip(x) + module.net2[2](F.silu(n2))
        values.update({f"{name}.norm1": n1, f"{name}.hidden": hidden, f"{name}.norm2": n2, f"{name}.out": out})
        return out

    for i, module in enumerate(net.down):
        h = block(f"down{i}", module, h)
        skips.append(h)
    h = block("mid1", net.mid1, h)
    attn = net.mid_attn
    normed = attn.norm(h)
    b, c, hh, ww = h.shape
    q, k, v = attn.qkv(normed).reshape(b, 3, c, hh * ww).unbind(1)
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)
    mix = (weights @ v.transpose(1, 2)).transpose(1, 2).reshape(b, c, hh, ww)
    h = h + attn.out(mix)
    values.update({"attn.norm": normed, "attn.q": q, "attn.k": k, "attn.v": v, "attn.mix": mix, "attn.out": h})
    h = block("mid2", net.mid2, h)
    for i, module in enumerate(net.up):
        h = block(f"up{i}", module, torch.cat([h, skips.pop()], dim=1))
    normed = net.conv_out[0](h)
    eps, scale = net.conv_out[2](F.silu(normed)).split(net.channels, dim=1)
    values.update({"out.norm": normed, "out.eps": eps, "out.scale": scale + SOFTPLUS_SHIFT})
    return values


def exponent_for(max_abs: float, headroom: float = 2.0, bound: int = INT16) -> int:
    """The finest power-of-two scale that keeps headroom x max_abs inside the integer range."""
    return int(math.floor(math.log2(bound / (headroom * max(max_abs, 1e-6)))))


# ---------------------------------------------------------------------- quantization
def quantize_net(net, gammas: list[scalar.Real], exponents: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Integer tensors of the network: weights, per-step biases, per-step exponents.

    `gammas[s]` is the log-SNR the network sees at step s; `exponents[site][s]` the
    calibrated activation exponents. Everything here is computed once, at import.
    """
    steps = len(gammas)
    out: dict[str, torch.Tensor] = {}
    sites = site_names(len(net.down))
    wrong = [s for s in sites if not (isinstance(exponents.get(s), list) and len(exponents[s]) == steps
                                      and all(isinstance(e, int) and 0 <= e <= 30 for e in exponents[s]))]
    if wrong:
        raise ValueError(f"calibration exponents must give {steps} integers in 0..30 for every site; "
                         f"wrong or missing: {', '.join(wrong[:5])}")
    out["exponents"] = torch.tensor([[exponents[s][t] for t in range(steps)] for s in sites], dtype=torch.int32)
    conds = [_time_embedding(net, g) for g in gammas]
    # conv_in: fold the inputs' fixed scales (z 2^-12, Fourier 2^-14) into the weights
    in_scales = torch.tensor([2.0 ** -Z_EXPONENT] * 3 + [2.0 ** -FOURIER_EXPONENT] * 12, dtype=torch.float64)
    _conv(out, "conv_in", net.conv_in.weight.double() * in_scales[None, :, None, None], net.conv_in.bias)

    def block(name, module, cond_list):
        _norm(out, f"{name}.norm1", module.net1[0])
        # the conv's bias plus the projected time embedding, one row per step (steps, C)
        biases = [scalar.matvec(module.cond_proj.weight, c, bias=module.net1[2].bias) for c in cond_list]
        _conv(out, f"{name}.conv1", module.net1[2].weight, scalar.tensor(biases))
        _norm(out, f"{name}.norm2", module.net2[0])
        _conv(out, f"{name}.conv2", module.net2[2].weight, module.net2[2].bias)
        if not isinstance(module.skip, torch.nn.Identity):
            _conv(out, f"{name}.skip", module.skip.weight, module.skip.bias)

    for i, module in enumerate(net.down):
        block(f"down{i}", module, conds)
    block("mid1", net.mid1, conds)
    attn = net.mid_attn
    _norm(out, "attn.norm", attn.norm)
    _conv(out, "attn.qkv", attn.qkv.weight, attn.qkv.bias)
    _conv(out, "attn.proj", attn.out.weight, attn.out.bias)
    block("mid2", net.mid2, conds)
    for i, module in enumerate(net.up):
        block(f"up{i}", module, conds)
    _norm(out, "out.norm", net.conv_out[0])
    bias = net.conv_out[2].bias.double().clone()
    bias[net.channels:] += SOFTPLUS_SHIFT
    _conv(out, "out.conv", net.conv_out[2].weight, bias)
    return out


def _time_embedding(net, gamma: scalar.Real) -> list[scalar.Real]:
    """The time MLP's output for one log-SNR (computed once, at import, at 256 bits).

    The authors' formula: t = 1000 (gamma - gamma_min) / (gamma_max - gamma_min), features
    sin and cos of t * 10^(-4 i / (n - 1)), then Linear, SiLU, Linear, SiLU.
    """
    lo, hi = (scalar.real(v) for v in net.gamma_range)
    n = net.time_embed[0].in_features // 2
    t = 1000 * (gamma - lo) / (hi - lo)
    angles = [t * scalar.real(10) ** (scalar.real(-4 * i) / (n - 1)) for i in range(n)]
    features = [scalar.sin(a) for a in angles] + [scalar.cos(a) for a in angles]
    for layer in (net.time_embed[0], net.time_embed[2]):
        features = [scalar.silu(v) for v in scalar.matvec(layer.weight, features, bias=layer.bias)]
    return features


def _conv(out: dict, name: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Integer weights and their per-output-channel scales; the float bias is kept (float64) and
    turned into accumulator units at run time, when the input exponent is known."""
    q, scale = exact.quantize_weight(weight.double())
    out[f"{name}.weight"] = q.to(torch.int16)
    out[f"{name}.scale"] = scale
    out[f"{name}.bias"] = bias.detach().double()


def _norm(out: dict, name: str, norm) -> None:
    out[f"{name}.gamma"] = norm.weight.detach().double()
    out[f"{name}.beta"] = norm.bias.detach().double()


