"""Train CDC's context entropy model on frozen transforms: released weights in, new weights out.

    python -m jobs.train_context --source cdc-hp128 --name cdc-hp128-ctx --run-dir runs/cdc-hp128-ctx

What it learns: the rate of y under the context model (context.py), on the latents the
released encoder gives training crops at every rate point; g_a, g_s, the gains and the
exact hyperprior stay as they are (model/cdc/frozen.py: the latent cache and the restartable
loop, shared with train_hyper). The export adds the exact integer context nets
(exact_parts.export_context) and fp16 float copies (for later joint training) to the source's
tensors, under a new name: the source's streams keep decoding.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..registry import SHIPPED_DIR, Weights, load_codec, save_weights
from .config import CDCConfig
from .context import ContextModel
from .exact_parts import export_context
from .frozen import FrozenTrainConfig, LatentCache, train_rate
from .model import gaussian_likelihood

log = logging.getLogger(__name__)

#: ELIC's uneven split of 320 channels (16, 16, 32, 64, 192), scaled to our m = 192
DEFAULT_GROUPS = (16, 16, 32, 64, 64)


@dataclass(frozen=True)
class ContextTrainConfig(FrozenTrainConfig):
    groups: tuple[int, ...] = DEFAULT_GROUPS


def rate_bits(context: ContextModel, config: CDCConfig, y: torch.Tensor, levels: torch.Tensor,
              means: torch.Tensor) -> torch.Tensor:
    """Bits of y per latent element under the context model (uniform-noise proxy for rounding)."""
    position, mean, _ = context(y, levels, means)
    position, mean = position.float(), mean.float()
    scale = torch.exp(np.log(config.scale_min) + config.scale_step * position.clamp(0, config.scale_levels - 1))
    noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)
    return -torch.log2(gaussian_likelihood(noisy - mean, scale)).mean()


def train_context(cfg: ContextTrainConfig) -> tuple[ContextModel, list[dict], list[str]]:
    """Train (or resume) the run; returns the nets, the curve and the commands that made them."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    codec = load_codec(cfg.source, device="cpu")
    config = replace(codec.config, context_groups=tuple(cfg.groups))
    cache = LatentCache.build(codec, cfg, Path(cfg.run_dir) / "latents.safetensors")
    context = ContextModel(config.context_groups)
    curve, commands = train_rate(cfg, context, cache, lambda batch: rate_bits(context, config, *batch),
                                 "bits_per_latent")
    return context, curve, commands


def export_with_context(cfg: ContextTrainConfig, context: ContextModel, curve: list[dict], commands: list[str]
                        ) -> Path:
    """The source's weights plus the trained context nets, under `cfg.name`, and the curve beside them."""
    codec = load_codec(cfg.source, device="cpu")
    cache = LatentCache(load_file(str(Path(cfg.run_dir) / "latents.safetensors")))
    weights = with_context(codec, context, cache.batch(64, np.random.default_rng(12345)), cfg.name,
                           "; then ".join(commands) or cfg.provenance, steps=curve[-1]["step"] if curve else 0)
    path = save_weights(weights, cfg.export or SHIPPED_DIR / f"{cfg.name}.safetensors", replace=True)
    with open(path.with_suffix(".context-curve.json"), "w") as f:
        json.dump(curve, f)
    log.info("exported %s (%d bytes)", path, path.stat().st_size)
    return path


def with_context(codec, context: ContextModel, calibration: tuple[torch.Tensor, ...], name: str, how: str,
                 steps: int = 0) -> Weights:
    """New weights: `codec`'s (a hyperprior CDC) plus the context nets as exact integers (calibrated
    on `calibration` = frozen_latents of training crops) and as fp16 floats (for later training)."""
    source = codec.weights
    config = replace(codec.config, context_groups=context.groups)
    tensors = dict(source.tensors)
    tensors.update({f"exact.{k}": v for k, v in export_context(context, *calibration).items()})
    tensors.update({f"context.{k}": v.detach().half() for k, v in context.state_dict().items()})
    return Weights("cdc", name, {**source.config, "model": config.to_dict()}, tensors,
                   f"{source.provenance}; then: {how}", {**(source.training or {}), "context_steps": steps})
