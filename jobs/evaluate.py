"""Rate-distortion of learned codecs against JPEG, WebP, AVIF and HEVC-intra, on your images.

    python -m jobs.evaluate --codecs cdc-hp128:q3 uqdm-tiny-exact --images '../shared/data/photos/dev/*.png' \
        --out rd.json [--steps 4]

For each image and codec: bits per pixel of the real stream, PSNR and MS-SSIM (RGB, 8-bit),
decode time. Each classical codec is swept over its quality knob and interpolated (in bpp,
per image) to the learned codec's bpp ("at matched bpp"), and to its PSNR ("bpp needed
for equal PSNR"). Values outside a sweep's range are reported as null, never extrapolated;
`dominates_share` says on how many images the classical codec beats it on both axes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs._cli import setup_logging
from model.classical import compare_codecs
from model.evaluation import load_images


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", nargs="+", required=True, help="registry names or weights paths")
    p.add_argument("--images", required=True, help="glob of images to evaluate on")
    p.add_argument("--steps", type=int, help="diffusion steps (default: each codec's)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    setup_logging()
    images = load_images(args.images)
    report = {"images": list(images), "codecs": {}}
    for name, result in compare_codecs(args.codecs, images, steps=args.steps):
        report["codecs"][name] = result
        print(json.dumps({name: result["mean"]}))
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
