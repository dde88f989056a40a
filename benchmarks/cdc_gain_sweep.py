"""How far gain scaling stretches CDC's rate range: candidate derived rate points on the dev
photos (mean image), each against JPEG at equal PSNR and MS-SSIM. Chose the shipped q0 and q7.

    python -m benchmarks.cdc_gain_sweep [--points q1*0.5 q1*0.6 q6*1.4 q6*1.7 q6*2.0]

Writes benchmarks/results/cdc_gain_sweep.json and prints a table. Nothing is saved to the
weights: each candidate is an in-memory copy (model.cdc.train.with_derived_rates).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from model.cdc.codec import CDCCodec
from model.cdc.train import with_derived_rates
from model.evaluation import (Settings, Streams, bits_at_equal_quality, classical_curve, decoding_roundtrip,
                              image_set, load_images, measure)
from model.paths import DEV_PHOTOS
from model.registry import read_weights, resolve

RESULTS = Path(__file__).parent / "results" / "cdc_gain_sweep.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="cdc-hp128")
    parser.add_argument("--points", nargs="+", default=["q1*0.5", "q1*0.6", "q6*1.4", "q6*1.7", "q6*2.0"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = Settings()
    images = image_set(load_images(str(DEV_PHOTOS / "*.png")), "crop", 0)
    jpeg = classical_curve("jpeg", images, settings.swd)["points"]
    base = read_weights(resolve(args.weights))
    rows = []
    for spec in args.points:
        source, scale = spec.split("*")
        weights = with_derived_rates(base, [("candidate", source, float(scale))], "benchmarks.cdc_gain_sweep")
        streams = Streams(CDCCodec(weights, device="cpu", variant="candidate"))
        point = measure(images, decoding_roundtrip(streams, images, steps=0), {"rate": spec}, settings.swd)
        rows.append({"point": spec, "bpp": point["bpp"], "psnr": point["psnr"], "msssim": point["msssim"],
                     **{f"bits_vs_jpeg_{m}": bits_at_equal_quality([(p["bpp"], p[m]) for p in jpeg], point["bpp"],
                                                                   point[m]) for m in ("psnr", "msssim_db")}})
    RESULTS.write_text(json.dumps({"weights": args.weights, "images": len(images.images), "rows": rows}, indent=1))
    print("| point | bpp | PSNR | MS-SSIM | bits vs JPEG (PSNR) | (MS-SSIM) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['point']} | {r['bpp']:.3f} | {r['psnr']:.2f} | {r['msssim']:.4f} | "
              + " | ".join("n/a" if r[k] is None else f"{r[k]:+.1f}%" for k in ("bits_vs_jpeg_psnr", "bits_vs_jpeg_msssim_db"))
              + " |")


if __name__ == "__main__":
    main()
