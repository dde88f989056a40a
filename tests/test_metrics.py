"""Metrics against known values: identical images, known Gaussian noise, known textures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_msssim import ms_ssim
from scipy import ndimage

from model.metrics import msssim, msssim_db, psnr, psnr_from_mse, sliced_wasserstein

SIGMAS = (5.0, 10.0, 20.0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A 192x256 RGB image of smooth structure plus texture, within [64, 192]: no clipping at sigma 20
    (3.2 sigma) worth measuring."""
    rng = np.random.default_rng(7)
    field = ndimage.gaussian_filter(rng.standard_normal((192, 256, 3)), sigma=(3, 3, 0))
    return (128 + 64 * np.tanh(field / field.std())).round().astype(np.uint8)


def noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    out = img + np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def texture(shape: tuple[int, int], correlation: float, seed: int) -> np.ndarray:
    """A stationary texture: white noise blurred over `correlation` pixels, 128 +- ~40."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((*shape, 3)),
                                    sigma=(correlation, correlation, 0))
    return np.clip(128 + 40 * field / field.std(), 0, 255).round().astype(np.uint8)


def test_identical_images(image):
    assert psnr(image, image) == math.inf
    assert msssim(image, image) == pytest.approx(1.0, abs=1e-12)
    assert msssim_db(msssim(image, image)) == math.inf
    assert sliced_wasserstein([image], [image.copy()]) == 0.0


@pytest.mark.parametrize("sigma", SIGMAS)
def test_psnr_of_known_noise(image, sigma):
    # Rounding to integers adds 1/12 of a level's variance; well within 0.1 dB for sigma >= 5.
    assert psnr(image, noisy(image, sigma)) == pytest.approx(10 * math.log10(255 ** 2 / sigma ** 2), abs=0.1)


def test_psnr_from_mse():
    assert psnr_from_mse(0.0) == math.inf
    assert psnr_from_mse(255.0 ** 2) == pytest.approx(0.0)
    assert psnr_from_mse(0.04, peak=2.0) == pytest.approx(20.0)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_msssim_matches_pytorch_msssim(image, sigma):
    """The reference implementation (pytorch_msssim, five scales) on an image above 160 px."""
    def tensor(img):
        return torch.from_numpy(img).permute(2, 0, 1)[None].float()

    test = noisy(image, sigma)
    assert msssim(image, test) == pytest.approx(float(ms_ssim(tensor(image), tensor(test), data_range=255)), abs=1e-4)


def test_msssim_falls_with_noise_and_measures_small_images(image):
    values = [msssim(image, noisy(image, s)) for s in SIGMAS]
    assert 1 > values[0] > values[1] > values[2] > 0
    small = image[:64, :64]  # three scales; pytorch_msssim refuses sides of 160 px or less
    small_values = [msssim(small, noisy(small, s)) for s in SIGMAS]
    assert 1 > small_values[0] > small_values[1] > small_values[2] > 0
    # odd sides pool with zero padding, as torch's avg_pool2d does
    assert 0 < msssim(image[:171, :201], noisy(image, 10)[:171, :201]) < 1
    with pytest.raises(ValueError):
        msssim(image[:8, :8], image[:8, :8])


def test_msssim_db():
    assert msssim_db(0.9) == pytest.approx(10.0)
    assert msssim_db(0.99) == pytest.approx(20.0)


def test_swd_grows_with_noise(image):
    values = [sliced_wasserstein([image], [noisy(image, s)]) for s in (0, *SIGMAS)]
    assert values[0] == 0.0
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_swd_is_a_distance_between_texture_distributions():
    """Two halves of one stationary texture: about 0; two different textures: far apart."""
    one = texture((256, 512), correlation=2, seed=1)
    other = texture((256, 256), correlation=6, seed=2)  # coarser grain
    left, right = one[:, :256], one[:, 256:]
    # 4096 patches: fewer leave a sampling floor (~1.8 at 1024) above the 1/10 asked here
    same = sliced_wasserstein([left], [right], patches_per_image=4096)
    different = sliced_wasserstein([left], [other], patches_per_image=4096)
    assert same < 0.1 * different, (same, different)
    # sets of different sizes and shapes, in either order
    assert sliced_wasserstein([left, right], [other]) > 5 * sliced_wasserstein([left, right], [one])
    assert sliced_wasserstein([left], [other]) == pytest.approx(sliced_wasserstein([other], [left]), rel=1e-6)


def test_swd_is_deterministic_and_checks_its_input(image):
    test = noisy(image, 10)
    assert sliced_wasserstein([image], [test]) == sliced_wasserstein([image], [test])
    assert sliced_wasserstein([image], [test], seed=1) != sliced_wasserstein([image], [test])
    with pytest.raises(ValueError):
        sliced_wasserstein([], [image])
    with pytest.raises(ValueError):
        sliced_wasserstein([image], [image[:4, :4]])
