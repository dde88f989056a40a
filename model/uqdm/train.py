"""Training UQDM: the progressive negative ELBO as the exact codec codes it, the fine-tune loop
(AdamW, grad clip, EMA, bf16 autocast, exact resume) and the export to exact weights.

The loss (`nelbo_bits`) is what `codec.UQDMCodec` spends on a tile, in float: z_1 ~ N(0, 1)
(the codec draws it from the stream's seed, `_initial_latent`: it costs nothing), then for each
of the T reverse steps t -> s the rate of the universally quantized step under the prior
p(z_s | z_t) = logistic(mu_p, scale) * U(delta) (mu_p unclipped, as the codec uses it),

    -log2 [ sigmoid((y + delta/2) / scale) - sigmoid((y - delta/2) / scale) ],  y = z_s - mu_p,

with z_s = mu_q + delta n, n ~ U(-1/2, 1/2) (universal quantization's error has exactly that
law, so this is the codec's expected size; given the codec's dither u, n is its own error and
the loss is the codec's ideal bits), and last the lossless chunk -log2 p(x | z_0), VDM's
decoder as `_pixel_model` codes it: a discretized Gaussian over the 256 levels, centre
z_0 / alpha_0, variance exp(gamma_0). The learned linear noise schedule's slope
(`gamma_slope`) is a trained parameter: the step sizes delta and the schedule follow it.

State lives in a checkpoint folder (model, EMA, optimizer, step, generators, curve), replaced
atomically (`model.training.save_checkpoint`): rerunning with the same folder continues at the
exact step with the exact crops and noise it would have drawn. The EMA weights are exported.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..files import atomic_path, recovered_folder
from ..paths import TRAIN_PHOTOS, UQDM_TINY_SOURCE
from ..registry import Weights, read_weights, save_weights
from ..training import CropSampler, load_optimizer_state, save_checkpoint, write_curve
from .net import ScoreNet

log = logging.getLogger(__name__)

CURVE_FIELDS = ["step", "loss_bpp", "lr", "seconds"]
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------- the model and its loss
class TrainableUQDM(torch.nn.Module):
    """The score network plus the noise schedule's slope, from float UQDM weights (import_checkpoint's)."""

    def __init__(self, weights: Weights):
        super().__init__()
        self.config = dict(weights.config)
        self.net = ScoreNet(self.config)
        self.net.load_state_dict({k[len("net."):]: v.float() for k, v in weights.tensors.items()
                                  if k.startswith("net.")})
        self.gamma_slope = torch.nn.Parameter(weights.tensors["gamma_slope"].float().reshape(()).clone())

    def log_snrs(self) -> torch.Tensor:
        """gamma_T, ..., gamma_0 (as quantize.log_snrs: gamma_max + |slope| (t/T - 1)), differentiable."""
        steps = self.config["n_timesteps"]
        t = torch.arange(steps, -1, -1, dtype=torch.float32) / steps
        return self.config["gamma_max"] + self.gamma_slope.abs() * (t - 1)

    def weights(self, name: str, provenance: str = "", tensors: dict[str, torch.Tensor] | None = None) -> Weights:
        """Float weights as import_checkpoint gives them (of `tensors`, a state_dict such as the EMA's)."""
        state = tensors if tensors is not None else self.state_dict()
        out = {k: v.detach().float().cpu().contiguous() for k, v in state.items() if k.startswith("net.")}
        out["gamma_slope"] = state["gamma_slope"].detach().float().cpu().reshape(())
        return Weights("uqdm", name, dict(self.config), out, provenance)


def to_latent_units(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> the codec's x: (v + 1/2) / 128 - 1 (bin centres in [-1, 1])."""
    return (x.float() + 0.5) / 128.0 - 1.0


def nelbo_bits(model: TrainableUQDM, pixels: torch.Tensor, z_1: torch.Tensor | None = None,
               dithers: list[torch.Tensor] | None = None, generator: torch.Generator | None = None,
               autocast: bool = False, parts: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Bits per image (B,) of the codec's stream for uint8 tiles `pixels` (B, 3, H, W): T step rates + lossless.

    Random by default (z_1 and the quantization errors from `generator`); with `z_1` and
    `dithers` (the codec's u of each step, in [-1/2, 1/2]) it follows the codec's own
    trajectory (hard universal quantization: no gradient through the rounding). Only the
    network runs under bf16 `autocast`; the schedule and the rates stay float32. Given a list
    `parts`, each step's bits per element (B, 3, H, W) and then the lossless term's are appended to it.
    """
    x = to_latent_units(pixels)
    gammas = model.log_snrs()
    z = torch.randn(x.shape, generator=generator) if z_1 is None else z_1.float()
    bits = x.new_zeros(x.shape[0])
    for i in range(len(gammas) - 1):
        g_t, g_s = gammas[i], gammas[i + 1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            eps, scale_factor = model.net(z, g_t)
        eps, scale_factor = eps.float(), scale_factor.float()
        expm1 = -torch.expm1(g_s - g_t)                    # sigma_{t|s}^2 / sigma_t^2
        alpha_t, alpha_s = torch.sigmoid(-g_t).sqrt(), torch.sigmoid(-g_s).sqrt()
        sigma_t, sigma_s = torch.sigmoid(g_t).sqrt(), torch.sigmoid(g_s).sqrt()
        delta = sigma_s * torch.sqrt(12 * expm1)
        p_loc = (z - eps * (sigma_t * expm1)) * (alpha_s / alpha_t)
        q_loc = z * (alpha_s * (1 - expm1) / alpha_t) + x * (alpha_s * expm1)
        scale = scale_factor * (sigma_t * expm1.sqrt() * (math.sqrt(3) / math.pi))
        if dithers is None:
            z = q_loc + delta * (torch.rand(x.shape, generator=generator) - 0.5)
        else:
            u = dithers[i].float()
            z = p_loc + (torch.round((q_loc - p_loc).detach() / delta + u) - u) * delta
        step = uq_logistic_bits(z - p_loc, delta, scale)
        if parts is not None:
            parts.append(step)
        bits = bits + step.flatten(1).sum(1)
    lossless = pixel_bits(x, z, gammas[-1])
    if parts is not None:
        parts.append(lossless)
    return bits + lossless.flatten(1).sum(1)


def uq_logistic_bits(y: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """-log2 of the logistic(0, scale) * U(delta) mass of the bin [y - delta/2, y + delta/2], stably:
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(b - a))."""
    a, b = (y + delta / 2) / scale, (y - delta / 2) / scale
    log_p = torch.nn.functional.logsigmoid(a) + torch.nn.functional.logsigmoid(-b) + torch.log(-torch.expm1(b - a))
    return -log_p / _LN2


def pixel_bits(x: torch.Tensor, z_0: torch.Tensor, gamma_0: torch.Tensor) -> torch.Tensor:
    """-log2 p(x | z_0): a Gaussian (centre z_0 / alpha_0, variance exp(gamma_0)) over the 256 levels."""
    levels = (torch.arange(256, dtype=torch.float32) + 0.5) / 128.0 - 1.0
    centre = z_0 / torch.sigmoid(-gamma_0).sqrt()
    logits = -0.5 * torch.exp(-gamma_0) * (levels - centre[..., None]) ** 2
    index = torch.round((x + 1.0) * 128.0 - 0.5).long()
    chosen = logits.gather(-1, index[..., None])[..., 0]
    return (torch.logsumexp(logits, dim=-1) - chosen) / _LN2


def codec_trajectory(codec, n_tiles: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The exact codec's z_1 and dithers for its first `n_tiles` tiles (what it draws from its seed)."""
    from .codec import U_UNIT, Z_ONE

    z_1 = codec._initial_latent(0, n_tiles).cpu() / Z_ONE
    dithers = [codec._dither(0, n_tiles, i).cpu() / U_UNIT for i in range(codec.n_steps)]
    return z_1, dithers


# ---------------------------------------------------------------------- the loop
@dataclass
class UQDMTrainConfig:
    checkpoint: str                     # the run's checkpoint folder (resumed when it holds one)
    steps: int = 2000                   # total optimizer steps; a resumed run continues to it
    minutes: float | None = None        # stop this run after so many minutes (checkpointed)
    batch_size: int = 8
    crop: int = 64
    lr: float = 5e-5
    warmup: int = 50
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    bf16: bool = True
    seed: int = 0
    threads: int = 1
    log_every: int = 10
    checkpoint_every: int = 50
    data: str = str(TRAIN_PHOTOS)
    init_from: str = str(UQDM_TINY_SOURCE)  # the authors' checkpoint folder, or float UQDM weights (.safetensors)


def initial_weights(source: str | Path) -> Weights:
    path = Path(source)
    if path.is_file():
        return read_weights(path)
    from .importer import import_checkpoint

    return import_checkpoint(path)


def learning_rate(cfg: UQDMTrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


class Trainer:
    """One fine-tune run: `run()` trains (resuming from cfg.checkpoint) until cfg.steps or cfg.minutes."""

    def __init__(self, cfg: UQDMTrainConfig, sampler: CropSampler | None = None):
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.folder = recovered_folder(cfg.checkpoint)
        self.model = TrainableUQDM(initial_weights(cfg.init_from))
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sampler = sampler or CropSampler(cfg.data, cfg.crop, cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed + 1)
        self.state = {"step": 0, "curve": [], "seconds": 0.0, "config": asdict(cfg),
                      "model_config": dict(self.model.config)}
        if (self.folder / "state.json").is_file():
            self._resume()

    def step(self, pixels: torch.Tensor) -> float:
        """One optimizer step on a batch of uint8 crops; returns the batch's loss in bits per pixel."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.state["step"])
        self.model.train()
        bits = nelbo_bits(self.model, pixels, generator=self.generator, autocast=cfg.bf16)
        loss = bits.mean() / (pixels.shape[-1] * pixels.shape[-2])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)):
            self.optimizer.step()
            self._update_ema()
        else:
            log.warning("step %d: non-finite gradient, update skipped", self.state["step"])
        self.state["step"] += 1
        return float(loss.detach())

    def _update_ema(self) -> None:
        n = self.state["step"] + 1
        decay = min(self.cfg.ema_decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                self.ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)

    def run(self) -> list[dict]:
        cfg, state = self.cfg, self.state
        started, before, window = time.time(), state["seconds"], []
        deadline = started + 60 * cfg.minutes if cfg.minutes else None
        while state["step"] < cfg.steps and not (deadline and time.time() >= deadline):
            window.append(self.step(self.sampler.batch(cfg.batch_size)))
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.steps:
                state["seconds"] = before + time.time() - started
                state["curve"].append({"step": state["step"], "loss_bpp": float(np.mean(window)),
                                       "lr": self.optimizer.param_groups[0]["lr"],
                                       "seconds": round(state["seconds"], 1)})
                window = []
                log.info("%s", json.dumps(state["curve"][-1]))
            if state["step"] % cfg.checkpoint_every == 0 or state["step"] == cfg.steps:
                state["seconds"] = before + time.time() - started
                self.save()
        if state["step"] % cfg.checkpoint_every and state["step"] != cfg.steps:  # stopped by the clock
            state["seconds"] = before + time.time() - started
            self.save()
        return state["curve"]

    def save(self) -> None:
        self.state["generator"] = self.generator.get_state().tolist()
        self.state["sampler_rng"] = self.sampler.rng.bit_generator.state
        save_checkpoint(self.folder, self.model, self.optimizer, self.state, extra={"ema": self.ema})
        write_curve(self.state["curve"], self.folder / "curve.csv", CURVE_FIELDS)

    def _resume(self) -> None:
        state = json.loads((self.folder / "state.json").read_text())
        self.model.load_state_dict(load_file(str(self.folder / "model.safetensors")))
        self.ema = load_file(str(self.folder / "ema.safetensors"))
        load_optimizer_state(self.folder, self.optimizer, state.pop("param_groups"))
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        state["config"] = asdict(self.cfg)
        self.state = state
        log.info("resuming %s at step %d of %d", self.folder, state["step"], self.cfg.steps)

    def ema_weights(self, name: str, provenance: str) -> Weights:
        return self.model.weights(name, provenance, self.ema)


# ---------------------------------------------------------------------- export
def read_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint folder's EMA weights and state (for an export without training)."""
    folder = recovered_folder(folder)
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"{folder} holds no UQDM training checkpoint (state.json, ema.safetensors)")
    return load_file(str(folder / "ema.safetensors")), json.loads((folder / "state.json").read_text())


def float_source(ema: dict[str, torch.Tensor], config: dict, name: str, provenance: str) -> Weights:
    """The exported float weights (EMA, float32), as import_checkpoint gives the authors' ones."""
    tensors = {k: v.float().contiguous() for k, v in ema.items() if k.startswith("net.")}
    tensors["gamma_slope"] = ema["gamma_slope"].float().reshape(())
    return Weights("uqdm", f"{name}-float", dict(config), tensors, provenance)


def calibration_tiles(data: str | Path, count: int = 16, seed: int = 1) -> np.ndarray:
    """(count, 3, 64, 64) uint8 random crops of the training photos for the activation exponents."""
    return CropSampler(data, 64, seed).batch(count).numpy()


def export(source: Weights, name: str, calibration_path: Path, source_path: Path, weights_path: Path,
           tiles: np.ndarray) -> Weights:
    """Calibrate on `tiles`, quantize to the exact codec; write the float source, the calibration
    record (exponents + digest) and the exact weights. Remade anywhere by `remake_exact`."""
    from .quantize import calibrate, to_exact

    exponents = calibrate(source, tiles, seed=0)
    exact = to_exact(source, exponents, name)
    record = {"about": f"Activation exponents of the exact {name} (site -> one per step), calibrated on "
                       f"{len(tiles)} random 64x64 crops of the team's training photos (model.training.CropSampler "
                       "seed 1), 2x headroom; the float source beside this file; and the digest the exact weights "
                       "made from them must have (model.uqdm.train.remake_exact).",
              "source": source_path.name, "exponents": exponents, "digest": exact.digest.hex()}
    save_weights(source, source_path, replace=True)
    with atomic_path(calibration_path) as partial:  # remake_exact trusts it: whole or absent
        partial.write_text(json.dumps(record, indent=1) + "\n")
    save_weights(exact, weights_path, replace=True)
    return exact


def remake_exact(calibration_path: Path, name: str) -> Weights:
    """The exact weights from the committed float source and calibration record, digest checked."""
    from .importer import exact_from_record

    record = json.loads(Path(calibration_path).read_text())
    source = read_weights(Path(calibration_path).with_name(record["source"]))
    return exact_from_record(source, calibration_path, name)
