"""CDC's context entropy model: channel groups and a checkerboard, ELIC-style (float, for training).

He et al., "ELIC: Efficient Learned Image Compression with Unevenly Grouped Space-Channel
Contextual Adaptive Coding" (CVPR 2022), and He et al., "Checkerboard Context Model for
Efficient Learned Image Compression" (CVPR 2021). The hyperprior (z -> h_s) gives every y
element a base scale level and mean; this model refines both from what the decoder already
has. y's channels are split into groups of uneven sizes (small first); each group is coded
in two passes over a checkerboard: the anchors (i + j even), then the rest. A group's
parameters come from its base level and mean, the decoded y of every earlier group
(channel context), and, for the second pass, a 5x5 convolution over the group's decoded
anchors (spatial context). Decoding is 2 x groups small parallel passes, never a serial scan.

Only convolutions and ReLU, so `exact_parts.ExactContext` evaluates the same network in
integer arithmetic: everything that picks a coding table stays exact. Every input the
networks see lies on a 2^-10 grid (levels are integers; means and y-hat are k + mean), the
grid of the exact model's inputs.

Shapes: y (B, M, h, w); base levels and means (B, M, h, w).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPATIAL_KERNEL = 5


def anchors(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h, w) bool: the checkerboard's first pass, positions with i + j even."""
    i = torch.arange(height, device=device)[:, None]
    j = torch.arange(width, device=device)[None, :]
    return (i + j) % 2 == 0


def group_slices(groups: tuple[int, ...]) -> list[slice]:
    starts = [sum(groups[:g]) for g in range(len(groups))]
    return [slice(s, s + c) for s, c in zip(starts, groups)]


class GroupParameters(nn.Module):
    """One channel group: (base level, base mean, spatial context, earlier y-hat) -> (level, mean) deltas."""

    def __init__(self, channels: int, earlier: int):
        super().__init__()
        hidden = max(64, 2 * channels)
        self.spatial = nn.Conv2d(channels, channels, SPATIAL_KERNEL, padding=SPATIAL_KERNEL // 2)
        self.layers = nn.ModuleList([nn.Conv2d(3 * channels + earlier, hidden, 1), nn.Conv2d(hidden, hidden, 1),
                                     nn.Conv2d(hidden, 2 * channels, 1)])
        nn.init.zeros_(self.layers[-1].weight)  # starts as the hyperprior alone
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, base_level: torch.Tensor, base_mean: torch.Tensor, decoded_anchors: torch.Tensor | None,
                earlier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous scale position and mean of every element of the group; `decoded_anchors`
        is None in the first pass, else the group's y-hat at the anchors (zero elsewhere)."""
        # anchors (first pass) have no decoded neighbours: the spatial context is its bias alone
        spatial = (self.spatial.bias[None, :, None, None].expand_as(base_mean) if decoded_anchors is None
                   else self.spatial(decoded_anchors))
        h = torch.cat([base_level, base_mean, spatial, earlier], dim=1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.relu(h)
        d_position, d_mean = h.chunk(2, dim=1)
        return base_level + d_position, base_mean + d_mean


class ContextModel(nn.Module):
    """The float model the exact one is exported from; `forward` is the training objective's part."""

    def __init__(self, groups: tuple[int, ...]):
        super().__init__()
        self.groups = tuple(groups)
        self.slices = group_slices(self.groups)
        self.nets = nn.ModuleList([GroupParameters(c, sum(self.groups[:g])) for g, c in enumerate(self.groups)])

    def forward(self, y: torch.Tensor, base_level: torch.Tensor, base_mean: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position, mean, y_hat) of every y element, coding groups and passes in the decoder's order.

        y_hat = round(y - mean) + mean is what the decoder will know; it feeds the later
        contexts (detached: contexts learn to use y-hat, not to move it).
        """
        anchor = anchors(*y.shape[-2:], device=y.device)[None, None]
        positions, means, decoded = [], [], []
        for net, part in zip(self.nets, self.slices):
            earlier = torch.cat(decoded, dim=1) if decoded else y.new_zeros(y.shape[0], 0, *y.shape[2:])
            level, mean, y_g = base_level[:, part], base_mean[:, part], y[:, part]
            pos_a, mean_a = net(level, mean, None, earlier)
            hat_a = (torch.round(y_g - mean_a) + mean_a).detach() * anchor
            pos_n, mean_n = net(level, mean, hat_a, earlier)
            position, mean = torch.where(anchor, pos_a, pos_n), torch.where(anchor, mean_a, mean_n)
            positions.append(position)
            means.append(mean)
            decoded.append((torch.round(y_g - mean) + mean).detach())
        return torch.cat(positions, 1), torch.cat(means, 1), torch.cat(decoded, 1)
