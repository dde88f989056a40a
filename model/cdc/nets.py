"""CDC networks: analysis/hyper transforms, the conditioning decoder and the denoising UNet.

Shapes (H, W multiples of 64): image (B,3,H,W) -> y (B,Cy,H/16,W/16) -> z (B,Ch,H/64,W/64).
The conditioning decoder turns y-hat into features at H/8, H/4, H/2 and H that are
concatenated into the first four levels of the UNet's down path (Yang & Mandt 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ResBlock(nn.Module):
    """Two 3x3 convs with a residual path; optionally shifted by a time embedding.

    The encoder-side blocks run without normalization: GroupNorm statistics over a
    128 px training crop differ from those over a whole photo, which would make the
    latents depend on the image size.
    """

    def __init__(self, c_in: int, c_out: int, time_dim: int = 0, norm: bool = True):
        super().__init__()
        make_norm = group_norm if norm else (lambda c: nn.Identity())
        self.norm1, self.conv1 = make_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = make_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out) if time_dim else None
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(t_emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class LinearAttention(nn.Module):
    """Linear-cost self-attention (softmax over keys' positions), residual."""

    def __init__(self, channels: int, heads: int = 4, head_dim: int = 32):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, inner * 3, 1, bias=False)
        self.out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, -1, h * w).unbind(1)
        q, k = q.softmax(dim=-2), k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, -1, h, w)
        return x + self.out(out)


def downsample(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AnalysisTransform(nn.Module):
    """Image in [-1, 1] -> continuous latent y at 1/16 resolution."""

    def __init__(self, widths: list[int], latent_channels: int):
        super().__init__()
        layers, c = [], 3
        for width in widths:
            layers += [ResBlock(c, width, norm=False), downsample(width, width)]
            c = width
        layers.append(nn.Conv2d(c, latent_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class HyperAnalysis(nn.Module):
    """y -> hyper-latent z at 1/4 of y's resolution."""

    def __init__(self, latent_channels: int, hyper_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(latent_channels, hyper_channels, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(hyper_channels, hyper_channels, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Conv2d(hyper_channels, hyper_channels, 5, stride=2, padding=2))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class HyperSynthesis(nn.Module):
    """z-hat -> (scales, means) of the Gaussian prior over y."""

    def __init__(self, latent_channels: int, hyper_channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ConvTranspose2d(hyper_channels, hyper_channels, 5, 2, 2, output_padding=1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(hyper_channels, hyper_channels, 5, 2, 2, output_padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(hyper_channels, 2 * latent_channels, 3, padding=1))

    def forward(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scales, means = self.net(z_hat).chunk(2, dim=1)
        return scales, means


class ConditioningDecoder(nn.Module):
    """y-hat -> features at 1/8, 1/4, 1/2, 1/1, returned finest first (the UNet's order)."""

    def __init__(self, latent_channels: int, widths: list[int]):
        super().__init__()
        self.stages = nn.ModuleList()
        c = latent_channels
        for width in reversed(widths):  # coarsest stage first
            self.stages.append(nn.ModuleList([Upsample(c, width), ResBlock(width, width, norm=False)]))
            c = width

    def forward(self, y_hat: torch.Tensor) -> list[torch.Tensor]:
        features, h = [], y_hat
        for up, block in self.stages:
            h = block(up(h))
            features.append(h)
        return features[::-1]


class TimeEmbedding(nn.Module):
    """Continuous diffusion time t in [0, 1] -> vector, via sinusoids and an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class ConditionalUNet(nn.Module):
    """Predicts the clean image x0 from (x_t, t) and the conditioning features.

    Level i of the down path (resolution 1/2^i) takes `context[i]` concatenated to its input.
    """

    def __init__(self, widths: list[int], context_widths: list[int], attention: bool):
        super().__init__()
        time_dim = widths[0]
        self.time = TimeEmbedding(time_dim)
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        c = widths[0]
        for i, width in enumerate(widths):
            c_ctx = context_widths[i] if i < len(context_widths) else 0
            last = i == len(widths) - 1
            self.down.append(nn.ModuleList([
                ResBlock(c + c_ctx, width, time_dim),
                LinearAttention(width) if attention else nn.Identity(),
                nn.Identity() if last else downsample(width, width)]))
            c = width
        self.mid = ResBlock(c, c, time_dim)
        self.mid_attention = LinearAttention(c) if attention else nn.Identity()
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            width = widths[i]
            self.up.append(nn.ModuleList([
                ResBlock(c + width, width, time_dim),
                LinearAttention(width) if attention else nn.Identity(),
                Upsample(width, widths[i - 1]) if i > 0 else nn.Identity()]))
            c = widths[i - 1] if i > 0 else width
        self.head = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: list[torch.Tensor]) -> torch.Tensor:
        t_emb = self.time(t)
        h, skips = self.stem(x_t), []
        for i, (block, attn, down) in enumerate(self.down):
            if i < len(context):
                h = torch.cat([h, context[i]], dim=1)
            h = attn(block(h, t_emb))
            skips.append(h)
            h = down(h)
        h = self.mid_attention(self.mid(h, t_emb))
        for block, attn, up in self.up:
            h = up(attn(block(torch.cat([h, skips.pop()], dim=1), t_emb)))
        return self.head(h)
