"""Test images that need nothing outside the repository: matplotlib's sample photos, or generated."""

from __future__ import annotations

from functools import lru_cache

import matplotlib.cbook
import numpy as np
from PIL import Image


@lru_cache(maxsize=None)
def _sample_photo(name: str) -> np.ndarray:
    with Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as image:
        array = np.asarray(image.convert("RGB"))
    array.flags.writeable = False
    return array


def sample_photo(name: str = "grace_hopper.jpg") -> np.ndarray:
    """A photo matplotlib ships (grace_hopper.jpg is 600x512 RGB), as HxWx3 uint8."""
    return _sample_photo(name)


def photo_crop(top: int, left: int, height: int, width: int, name: str = "grace_hopper.jpg") -> np.ndarray:
    return np.ascontiguousarray(sample_photo(name)[top:top + height, left:left + width])


def photo_tiles(count: int, seed: int, side: int = 64) -> np.ndarray:
    """`count` random side x side crops of the sample photo, as (count, 3, side, side) uint8."""
    photo = sample_photo()
    rng = np.random.default_rng(seed)
    tiles = []
    for _ in range(count):
        top, left = rng.integers(photo.shape[0] - side), rng.integers(photo.shape[1] - side)
        tiles.append(photo[top:top + side, left:left + side].transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(tiles))


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients plus a little noise: compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    noise = rng.normal(0, 6, (height, width, 3))
    return np.clip(base + noise + rng.integers(0, 50), 0, 255).astype(np.uint8)
