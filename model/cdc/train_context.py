"""Train CDC's context entropy model on frozen transforms: released weights in, new weights out.

    python -m jobs.train_context --source cdc-hp128 --name cdc-hp128-ctx --run-dir runs/cdc-hp128-ctx

What it learns: the rate of y under the context model (context.py), on the latents the
released encoder gives training crops at every rate point; g_a, g_s, the gains and the
exact hyperprior stay as they are (y-hat = round(y - mean) + mean moves by less than a
quantization step whatever the mean, so the distortion does not depend on it and only
the rate is trained). Latents are computed once into a cache (the encoder is most of the
cost), then training runs many cheap steps on them.

The run is restartable: <run_dir>/checkpoint holds the nets, the optimizer and the curve,
replaced atomically; rerunning the same command continues. The export adds the exact
integer context nets (exact_parts.export_context) and fp16 float copies (for later joint
training) to the source's tensors, under a new name: the source's streams keep decoding.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_path
from ..paths import TRAIN_PHOTOS
from ..registry import SHIPPED_DIR, Weights, load_codec, save_weights
from ..training import CropSampler, load_optimizer_state, save_checkpoint
from .config import CDCConfig
from .context import ContextModel
from .exact_parts import export_context
from .model import gaussian_likelihood
from .train import to_unit

log = logging.getLogger(__name__)

#: ELIC's uneven split of 320 channels (16, 16, 32, 64, 192), scaled to our m = 192
DEFAULT_GROUPS = (16, 16, 32, 64, 64)


@dataclass(frozen=True)
class ContextTrainConfig:
    source: str                     # released CDC weights (name or path) whose transforms stay frozen
    name: str                       # registry name of the new weights
    run_dir: str
    groups: tuple[int, ...] = DEFAULT_GROUPS
    steps: int = 3000
    batch_size: int = 16
    crops: int = 1024               # latents cached: crops x one random rate point each
    crop: int = 256
    lr: float = 1e-3
    data: str = str(TRAIN_PHOTOS)
    scales: tuple[float, ...] = (1.0, 0.6)
    seed: int = 0
    threads: int = 2
    bf16: bool = True               # autocast the nets' convolutions (likelihoods stay float32)
    export: str | None = None       # weights file (None: model/weights/<name>.safetensors)
    provenance: str = ""
    log_every: int = 50
    checkpoint_every: int = 250


class LatentCache:
    """y, base levels and base means of training crops under the frozen encoder (float32 on disk)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.y, self.levels, self.means = tensors["y"], tensors["levels"], tensors["means"]

    @classmethod
    def build(cls, codec, cfg: ContextTrainConfig, path: Path) -> LatentCache:
        if path.is_file():
            return cls(load_file(str(path)))
        sampler = CropSampler(cfg.data, cfg.crop, cfg.seed + 7, cfg.scales)
        rng = np.random.default_rng(cfg.seed + 8)
        parts: dict[str, list[torch.Tensor]] = {"y": [], "levels": [], "means": []}
        started = time.time()
        for start in range(0, cfg.crops, 8):
            images = to_unit(sampler.batch(min(8, cfg.crops - start)))
            rates = torch.from_numpy(rng.integers(len(codec.rate_names), size=images.shape[0]))
            y, levels, means = frozen_latents(codec, images, rates)
            for key, value in (("y", y.float()), ("levels", levels.to(torch.int16)), ("means", means.float())):
                parts[key].append(value)
            log.info("latent cache: %d of %d crops (%.0f s)", start + images.shape[0], cfg.crops, time.time() - started)
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        with atomic_path(path) as partial:
            save_file(tensors, str(partial))
        return cls(tensors)

    def batch(self, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(rng.integers(self.y.shape[0], size=size))
        return self.y[index], self.levels[index].float(), self.means[index]


@torch.no_grad()
def frozen_latents(codec, images: torch.Tensor, rates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the codec's encoder computes before coding y: y (float64), the exact hyperprior's levels and means."""
    model = codec.model
    y = model.g_a(images).double() * model.gains(rates)[0].double()
    z = torch.round(model.h_a(y.float()).double())
    limit = codec.hyper.z_widths.to(z.dtype)[None, :, None, None].expand_as(z)
    z = torch.maximum(torch.minimum(z, limit), -limit)
    levels, means = codec.hyper(z)
    return y, levels, means


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
    optimizer = torch.optim.Adam(context.parameters(), lr=cfg.lr)
    checkpoint = Path(cfg.run_dir) / "checkpoint"
    state = {"step": 0, "curve": [], "elapsed_s": 0.0}
    rng = np.random.default_rng(cfg.seed)
    if (checkpoint / "state.json").is_file():
        state = _resume(checkpoint, context, optimizer, rng)
    # the provenance: every command that worked on this run, in order (a resumed run may change --steps)
    state.setdefault("commands", [])
    if cfg.provenance and cfg.provenance not in state["commands"][-1:]:
        state["commands"].append(cfg.provenance)
    started, before, window = time.time(), state["elapsed_s"], []
    while state["step"] < cfg.steps:
        lr = cfg.lr * (0.1 if state["step"] >= 0.8 * cfg.steps else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):  # the nets' convolutions
            bits = rate_bits(context, config, *cache.batch(cfg.batch_size, rng))
        optimizer.zero_grad(set_to_none=True)
        bits.backward()
        optimizer.step()
        window.append(float(bits.detach()))
        state["step"] += 1
        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
            state["elapsed_s"] = before + time.time() - started
            state["curve"].append({"step": state["step"], "elapsed_s": round(state["elapsed_s"], 1),
                                   "bits_per_latent": float(np.mean(window)), "lr": lr})
            window = []
            log.info("%s", json.dumps(state["curve"][-1]))
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
            state["elapsed_s"] = before + time.time() - started
            state["rng"] = rng.bit_generator.state
            save_checkpoint(checkpoint, context, optimizer, state)
    return context, state["curve"], state["commands"]


def _resume(checkpoint: Path, context: ContextModel, optimizer, rng: np.random.Generator) -> dict:
    state = json.loads((checkpoint / "state.json").read_text())
    context.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    load_optimizer_state(checkpoint, optimizer, state.pop("param_groups"))
    rng.bit_generator.state = state["rng"]
    log.info("resuming %s at step %d", checkpoint, state["step"])
    return state


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
