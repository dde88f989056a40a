"""CDC networks: a mean-scale hyperprior content path and a conditional denoising UNet.

Shapes (H, W multiples of 64): image (B,3,H,W) -> y (B,M,H/16,W/16) -> z (B,N,H/64,W/64).

The content decoder (g_s) is also CDC's conditioning decoder: its features at 1/8, 1/4
and 1/2 resolution and its mean image at full resolution enter the UNet's down path,
so one stream serves a 0-step decode (the mean image) and a diffusion decode.

The hyper-synthesis (h_s) decides every y symbol's coding table, so it is built from
layers that have exact integer counterparts (convolutions and ReLU, no normalization,
no z medians): see `model.cdc.exact`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from compressai.layers import GDN
from torch import nn


def conv(c_in: int, c_out: int, kernel: int = 5, stride: int = 2) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2)


def deconv(c_in: int, c_out: int, kernel: int = 5, stride: int = 2) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, kernel, stride, kernel // 2, output_padding=stride - 1)


class ContentEncoder(nn.Module):
    """g_a: image in [-1, 1] -> y at 1/16 (Ballé et al.'s GDN analysis transform)."""

    def __init__(self, n: int, m: int):
        super().__init__()
        self.net = nn.Sequential(conv(3, n), GDN(n), conv(n, n), GDN(n), conv(n, n), GDN(n), conv(n, m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContentDecoder(nn.Module):
    """g_s: y-hat -> (mean image, [features at 1/2, 1/4, 1/8])."""

    def __init__(self, n: int, m: int):
        super().__init__()
        self.up8 = nn.Sequential(deconv(m, n), GDN(n, inverse=True))
        self.up4 = nn.Sequential(deconv(n, n), GDN(n, inverse=True))
        self.up2 = nn.Sequential(deconv(n, n), GDN(n, inverse=True))
        self.out = deconv(n, 3)

    def forward(self, y_hat: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f8 = self.up8(y_hat)
        f4 = self.up4(f8)
        f2 = self.up2(f4)
        return self.out(f2), [f2, f4, f8]


class HyperEncoder(nn.Module):
    """h_a: y -> z at 1/4 of y's resolution."""

    def __init__(self, n: int, m: int):
        super().__init__()
        self.net = nn.Sequential(conv(m, n, 3, 1), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class HyperDecoder(nn.Module):
    """h_s: integer z symbols -> (scale-table position, mean) of every y element.

    Only integer-friendly layers (conv, transposed conv, ReLU): `model.cdc.exact`
    evaluates the same network in exact integer arithmetic.
    """

    def __init__(self, n: int, m: int, hidden: tuple[int, int] | None = None, kernel: int = 3):
        super().__init__()
        first, second = hidden or (m, m * 3 // 2)
        self.layers = nn.ModuleList([deconv(n, first), deconv(first, second), conv(second, 2 * m, kernel, 1)])

    def forward(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = z_hat
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        position, mean = h.chunk(2, dim=1)
        return position, mean


class TimeEmbedding(nn.Module):
    """Diffusion time t in [0, 1] -> vector (sinusoids, then an MLP)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, time_dim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(math.gcd(8, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(math.gcd(8, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t_emb)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class DenoisingUNet(nn.Module):
    """Predicts the clean image from x_t, t and the content decoder's outputs (X-parameterization).

    Level i (resolution 1/2^i) takes the conditioning at that resolution concatenated to
    its input: the mean image at 1/1, g_s's features at 1/2, 1/4, 1/8. The output is a
    correction added to the mean image, so at t = 1 the net starts from the content path's
    best guess and only has to learn texture.
    """

    def __init__(self, widths: list[int], context_widths: list[int]):
        super().__init__()
        time_dim = widths[0]
        self.time = TimeEmbedding(time_dim)
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down, self.pool = nn.ModuleList(), nn.ModuleList()
        c = widths[0]
        for i, width in enumerate(widths):
            self.down.append(ResBlock(c + context_widths[i], width, time_dim))
            self.pool.append(conv(width, width, 3, 2) if i < len(widths) - 1 else nn.Identity())
            c = width
        self.mid = ResBlock(c, c, time_dim)
        self.up, self.unpool = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up.append(ResBlock(c + widths[i], widths[i], time_dim))
            self.unpool.append(deconv(widths[i], widths[i - 1], 3) if i > 0 else nn.Identity())
            c = widths[i - 1] if i > 0 else widths[i]
        self.head = nn.Sequential(nn.GroupNorm(math.gcd(8, c), c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mean: torch.Tensor,
                context: list[torch.Tensor]) -> torch.Tensor:
        t_emb = self.time(t)
        conditioning = [mean, *context]
        h, skips = self.stem(x_t), []
        for block, pool, cond in zip(self.down, self.pool, conditioning):
            h = block(torch.cat([h, cond], dim=1), t_emb)
            skips.append(h)
            h = pool(h)
        h = self.mid(h, t_emb)
        for block, unpool in zip(self.up, self.unpool):
            h = unpool(block(torch.cat([h, skips.pop()], dim=1), t_emb))
        return mean + self.head(h)
