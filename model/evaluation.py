"""Measuring a learned codec on images: real stream sizes, PSNR, MS-SSIM, timings.

    images = load_images("photos/dev/*.png")
    rows = evaluate_codec(load_codec("cdc-hp128:q3"), images, steps=4)
    summarize(rows)           # mean bpp, psnr, msssim, encode_s, decode_s

Comparisons with JPEG, WebP, AVIF and HEVC-intra are in model.classical.
"""

from __future__ import annotations

import glob
import logging
import time
from pathlib import Path

import numpy as np

from .codec import Codec
from .images import decode_image
from .metrics import msssim, psnr

log = logging.getLogger(__name__)


def evaluate_codec(codec: Codec, images: dict[str, np.ndarray], **decode_options) -> list[dict]:
    """Per-image bpp (real stream bytes), PSNR, MS-SSIM, encode and decode seconds."""
    rows = []
    for name, img in images.items():
        started = time.perf_counter()
        data = codec.compress(img)
        encoded = time.perf_counter()
        out = codec.decompress(data, **decode_options)
        decoded = time.perf_counter()
        rows.append({"image": name, "bytes": len(data), "bpp": 8 * len(data) / (img.shape[0] * img.shape[1]),
                     "psnr": psnr(img, out), "msssim": msssim(img, out),
                     "encode_s": encoded - started, "decode_s": decoded - encoded})
        log.info("%s %s: %.4f bpp, %.2f dB", codec.name, name, rows[-1]["bpp"], rows[-1]["psnr"])
    return rows


def mean_or_none(values: list[float | None]) -> float | None:
    """The mean over images, or None unless every image had a value (no partial averages)."""
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def summarize(rows: list[dict]) -> dict:
    keys = ("bpp", "psnr", "msssim", "encode_s", "decode_s")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def load_images(pattern: str) -> dict[str, np.ndarray]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no images match {pattern!r}")
    return {Path(p).name: decode_image(Path(p).read_bytes())[0] for p in paths}
