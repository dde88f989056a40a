"""CDC rate-distortion vs JPEG/WebP/AVIF/HEVC at matched bpp, and the DDIM-steps knob.

    python -m benchmarks.cdc_rd                       # both parts, every shipped cdc-small-* rate
    python -m benchmarks.cdc_rd --part steps --knob-codec cdc-small-b0010

Writes benchmarks/results/cdc_rd.json and cdc_steps.json and prints tables. Timings are
single-threaded CPU (the codec pins one thread so encoder and decoder agree bit for bit).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from model import available, load_codec
from model.classical import CLASSICAL, ClassicalCurves, compare_with_classical
from model.evaluation import evaluate_codec, load_images, summarize
from model.metrics import msssim, psnr
from model.paths import DEV_PHOTOS

RESULTS = Path(__file__).parent / "results"
DEV = DEV_PHOTOS / "*.png"


def rate_distortion(rates: list[str], images: dict[str, np.ndarray]) -> dict:
    curves, out = ClassicalCurves(images), {}
    for name in rates:
        codec = load_codec(name, device="cpu")
        rows = evaluate_codec(codec, images)
        for row in rows:
            row["estimated_bits"] = codec.estimated_bits(images[row["image"]])
            row["rate_gap"] = 8 * row["bytes"] / row["estimated_bits"] - 1
        out[name] = {"steps": codec.default_steps, "mean": summarize(rows),
                     "rate_gap_mean": float(np.mean([r["rate_gap"] for r in rows])),
                     "rate_gap_max": float(np.max(np.abs([r["rate_gap"] for r in rows]))),
                     "classical": compare_with_classical(rows, curves), "per_image": rows}
    return out


def steps_knob(name: str, images: dict[str, np.ndarray], steps_list: list[int]) -> dict:
    codec = load_codec(name, device="cpu")
    streams = {key: codec.compress(img) for key, img in images.items()}
    table = {}
    for steps in steps_list:
        rows = []
        for key, img in images.items():
            started = time.perf_counter()
            out = codec.decompress(streams[key], steps=steps)
            rows.append({"decode_s": time.perf_counter() - started, "psnr": psnr(img, out),
                         "msssim": msssim(img, out)})
        table[steps] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        logging.info("%s steps=%d: %s", name, steps, table[steps])
    bpp = float(np.mean([8 * len(streams[k]) / (img.shape[0] * img.shape[1]) for k, img in images.items()]))
    return {"codec": name, "bpp": bpp, "steps": table}


def cell(value: float | None, spec: str) -> str:
    return "n/a".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)


def print_rd(results: dict) -> None:
    print(f"{'codec':18} {'bpp':>6} {'PSNR':>6} {'MS-SSIM':>7} {'gap%':>5} {'dec s':>6} | "
          + " | ".join(f"{c.upper():>4} PSNR@bpp  MS-SSIM  bpp@PSNR  beats" for c in CLASSICAL))
    for name, r in results.items():
        m = r["mean"]
        cells = [f"{cell(c['psnr_at_matched_bpp'], '13.2f')} {cell(c['msssim_at_matched_bpp'], '8.4f')} "
                 f"{cell(c['bpp_for_equal_psnr'], '9.4f')} {100 * c['dominates_share']:5.0f}%" for c in r["classical"].values()]
        print(f"{name:18} {m['bpp']:6.4f} {m['psnr']:6.2f} {m['msssim']:7.4f} {100 * r['rate_gap_mean']:5.2f} "
              f"{m['decode_s']:6.2f} | " + " | ".join(cells))


def print_steps(result: dict) -> None:
    print(f"{result['codec']} at {result['bpp']:.4f} bpp")
    print(f"{'steps':>5} {'PSNR':>7} {'MS-SSIM':>8} {'decode s':>9}")
    for steps, r in result["steps"].items():
        print(f"{steps:>5} {r['psnr']:7.2f} {r['msssim']:8.4f} {r['decode_s']:9.2f}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["rd", "steps", "all"], default="all")
    p.add_argument("--rates", nargs="+", help="codecs for the RD table (default: shipped cdc-small-*)")
    p.add_argument("--images", default=str(DEV))
    p.add_argument("--knob-codec", default="cdc-small-b0010")
    p.add_argument("--knob-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    images = load_images(args.images)
    meta = {"command": "python -m benchmarks.cdc_rd " + shlex.join(argv), "images": list(images),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": 1}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.part in ("rd", "all"):
        rates = args.rates or [n for n in available() if n.startswith("cdc-small-")]
        results = rate_distortion(rates, images)
        (out_dir / "cdc_rd.json").write_text(json.dumps({**meta, "results": results}, indent=1))
        print_rd(results)
    if args.part in ("steps", "all"):
        result = steps_knob(args.knob_codec, images, args.knob_steps)
        (out_dir / "cdc_steps.json").write_text(json.dumps({**meta, **result}, indent=1))
        print_steps(result)


if __name__ == "__main__":
    main()
