"""UQDM-tiny measurements on this machine: JSON out + printed tables.

    python -m benchmarks.uqdm_bench progressive   # bpp and PSNR per prefix, dev photos
    python -m benchmarks.uqdm_bench fidelity      # coded size vs negative ELBO
    python -m benchmarks.uqdm_bench speed         # MP/s per prefix, entropy coder symbols/s
    python -m benchmarks.uqdm_bench memory        # peak RSS encoding + decoding a 24 MP photo

Needs the imported weights (`python -m jobs.import_uqdm ../shared/weights/uqdm-tiny`).
Results go to benchmarks/results/uqdm_<what>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model import entropy, load_codec
from model.metrics import psnr
from model.paths import DEV_PHOTOS, TRAIN_PHOTOS
from model.uqdm.codec import TILE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def dev_images(size: int | None = None) -> list[np.ndarray]:
    images = []
    for path in sorted(DEV_PHOTOS.glob("*.png")):
        image = Image.open(path).convert("RGB")
        if size:
            image = image.resize((size, size), Image.LANCZOS)
        images.append(np.asarray(image))
    return images


def progressive(codec, images) -> dict:
    """Cumulative bpp and mean PSNR for each prefix 1..T+1 (full-size dev photos)."""
    n = codec.n_chunks
    bpp, quality = np.zeros(n), np.zeros(n)
    for img in images:
        data = codec.compress(img)
        header = codec.read_header(data)
        pixels = img.shape[0] * img.shape[1]
        bpp += 8 * (header.size + np.cumsum(header.chunk_lengths)) / pixels / len(images)
        quality += np.array([psnr(codec.decompress(data, chunks=k), img) for k in range(1, n + 1)]) / len(images)
    rows = [{"chunks": k + 1, "bpp": round(float(bpp[k]), 4), "psnr_db": round(float(quality[k]), 3)}
            for k in range(n)]
    return {"images": len(images), "rows": rows}


def fidelity(codec, images_64, images_full) -> dict:
    """Coded bits over the model's negative ELBO (the ideal bits of the sampled latents)."""
    out = {}
    for label, images in (("dev_64x64", images_64), ("dev_full_size_tiles", images_full)):
        ideal = payload = total = pixels = 0.0
        for img in images:
            data, bits = codec.compress_with_rates(img)
            ideal += sum(bits)
            total += 8 * len(data)
            payload += 8 * (len(data) - codec.read_header(data).size)
            pixels += img.shape[0] * img.shape[1]
        out[label] = {"images": len(images), "nelbo_bpp": round(ideal / pixels, 4),
                      "coded_payload_bpp": round(payload / pixels, 4), "coded_stream_bpp": round(total / pixels, 4),
                      "payload_over_nelbo": round(payload / ideal, 5), "stream_over_nelbo": round(total / ideal, 5)}
    return out


def speed(codec, images) -> dict:
    pixels = sum(img.shape[0] * img.shape[1] for img in images) / 1e6
    started = time.perf_counter()
    datas = codec.compress_batch(images)
    encode_s = time.perf_counter() - started
    rows = [{"stage": "encode (all chunks)", "seconds": round(encode_s, 2), "mp_per_s": round(pixels / encode_s, 4)}]
    for k in range(1, codec.n_chunks + 1):
        started = time.perf_counter()
        codec.decompress_batch(datas, chunks=k)
        seconds = time.perf_counter() - started
        rows.append({"stage": f"decode {k} chunk(s)", "seconds": round(seconds, 2), "mp_per_s": round(pixels / seconds, 4)})
    return {"megapixels": round(pixels, 3), "rows": rows, "entropy_coder": entropy_coder_speed()}


def entropy_coder_speed(segment: int = 49_152, repeats: int = 20) -> dict:
    """constriction with one probability row per symbol, on segments the size of a 4-tile group.

    The rows are computed once outside the timing: this is the coder's own speed; the codec
    also spends time computing rows (in the encode/decode figures above).
    """
    rng = np.random.default_rng(0)
    centre = rng.uniform(-0.5, 0.5, size=segment)
    offsets = np.round(centre + rng.logistic(0, 1.5, size=segment)).astype(np.int64)
    window = int(np.abs(offsets).max())
    grid = np.arange(-window, window + 1)[None, :] - centre[:, None]
    probs = np.exp(-np.abs(grid) / 1.5)
    started = time.perf_counter()
    for _ in range(repeats):
        data = entropy.encode_offsets(offsets, lambda w: probs)
    encode_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(repeats):
        decoded = entropy.decode_offsets(data, segment, lambda w: probs)
    decode_s = time.perf_counter() - started
    assert np.array_equal(decoded, offsets)
    n = segment * repeats
    return {"symbols": n, "window": window, "encode_msym_per_s": round(n / encode_s / 1e6, 2),
            "decode_msym_per_s": round(n / decode_s / 1e6, 2), "bits_per_symbol": round(8 * len(data) / segment, 3)}


MEMORY_CHILD = """
import resource, sys, time, json
import numpy as np
from PIL import Image
from model import load_codec
codec = load_codec(sys.argv[1], device="cpu")
src = Image.open(sys.argv[2]).convert("RGB").resize((6000, 4000), Image.LANCZOS)
img = np.asarray(src); del src
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); data = codec.compress(img); enc = time.perf_counter() - t
t = time.perf_counter(); out = codec.decompress(data); dec = time.perf_counter() - t
assert np.array_equal(out, img)
print(json.dumps({"megapixels": 24.0, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_codec_mib": base / 1024, "encode_s": enc, "decode_s": dec,
                  "stream_bytes": len(data), "bpp": 8 * len(data) / img.shape[0] / img.shape[1]}))
"""


def memory(weights: str) -> dict:
    photo = sorted(TRAIN_PHOTOS.glob("*.jpg"))[0]
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, weights, str(photo)], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["progressive", "fidelity", "speed", "memory"])
    parser.add_argument("--weights", default="uqdm-tiny-exact")
    parser.add_argument("--images", type=int, default=12, help="how many dev photos to use")
    args = parser.parse_args(argv)
    codec = load_codec(args.weights, device="cpu")
    if args.what == "progressive":
        result = progressive(codec, dev_images()[:args.images])
    elif args.what == "fidelity":
        result = fidelity(codec, dev_images(TILE)[:args.images], dev_images()[:args.images])
    elif args.what == "speed":
        result = speed(codec, dev_images()[:args.images])
    else:
        result = memory(args.weights)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                         "threads_for_networks": 1, "cores": os.cpu_count()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"uqdm_{args.what}.json").write_text(json.dumps(result, indent=2))
    print_table(args.what, result)
    return result


def print_table(what: str, result: dict) -> None:
    if "rows" in result:
        keys = list(result["rows"][0])
        print(" | ".join(f"{k:>20}" for k in keys))
        for row in result["rows"]:
            print(" | ".join(f"{row[k]!s:>20}" for k in keys))
    for key, value in result.items():
        if key not in ("rows", "machine"):
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
