"""Typed configs for CDC: the network sizes (CDCConfig, stored in every weights file) and
the training run (TrainConfig). Both are frozen and refuse keys they do not know, so a
typo fails loudly instead of slipping into a weights file's config and digest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields, replace

from ..paths import TRAIN_PHOTOS


def _check_keys(cls: type, given: dict) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")


@dataclass(frozen=True)
class CDCConfig:
    """Network sizes. The dict form (`to_dict`) is what a weights file stores and digests."""

    preset: str
    encoder_widths: tuple[int, ...]
    latent_channels: int
    hyper_channels: int
    context_widths: tuple[int, ...]
    unet_widths: tuple[int, ...]
    attention: bool
    default_steps: int   # DDIM steps when a decoder does not say

    @classmethod
    def from_dict(cls, config: dict) -> CDCConfig:
        """A preset ("small" unless `config["preset"]` names another) with `config`'s values on top."""
        _check_keys(cls, config)
        preset = config.get("preset", "small")
        if preset not in PRESETS:
            raise ValueError(f"unknown CDC preset {preset!r}; known presets: {sorted(PRESETS)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        return replace(PRESETS[preset], **values)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


#: "small" trains on one CPU core; "paper" follows the authors' widths.
PRESETS: dict[str, CDCConfig] = {
    "small": CDCConfig(preset="small", encoder_widths=(16, 32, 48, 64), latent_channels=64, hyper_channels=32,
                       context_widths=(16, 32, 32, 64), unet_widths=(16, 32, 32, 64),
                       attention=False, default_steps=4),
    "paper": CDCConfig(preset="paper", encoder_widths=(64, 128, 192, 256), latent_channels=256,
                       hyper_channels=256, context_widths=(64, 128, 192, 256),
                       unet_widths=(64, 128, 192, 256, 320, 384), attention=True, default_steps=16),
}


@dataclass(frozen=True)
class TrainConfig:
    """One training run (model.cdc.train.train). jobs.train takes its flags' defaults from here."""

    name: str                      # registry name of the exported weights
    beta: float                    # rate weight: loss = beta * bpp + ...
    steps: int                     # total optimizer steps (a resumed run continues to it)
    model: CDCConfig = PRESETS["small"]
    rho: float = 0.0               # weight of the 1 - MS-SSIM term
    max_minutes: float = 1e9       # stop (and checkpoint) after this long
    batch_size: int = 4
    crop: int = 128
    lr: float = 4e-4
    aux_lr: float = 1e-2           # learning rate of the z-density quantiles
    init_from: str | None = None   # weights file to fine-tune from
    data: str = str(TRAIN_PHOTOS)  # folder of training photos
    run_dir: str | None = None     # checkpoints go to <run_dir>/checkpoint; None: no checkpoints
    export: str | None = None      # weights file to write (None: model/weights/<name>.safetensors)
    provenance: str = ""           # the command that made the weights
    seed: int = 0
    threads: int = 1               # torch threads per worker
    log_every: int = 50
    checkpoint_every: int = 250
    # Where this copy of the loop runs (set per Ray Train worker).
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @classmethod
    def from_dict(cls, config: dict) -> TrainConfig:
        _check_keys(cls, config)
        model = config.get("model", PRESETS["small"])
        return cls(**{**config, "model": model if isinstance(model, CDCConfig) else CDCConfig.from_dict(model)})

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "model": self.model.to_dict()}
