"""UQDM-tiny measurements on this machine: JSON out + printed tables.

    python -m benchmarks.uqdm_bench progressive   # bpp and PSNR per prefix, dev photos
    python -m benchmarks.uqdm_bench fidelity      # coded size vs negative ELBO
    python -m benchmarks.uqdm_bench exactness     # bits of the exact codec vs the float model's NELBO
    python -m benchmarks.uqdm_bench speed         # MP/s per prefix, entropy coder symbols/s
    python -m benchmarks.uqdm_bench memory        # peak RSS encoding + decoding a 24 MP photo

Needs the imported weights (`python -m jobs.import_uqdm ../shared/weights/uqdm-tiny`).
Results go to benchmarks/results/uqdm_<what>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.machine import cpu_name
from model import entropy, load_codec
from model.metrics import psnr
from model.paths import DEV_PHOTOS, TRAIN_PHOTOS
from model.exact import frequency_rows
from model.uqdm.codec import TILE, _group_mask, _tile
from model.uqdm.quantize import float_network, log_snrs, step_constants

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


def exactness(codec, weights_float, images) -> dict:
    """Bits the exact codec codes, per chunk, over the float model's negative ELBO on the same
    images with the same shared randomness (initial latents and dithers): the cost of exactness."""
    exact_bits, float_bits, pixels = np.zeros(codec.n_chunks), np.zeros(codec.n_chunks), 0
    for img in images:
        exact_bits += codec.compress_with_rates(img)[1]
        float_bits += float_nelbo(weights_float, codec, img)
        pixels += img.shape[0] * img.shape[1]
    rows = [{"chunk": k + 1, "float_nelbo_bpp": round(float(f / pixels), 4), "exact_bpp": round(float(e / pixels), 4),
             "exact_over_float": round(float(e / f), 5)} for k, (e, f) in enumerate(zip(exact_bits, float_bits))]
    rows.append({"chunk": "all", "float_nelbo_bpp": round(float(float_bits.sum() / pixels), 4),
                 "exact_bpp": round(float(exact_bits.sum() / pixels), 4),
                 "exact_over_float": round(float(exact_bits.sum() / float_bits.sum()), 5)})
    lossy = [{"chunk": k + 1, "exact_over_float": round(float(exact_bits[:k + 1].sum() / float_bits[:k + 1].sum()), 5)}
             for k in range(codec.n_chunks - 1)]
    return {"images": len(images), "pixels": pixels, "rows": rows, "prefixes": lossy}


def float_nelbo(weights_float, codec, img: np.ndarray) -> np.ndarray:
    """The float model's ideal bits per chunk (its negative ELBO terms): the authors' float32 network,
    the rest in float64, with the exact codec's initial latents and dithers."""
    from scipy.special import expit

    net, gammas = float_network(weights_float), log_snrs(weights_float)
    steps = [step_constants(a, b) for a, b in zip(gammas, gammas[1:])]
    tiles = _tile(img)
    height, width = img.shape[:2]
    bits = np.zeros(len(steps) + 1)
    for first in range(0, len(tiles), 4):
        last = min(first + 4, len(tiles))
        m = torch.from_numpy(_group_mask(height, width, first, last))
        x_raw = torch.from_numpy(tiles[first:last]).double()
        x = (x_raw + 0.5) / 128 - 1
        z = codec._initial_latent(first, last).cpu() / 4096.0
        for i, step in enumerate(steps):
            with torch.no_grad():
                eps, scale = (t.double() for t in net(z.float(), torch.tensor(float(gammas[i]))))
            p_loc = step.loc_scale * (z - step.eps_scale * eps)
            r = (scale * step.prior_scale * 65536.0).numpy()[m.numpy()]
            u = (codec._dither(first, last, i).cpu() / 512.0)
            k = torch.round((step.q_z * z + step.q_x * x - p_loc) / step.delta + u) * m
            a = (k - u).numpy()[m.numpy()]
            # sigmoid(hi) - sigmoid(lo) on the side of the median where it does not cancel
            hi = np.where(a > 0, (0.5 - a) / r, (a + 0.5) / r)
            lo = np.where(a > 0, (-0.5 - a) / r, (a - 0.5) / r)
            probability = expit(hi) - expit(lo)
            bits[i] -= np.log2(np.maximum(probability, 2.0 ** -60)).sum()
            z = p_loc + (k - u) * step.delta
        alpha_0 = 1.0 / codec.pixel.inv_alpha_0
        centre = ((z / alpha_0 + 1) * 128 - 0.5).numpy()[m.numpy()]
        values = np.arange(256)[None, :]
        logits = -0.5 * np.exp(-gammas[-1]) / 128.0 ** 2 * (values - centre[:, None]) ** 2
        log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        bits[-1] -= log_p[np.arange(centre.size), x_raw.numpy()[m.numpy()].astype(int)].sum() / np.log(2)
    return bits


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
    """constriction with one integer frequency row per symbol, on segments the size of a 4-tile group.

    The rows are computed once outside the timing: this is the coder's own speed; the codec
    also spends time computing rows (in the encode/decode figures above).
    """
    rng = np.random.default_rng(0)
    centre = rng.uniform(-0.5, 0.5, size=segment)
    offsets = np.round(centre + rng.logistic(0, 1.5, size=segment)).astype(np.int64)
    window = int(np.abs(offsets).max())
    grid = np.arange(-window, window + 1)[None, :] - centre[:, None]
    probs = frequency_rows(np.round(np.exp(-np.abs(grid) / 1.5) * (1 << 20)).astype(np.int64))
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
    parser.add_argument("what", choices=["progressive", "fidelity", "exactness", "speed", "memory"])
    parser.add_argument("--weights", default="uqdm-tiny-exact2")
    parser.add_argument("--images", type=int, default=12, help="how many dev photos to use")
    args = parser.parse_args(argv)
    codec = load_codec(args.weights, device="cpu")
    if args.what == "progressive":
        result = progressive(codec, dev_images()[:args.images])
    elif args.what == "fidelity":
        result = fidelity(codec, dev_images(TILE)[:args.images], dev_images()[:args.images])
    elif args.what == "exactness":
        from model.paths import UQDM_TINY_SOURCE
        from model.uqdm.importer import import_checkpoint
        crops = [img[r:r + 2 * TILE, c:c + 2 * TILE] for img, (r, c) in
                 zip(dev_images()[:args.images], np.random.default_rng(0).integers(0, 384, (args.images, 2)))]
        result = exactness(codec, import_checkpoint(UQDM_TINY_SOURCE), dev_images(TILE)[:args.images] + crops)
    elif args.what == "speed":
        result = speed(codec, dev_images()[:args.images])
    else:
        result = memory(args.weights)
    result["machine"] = {"cpu": cpu_name(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "cores": os.cpu_count()}
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
