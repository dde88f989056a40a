"""Turning a float UQDM network into the exact integer one: schedule, calibration, quantization.

Done once, when weights are imported (`importer.import_checkpoint`) or made for tests;
the decoder never runs any of this. The transcendental functions used here (the noise
schedule's sigmoid and exp, the time embedding's sin and cos) run in float64 on the
importing machine; their results are stored in the weights file, whose digest
(`expected_digest` in the calibration file) proves the import reproduced ours.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .. import exact
from ..exact import INT16
from ..registry import Weights
from .codec import PixelConstants, StepConstants
from .int_net import FOURIER_EXPONENT, SOFTPLUS_SHIFT, Z_EXPONENT, site_names
from .net import ScoreNet

CALIBRATION_TILES = 16


def float_network(weights: Weights) -> ScoreNet:
    net = ScoreNet(weights.config)
    net.load_state_dict({k[len("net."):]: v.float() for k, v in weights.tensors.items() if k.startswith("net.")})
    return net.eval()


def log_snrs(weights: Weights) -> list[float]:
    """gamma_T, ..., gamma_0 of the learned linear schedule (T + 1 values)."""
    cfg = weights.config
    steps, slope, gamma_max = cfg["n_timesteps"], abs(float(weights.tensors["gamma_slope"])), cfg["gamma_max"]
    return [gamma_max + slope * (t / steps - 1.0) for t in range(steps, -1, -1)]


def step_constants(gamma_t: float, gamma_s: float) -> StepConstants:
    expm1 = -math.expm1(gamma_s - gamma_t)
    alpha_t, alpha_s = math.sqrt(_sigmoid(-gamma_t)), math.sqrt(_sigmoid(-gamma_s))
    sigma_t, sigma_s = math.sqrt(_sigmoid(gamma_t)), math.sqrt(_sigmoid(gamma_s))
    delta = sigma_s * math.sqrt(12.0 * expm1)
    return StepConstants(
        loc_scale=alpha_s / alpha_t, eps_scale=sigma_t * expm1,
        prior_scale=sigma_t * math.sqrt(expm1) * (math.sqrt(3.0) / math.pi) / delta / 65536.0,
        delta=delta, inv_delta=1.0 / delta, q_z=alpha_s * (1 - expm1) / alpha_t, q_x=alpha_s * expm1,
        inv_alpha_t=1.0 / alpha_t, sigma_t=sigma_t)


def pixel_constants(gamma_0: float) -> PixelConstants:
    alpha_0 = math.sqrt(_sigmoid(-gamma_0))
    return PixelConstants(centre_scale=128.0 / ((1 << Z_EXPONENT) * alpha_0), inv_alpha_0=1.0 / alpha_0,
                          density=0.5 * math.exp(-gamma_0) / 128.0 ** 2 / 256.0)


def calibrate(weights: Weights, tiles: np.ndarray, seed: int = 0) -> dict[str, list[int]]:
    """Activation exponents per site and step: the float network's largest magnitudes along
    encoding trajectories of `tiles` (N, 3, 64, 64 uint8), with 2x headroom."""
    net = float_network(weights)
    gammas = log_snrs(weights)
    steps = [step_constants(a, b) for a, b in zip(gammas, gammas[1:])]
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


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


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
def quantize_net(net, gammas: list[float], exponents: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Integer tensors of the network: weights, per-step biases, per-step exponents.

    `gammas[s]` is the log-SNR the network sees at step s; `exponents[site][s]` the
    calibrated activation exponents. Everything here is computed once, at import.
    """
    steps = len(gammas)
    out: dict[str, torch.Tensor] = {}
    sites = site_names(len(net.down))
    out["exponents"] = torch.tensor([[exponents[s][t] for t in range(steps)] for s in sites], dtype=torch.int32)
    conds = [_time_embedding(net, g) for g in gammas]
    # conv_in: fold the inputs' fixed scales (z 2^-12, Fourier 2^-14) into the weights
    in_scales = torch.tensor([2.0 ** -Z_EXPONENT] * 3 + [2.0 ** -FOURIER_EXPONENT] * 12, dtype=torch.float64)
    _conv(out, "conv_in", net.conv_in.weight.double() * in_scales[None, :, None, None], net.conv_in.bias)

    def block(name, module, cond_list):
        _norm(out, f"{name}.norm1", module.net1[0])
        projected = torch.stack([module.cond_proj.weight.double() @ c for c in cond_list])  # (steps, C)
        _conv(out, f"{name}.conv1", module.net1[2].weight, module.net1[2].bias.double()[None] + projected)
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


@torch.no_grad()
def _time_embedding(net, gamma: float) -> torch.Tensor:
    """The time MLP's output for one log-SNR, in float64 (computed once, at import)."""
    lo, hi = net.gamma_range
    dim = net.time_embed[0].in_features
    t = torch.tensor([1000.0 * (gamma - lo) / (hi - lo)], dtype=torch.float64)
    angles = t[:, None] * torch.logspace(0.0, -4.0, dim // 2, dtype=torch.float64)[None, :]
    features = torch.cat([angles.sin(), angles.cos()], dim=1)
    mlp = [m.double() if isinstance(m, torch.nn.Linear) else m for m in copy.deepcopy(net.time_embed)]
    for layer in mlp:
        features = layer(features)
    return features[0]


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


