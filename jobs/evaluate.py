"""Rate, distortion and realism of the learned codecs against JPEG, WebP, AVIF, JPEG 2000 and
HEVC-intra, on your own images.

    diffpress evaluate --images 'photos/*.png' --out eval/
    diffpress evaluate --images 'photos/*.png' --out eval/ --codecs cdc-hp128:q1 cdc-hp128:q4 jpeg webp

Writes results.json (every point, per image too), results.md (tables: BD-rate vs JPEG and
WebP and AVIF, the diffusion-steps table, every point), rd_psnr.png, rd_msssim.png and rd_swd.png
(rate vs PSNR, MS-SSIM and realism), side_by_side_RATE.png (crops of the first image: the
original, CDC at 0 and --curve-steps steps, AVIF, WebP and JPEG at no more bytes), and prints
the Markdown.

--codecs takes registry names or weights paths of learned codecs (a CDC name alone means all
its rate points, "name:q2" one of them) and classical names (jpeg webp avif jpeg2000 hevc).
Diffusion decoding and UQDM are slow on a CPU, so they run on smaller images by default:
--diffusion-size central crops for CDC's steps > 0, --uqdm-size resized-and-cropped images for
UQDM (--uqdm-set crop: central crops at native scale instead; 0 = the images as given). Every
classical codec is also measured on those sets, and each comparison stays within one set.
What each metric and set is: model/evaluation.py.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from jobs import cli
from jobs._cli import UsageError, check_codec, non_negative_int, positive_int, usage_errors
from model.classical import CLASSICAL
from model.evaluation import UQDM_SETS, Settings, evaluate, load_images
from model.registry import load_codec, split_variant
from model.report import markdown, write_report
from model.sidebyside import write_side_by_side

HELP = "rate, distortion and realism against JPEG, WebP, AVIF, JPEG 2000, HEVC on your images"
DEFAULTS = Settings()
log = logging.getLogger("jobs.evaluate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="glob of images to evaluate on (quote it)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the plots")
    p.add_argument("--codecs", nargs="+",
                   help="learned (registry names, weights paths, name:rate) and classical codecs; default: "
                        f"{' '.join(DEFAULTS.learned + DEFAULTS.classical)} (learned ones that are not installed "
                        "are skipped, with a warning)")
    p.add_argument("--steps", type=non_negative_int, nargs="+", default=DEFAULTS.steps,
                   help="DDIM steps for the steps table (default: %(default)s)")
    p.add_argument("--steps-rate", default=DEFAULTS.steps_rate, help="rate point of the steps table (%(default)s)")
    p.add_argument("--curve-steps", type=positive_int, default=DEFAULTS.curve_steps,
                   help="DDIM steps of the diffusion rate curves (%(default)s)")
    p.add_argument("--diffusion-size", type=non_negative_int, default=DEFAULTS.diffusion_size,
                   help="central crop size for CDC decodes with steps > 0; 0 = full images (%(default)s)")
    p.add_argument("--uqdm-size", type=non_negative_int, default=DEFAULTS.uqdm_size,
                   help="UQDM images: made this size as --uqdm-set says; 0 = full images (%(default)s)")
    p.add_argument("--uqdm-set", choices=UQDM_SETS, default=DEFAULTS.uqdm_set,
                   help="UQDM images: resized then centre-cropped (downsize, as ImageNet-64), or central crops "
                        "at native scale (crop, as the codec tiles a photo) (%(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of stochastic decoding (%(default)s)")
    p.add_argument("--swd-patch", type=positive_int, default=DEFAULTS.swd["patch_size"],
                   help="SWD patch size (%(default)s)")
    p.add_argument("--swd-projections", type=positive_int, default=DEFAULTS.swd["projections"],
                   help="SWD projections (%(default)s)")
    p.add_argument("--side-by-side", nargs="*", default=["q0", "q6"], metavar="RATE",
                   help="rate points of the side-by-side crops of the first image (first CDC codec against AVIF, "
                        "WebP and JPEG at the same bytes; none: skip) (default: %(default)s)")
    p.add_argument("--device", help="torch device of the learned codecs (default: cuda if available)")
    p.add_argument("--threads", type=non_negative_int, default=DEFAULTS.threads,
                   help="torch CPU threads; 0 = torch's default (%(default)s: fastest on a shared machine)")


def learned_codecs(asked: list[str] | None) -> list[str]:
    """The learned codecs to run, each checked here: the ones asked for must load; of the defaults,
    those not installed (UQDM before its import) are skipped with a warning."""
    if asked is not None:
        return [check_codec(name) for name in asked if name not in CLASSICAL]
    found = []
    for name in DEFAULTS.learned:
        try:
            found.append(check_codec(name))
        except UsageError as exc:
            log.warning("skipping %s: %s", name, exc)
    return found


def run(args: argparse.Namespace) -> int:
    with usage_errors(FileNotFoundError):
        images = load_images(args.images)
    classical = DEFAULTS.classical if args.codecs is None else [c for c in args.codecs if c in CLASSICAL]
    settings = Settings(learned=learned_codecs(args.codecs), classical=classical,
                        curve_steps=args.curve_steps, steps=args.steps, steps_rate=args.steps_rate,
                        diffusion_size=args.diffusion_size, uqdm_size=args.uqdm_size,
                        uqdm_set=args.uqdm_set, seed=args.seed,
                        swd={**DEFAULTS.swd, "patch_size": args.swd_patch, "projections": args.swd_projections},
                        device=args.device, threads=args.threads or None)
    report = evaluate(images, settings)
    report["command"] = "diffpress " + shlex.join(args.argv)
    write_report(report, args.out)
    cdc = next((c for c in settings.learned if load_codec(split_variant(c)[0], device="cpu").has_variants), None)
    if cdc and args.side_by_side:
        write_side_by_side(next(iter(images.values())), str(split_variant(cdc)[0]), args.side_by_side, args.out,
                           steps=args.curve_steps, device=args.device)
    print(markdown(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
