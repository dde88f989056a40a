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
from .model import gaussian_likelihood, scale_of, ste_round

log = logging.getLogger(__name__)

#: ELIC's uneven split of 320 channels (16, 16, 32, 64, 192), scaled to our m = 192
DEFAULT_GROUPS = (16, 16, 32, 64, 64)


@dataclass(frozen=True)
class ContextTrainConfig(FrozenTrainConfig):
    groups: tuple[int, ...] = DEFAULT_GROUPS
    init_from: str | None = None    # released weights whose context nets (same groups) a new run starts from
    rounded_rate: bool = False      # the rate with y - mean rounded as coded, not the uniform-noise proxy


def rate_bits(context: ContextModel, config: CDCConfig, y: torch.Tensor, levels: torch.Tensor,
              means: torch.Tensor, rounded: bool = False) -> torch.Tensor:
    """Bits of y per latent element under the context model: y plus uniform noise (the usual proxy
    for rounding), or with `rounded` y - mean rounded as coded, gradients straight through (what
    train_hyper needs). For the context nets it did not pay: 8,000 rounded steps from
    cdc-hp128-ctx changed the dev photos' bits by -0.7% / 0.0% / +0.5% at q0 / q4 / q7."""
    position, mean, _ = context(y, levels, means)
    scale = scale_of(config, position.float())
    mean = mean.float()
    if rounded:
        return -torch.log2(gaussian_likelihood(ste_round(y - mean), scale)).mean()
    noisy = y + torch.empty_like(y).uniform_(-0.5, 0.5)
    return -torch.log2(gaussian_likelihood(noisy - mean, scale)).mean()


def train_context(cfg: ContextTrainConfig) -> tuple[ContextModel, list[dict], list[str]]:
    """Train (or resume) the run; returns the nets, the curve and the commands that made them."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    codec = load_codec(cfg.source, device="cpu")
    config = replace(codec.config, context_groups=tuple(cfg.groups))
    context = ContextModel(config.context_groups)
    if cfg.init_from:  # (a resumed run then loads its checkpoint over these)
        context.load_state_dict(released_context(cfg.init_from, config.context_groups))
    train, held_out = LatentCache.build(codec, cfg, Path(cfg.run_dir) / "latents.safetensors").split()
    held_out_batch = (held_out.y, held_out.levels.float(), held_out.means)

    def held_out_bits() -> dict:  # as coded (rounded): a figure that does not move with the noise
        return {"held_out_bits_per_latent": float(rate_bits(context, config, *held_out_batch, rounded=True))}

    curve, commands = train_rate(cfg, context, train,
                                 lambda batch: rate_bits(context, config, *batch, rounded=cfg.rounded_rate),
                                 "bits_per_latent", held_out_bits)
    return context, curve, commands


def released_context(name: str, groups: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The float context nets (fp16 copies) of released weights, as float32; ValueError if they
    have none or other groups."""
    codec = load_codec(name, device="cpu")
    if tuple(codec.config.context_groups or ()) != tuple(groups):
        raise ValueError(f"{name} has context groups {codec.config.context_groups or 'none'}, not {tuple(groups)}")
    return {k[len("context."):]: v.float() for k, v in codec.weights.tensors.items() if k.startswith("context.")}


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
