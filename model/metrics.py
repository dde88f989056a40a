"""Image quality metrics on HxWx3 uint8 arrays (RGB, 8-bit): PSNR, MS-SSIM, and a realism
measure (sliced Wasserstein distance between patch distributions).

The one PSNR and MS-SSIM of the project: evaluation, benchmarks, tests and training all use it.

    psnr(a, b)        fidelity of one image, dB (inf when identical)
    msssim(a, b)      fidelity of one image, 0..1 (1 when identical); msssim_db: -10 log10(1 - msssim)
    sliced_wasserstein(references, tests)   realism of a *set* of images: distance between the
                      distributions of their patches (0 when the sets are identical)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    return psnr_from_mse(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))


def psnr_from_mse(mse: float, peak: float = 255.0) -> float:
    """PSNR in dB of a mean squared error, for signals spanning `peak` (2.0 for [-1, 1])."""
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


# MS-SSIM (Wang, Simoncelli & Bovik 2003) as pytorch_msssim.ms_ssim computes it (the tests hold
# the two within 1e-5): 11-tap Gaussian window (sigma 1.5, 'valid' filtering), K = (0.01, 0.03),
# 2x2 average pooling between scales (zero-padded on odd sides), the five standard scale weights.
# Written with scipy's separable filters: about twice as fast on a CPU, and it also measures
# images of 161 px or less, which pytorch_msssim refuses whatever the number of scales.
_MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WINDOW = 11
_GAUSS = np.exp(-(np.arange(_WINDOW) - _WINDOW // 2) ** 2 / (2 * 1.5 ** 2)).astype(np.float32)
_GAUSS /= _GAUSS.sum()
_C1, _C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def msssim(reference: np.ndarray, test: np.ndarray) -> float:
    """MS-SSIM of two HxWx3 (or HxW) 8-bit images, mean over channels.

    Five scales need a smaller side above 160 px; smaller images use fewer scales (three
    above 40 px, then two, then one: plain SSIM), with the finest scales' weights renormalized.
    """
    if reference.shape != test.shape:
        raise ValueError(f"images differ in shape: {reference.shape} vs {test.shape}")
    side = min(reference.shape[:2])
    if side < _WINDOW:
        raise ValueError(f"MS-SSIM needs images of at least {_WINDOW} px a side, got {reference.shape[:2]}")
    scales = 5 if side > 160 else 3 if side > 40 else 2 if side > 20 else 1
    weights = np.array(_MSSSIM_WEIGHTS[:scales]) / sum(_MSSSIM_WEIGHTS[:scales])
    x, y = (np.atleast_3d(img).astype(np.float32).transpose(2, 0, 1) for img in (reference, test))
    factors = []
    for scale in range(scales):
        ssim, cs = _ssim_per_channel(x, y)
        if scale < scales - 1:
            factors.append(np.maximum(cs, 0))
            x, y = _halve(x), _halve(y)
    factors.append(np.maximum(ssim, 0))
    return float(np.mean(np.prod(np.stack(factors) ** weights[:, None], axis=0)))


def msssim_db(value: float) -> float:
    """MS-SSIM on a decibel scale, -10 log10(1 - MS-SSIM): inf for identical images."""
    return float("inf") if value >= 1 else float(-10 * np.log10(1 - value))


def _ssim_per_channel(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mx, my, xx, yy, xy = _blur(np.stack([x, y, x * x, y * y, x * y]))
    vx, vy, cov = xx - mx * mx, yy - my * my, xy - mx * my
    cs = (2 * cov + _C2) / (vx + vy + _C2)
    ssim = (2 * mx * my + _C1) / (mx * mx + my * my + _C1) * cs
    return ssim.mean(axis=(-2, -1)), cs.mean(axis=(-2, -1))


def _blur(x: np.ndarray) -> np.ndarray:
    """Gaussian filter over the last two axes, keeping only the 'valid' part."""
    half = _WINDOW // 2
    x = ndimage.correlate1d(x, _GAUSS, axis=-2, mode="constant")[..., half:-half, :]
    return ndimage.correlate1d(x, _GAUSS, axis=-1, mode="constant")[..., half:-half]


def _halve(x: np.ndarray) -> np.ndarray:
    """2x2 average pooling; an odd side is zero-padded by one on both ends (as torch's avg_pool2d)."""
    pads = [(0, 0)] + [(side % 2, side % 2) for side in x.shape[1:]]
    x = np.pad(x, pads)
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    return x[:, :h, :w].reshape(x.shape[0], h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def sliced_wasserstein(reference_images: Sequence[np.ndarray], test_images: Sequence[np.ndarray],
                       patch_size: int = 8, projections: int = 128, patches_per_image: int = 1024,
                       seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between the patch distributions of two *sets* of images.

    A realism measure that needs no learned features: it compares the distribution of
    local patches over a whole set of images with another set's, not image to image (a
    reconstruction with plausible but different texture scores as well as the original,
    a blurred one does not). The sets may differ in size and in image shapes.

    - Patches: `patch_size` x `patch_size` x 3 pixels (default 8x8x3: 192 dimensions), in
      8-bit levels, at `patches_per_image` positions drawn uniformly (with replacement)
      from each image by a generator seeded with (`seed`, the image's index and shape):
      two sets of identically shaped images are sampled at the same positions, so a set
      compared with itself gives exactly 0. Each patch's per-channel mean is subtracted:
      the distance measures texture and structure, not colour or brightness (PSNR does).
    - Projections: `projections` directions uniform on the unit sphere (normalized
      Gaussian vectors from a generator seeded with `seed`), the same for both sets. For
      each, the 1-D Wasserstein-1 distance between the two sets' projected patches (mean
      absolute difference of their quantile functions, at min(n_reference, n_test) levels).
    - Result: the mean over directions, in 8-bit levels. 0 for identical sets; it grows
      with noise, blur and texture that differs from the reference's.
    """
    if not reference_images or not test_images:
        raise ValueError("sliced_wasserstein needs at least one image in each set")
    a = _patches(reference_images, patch_size, patches_per_image, seed)
    b = _patches(test_images, patch_size, patches_per_image, seed)
    directions = np.random.default_rng([seed, 1]).standard_normal((a.shape[1], projections))
    directions = (directions / np.linalg.norm(directions, axis=0)).astype(np.float32)
    pa, pb = np.sort(a @ directions, axis=0), np.sort(b @ directions, axis=0)
    if len(pa) != len(pb):
        levels = (np.arange(min(len(pa), len(pb))) + 0.5) / min(len(pa), len(pb))
        pa, pb = (np.stack([np.interp(levels, (np.arange(len(p)) + 0.5) / len(p), p[:, k])
                            for k in range(projections)], axis=1) for p in (pa, pb))
    return float(np.mean(np.abs(pa.astype(np.float64) - pb)))


def _patches(images: Sequence[np.ndarray], size: int, per_image: int, seed: int) -> np.ndarray:
    """(n_images * per_image, size * size * 3) mean-removed patches, float32."""
    out = []
    for index, img in enumerate(images):
        img = np.atleast_3d(img)
        h, w = img.shape[:2]
        if h < size or w < size:
            raise ValueError(f"image {index} ({h}x{w}) is smaller than the {size}x{size} patches")
        rng = np.random.default_rng([seed, index, h, w])
        rows, cols = rng.integers(0, h - size + 1, per_image), rng.integers(0, w - size + 1, per_image)
        offsets = np.arange(size)
        patches = img[rows[:, None, None] + offsets[None, :, None], cols[:, None, None] + offsets[None, None, :]]
        patches = patches.astype(np.float32)
        out.append((patches - patches.mean(axis=(1, 2), keepdims=True)).reshape(per_image, -1))
    return np.concatenate(out)
