"""Training CDC: the loop (bf16 autocast, channels_last, exact resume), its checkpoints, the
export to a registry weights file, and the Ray Train driver (`python -m jobs.train`).

Stages (TrainConfig.stage): `content` (rate + MSE of the content path's mean image, every
rate point at once), `diffusion` (the UNet on the frozen content path), `joint`. Each stage
runs in its own run dir; the next starts from the previous one's checkpoint (`init_from`).
`init_from` may also name shipped weights (a registry name or a weights file): training then
continues from their networks, with more rate points if the config has more lambdas
(`start_from_weights`).

State lives in <run_dir>/checkpoint (model and optimizer as safetensors; step, curve and
the random generators' states as JSON), replaced atomically every `checkpoint_every`
steps: rerunning the same command continues at the exact step, with the exact crops and
noise it would have drawn (CPU; on a GPU the device's generator is not restored).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..files import recovered_folder
from ..metrics import psnr_from_mse
from ..registry import SHIPPED_DIR, Weights, read_weights, resolve, save_weights
from ..training import CropSampler, load_optimizer_state, save_checkpoint, write_curve
from .codec import TRAINING_ONLY
from .config import CDCConfig, TrainConfig
from .exact_parts import HYPER_GEOMETRY, export_exact
from .model import CDCModel

log = logging.getLogger(__name__)

CURVE_FIELDS = ["step", "elapsed_s", "stage", "loss", "bpp", "psnr_mean", "diffusion_mse", "lr"]


def to_unit(batch: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1]."""
    return batch.float() / 127.5 - 1.0


def trainable(model: CDCModel, stage: str) -> list[torch.nn.Parameter]:
    if stage == "diffusion":
        return list(model.unet.parameters())
    if stage == "content":
        return [p for name, p in model.named_parameters() if not name.startswith("unet.")]
    return list(model.parameters())


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warm-up, constant, then a cosine decay to a tenth over the last steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = int(cfg.decay_from * total)
    if step < start:
        return cfg.lr
    progress = min(1.0, (step - start) / max(1, total - start))
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, report: Callable[[dict], None] | None = None,
          wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> tuple[CDCModel, list[dict]]:
    """Run (or resume) one stage; returns the model (unwrapped) and the curve of every stage so far."""
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker and rerun
    model = CDCModel(cfg.model)
    checkpoint = recovered_folder(Path(cfg.run_dir) / "checkpoint")
    resuming = (checkpoint / "state.json").is_file()
    state = {"step": 0, "total": cfg.steps, "stage": cfg.stage, "curve": [], "elapsed_s": 0.0}
    if not resuming and cfg.init_from and not Path(cfg.init_from, "model.safetensors").is_file():
        start_from_weights(model, read_weights(resolve(cfg.init_from)))
    elif not resuming and cfg.init_from:
        load_model_state(model, Path(cfg.init_from))
        previous = Path(cfg.init_from) / "state.json"
        if previous.is_file():
            state["curve"] = json.loads(previous.read_text())["curve"]
            state["elapsed_s"] = state["curve"][-1]["elapsed_s"] if state["curve"] else 0.0
    model.to(device).to(memory_format=torch.channels_last)
    params = trainable(model, cfg.stage)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    sampler = CropSampler(cfg.data, cfg.crop, cfg.seed + 1000 * cfg.rank, cfg.scales)
    if resuming:
        state = _resume(checkpoint, cfg, model, optimizer, sampler)
    net = wrap_model(model) if wrap_model else model
    model.train()
    started, elapsed_before, window = time.time(), state["elapsed_s"], []
    deadline = started + 60 * cfg.minutes if cfg.minutes else None
    rates = len(cfg.model.lambdas)
    while state["step"] < state["total"]:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, state["total"])
        x = to_unit(sampler.batch(cfg.batch_size).to(device)).contiguous(memory_format=torch.channels_last)
        rate = torch.randint(rates, (cfg.batch_size,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            row = net(x, rate, cfg.stage, cfg.diffusion_weight)
        optimizer.zero_grad(set_to_none=True)
        row["loss"].backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):
            optimizer.step()
        else:
            log.warning("step %d: non-finite gradient, update skipped", step)
        window.append({k: float(v.detach()) for k, v in row.items()})
        state["step"] = step + 1
        if deadline and state["step"] in (20, 120):  # time budget: steps from the speed after warm-up
            if state["step"] == 20:
                warm = (time.time(), 20)
                state["total"] = 10 ** 9  # until the speed is known
            else:
                per_step = (time.time() - warm[0]) / (state["step"] - warm[1])
                state["total"] = max(121, int(120 + (deadline - time.time()) / per_step))
                log.info("%.3f s/step: %d steps fit in %.1f minutes", per_step, state["total"], cfg.minutes)
        if state["step"] % cfg.log_every == 0 or state["step"] == state["total"]:
            state["elapsed_s"] = elapsed_before + time.time() - started
            state["curve"].append(_curve_row(state, cfg, window, optimizer))
            window = []
            log.info("%s", json.dumps(state["curve"][-1]))
            if report:
                report(state["curve"][-1])
        if cfg.rank == 0 and (state["step"] % cfg.checkpoint_every == 0 or state["step"] == state["total"]):
            _checkpoint(checkpoint, model, optimizer, state, sampler, elapsed_before, started)
    return model, state["curve"]


def load_model_state(model: CDCModel, source: Path) -> None:
    """Weights from a checkpoint folder (any stage) into `model`, strictly."""
    tensors = load_file(str(source / "model.safetensors"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})


def start_from_weights(model: CDCModel, weights: Weights) -> None:
    """Shipped weights into `model`, to train on from them.

    A weights file keeps float16 copies of the networks, but not the float hyper-synthesis or the
    z density (only their exact integer exports): h_s comes back from its integer weights and
    per-channel scales (within float16-like precision), the z density starts afresh (it is a
    few parameters per channel and relearns in a few hundred steps). A config with more lambdas
    than the weights were trained at gets the new rate points' gains extrapolated: quantization
    steps scale as 1/sqrt(lambda), so the log-gains move by half the log of the lambda ratio.
    """
    source = CDCConfig.from_dict(weights.config["model"])
    cfg = model.config
    if (source.n, source.m, source.unet_widths) != (cfg.n, cfg.m, cfg.unet_widths):
        raise ValueError(f"weights {weights.name!r} have n={source.n}, m={source.m}, unet {source.unet_widths}; "
                         f"this config has n={cfg.n}, m={cfg.m}, unet {cfg.unet_widths}")
    if tuple(cfg.lambdas[:len(source.lambdas)]) != tuple(source.lambdas):
        raise ValueError(f"the lambdas must start with those of {weights.name!r} {list(source.lambdas)}, "
                         f"got {list(cfg.lambdas)}")
    state = {k: v.float() for k, v in weights.tensors.items() if not k.startswith("exact.")}
    state.update(_hyper_synthesis_floats(weights.tensors))
    extra = torch.log(torch.tensor(cfg.lambdas[len(source.lambdas):]) / source.lambdas[-1])[:, None] / 2
    for name, sign in (("log_gain_enc", 1.0), ("log_gain_dec", -1.0)):
        state[name] = torch.cat([state[name], state[name][-1:] + sign * extra])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("z_density.") for k in missing):
        raise ValueError(f"weights {weights.name!r} do not fit this CDC model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    log.info("starting from %s: h_s from its exact integers, a fresh z density, %d new rate point(s)",
             weights.name, len(cfg.lambdas) - len(source.lambdas))


def _hyper_synthesis_floats(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """h_s's float parameters from export_exact's integer weights times their output-channel scales."""
    out, i = {}, 0
    while f"exact.hs.{i}.weight" in tensors:
        q, scale = tensors[f"exact.hs.{i}.weight"].double(), tensors[f"exact.hs.{i}.scale"]
        transposed = HYPER_GEOMETRY[i] == "up"  # ConvTranspose: in x out x k x k, scales per output (dim 1)
        shape = (1, -1, 1, 1) if transposed else (-1, 1, 1, 1)
        out[f"h_s.layers.{i}.weight"] = (q * scale.reshape(shape)).float()
        out[f"h_s.layers.{i}.bias"] = tensors[f"exact.hs.{i}.bias"].float()
        i += 1
    return out


def _resume(checkpoint: Path, cfg: TrainConfig, model: CDCModel, optimizer, sampler: CropSampler) -> dict:
    state = json.loads((checkpoint / "state.json").read_text())
    if state["stage"] != cfg.stage:
        raise ValueError(f"{checkpoint} holds stage {state['stage']!r}; this run is {cfg.stage!r}: "
                         "start the next stage in a new run dir with init_from")
    load_model_state(model, checkpoint)
    load_optimizer_state(checkpoint, optimizer, state.pop("param_groups"), next(model.parameters()).device)
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    sampler.rng.bit_generator.state = state["sampler_rng"]
    if not cfg.minutes:
        state["total"] = cfg.steps
    log.info("resuming %s at step %d of %d", checkpoint, state["step"], state["total"])
    return state


def _checkpoint(folder: Path, model, optimizer, state: dict, sampler: CropSampler, elapsed_before: float,
                started: float) -> None:
    state["elapsed_s"] = elapsed_before + time.time() - started
    state["torch_rng"] = torch.get_rng_state().tolist()
    state["sampler_rng"] = sampler.rng.bit_generator.state
    save_checkpoint(folder, model, optimizer, state)


def _curve_row(state: dict, cfg: TrainConfig, window: list[dict], optimizer) -> dict:
    mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
    return {"step": state["step"], "elapsed_s": round(state["elapsed_s"], 1), "stage": cfg.stage,
            "loss": mean["loss"], "bpp": mean["bpp"], "psnr_mean": psnr_from_mse(mean["mse01"] * 255.0 ** 2),
            "diffusion_mse": mean.get("diffusion_mse"), "lr": optimizer.param_groups[0]["lr"]}


# ---------------------------------------------------------------------- export
def export(model: CDCModel, curve: list[dict], cfg: TrainConfig, path: str | Path | None = None) -> Path:
    """Write the registry weights file: float16 networks + the exact integer parts, and its curve.

    The exact parts (integer h_s, z and y tables) are made here, once, in float64: every
    decoder then reads the same integers. The activation exponents of h_s are calibrated
    on the z symbols of training crops at every rate point.
    """
    model = model.float().cpu().eval()
    with torch.no_grad():
        sampler = CropSampler(cfg.data, cfg.crop, seed=12345, scales=cfg.scales)
        x = to_unit(sampler.batch(4 * len(cfg.model.lambdas)))
        rate = torch.arange(len(cfg.model.lambdas)).repeat_interleave(4)
        z = torch.round(model.h_a(model.g_a(x) * model.gains(rate)[0]))
    tensors = {k: v.detach().half() for k, v in model.state_dict().items()
               if v.is_floating_point() and not k.startswith(TRAINING_ONLY)}
    tensors.update({f"exact.{k}": v for k, v in export_exact(model, z).items()})
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"refusing to export non-finite weights ({broken[:3]}...); resume from an earlier run")
    config = {"model": cfg.model.to_dict(), "rates": cfg.model.rate_names,
              "default_rate": cfg.model.rate_names[len(cfg.model.lambdas) // 2]}
    weights = Weights("cdc", cfg.name, config, tensors, cfg.provenance,
                      training={"lambdas": list(cfg.model.lambdas), "stage": cfg.stage,
                                "steps": curve[-1]["step"] if curve else 0})
    path = save_weights(weights, path or cfg.export or SHIPPED_DIR / f"{cfg.name}.safetensors", replace=True)
    write_curve(curve, path.with_suffix(".curve.csv"), CURVE_FIELDS)
    log.info("exported %s (%d bytes) after %d steps", path, path.stat().st_size, curve[-1]["step"] if curve else 0)
    return path


def with_derived_rates(weights: Weights, derived: Sequence[tuple[str, str, float]], how: str,
                       name: str | None = None) -> Weights:
    """The same networks and tables with rate points added by gain scaling (CDCConfig.derived_rates):
    no tensor changes, the config (hence the digest) does, and `how` joins the provenance.
    New weights: give them a new `name` (the default keeps the old one, for in-memory use)."""
    model = CDCConfig.from_dict(weights.config["model"])
    model = replace(model, derived_rates=model.derived_rates + tuple(derived))
    config = {**weights.config, "model": model.to_dict(), "rates": model.rate_names}
    return Weights(weights.codec, name or weights.name, config, weights.tensors,
                   f"{weights.provenance}; then: {how}", weights.training)


# ---------------------------------------------------------------------- Ray Train
def ray_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker (`loop_config` is TrainConfig.to_dict()); DDP wraps the
    model when there are several."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    cfg = replace(TrainConfig.from_dict(loop_config), rank=context.get_world_rank(),
                  world_size=context.get_world_size(), device=str(ray.train.torch.get_device()))
    model, curve = train(cfg, report=lambda row: ray.train.report(row),
                         wrap_model=ray.train.torch.prepare_model if cfg.world_size > 1 else None)
    if cfg.rank == 0 and curve:
        export(model, curve, cfg)


def fit(cfg: TrainConfig, workers: int = 1, gpu: bool = False):
    """Run `ray_worker` on `workers` Ray Train workers (one GPU each with `gpu`); returns Ray's result.

    Joins the cluster named by RAY_ADDRESS, else starts Ray in-process.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    trainer = TorchTrainer(
        ray_worker, train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cfg.threads}),
        run_config=RunConfig(name=cfg.name, storage_path=str(Path(cfg.run_dir) / "ray")))
    return trainer.fit()
