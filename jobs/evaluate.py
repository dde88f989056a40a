"""Rate-distortion of learned codecs against JPEG, WebP, AVIF and HEVC-intra, on your images.

    python -m jobs.evaluate --codecs cdc-small-b0020 uqdm-tiny --images 'photos/dev/*.png' \
        --out rd.json [--steps 4]

For each image and codec: bits per pixel of the real stream, PSNR and MS-SSIM (RGB, 8-bit),
decode time. Each classical codec is swept over its quality knob and interpolated (in bpp,
per image) to the learned codec's bpp ("at matched bpp"), and to its PSNR ("bpp needed
for equal PSNR"). Values outside a sweep's range are reported as null, never extrapolated;
`dominates_share` says on how many images the classical codec beats it on both axes.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pillow_heif
import torch
from PIL import Image
from pytorch_msssim import ms_ssim

from model import Codec, load_codec
from model.images import decode_image

log = logging.getLogger("jobs.evaluate")

# Pillow format name and the quality grid swept for each classical codec.
CLASSICAL = {
    "jpeg": ("JPEG", [1, 2, 4, 6, 8, 10, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 95]),
    "webp": ("WEBP", [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95]),
    "avif": ("AVIF", [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90]),
    "hevc": ("HEIF", [0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90]),
}
pillow_heif.register_heif_opener()


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    mse = np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def msssim(reference: np.ndarray, test: np.ndarray) -> float:
    def as_tensor(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(img).permute(2, 0, 1)[None].float()

    # Five scales need a side above 160 px; fewer scales keep small images measurable.
    scales = 5 if min(reference.shape[:2]) > 160 else 3
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333][-scales:]
    return float(ms_ssim(as_tensor(reference), as_tensor(test), data_range=255.0,
                         weights=[w / sum(weights) for w in weights]))


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", nargs="+", required=True, help="registry names or weights paths")
    p.add_argument("--images", required=True, help="glob of images to evaluate on")
    p.add_argument("--steps", type=int, help="diffusion steps (default: each codec's)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    images = load_images(args.images)
    curves = ClassicalCurves(images)
    report = {"images": list(images), "codecs": {}}
    for name in args.codecs:
        rows = evaluate_codec(load_codec(name), images, steps=args.steps)
        report["codecs"][name] = {"mean": summarize(rows), "classical": compare_with_classical(rows, curves),
                                  "per_image": rows}
        print(json.dumps({name: report["codecs"][name]["mean"]}))
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
