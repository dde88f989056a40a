"""UQDM's denoising network: the VDM score UNet at full resolution (no down-sampling).

Given a noisy latent z_t and its log-SNR gamma_t, it predicts the noise eps and, because
UQDM learns the prior's scale, a positive per-dimension factor for that scale.
Parameters are registered in the same order as the authors' network so that their EMA
weights (a list in parameter order) load by position.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, ch_in: int, ch_out: int, cond_dim: int, groups: int):
        super().__init__()
        self.net1 = nn.Sequential(nn.GroupNorm(groups, ch_in), nn.SiLU(), nn.Conv2d(ch_in, ch_out, 3, padding=1))
        self.cond_proj = nn.Linear(cond_dim, ch_out, bias=False)
        self.net2 = nn.Sequential(nn.GroupNorm(groups, ch_out), nn.SiLU(), nn.Conv2d(ch_out, ch_out, 3, padding=1))
        self.skip = nn.Conv2d(ch_in, ch_out, 1) if ch_in != ch_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.net1(x) + self.cond_proj(cond)[:, :, None, None]
        return self.skip(x) + self.net2(h)


class SelfAttention(nn.Module):
    """Single-head global self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (batch, heads=1, pixels, channels), contiguous: the fused kernel is 9x slower on views.
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).contiguous().unbind(1)
        # Fused attention: ~10x faster than two einsums here, never materializes the
        # 4096x4096 weights, and (measured) gives the same bits for any thread count or batch.
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class ScoreNet(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        ch, groups, channels = cfg["embedding_dim"], cfg["norm_groups"], cfg["n_channels"]
        if cfg["attention_everywhere"] or cfg["n_attention_heads"] != 1 or cfg["dropout_prob"]:
            raise ValueError("only the released UQDM architecture is supported "
                             "(attention in the middle only, one head, no dropout)")
        self.gamma_range = (cfg["gamma_min"], cfg["gamma_max"])
        self.channels = channels
        self.fourier_exponents = (5.0, 6.0) if cfg["use_fourier_features"] else ()
        self.time_embed = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch), nn.SiLU())
        self.conv_in = nn.Conv2d(channels * (1 + 2 * len(self.fourier_exponents)), ch, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(ch, ch, 4 * ch, groups) for _ in range(cfg["n_blocks"]))
        self.mid1 = ResBlock(ch, ch, 4 * ch, groups)
        self.mid_attn = SelfAttention(ch, groups)
        self.mid2 = ResBlock(ch, ch, 4 * ch, groups)
        self.up = nn.ModuleList(ResBlock(2 * ch, ch, 4 * ch, groups) for _ in range(cfg["n_blocks"] + 1))
        self.conv_out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, 2 * channels, 3, padding=1))

    def forward(self, z: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (eps_hat, scale_factor), both shaped like z; gamma is one scalar for the batch."""
        # One embedding row for the whole batch: a batched Linear would give each sample
        # slightly different bits depending on the batch size.
        cond = self.time_embed(self._time_features(gamma.reshape(1), self.time_embed[0].in_features))
        h = self.conv_in(torch.cat([z, *self._fourier(z)], dim=1))
        skips = [h]
        for block in self.down:
            h = block(h, cond)
            skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, cond)), cond)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), cond)
        eps, scale = self.conv_out(h).split(self.channels, dim=1)
        # The network predicts a residual on z; the scale factor is biased towards 1.
        return eps + z, F.softplus(scale + math.log(math.expm1(1.0)))

    def _time_features(self, gamma: torch.Tensor, dim: int) -> torch.Tensor:
        lo, hi = self.gamma_range
        t = 1000.0 * (gamma - lo) / (hi - lo)  # roughly [0, 1000], as in DDPM
        freqs = torch.logspace(0.0, -4.0, dim // 2, device=gamma.device)
        angles = t[:, None].float() * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def _fourier(self, z: torch.Tensor) -> list[torch.Tensor]:
        if not self.fourier_exponents:
            return []
        freqs = torch.tensor([2.0 ** e * 2 * math.pi for e in self.fourier_exponents], dtype=z.dtype, device=z.device)
        angles = (freqs[None, :, None, None, None] * z[:, None]).flatten(1, 2)
        return [angles.sin(), angles.cos()]
