"""Retrain CDC's hyperprior (h_a, h_s, z's density) smaller, on a released model's frozen transforms.

    python -m jobs.train_hyper --source cdc-hp128 --name cdc-hp128-lite --run-dir runs/cdc-hp128-lite \\
        --hyper-widths 96,128 --hyper-kernel 1

Why: decoding a stream's latents (entropy decoding + the exact integer h_s) is what CPU loader
workers do for every image, and h_s is most of it: at the default widths (m, 3m/2) it is ~5.5
kMAC a pixel, run in integer-valued float64 to be the same on every machine. A narrower h_s
with a 1x1 last layer is several times cheaper; this trainer measures what it costs in bits.

What it learns: the rate (bits of z + bits of y per pixel, rounded as coded) of the
latents the frozen encoder gives training crops (train_context's LatentCache: one random rate
point per crop), h_a starting from the source's, h_s and z's density from scratch (releases
keep only their exact integer forms). g_a, g_s, the gains and the UNet stay as they are;
y-hat = round(y - mean) + mean moves by less than a quantization step whatever the mean, so
only the rate changes. The export scores the new and the source hyperprior on the same held-out
latents by their exact tables (`coded_bpp`): the price, or the gain, of the smaller h_s.

Restartable like train_context (model/cdc/frozen.py: rerun the same command). The export
is the source's weights with the new hyperprior and its exact integer h_s and z tables, under
a new name: the source's streams keep decoding with the source.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck
from safetensors.torch import load_file
from torch import nn

from ..exact import PRECISION
from ..registry import SHIPPED_DIR, Weights, load_codec, save_weights
from ..training import write_curve
from .codec import CDCCodec
from .config import CDCConfig
from .exact_parts import export_exact
from .frozen import HELD_OUT, FrozenTrainConfig, LatentCache, train_rate
from .model import STRIDE, gaussian_likelihood, scale_of, ste_round, z_likelihood
from .nets import HyperDecoder, HyperEncoder

log = logging.getLogger(__name__)
CURVE_FIELDS = ("step", "elapsed_s", "bpp", "held_out_bpp", "lr")


@dataclass(frozen=True)
class HyperTrainConfig(FrozenTrainConfig):
    hyper_widths: tuple[int, int] = (96, 128)
    hyper_kernel: int = 1
    steps: int = 4000


class Hyperprior(nn.Module):
    """h_a, h_s and z's density of a CDC config, with the rate of latents y under them."""

    def __init__(self, config: CDCConfig):
        super().__init__()
        self.config = config
        self.h_a = HyperEncoder(config.n, config.m)
        self.h_s = HyperDecoder(config.n, config.m, config.hyper_hidden, config.hyper_kernel)
        self.z_density = EntropyBottleneck(config.n)

    def bpp(self, y: torch.Tensor) -> torch.Tensor:
        """Bits per pixel of each latent (B, M, h, w) as coded: z and y - mean rounded, gradients
        straight through the rounding. (Uniform noise instead, the usual proxy, read 0.61 bpp where
        the exact tables coded the same weights' held-out latents in 0.49: at low rates it prices
        the many near-certain zeros wrongly, so it would train the wrong thing.)"""
        z = ste_round(self.h_a(y).float())
        with torch.autocast(y.device.type, enabled=False):
            z_bits = -torch.log2(z_likelihood(self.z_density, z))
            position, mean = self.h_s(z)
            scale = scale_of(self.config, position.float())
            y_bits = -torch.log2(gaussian_likelihood(ste_round(y - mean.float()), scale))
        pixels = y.shape[-2] * y.shape[-1] * (STRIDE // 4) ** 2
        return (z_bits.sum((1, 2, 3)) + y_bits.sum((1, 2, 3))) / pixels


def train_hyper(cfg: HyperTrainConfig) -> tuple[Hyperprior, list[dict], list[str]]:
    """Train (or resume) the run; returns the hyperprior, the curve and the commands that made it."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    codec = source_codec(cfg.source)
    train, held_out = LatentCache.build(codec, cfg, Path(cfg.run_dir) / "latents.safetensors").split(HELD_OUT)
    prior = Hyperprior(replace(codec.config, hyper_widths=tuple(cfg.hyper_widths), hyper_kernel=cfg.hyper_kernel))
    prior.h_a.load_state_dict({k[len("h_a."):]: v.float() for k, v in codec.model.state_dict().items()
                               if k.startswith("h_a.")})
    curve, commands = train_rate(cfg, prior, train, lambda batch: prior.bpp(batch[0]).mean(), "bpp",
                                 lambda: {"held_out_bpp": float(prior.bpp(held_out.y).mean())})
    return prior, curve, commands


def source_codec(source: str):
    """The released codec whose transforms stay frozen; ValueError for one with a context model."""
    codec = load_codec(source, device="cpu")
    if codec.config.context_groups:
        raise ValueError(f"{source} has a context model, whose nets take h_s's output: retrain the hyperprior "
                         "of a hyperprior-only release (cdc-hp128)")
    return codec


def export_hyper(cfg: HyperTrainConfig, prior: Hyperprior, curve: list[dict], commands: list[str]) -> Path:
    """The source's weights with the new hyperprior, under `cfg.name`, and the curve beside them."""
    codec = load_codec(cfg.source, device="cpu")
    cache = LatentCache(load_file(str(Path(cfg.run_dir) / "latents.safetensors")))
    weights = with_hyperprior(codec, prior, cache.y[:HELD_OUT], cfg.name, "; then ".join(commands) or cfg.provenance,
                              steps=curve[-1]["step"] if curve else 0)
    held_out = cache.split(HELD_OUT)[1].y
    scores = {"held_out_coded_bpp": coded_bpp(CDCCodec(weights, device="cpu"), held_out),
              "source_held_out_coded_bpp": coded_bpp(codec, held_out)}
    log.info("held-out latents, coded by the exact tables: %s", json.dumps(scores))
    weights = replace(weights, training={**weights.training, **scores})
    path = save_weights(weights, cfg.export or SHIPPED_DIR / f"{cfg.name}.safetensors", replace=True)
    write_curve(curve, path.with_suffix(".hyper-curve.csv"), CURVE_FIELDS)
    log.info("exported %s (%d bytes)", path, path.stat().st_size)
    return path


@torch.no_grad()
def coded_bpp(codec, y: torch.Tensor) -> float:
    """Mean bits per pixel that `codec`'s exact tables give latents y (B, M, h, w), ideal coding
    (a stream adds its header and the coder's few bytes)."""
    z_rows, y_rows = _flat_tables(codec.hyper.z_tables), _flat_tables(codec.hyper.y_tables)
    bits = 0.0
    with codec.float_numerics():
        for one in y.double().split(1):
            z, _, parts = codec._exact_symbols(one, codec.model.h_a(one.float()).double())
            channel = torch.arange(z.shape[1])[None, :, None, None].expand_as(z).reshape(-1)
            bits += z_rows.bits(channel, z.reshape(-1), codec.hyper.z_widths)
            for k, levels in parts:
                bits += y_rows.bits(levels.reshape(-1), k.reshape(-1), codec.hyper.y_widths)
    return bits / (y.shape[0] * y.shape[-2] * y.shape[-1] * (STRIDE // 4) ** 2)


@dataclass
class _FlatTables:
    """Integer frequency rows (each over [-W_i, W_i]) concatenated, for vectorized look-ups."""
    values: torch.Tensor
    starts: torch.Tensor

    def bits(self, table: torch.Tensor, symbol: torch.Tensor, widths: torch.Tensor) -> float:
        # the coder's frequency of an entry is the row's integer + 1 (exact.frequency_rows)
        frequency = self.values[self.starts[table] + symbol + widths.long()[table]] + 1.0
        return float(-torch.log2(frequency / float(1 << PRECISION)).sum())


def _flat_tables(rows: list[np.ndarray]) -> _FlatTables:
    lengths = torch.tensor([len(row) for row in rows])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return _FlatTables(torch.from_numpy(np.concatenate(rows)).double(), starts)


@torch.no_grad()
def with_hyperprior(codec, prior: Hyperprior, calibration_y: torch.Tensor, name: str, how: str,
                    steps: int = 0) -> Weights:
    """New weights: `codec`'s with `prior` in place of its hyperprior, as fp16 floats and as the
    exact integer h_s and tables (activation exponents calibrated on the z of `calibration_y`)."""
    source = codec.weights
    z = torch.round(prior.h_a(calibration_y.float()))
    tensors = {k: v for k, v in source.tensors.items()
               if not k.startswith(("h_a.", "h_s.", "z_density.", "exact."))}
    tensors.update({k: v.detach().half() for k, v in prior.state_dict().items() if v.is_floating_point()})
    tensors.update({f"exact.{k}": v for k, v in export_exact(prior, z).items()})  # it reads h_s, z_density, config
    return Weights("cdc", name, {**source.config, "model": prior.config.to_dict()}, tensors,
                   f"{source.provenance}; then: {how}", {**(source.training or {}), "hyper_steps": steps})
