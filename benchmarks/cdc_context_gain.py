"""What CDC's context entropy model gains alone: the same frozen transforms, coded with the
hyperprior (the source weights) and with the context model (the new weights), on the dev photos.

    python -m benchmarks.cdc_context_gain [--source cdc-hp128] [--context cdc-hp128-ctx] [--images 12]

Every rate point, real streams, 0-step mean images: bytes, PSNR, encode and decode seconds
(one thread), the bits the context saves at each point and the BD-rate (PSNR) of the context
weights against the source's. Writes benchmarks/results/cdc_context_gain.json, prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model.evaluation import Settings, Streams, bd_rate, decoding_roundtrip, image_set, load_images, measure
from model.paths import DEV_PHOTOS
from model.registry import load_codec

RESULTS = Path(__file__).parent / "results" / "cdc_context_gain.json"


def curve(name: str, images, settings: Settings) -> list[dict]:
    rates = load_codec(name, device="cpu").rate_names
    points = []
    for rate in rates:
        streams = Streams(load_codec(f"{name}:{rate}", device="cpu"))
        point = measure(images, decoding_roundtrip(streams, images, steps=0), {"rate": rate}, settings.swd)
        points.append({k: point[k] for k in ("rate", "bpp", "psnr", "msssim", "encode_s", "decode_s")})
    return sorted(points, key=lambda p: p["bpp"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="cdc-hp128")
    parser.add_argument("--context", default="cdc-hp128-ctx")
    parser.add_argument("--images", type=int, default=12, help="first N dev photos")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = Settings()
    photos = load_images(str(DEV_PHOTOS / "*.png"))
    images = image_set(dict(list(photos.items())[:args.images]), "full", 0)
    source, context = curve(args.source, images, settings), curve(args.context, images, settings)
    by_rate = {p["rate"]: p for p in source}
    rows = [{"rate": p["rate"], "bpp_source": by_rate[p["rate"]]["bpp"], "bpp_context": p["bpp"],
             "saved": 1 - p["bpp"] / by_rate[p["rate"]]["bpp"], "psnr_source": by_rate[p["rate"]]["psnr"],
             "psnr_context": p["psnr"], "decode_s_source": by_rate[p["rate"]]["decode_s"],
             "decode_s_context": p["decode_s"], "encode_s_source": by_rate[p["rate"]]["encode_s"],
             "encode_s_context": p["encode_s"]} for p in context]
    bd = bd_rate([(p["bpp"], p["psnr"]) for p in source], [(p["bpp"], p["psnr"]) for p in context])
    RESULTS.write_text(json.dumps({"source": args.source, "context": args.context, "images": len(images.images),
                                   "image_set": images.key, "threads": 1, "bd_rate_psnr": bd, "rows": rows}, indent=1))
    print(f"{args.context} vs {args.source} on {len(images.images)} dev photos: BD-rate (PSNR) {bd:+.2f}%")
    print("| rate | bpp hyperprior | bpp context | saved | PSNR hyperprior | PSNR context | decode s (hp / ctx) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']} | {r['bpp_source']:.4f} | {r['bpp_context']:.4f} | {100 * r['saved']:.1f}% | "
              f"{r['psnr_source']:.2f} | {r['psnr_context']:.2f} | {r['decode_s_source']:.2f} / {r['decode_s_context']:.2f} |")


if __name__ == "__main__":
    main()
