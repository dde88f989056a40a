"""What a smaller hyperprior costs in bits and saves in decoding: the same frozen transforms coded
with the source's hyperprior and with one retrained smaller (diffpress train-hyper), on the dev photos.

    python -m benchmarks.cdc_hyper_lite [--source cdc-hp128] [--lite cdc-hp128-lite] [--images 12]

Every rate point, real streams, 0-step mean images: bpp and PSNR of both, the BD-rate (PSNR) of
the lite weights against the source's; and, one thread, decode_latents images/s (the exact half a
loader worker runs per image: entropy decoding + the integer h_s) of both at 768x512 and on
256x256 central crops, beside Pillow's JPEG q90 decoding of the same images. Writes
benchmarks/results/cdc_hyper_lite.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model.evaluation import Settings, bd_rate, image_set, load_images
from model.paths import DEV_PHOTOS
from model.registry import load_codec

from .cdc_context_gain import curve
from .decode_split import jpeg_decode_rate, median_seconds
from .machine import cpu_name

RESULTS = Path(__file__).parent / "results" / "cdc_hyper_lite.json"
SPEED_RATE = "q4"


def decode_latents_rate(name: str, images: list, repeats: int) -> float:
    codec = load_codec(f"{name}:{SPEED_RATE}", device="cpu")
    streams = codec.compress_batch(images)
    return len(streams) / median_seconds(lambda: codec.decode_latents(streams), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="cdc-hp128")
    parser.add_argument("--lite", default="cdc-hp128-lite")
    parser.add_argument("--images", type=int, default=12, help="first N dev photos")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = load_images(str(DEV_PHOTOS / "*.png"))
    full = image_set(dict(list(photos.items())[:args.images]), "full", 0)
    source, lite = curve(args.source, full, Settings()), curve(args.lite, full, Settings())
    by_rate = {p["rate"]: p for p in source}
    rows = [{"rate": p["rate"], "bpp_source": by_rate[p["rate"]]["bpp"], "bpp_lite": p["bpp"],
             "extra_bits": p["bpp"] / by_rate[p["rate"]]["bpp"] - 1, "psnr_source": by_rate[p["rate"]]["psnr"],
             "psnr_lite": p["psnr"]} for p in lite]
    bd = bd_rate([(p["bpp"], p["psnr"]) for p in source], [(p["bpp"], p["psnr"]) for p in lite])
    speed = {}
    for size in (0, 256):
        images = list((full if size == 0 else image_set(full.images, "crop", size)).images.values())
        jpeg, _ = jpeg_decode_rate(images, args.repeats)
        speed[f"{images[0].shape[1]}x{images[0].shape[0]}"] = {
            "jpeg_q90_images_per_s": jpeg, "rate": SPEED_RATE,
            **{f"decode_latents_{which}_images_per_s": decode_latents_rate(name, images, args.repeats)
               for which, name in (("source", args.source), ("lite", args.lite))}}
    report = {"source": args.source, "lite": args.lite, "images": len(full.images), "threads": 1,
              "bd_rate_psnr": bd, "rows": rows, "decode_latents": speed,
              "machine": {"cpu": cpu_name(), "torch": torch.__version__}}
    RESULTS.write_text(json.dumps(report, indent=1))
    print(f"{args.lite} vs {args.source} on {len(full.images)} dev photos: BD-rate (PSNR) {bd:+.2f}%")
    print("| rate | bpp source | bpp lite | extra bits | PSNR source | PSNR lite |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']} | {r['bpp_source']:.4f} | {r['bpp_lite']:.4f} | {100 * r['extra_bits']:+.1f}% | "
              f"{r['psnr_source']:.2f} | {r['psnr_lite']:.2f} |")
    print("| image | JPEG q90 decodes/s | decode_latents/s, source | decode_latents/s, lite |")
    print("|---|---|---|---|")
    for size, s in speed.items():
        print(f"| {size} | {s['jpeg_q90_images_per_s']:.0f} | {s['decode_latents_source_images_per_s']:.1f} | "
              f"{s['decode_latents_lite_images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
