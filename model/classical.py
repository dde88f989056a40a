"""Classical codecs as the reference: JPEG, WebP, AVIF and HEVC-intra round trips, quality
sweeps, and a learned codec's results compared with them at matched bpp and PSNR.

Each classical codec is swept over its quality knob and interpolated (in bpp, per image) to
the learned codec's bpp ("at matched bpp"), and to its PSNR ("bpp needed for equal PSNR").
Values outside a sweep's range are None, never extrapolated; `dominates_share` says on how
many images the classical codec beats the learned one on both axes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import numpy as np
import pillow_heif
from PIL import Image

from .evaluation import evaluate_codec, mean_or_none, summarize
from .images import decode_image
from .metrics import msssim, psnr
from .registry import load_codec

# Pillow format name and the quality grid swept for each classical codec.
CLASSICAL = {
    "jpeg": ("JPEG", [1, 2, 4, 6, 8, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95]),
    "webp": ("WEBP", [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95]),
    "avif": ("AVIF", [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90]),
    "hevc": ("HEIF", [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90]),
}
pillow_heif.register_heif_opener()


def classical_roundtrip(fmt: str, img: np.ndarray, quality: int) -> tuple[int, np.ndarray]:
    """Encode with Pillow (pillow-heif for HEVC) and decode back: (bytes, image)."""
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format=CLASSICAL[fmt][0], quality=quality)
    data = buffer.getvalue()
    return len(data), decode_image(data)[0]


class ClassicalCurves:
    """Per-image rate-distortion sweeps of the classical codecs, computed lazily and cached.

    PSNR is measured at every quality; MS-SSIM (about a second per photo on a CPU) only at
    the qualities that bracket a point being interpolated.
    """

    def __init__(self, images: dict[str, np.ndarray]):
        self.images = images
        self._points: dict[tuple[str, str], list[dict]] = {}
        self._msssim: dict[tuple[str, str, int], float] = {}

    def points(self, fmt: str, name: str) -> list[dict]:
        """(quality, bpp, psnr) over the codec's quality grid, by increasing bpp."""
        if (fmt, name) not in self._points:
            img, points = self.images[name], []
            for quality in CLASSICAL[fmt][1]:
                size, decoded = classical_roundtrip(fmt, img, quality)
                points.append({"quality": quality, "bpp": 8 * size / (img.shape[0] * img.shape[1]),
                               "psnr": psnr(img, decoded)})
            self._points[fmt, name] = sorted(points, key=lambda p: p["bpp"])
        return self._points[fmt, name]

    def msssim_at_bpp(self, fmt: str, name: str, bpp: float) -> float | None:
        bracket = bracketing(self.points(fmt, name), "bpp", bpp)
        if bracket is None:
            return None
        lo, hi = ({**p, "msssim": self._quality_msssim(fmt, name, p["quality"])} for p in bracket)
        return interpolate([lo, hi], "bpp", bpp, "msssim")

    def _quality_msssim(self, fmt: str, name: str, quality: int) -> float:
        if (fmt, name, quality) not in self._msssim:
            img = self.images[name]
            self._msssim[fmt, name, quality] = msssim(img, classical_roundtrip(fmt, img, quality)[1])
        return self._msssim[fmt, name, quality]


def bracketing(points: list[dict], key: str, at: float) -> tuple[dict, dict] | None:
    points = sorted(points, key=lambda p: p[key])
    for lo, hi in zip(points, points[1:]):
        if lo[key] <= at <= hi[key]:
            return lo, hi
    return None


def interpolate(points: list[dict], key: str, at: float, value: str) -> float | None:
    """Linear interpolation of `value` where `key` equals `at`; None outside the sweep."""
    bracket = bracketing(points, key, at)
    if bracket is None:
        return None
    lo, hi = bracket
    if hi[key] == lo[key]:
        return lo[value]
    return lo[value] + (at - lo[key]) / (hi[key] - lo[key]) * (hi[value] - lo[value])


def compare_with_classical(rows: list[dict], curves: ClassicalCurves) -> dict:
    """For each classical codec: PSNR/MS-SSIM at each image's bpp, and bpp at its PSNR."""
    out = {}
    for fmt in CLASSICAL:
        per_image = {r["image"]: curves.points(fmt, r["image"]) for r in rows}
        out[fmt] = {
            "psnr_at_matched_bpp": mean_or_none([interpolate(per_image[r["image"]], "bpp", r["bpp"], "psnr")
                                                 for r in rows]),
            "msssim_at_matched_bpp": mean_or_none([curves.msssim_at_bpp(fmt, r["image"], r["bpp"]) for r in rows]),
            "bpp_for_equal_psnr": mean_or_none([interpolate(per_image[r["image"]], "psnr", r["psnr"], "bpp")
                                                for r in rows]),
            # Share of images where some quality has both fewer bits and a higher PSNR:
            # meaningful even where the interpolations above fall outside the sweep.
            "dominates_share": float(np.mean([any(p["bpp"] <= r["bpp"] and p["psnr"] >= r["psnr"]
                                                  for p in per_image[r["image"]]) for r in rows]))}
    return out


def compare_codecs(codecs: Sequence[str], images: dict[str, np.ndarray],
                   **decode_options) -> Iterator[tuple[str, dict]]:
    """Evaluate each learned codec (registry name or weights path) on the images and compare it
    with the classical codecs; yields (codec, {"mean", "classical", "per_image"}) as each finishes.
    The classical sweeps are computed once and shared by every codec."""
    curves = ClassicalCurves(images)
    for name in codecs:
        rows = evaluate_codec(load_codec(name), images, **decode_options)
        yield name, {"mean": summarize(rows), "classical": compare_with_classical(rows, curves), "per_image": rows}
