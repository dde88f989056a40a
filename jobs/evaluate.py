"""Rate, distortion and realism of the learned codecs against JPEG, WebP, AVIF, JPEG 2000 and
HEVC-intra, on your own images.

    python -m jobs.evaluate --images 'photos/*.png' --out eval/
    python -m jobs.evaluate --images 'photos/*.png' --out eval/ --codecs cdc-hp128:q1 cdc-hp128:q4 jpeg webp

Writes results.json (every point, per image too), results.md (tables: BD-rate vs JPEG and
WebP and AVIF, the diffusion-steps table, every point), rd_psnr.png, rd_msssim.png and rd_swd.png
(rate vs PSNR, MS-SSIM and realism), side_by_side_RATE.png (crops of the first image: the
original, CDC at 0 and --curve-steps steps, AVIF, WebP and JPEG at no more bytes), and prints
the Markdown.

--codecs takes registry names or weights paths of learned codecs (a CDC name alone means all
its rate points, "name:q2" one of them) and classical names (jpeg webp avif jpeg2000 hevc).
Diffusion decoding and UQDM are slow on a CPU, so they run on smaller images by default:
--diffusion-size central crops for CDC's steps > 0, --uqdm-size resized-and-cropped images for
UQDM (0 = the images as given). Every classical codec is also measured on those sets, and
each comparison stays within one set. What each metric and set is: model/evaluation.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from jobs._cli import setup_logging
from model.classical import CLASSICAL
from model.evaluation import Settings, evaluate, load_images
from model.registry import load_codec, split_variant
from model.report import markdown, write_report
from model.sidebyside import write_side_by_side

DEFAULTS = Settings()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="glob of images to evaluate on (quote it)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the plots")
    p.add_argument("--codecs", nargs="+", default=DEFAULTS.learned + DEFAULTS.classical,
                   help="learned (registry names, weights paths, name:rate) and classical codecs; default: %(default)s")
    p.add_argument("--steps", type=int, nargs="+", default=DEFAULTS.steps,
                   help="DDIM steps for the steps table (default: %(default)s)")
    p.add_argument("--steps-rate", default=DEFAULTS.steps_rate, help="rate point of the steps table (%(default)s)")
    p.add_argument("--curve-steps", type=int, default=DEFAULTS.curve_steps,
                   help="DDIM steps of the diffusion rate curves (%(default)s)")
    p.add_argument("--diffusion-size", type=int, default=DEFAULTS.diffusion_size,
                   help="central crop size for CDC decodes with steps > 0; 0 = full images (%(default)s)")
    p.add_argument("--uqdm-size", type=int, default=DEFAULTS.uqdm_size,
                   help="UQDM images: resized and centre-cropped to this size; 0 = full images (%(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of stochastic decoding (%(default)s)")
    p.add_argument("--swd-patch", type=int, default=DEFAULTS.swd["patch_size"], help="SWD patch size (%(default)s)")
    p.add_argument("--swd-projections", type=int, default=DEFAULTS.swd["projections"],
                   help="SWD projections (%(default)s)")
    p.add_argument("--side-by-side", nargs="*", default=["q0", "q6"], metavar="RATE",
                   help="rate points of the side-by-side crops of the first image (first CDC codec against AVIF, "
                        "WebP and JPEG at the same bytes; none: skip) (default: %(default)s)")
    p.add_argument("--device", help="torch device of the learned codecs (default: cuda if available)")
    p.add_argument("--threads", type=int, default=DEFAULTS.threads,
                   help="torch CPU threads; 0 = torch's default (%(default)s: fastest on a shared machine)")
    args = p.parse_args(argv)
    setup_logging()
    settings = Settings(learned=[c for c in args.codecs if c not in CLASSICAL],
                        classical=[c for c in args.codecs if c in CLASSICAL],
                        curve_steps=args.curve_steps, steps=args.steps, steps_rate=args.steps_rate,
                        diffusion_size=args.diffusion_size, uqdm_size=args.uqdm_size, seed=args.seed,
                        swd={**DEFAULTS.swd, "patch_size": args.swd_patch, "projections": args.swd_projections},
                        device=args.device, threads=args.threads or None)
    images = load_images(args.images)
    report = evaluate(images, settings)
    report["command"] = "python -m jobs.evaluate " + shlex.join(argv)
    write_report(report, args.out)
    cdc = next((c for c in settings.learned if load_codec(split_variant(c)[0], device="cpu").has_variants), None)
    if cdc and args.side_by_side:
        write_side_by_side(next(iter(images.values())), str(split_variant(cdc)[0]), args.side_by_side, args.out,
                           steps=args.curve_steps, device=args.device)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
