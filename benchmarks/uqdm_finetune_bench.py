"""Lossless bpp on the 12 dev photos (never trained on): PNG, WebP lossless, uqdm-tiny, uqdm-tiny-photo.

    python -m benchmarks.uqdm_finetune_bench                 # -> benchmarks/results/uqdm_finetune.json + table
    python -m benchmarks.uqdm_finetune_bench --photos 2 --exact-photos 0    # a quick look

PNG (Pillow, optimize=True) and WebP lossless (Pillow, lossless=True, quality=100, method=6:
its strongest effort) code whole photos. The UQDM models are measured by their float negative
ELBO (model.uqdm.train.nelbo_bits: what the exact codec codes, within 1%) over a checkerboard
half of each photo's 64x64 tiles ((row + column) even; 48 of the 96 tiles of a 768x512
photo), one random draw of z_1 and the quantization errors per tile (seed 0), to bound the CPU
time; the exact codec's real stream is measured beside its float NELBO (same z_1 and dithers)
on the first --exact-photos photos, every tile (uqdm-tiny-photo's by default: uqdm-tiny's is
`python -m benchmarks.uqdm_bench exactness`). uqdm-tiny is the authors' float checkpoint
(../shared); uqdm-tiny-photo the float source `diffpress train-uqdm` writes beside its exact
weights (~/.cache/diffpress/weights: not shipped, it derives from the authors' weights).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import load_codec
from model.paths import UQDM_TINY_SOURCE
from model.registry import read_weights
from model.uqdm.codec import TILE, _tile
from model.uqdm.importer import import_checkpoint
from model.registry import USER_DIR
from model.uqdm.train import TrainableUQDM, codec_trajectory, nelbo_bits

from .machine import cpu_name
from .uqdm_bench import RESULTS, dev_images

PHOTO_SOURCE = USER_DIR / "uqdm-tiny-photo.float.safetensors"


def classical_bpp(img: np.ndarray) -> dict[str, float]:
    pixels = img.shape[0] * img.shape[1]
    out = {}
    for name, options in (("png", dict(format="PNG", optimize=True)),
                          ("webp_lossless", dict(format="WEBP", lossless=True, quality=100, method=6))):
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, **options)
        out[name] = 8 * buffer.tell() / pixels
    return out


def checkerboard(img: np.ndarray) -> np.ndarray:
    """The full 64x64 tiles with (row + column) even."""
    rows, cols = img.shape[0] // TILE, img.shape[1] // TILE
    keep = [r * -(-img.shape[1] // TILE) + c for r in range(rows) for c in range(cols) if (r + c) % 2 == 0]
    return _tile(img)[keep]


def float_bpp(model: TrainableUQDM, tiles: np.ndarray, seed: int = 0) -> float:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bits = sum(float(nelbo_bits(model, torch.from_numpy(tiles[i:i + 4]), generator=generator).sum())
                   for i in range(0, len(tiles), 4))
    return bits / (len(tiles) * TILE * TILE)


def exact_vs_float(codec, model: TrainableUQDM, img: np.ndarray) -> dict:
    """The exact codec's stream and ideal bits against the float NELBO on the codec's own z_1 and dithers."""
    started = time.perf_counter()
    data, ideal = codec.compress_with_rates(img)
    seconds = time.perf_counter() - started
    assert np.array_equal(codec.decompress(data), img), "not lossless"
    tiles = torch.from_numpy(_tile(img))
    z_1, dithers = codec_trajectory(codec, len(tiles))
    with torch.no_grad():
        bits = sum(float(nelbo_bits(model, tiles[i:i + 4], z_1[i:i + 4], [d[i:i + 4] for d in dithers]).sum())
                   for i in range(0, len(tiles), 4))
    # padding is never coded: count only the image's own pixels on both sides
    pixels = img.shape[0] * img.shape[1]
    assert img.shape[0] % TILE == 0 and img.shape[1] % TILE == 0, "use photos whose sides are multiples of 64"
    return {"stream_bpp": round(8 * len(data) / pixels, 4), "ideal_bpp": round(sum(ideal) / pixels, 4),
            "float_nelbo_bpp": round(bits / pixels, 4), "stream_over_float": round(8 * len(data) / bits, 5),
            "ideal_over_float": round(sum(ideal) / bits, 5), "encode_s": round(seconds, 1),
            "lossless_roundtrip": True}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--exact-photos", type=int, default=1, help="photos coded by the exact codecs too")
    parser.add_argument("--exact-models", nargs="*", default=["uqdm-tiny-photo"],
                        help="whose exact codec codes them (uqdm-tiny's: benchmarks.uqdm_bench exactness)")
    parser.add_argument("--out", type=Path, default=RESULTS / "uqdm_finetune.json")
    parser.add_argument("--photo-weights", default="uqdm-tiny-photo", help="the exact fine-tuned weights")
    parser.add_argument("--photo-source", type=Path, default=PHOTO_SOURCE, help="their float source")
    args = parser.parse_args(argv)
    models = {"uqdm-tiny": ("uqdm-tiny-exact2", lambda: import_checkpoint(UQDM_TINY_SOURCE)),
              "uqdm-tiny-photo": (args.photo_weights, lambda: read_weights(args.photo_source))}
    torch.set_num_threads(1)
    images = dev_images()[:args.photos]
    per_photo = [{"size": list(img.shape[:2]), **{k: round(v, 4) for k, v in classical_bpp(img).items()}}
                 for img in images]
    exact = {}
    for label, (exact_name, floats) in models.items():
        model = TrainableUQDM(floats()).eval()
        started = time.perf_counter()
        for row, img in zip(per_photo, images):
            row[label] = round(float_bpp(model, checkerboard(img)), 4)
        print(f"{label}: float NELBO over {len(images)} photos in {time.perf_counter() - started:.0f} s", flush=True)
        if args.exact_photos and label in args.exact_models:
            codec = load_codec(exact_name, device="cpu")
            exact[label] = [exact_vs_float(codec, model, img) for img in images[:args.exact_photos]]
    names = ["png", "webp_lossless", *models]
    mean = {k: round(float(np.mean([row[k] for row in per_photo])), 4) for k in names}
    result = {"photos": len(images), "subset": "UQDM: float NELBO over the checkerboard half of each photo's 64x64 "
                                               "tiles ((row + col) even), seed 0; PNG and WebP: whole photos",
              "mean_bpp": mean, "per_photo": per_photo, "exact_vs_float": exact,
              "machine": {"cpu": cpu_name(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cores": os.cpu_count()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(" | ".join(f"{k:>16}" for k in names))
    print(" | ".join(f"{mean[k]:>16}" for k in names))
    for label, rows in exact.items():
        for row in rows:
            print(f"{label} exact codec on a whole photo: {row}")
    return result


if __name__ == "__main__":
    main()
