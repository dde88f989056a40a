"""What the training loops share (CDC's stages, its context model, UQDM's fine-tune): random crops
of the training photos, checkpoints written whole (model/files.py) and read back, curve files.

    sampler = CropSampler(TRAIN_PHOTOS, crop=64, seed=0)      # (B, 3, 64, 64) uint8 batches
    save_checkpoint(folder, model, optimizer, state)          # atomic: the old one or the new one
    load_optimizer_state(folder, optimizer, state.pop("param_groups"))
    write_curve(rows, "curve.csv", ["step", "loss"])
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .files import atomic_folder


class CropSampler:
    """Random square crops with random flips, from photos held in memory at several scales.

    The evaluation photos are downsampled originals; copies of the training photos at 0.6x
    (antialiased) have the same detail per pixel.
    """

    def __init__(self, folder: str | Path, crop: int, seed: int, scales: tuple[float, ...] = (1.0,)):
        folder = Path(folder)
        if folder.name == "dev":
            raise ValueError(f"{folder} is the evaluation set; train on photos/train")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        self.images = [img for path in files for img in _scaled(path, scales) if min(img.shape[:2]) >= crop]
        if not self.images:
            raise FileNotFoundError(f"no training photos of at least {crop} px in {folder}")
        self.crop, self.rng = crop, np.random.default_rng(seed)

    def batch(self, size: int) -> torch.Tensor:
        """(size, 3, crop, crop) uint8."""
        crops = []
        for _ in range(size):
            img = self.images[self.rng.integers(len(self.images))]
            top = self.rng.integers(img.shape[0] - self.crop + 1)
            left = self.rng.integers(img.shape[1] - self.crop + 1)
            patch = img[top:top + self.crop, left:left + self.crop]
            if self.rng.random() < 0.5:
                patch = patch[:, ::-1]
            if self.rng.random() < 0.5:
                patch = patch[::-1]
            crops.append(patch)
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)


def _scaled(path: Path, scales: tuple[float, ...]) -> list[np.ndarray]:
    with Image.open(path) as image:
        image = image.convert("RGB")
        return [np.asarray(image if s == 1.0 else image.resize((round(image.width * s), round(image.height * s)),
                                                               Image.Resampling.LANCZOS)) for s in scales]


def save_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Replace the checkpoint atomically: a crash leaves the old one or the new one.

    model.safetensors, optimizer.safetensors, state.json (`state` + the optimizer's param groups)
    and one `<name>.safetensors` per entry of `extra` (e.g. the EMA weights).
    """
    with atomic_folder(folder) as fresh:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(fresh / "model.safetensors"))
        opt = optimizer.state_dict()
        save_file({f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items() for k, v in s.items()
                   if isinstance(v, torch.Tensor)}, str(fresh / "optimizer.safetensors"))
        for name, tensors in (extra or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(fresh / f"{name}.safetensors"))
        (fresh / "state.json").write_text(json.dumps({**state, "param_groups": opt["param_groups"]}))


def load_optimizer_state(checkpoint: Path, optimizer: torch.optim.Optimizer, param_groups: list[dict],
                         device: torch.device | str | None = None) -> None:
    """The optimizer's per-parameter state (optimizer.safetensors) and `param_groups` (from state.json)."""
    per_param: dict[int, dict] = {}
    for name, value in load_file(str(Path(checkpoint) / "optimizer.safetensors")).items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = value if device is None else value.to(device)
    optimizer.load_state_dict({"state": per_param, "param_groups": param_groups})


def write_curve(curve: list[dict], path: Path, fields: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows({k: row.get(k) for k in fields} for row in curve)
