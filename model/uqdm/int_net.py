"""UQDM's score network in exact integer arithmetic (see `model.exact` for the scheme).

`quantize.quantize_net` turns the float network (the authors' EMA weights) into integer
weights, per-step biases (the time embedding only ever sees the T step values, so it
folds into the first convolution's bias of every block) and per-step activation
exponents calibrated on photos. `IntScoreNet` evaluates it: the same integers on every
machine, for any batch size and thread count, on CPU or GPU.

Activation sites (each an integer tensor at scale 2^-e[site, step]):
    z (fixed 2^-12), Fourier features (fixed 2^-14), then per block the GroupNorm outputs,
    the hidden activation and the block output; attention's q, k, v and result; the
    network's eps and scale outputs.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .. import exact
from ..exact import INT16
from ..exact.tables import EXP_FRAC, SIN_FRAC, SIN_PERIOD, torch_table

Z_EXPONENT = 12        # latents live on a 2^-12 grid
FOURIER_EXPONENT = SIN_FRAC
SOFTPLUS_SHIFT = 0.5413248546129181  # log(e - 1): the scale output is softplus(raw + this)
_ATTENTION_ROWS = 512  # query rows per block: 16 MB of scores, fast in cache (measured)


@lru_cache(maxsize=4)
def _exp_table(device: str) -> torch.Tensor:
    table = torch_table("EXP", device).to(torch.float64)
    return torch.cat([table, table.new_zeros(1)])


def block_names(n_blocks: int) -> list[str]:
    return [f"down{i}" for i in range(n_blocks)] + ["mid1", "mid2"] + [f"up{i}" for i in range(n_blocks + 1)]


def site_names(n_blocks: int) -> list[str]:
    sites = ["conv_in"]
    for name in block_names(n_blocks):
        sites += [f"{name}.norm1", f"{name}.hidden", f"{name}.norm2", f"{name}.out"]
        if name == "mid1":
            sites += ["attn.norm", "attn.q", "attn.k", "attn.v", "attn.mix", "attn.out"]
    return sites + ["out.norm", "out.eps", "out.scale"]


# ---------------------------------------------------------------------- integer evaluation
class IntScoreNet:
    """Evaluates the quantized network; tensors float64 (integer-valued) on `device`."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict, device: torch.device):
        self.device = device
        self.groups, self.channels = config["norm_groups"], config["n_channels"]
        self.n_blocks = config["n_blocks"]
        self.eps = 1e-5
        self.t = {k: v.to(device=device, dtype=torch.float64) for k, v in tensors.items()}
        sites = site_names(self.n_blocks)
        table = tensors["exponents"].tolist()
        self.exponents = {site: row for site, row in zip(sites, table)}

    def e(self, site: str, step: int) -> int:
        return self.exponents[site][step]

    def __call__(self, z: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """z: integer latents (B, 3, H, W) at 2^-12. Returns (eps_raw at 2^-e[out.eps], softplus at 2^-16)."""
        fourier = self._fourier(z)
        x = torch.cat([z, fourier], dim=1)
        h = self._conv_requant("conv_in", x, 0, self.e("conv_in", step), step)
        exp_h = [self.e("conv_in", step)] * h.shape[1]
        skips = [(h, exp_h)]
        for i in range(self.n_blocks):
            h, exp_h = self._block(f"down{i}", h, exp_h, step)
            skips.append((h, exp_h))
        h, exp_h = self._block("mid1", h, exp_h, step)
        h, exp_h = self._attention(h, exp_h, step)
        h, exp_h = self._block("mid2", h, exp_h, step)
        for i in range(self.n_blocks + 1):
            skip, exp_skip = skips.pop()
            h, exp_h = self._block(f"up{i}", torch.cat([h, skip], dim=1), exp_h + exp_skip, step)
        a = self._norm_silu("out.norm", h, exp_h, step)
        acc = self._acc("out.conv", a, self.e("out.norm", step), step)
        e_eps, e_scale = self.e("out.eps", step), self.e("out.scale", step)
        scale_w = self.t["out.conv.scale"] * float(2.0 ** -self.e("out.norm", step))
        c = self.channels
        eps = exact.requantize(acc[:, :c], scale_w[:c] * float(2.0 ** e_eps))
        raw = exact.requantize(acc[:, c:], scale_w[c:] * float(2.0 ** e_scale))
        return eps, exact.softplus_lookup(raw, e_scale)

    # ----- pieces
    def _fourier(self, z: torch.Tensor) -> torch.Tensor:
        """sin/cos(2 pi 2^e z) for e = 5, 6 on the 2^-12 grid: exact table lookups (value at 2^-14)."""
        table = torch_table("SIN", str(z.device)).to(z.dtype)
        zi = z.long()
        phases = [(zi * 32) % 4096 // 32, (zi * 64) % 4096 // 32]  # index of 2 pi 2^e z on a 128-step circle
        sines = [table[p % SIN_PERIOD] for p in phases]
        cosines = [table[(p + SIN_PERIOD // 4) % SIN_PERIOD] for p in phases]
        return torch.cat(sines + cosines, dim=1)

    def _in_scale(self, exponents: list[int]) -> torch.Tensor:
        return torch.tensor([2.0 ** -e for e in exponents], dtype=torch.float64, device=self.device)

    def _acc(self, name: str, x: torch.Tensor, in_exponent: int, step: int, in_exponents: list[int] | None = None):
        """Accumulator of an integer conv whose input has one exponent (or one per channel for 1x1 skips)."""
        weight = self.t[f"{name}.weight"]
        scale = self.t[f"{name}.scale"]
        if in_exponents is not None:  # fold per-channel input scales into the (integer) weights exactly
            ratios = self._in_scale(in_exponents) * float(2.0 ** max(in_exponents))
            weight = weight * ratios[None, :, None, None]
            in_exponent = max(in_exponents)
        bias = self.t[f"{name}.bias"]
        # bias in accumulator units: b / (scale * 2^-e_in), rounded (exactly representable integers)
        unit = scale * float(2.0 ** -in_exponent)
        bias_acc = torch.round(bias[step] / unit if bias.dim() == 2 else bias / unit)
        k = weight.shape[-1]
        return exact.conv2d(x, weight, bias_acc, padding=k // 2)

    def _conv_requant(self, name: str, x: torch.Tensor, in_exponent: int, out_exponent: int, step: int):
        acc = self._acc(name, x, in_exponent, step)
        return exact.requantize(acc, self.t[f"{name}.scale"] * float(2.0 ** (out_exponent - in_exponent)))

    def _norm_silu(self, site: str, x: torch.Tensor, exponents: list[int], step: int, silu: bool = True):
        name = site
        out_e = self.e(site, step)
        groups = self.groups
        per_group = len(exponents) // groups
        group_e = exponents[::per_group]
        if any(len(set(exponents[g * per_group:(g + 1) * per_group])) != 1 for g in range(groups)):
            raise ValueError(f"{site}: every GroupNorm group needs one input scale")
        eps_scaled = torch.tensor([self.eps * 4.0 ** e for e in group_e], dtype=torch.float64, device=self.device)
        y = exact.group_norm(x, groups, self.t[f"{name}.gamma"], self.t[f"{name}.beta"], eps_scaled, out_e)
        return exact.silu(y, out_e) if silu else y

    def _block(self, name: str, x: torch.Tensor, exponents: list[int], step: int):
        e_n1, e_h, e_n2, e_out = (self.e(f"{name}.{s}", step) for s in ("norm1", "hidden", "norm2", "out"))
        a1 = self._norm_silu(f"{name}.norm1", x, exponents, step)
        hidden = self._conv_requant(f"{name}.conv1", a1, e_n1, e_h, step)
        a2 = self._norm_silu(f"{name}.norm2", hidden, [e_h] * hidden.shape[1], step)
        acc2 = self._acc(f"{name}.conv2", a2, e_n2, step)
        main = acc2 * (self.t[f"{name}.conv2.scale"] * float(2.0 ** (e_out - e_n2)))[None, :, None, None]
        if f"{name}.skip.weight" in self.t:
            acc_s = self._acc(f"{name}.skip", x, 0, step, in_exponents=exponents)
            skip = acc_s * (self.t[f"{name}.skip.scale"] * float(2.0 ** (e_out - max(exponents))))[None, :, None, None]
        else:
            skip = x * self._in_scale(exponents)[None, :, None, None] * float(2.0 ** e_out)
        out = torch.round(main + skip).clamp_(-INT16, INT16)
        return out, [e_out] * out.shape[1]

    def _attention(self, x: torch.Tensor, exponents: list[int], step: int):
        e = {s: self.e(f"attn.{s}", step) for s in ("norm", "q", "k", "v", "mix", "out")}
        a = self._norm_silu("attn.norm", x, exponents, step, silu=False)
        acc = self._acc("attn.qkv", a, e["norm"], step)
        b, c3, hh, ww = acc.shape
        c = c3 // 3
        scale = self.t["attn.qkv.scale"] * float(2.0 ** -e["norm"])
        q = exact.requantize(acc[:, :c], scale[:c] * float(2.0 ** e["q"])).reshape(b, c, -1)
        k = exact.requantize(acc[:, c:2 * c], scale[c:2 * c] * float(2.0 ** e["k"])).reshape(b, c, -1)
        v = exact.requantize(acc[:, 2 * c:], scale[2 * c:] * float(2.0 ** e["v"])).reshape(b, c, -1)
        # logits = q.k * 2^-(e_q + e_k) / sqrt(c); softmax weights exp(-(max - logit)) from the table,
        # whose extra last entry is 0 (every gap beyond the table).
        to_index = float(2.0 ** (EXP_FRAC - e["q"] - e["k"]) / math.sqrt(c))
        exp_table = _exp_table(str(x.device))
        last = float(exp_table.numel() - 1)
        mix_scale = float(2.0 ** (e["mix"] - e["v"]))
        mix = torch.empty_like(v)
        for tile in range(b):  # one tile and a block of query rows at a time: the scores stay in cache
            keys, values = k[tile], v[tile].t().contiguous()
            for start in range(0, q.shape[-1], _ATTENTION_ROWS):
                scores = q[tile, :, start:start + _ATTENTION_ROWS].t() @ keys            # exact integers
                gap = scores.sub_(scores.amax(dim=-1, keepdim=True)).mul_(-to_index)     # (max - s) * c >= 0
                index = gap.round_().clamp_(max=last).int()  # int32: 3.7x cheaper than int64 here
                weights = torch.index_select(exp_table, 0, index.view(-1)).view(index.shape)
                numerator = weights @ values                                             # exact (< 2^53)
                denominator = weights.sum(dim=-1, keepdim=True)                          # exact
                mix[tile, :, start:start + _ATTENTION_ROWS] = (
                    numerator.mul_(mix_scale).div_(denominator).round_().clamp_(-INT16, INT16).t())
        mix = mix.reshape(b, c, hh, ww)
        acc_o = self._acc("attn.proj", mix, e["mix"], step)
        main = acc_o * (self.t["attn.proj.scale"] * float(2.0 ** (e["out"] - e["mix"])))[None, :, None, None]
        skip = x * self._in_scale(exponents)[None, :, None, None] * float(2.0 ** e["out"])
        out = torch.round(main + skip).clamp_(-INT16, INT16)
        return out, [e["out"]] * out.shape[1]
