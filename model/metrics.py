"""Image quality metrics on HxWx3 uint8 arrays (RGB, 8-bit): PSNR and MS-SSIM.

The one PSNR of the project: evaluation, benchmarks, tests and training all use it."""

from __future__ import annotations

import numpy as np
import torch
from pytorch_msssim import ms_ssim


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    return psnr_from_mse(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))


def psnr_from_mse(mse: float, peak: float = 255.0) -> float:
    """PSNR in dB of a mean squared error, for signals spanning `peak` (2.0 for [-1, 1])."""
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def msssim(reference: np.ndarray, test: np.ndarray) -> float:
    def as_tensor(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(img).permute(2, 0, 1)[None].float()

    # Five scales need a side above 160 px; fewer scales keep small images measurable.
    scales = 5 if min(reference.shape[:2]) > 160 else 3
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333][-scales:]
    return float(ms_ssim(as_tensor(reference), as_tensor(test), data_range=255.0,
                         weights=[w / sum(weights) for w in weights]))
