"""Training a CDC entropy model on a released model's frozen transforms: one latent cache, one loop.

train_context (the context model) and train_hyper (a smaller hyperprior) both learn only a rate:
y-hat = round(y - mean) + mean moves by less than a quantization step whatever the entropy
model says, so with g_a, g_s and the gains frozen the distortion does not change. The encoder
is most of the cost, so the latents of training crops are computed once into a cache
(<run_dir>/latents.safetensors), then many cheap steps run on them. The run is restartable:
<run_dir>/checkpoint holds the nets, the optimizer, the sampler's state and the curve, replaced
atomically; rerunning the same command continues, and every command that worked on the run is
kept (the provenance of the weights it exports).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_path
from ..paths import TRAIN_PHOTOS
from ..training import CropSampler, load_optimizer_state, save_checkpoint
from .train import to_unit

log = logging.getLogger(__name__)
HELD_OUT = 64  # the cache's last latents: scored at every log row, never trained on


@dataclass(frozen=True)
class FrozenTrainConfig:
    source: str                     # released CDC weights (name or path) whose transforms stay frozen
    name: str                       # registry name of the new weights
    run_dir: str
    steps: int = 3000
    batch_size: int = 16
    crops: int = 1024               # latents cached: crops x one random rate point each
    crop: int = 256
    lr: float = 1e-3                # Adam; a tenth over the last 20% of steps
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
    def build(cls, codec, cfg: FrozenTrainConfig, path: Path) -> LatentCache:
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

    def split(self, held_out: int = HELD_OUT) -> tuple[LatentCache, LatentCache]:
        """(all but the last `held_out` latents, those last ones); at most a quarter of a small cache."""
        held_out = min(held_out, max(1, self.y.shape[0] // 4))

        def part(rows: slice) -> LatentCache:
            return LatentCache({"y": self.y[rows], "levels": self.levels[rows], "means": self.means[rows]})

        return part(slice(None, -held_out)), part(slice(-held_out, None))

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


#: one step's loss from a cached batch (y, base levels, base means)
Loss = Callable[[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]


def train_rate(cfg: FrozenTrainConfig, nets: nn.Module, cache: LatentCache, loss: Loss, loss_name: str,
               held_out: Callable[[], dict] | None = None) -> tuple[list[dict], list[str]]:
    """Train (or resume) `nets` on `loss` over the cache; returns the curve (every log_every
    steps: the window's mean `loss_name`, then `held_out()`'s figures) and the run's commands."""
    optimizer = torch.optim.Adam(nets.parameters(), lr=cfg.lr)
    checkpoint = Path(cfg.run_dir) / "checkpoint"
    state = {"step": 0, "curve": [], "elapsed_s": 0.0}
    rng = np.random.default_rng(cfg.seed)
    if (checkpoint / "state.json").is_file():
        state = _resume(checkpoint, nets, optimizer, rng)
    state.setdefault("commands", [])
    if cfg.provenance and cfg.provenance not in state["commands"][-1:]:
        state["commands"].append(cfg.provenance)
    started, before, window = time.time(), state["elapsed_s"], []
    while state["step"] < cfg.steps:
        lr = cfg.lr * (0.1 if state["step"] >= 0.8 * cfg.steps else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):  # the nets' convolutions
            value = loss(cache.batch(cfg.batch_size, rng))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        window.append(float(value.detach()))
        state["step"] += 1
        if state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
            state["elapsed_s"] = before + time.time() - started
            with torch.no_grad():
                figures = held_out() if held_out else {}
            state["curve"].append({"step": state["step"], "elapsed_s": round(state["elapsed_s"], 1),
                                   loss_name: float(np.mean(window)), **figures, "lr": lr})
            window = []
            log.info("%s", json.dumps(state["curve"][-1]))
        if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
            state["elapsed_s"] = before + time.time() - started
            state["rng"] = rng.bit_generator.state
            save_checkpoint(checkpoint, nets, optimizer, state)
    return state["curve"], state["commands"]


def _resume(checkpoint: Path, nets: nn.Module, optimizer, rng: np.random.Generator) -> dict:
    state = json.loads((checkpoint / "state.json").read_text())
    nets.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    load_optimizer_state(checkpoint, optimizer, state.pop("param_groups"))
    rng.bit_generator.state = state["rng"]
    log.info("resuming %s at step %d", checkpoint, state["step"])
    return state
