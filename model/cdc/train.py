"""Training a CDC codec: the loop, its checkpoints, the export to a registry weights file,
and the Ray Train driver that runs it on one or many workers (`python -m jobs.train`).

Loss (Yang & Mandt 2023): beta * bpp + (1 - rho) * diffusion loss + rho * perceptual, where
the perceptual term is 1 - MS-SSIM (the paper's LPIPS needs VGG weights we cannot fetch).

State lives in the run dir: checkpoint/ (model + optimizer as safetensors, step and curve
as JSON), rewritten atomically every `checkpoint_every` steps; a rerun resumes from the
step it stopped at. At the end, rank 0 writes <export>.safetensors and <export>.curve.csv.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..images import decode_image
from ..metrics import psnr_from_mse
from ..registry import SHIPPED_DIR, Weights, read_weights, save_weights
from .config import TrainConfig
from .model import CDCModel

log = logging.getLogger(__name__)

CURVE_FIELDS = ["step", "elapsed_s", "loss", "bpp", "mse", "psnr_x0", "perceptual", "aux"]


class CropSampler:
    """Random crops (with random horizontal flips) from a folder of photos held in memory."""

    def __init__(self, folder: str | Path, crop: int, seed: int):
        folder = Path(folder)
        if folder.name == "dev":
            raise ValueError(f"{folder} is the evaluation set; train on photos/train")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        self.images = [img for img in (decode_image(p.read_bytes())[0] for p in files)
                       if min(img.shape[:2]) >= crop]
        if not self.images:
            raise FileNotFoundError(f"no training photos of at least {crop} px in {folder}")
        self.crop, self.rng = crop, np.random.default_rng(seed)

    def batch(self, size: int) -> torch.Tensor:
        crops = []
        for _ in range(size):
            img = self.images[self.rng.integers(len(self.images))]
            top = self.rng.integers(img.shape[0] - self.crop + 1)
            left = self.rng.integers(img.shape[1] - self.crop + 1)
            patch = img[top:top + self.crop, left:left + self.crop]
            crops.append(patch[:, ::-1] if self.rng.random() < 0.5 else patch)
        x = torch.from_numpy(np.stack(crops).copy()).permute(0, 3, 1, 2).float()
        return x / 127.5 - 1.0


def build_optimizer(model: CDCModel, lr: float, aux_lr: float) -> torch.optim.Adam:
    quantiles = [model.entropy_bottleneck.quantiles]
    main = [p for p in model.parameters() if p is not quantiles[0]]
    return torch.optim.Adam([{"params": main, "lr": lr}, {"params": quantiles, "lr": aux_lr}])


def save_checkpoint(folder: Path, model: CDCModel, optimizer: torch.optim.Optimizer,
                    step: int, curve: list[dict]) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model.weight_tensors(), str(tmp / "model.safetensors"))
    opt_state = optimizer.state_dict()
    save_file({f"{index}.{key}": value for index, state in opt_state["state"].items()
               for key, value in state.items()}, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(
        {"step": step, "param_groups": opt_state["param_groups"], "curve": curve}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # a crash leaves either the old or the new checkpoint, never half of one


def load_checkpoint(folder: Path, model: CDCModel, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    meta = json.loads((folder / "state.json").read_text())
    model.load_weight_tensors(load_file(str(folder / "model.safetensors")))
    state: dict[int, dict] = {}
    for name, value in load_file(str(folder / "optimizer.safetensors")).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta["step"], meta["curve"]


def train(config: TrainConfig, report: Callable[[dict], None] | None = None,
          wrap_model: Callable[[CDCModel], torch.nn.Module] | None = None) -> tuple[CDCModel, list[dict]]:
    """The training loop; `report(row)` is called at every logged step (Ray or tests), and
    `wrap_model` (e.g. DDP) wraps the network that computes the loss.

    Returns the trained model (unwrapped) and the training curve.
    """
    torch.set_num_threads(config.threads)
    rank = config.rank
    device = torch.device(config.device)
    torch.manual_seed(config.seed)  # the same initial weights on every worker and rerun
    model = CDCModel(config.model)
    if config.init_from:
        model.load_weight_tensors({k: v.float() for k, v in read_weights(config.init_from).tensors.items()})
    model.to(device)
    optimizer = build_optimizer(model, config.lr, config.aux_lr)
    checkpoint = Path(config.run_dir) / "checkpoint" if config.run_dir else None
    step, curve = 0, []
    if checkpoint and (checkpoint / "state.json").is_file():
        step, curve = load_checkpoint(checkpoint, model, optimizer)
        log.info("resuming %s from step %d", checkpoint, step)
    # Fresh randomness per (rank, resume point): a resumed run does not replay old crops.
    torch.manual_seed(config.seed + 1000 * rank + step)
    sampler = CropSampler(config.data, config.crop, config.seed + 1000 * rank + step)
    net = wrap_model(model) if wrap_model else model
    started, deadline = time.time(), time.time() + 60 * config.max_minutes
    elapsed_before = curve[-1]["elapsed_s"] if curve else 0.0
    window: list[dict] = []
    while step < config.steps and time.time() < deadline:
        out = net(sampler.batch(config.batch_size).to(device), config.beta, config.rho)
        optimizer.zero_grad(set_to_none=True)
        (out["loss"] + out["aux"]).backward()
        # Clip the networks only: the quantiles' aux gradient is large and would shrink the rest.
        norm = torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], 1.0)
        step += 1
        if not (torch.isfinite(norm) and torch.isfinite(out["loss"])):
            # One bad batch must not turn every weight into NaN (seen once at lr 4e-4).
            log.warning("step %d: non-finite loss or gradient, update skipped", step)
            continue
        optimizer.step()
        window.append({k: float(v.detach()) for k, v in out.items()})
        if step % config.log_every == 0 or step == config.steps:
            row = {"step": step, "elapsed_s": round(elapsed_before + time.time() - started, 1)}
            row.update({k: float(np.mean([w[k] for w in window])) for k in ("loss", "bpp", "mse", "perceptual", "aux")})
            row["psnr_x0"] = float(np.mean([psnr_from_mse(max(w["mse"], 1e-10), peak=2.0) for w in window]))
            curve.append(row)
            window = []
            log.info("step %d loss %.4f bpp %.4f mse %.4f aux %.1f", step, row["loss"], row["bpp"],
                     row["mse"], row["aux"])
            if report:
                report(row)
        if checkpoint and rank == 0 and (step % config.checkpoint_every == 0 or step == config.steps):
            save_checkpoint(checkpoint, model, optimizer, step, curve)
    if checkpoint and rank == 0:
        save_checkpoint(checkpoint, model, optimizer, step, curve)
    return model, curve


def export(model: CDCModel, curve: list[dict], config: TrainConfig) -> Path:
    """Write the registry weights file (float16 tensors: half the size) and its curve.

    The file records the network config (digested) and, apart, the loss weights beta and rho.
    """
    tensors = {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
               for k, v in model.weight_tensors().items()}
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"refusing to export non-finite weights ({broken[:3]}...); resume from an earlier run")
    weights = Weights("cdc", config.name, model.config.to_dict(), tensors, config.provenance,
                      training={"beta": config.beta, "rho": config.rho})
    path = save_weights(weights, config.export or SHIPPED_DIR / f"{config.name}.safetensors")
    with open(path.with_suffix(".curve.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in CURVE_FIELDS} for row in curve)
    log.info("exported %s (%d bytes) after step %d", path, path.stat().st_size, curve[-1]["step"] if curve else 0)
    return path


def ray_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker (`loop_config` is TrainConfig.to_dict()); DDP wraps the
    model when there are several."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    config = replace(TrainConfig.from_dict(loop_config), rank=context.get_world_rank(),
                     world_size=context.get_world_size(), device=str(ray.train.torch.get_device()))
    model, curve = train(config, report=lambda row: ray.train.report(row),
                         wrap_model=ray.train.torch.prepare_model if config.world_size > 1 else None)
    if config.rank == 0 and curve:  # done: all steps, or --max-minutes ran out
        export(model, curve, config)


def fit(config: TrainConfig, workers: int = 1, gpu: bool = False):
    """Run `ray_worker` on `workers` Ray Train workers (one GPU each with `gpu`); returns Ray's result.

    Joins the cluster named by RAY_ADDRESS, else starts Ray in-process. Ray Train sets up
    its workers' logging (INFO lines reach the driver's console).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), include_dashboard=False)
    trainer = TorchTrainer(
        ray_worker, train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": config.threads}),
        run_config=RunConfig(name=config.name, storage_path=str(Path(config.run_dir) / "ray")))
    return trainer.fit()
