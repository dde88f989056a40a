"""Typed configs for CDC: the network (CDCConfig, stored in every weights file) and a training
run (TrainConfig). Both are frozen and refuse keys they do not know, so a typo fails loudly
instead of slipping into a weights file's config and digest.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields

from ..paths import TRAIN_PHOTOS


def _check_keys(cls: type, given: dict) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")


def _tuples(values: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


@dataclass(frozen=True)
class CDCConfig:
    """Network sizes and rate points. The dict form (`to_dict`) is what a weights file stores and digests."""

    preset: str = "hp128"
    n: int = 128                          # channels of the content transforms and of z
    m: int = 192                          # channels of the latent y
    unet_widths: tuple[int, ...] = (32, 64, 96, 128)
    # One network, several rates: MSE weights of the rate points, as compressai's zoo uses
    # them (loss = lambda * 255^2 * MSE + bpp), each with its own gain vectors on y.
    lambdas: tuple[float, ...] = (0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.0483)
    scale_min: float = 0.11               # the y scale table: scale_levels entries, log-spaced
    scale_max: float = 64.0
    scale_levels: int = 64
    default_steps: int = 0                # 0: the content path's mean image; > 0: DDIM steps
    # Rate points past the trained ones, without training: (name, trained rate, k) codes k * y
    # with that rate's tables and decodes y_hat / k (Cui et al. extend gain units the same way).
    # Appended after the trained points, so a stream's rate index never changes meaning.
    derived_rates: tuple[tuple[str, str, float], ...] = ()
    # Channel groups of y for the context entropy model (model/cdc/context.py), small first,
    # summing to m; () codes y with the hyperprior alone (cdc-hp128).
    context_groups: tuple[int, ...] = ()
    # h_s's two hidden widths and its last layer's kernel; () = (m, 3m/2), Minnen et al.'s. h_s is
    # the costly part of decoding the latents (float64-exact, ~5.5 kMAC a pixel at the default).
    hyper_widths: tuple[int, ...] = ()
    hyper_kernel: int = 3

    def __post_init__(self):
        if self.context_groups and (sum(self.context_groups) != self.m or min(self.context_groups) < 1):
            raise ValueError(f"context_groups must be positive and sum to m = {self.m}, got {self.context_groups}")
        if self.hyper_widths and (len(self.hyper_widths) != 2 or min(self.hyper_widths) < 1):
            raise ValueError(f"hyper_widths must be two positive widths, got {self.hyper_widths}")
        if self.hyper_kernel < 1 or self.hyper_kernel % 2 == 0:
            raise ValueError(f"hyper_kernel must be odd and positive, got {self.hyper_kernel}")
        trained = [f"q{i + 1}" for i in range(len(self.lambdas))]
        for name, source, scale in self.derived_rates:
            if source not in trained or not scale > 0 or name in trained:
                raise ValueError(f"derived rate {name!r} must scale a trained rate point ({', '.join(trained)}) "
                                 f"by a positive factor and have a name of its own; got ({source!r}, {scale!r})")
        if len(set(self.rate_names)) != len(self.rate_names):
            raise ValueError(f"rate point names repeat: {self.rate_names}")

    @classmethod
    def from_dict(cls, config: dict) -> CDCConfig:
        """A preset (`config["preset"]`, default "hp128") with `config`'s values on top."""
        _check_keys(cls, config)
        preset = config.get("preset", "hp128")
        if preset not in PRESETS:
            raise ValueError(f"unknown CDC preset {preset!r}; known presets: {sorted(PRESETS)}")
        config = _tuples(config)
        if "derived_rates" in config:
            config["derived_rates"] = tuple((str(n), str(s), float(k)) for n, s, k in config["derived_rates"])
        return dataclasses.replace(PRESETS[preset], **config)

    def to_dict(self) -> dict:
        config = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, at every depth
        # weights from before these options: their stored dict (hence their digest) unchanged
        for name, default in (("context_groups", ()), ("hyper_widths", ()), ("hyper_kernel", 3)):
            if getattr(self, name) == default:
                del config[name]
        return config

    @property
    def rate_names(self) -> list[str]:
        """Every rate point, as a stream's rate index numbers them: the trained ones, then the derived."""
        return [f"q{i + 1}" for i in range(len(self.lambdas))] + [name for name, _, _ in self.derived_rates]

    @property
    def hyper_hidden(self) -> tuple[int, int]:
        """h_s's two hidden widths."""
        return tuple(self.hyper_widths) if self.hyper_widths else (self.m, self.m * 3 // 2)

    @property
    def scale_step(self) -> float:
        return math.log(self.scale_max / self.scale_min) / (self.scale_levels - 1)


#: "hp128" trains on a CPU in hours and on one GPU in minutes; "paper" has the paper's widths.
PRESETS: dict[str, CDCConfig] = {
    "hp128": CDCConfig(),
    "paper": CDCConfig(preset="paper", n=192, m=320, unet_widths=(64, 128, 192, 256)),
}

STAGES = ("content", "diffusion", "joint")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage (model.cdc.train.train). jobs.train takes its flags' defaults from here.

    Stages: `content` trains the content path on rate + MSE at every rate point at once;
    `diffusion` the denoising UNet on the frozen content path; `joint` everything.
    """

    name: str                      # registry name of the exported weights
    run_dir: str                   # checkpoints go to <run_dir>/checkpoint
    stage: str = "content"
    model: CDCConfig = PRESETS["hp128"]
    steps: int = 20000             # total optimizer steps of this stage (a resumed run continues to it)
    minutes: float | None = None   # instead of `steps`: as many as fit in this many minutes
    batch_size: int = 8
    crop: int = 256
    lr: float = 1e-4
    warmup: int = 500
    decay_from: float = 0.85       # cosine decay to lr/10 over the steps after this fraction
    diffusion_weight: float = 1.0  # joint stage: weight of the diffusion loss
    init_from: str | None = None   # a checkpoint folder to start this stage from
    data: str = str(TRAIN_PHOTOS)  # folder of training photos
    scales: tuple[float, ...] = (1.0, 0.6)  # each photo is sampled at these scales
    export: str | None = None      # weights file to write (None: model/weights/<name>.safetensors)
    provenance: str = ""           # the command that made the weights
    seed: int = 0
    threads: int = 2               # torch threads per worker
    bf16: bool = True              # autocast convolutions to bfloat16 (fp32 master weights)
    log_every: int = 50
    checkpoint_every: int = 250
    # Where this copy of the loop runs (set per Ray Train worker).
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")

    @classmethod
    def from_dict(cls, config: dict) -> TrainConfig:
        _check_keys(cls, config)
        model = config.get("model", PRESETS["hp128"])
        return cls(**{**_tuples(config), "model": model if isinstance(model, CDCConfig) else CDCConfig.from_dict(model)})

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "model": self.model.to_dict()}
