"""Where CDC decoding time goes, one CPU thread, beside Pillow's JPEG decode of the same photos.

    python -m benchmarks.decode_split [--codecs cdc-hp128:q4 cdc-hp128-ctx:q4] [--images 12] [--repeats 3]

For each codec, on the dev photos (768x512), images/s of:
  decode_latents          the exact half (entropy decoding, integer hyper-synthesis, context passes)
  synthesize, batch 1     the float content decoder (0 steps), one image a call
  synthesize, batched     the same over every image in one call (bucketed by padded shape)
  ... contiguous          the same with contiguous tensors (the default layout is channels_last)
  synthesize, batched bf16   with the content decoder under bfloat16 autocast
  decompress, batch 1     both halves, one stream a call: what a reader did before the split
  decompress, batch 1, bf16  the same with the content decoder in bfloat16
and encode (compress_batch), each against JPEG q90 decoding (Pillow, to a numpy array) measured in
the same run. Each figure is the median of --repeats passes over the images. A cProfile of
decode_latents says where its time goes. Writes benchmarks/results/decode_split.json and prints
a table. One thread, because it is the unit a DataLoader worker or Ray task gets.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.machine import cpu_name
from model.evaluation import load_images
from model.paths import DEV_PHOTOS
from model.registry import load_codec

RESULTS = Path(__file__).parent / "results" / "decode_split.json"
JPEG_QUALITY = 90


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jpeg_decode_rate(images: list[np.ndarray], repeats: int) -> tuple[float, float]:
    """(images/s of Pillow decoding JPEG q90 bytes to arrays, mean bpp of those JPEGs)."""
    blobs = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, "JPEG", quality=JPEG_QUALITY)
        blobs.append(buffer.getvalue())
    seconds = median_seconds(lambda: [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs], repeats)
    bpp = statistics.mean(8 * len(b) / (img.shape[0] * img.shape[1]) for b, img in zip(blobs, images))
    return len(images) / seconds, bpp


def profile_top(work: Callable[[], object], rows: int = 8) -> list[dict]:
    """The functions taking most of `work`'s own time (tottime), with their share."""
    profiler = cProfile.Profile()
    profiler.enable()
    work()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(entry[2] for entry in stats.stats.values())
    top = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:rows]
    return [{"function": f"{Path(file).name}:{line}({name})", "seconds": entry[2], "share": entry[2] / total}
            for (file, line, name), entry in top]


def measure_codec(name: str, images: list[np.ndarray], repeats: int) -> dict:
    codec = load_codec(name, device="cpu")
    n = len(images)
    encode_s = median_seconds(lambda: codec.compress_batch(images), 1)
    streams = codec.compress_batch(images)
    latents = codec.decode_latents(streams)
    rates = {
        "decode_latents": n / median_seconds(lambda: codec.decode_latents(streams), repeats),
        "synthesize_batch1": n / median_seconds(lambda: [codec.synthesize([item], steps=0) for item in latents],
                                                repeats),
        "synthesize_batched": n / median_seconds(lambda: codec.synthesize(latents, steps=0), repeats),
        "synthesize_batched_contiguous": n / median_seconds(
            lambda: codec.synthesize(latents, steps=0, channels_last=False), repeats),
        "synthesize_batched_bf16": n / median_seconds(
            lambda: codec.synthesize(latents, steps=0, autocast=torch.bfloat16), repeats),
        "decompress_batch1": n / median_seconds(lambda: [codec.decompress(s, steps=0) for s in streams], repeats),
        "decompress_batch1_bf16": n / median_seconds(
            lambda: [codec.synthesize(codec.decode_latents([s]), steps=0, autocast=torch.bfloat16) for s in streams],
            repeats),
        "encode": n / encode_s,
    }
    pixels = sum(img.shape[0] * img.shape[1] for img in images)
    return {"codec": name, "bpp": 8 * sum(map(len, streams)) / pixels, "images_per_s": rates,
            "latent_bytes_per_image": statistics.mean(item.y_hat.nbytes for item in latents),
            "decode_latents_profile": profile_top(lambda: codec.decode_latents(streams[:4]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="+", default=["cdc-hp128:q4", "cdc-hp128-ctx:q4"])
    parser.add_argument("--images", type=int, default=12, help="first N dev photos")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = list(load_images(str(DEV_PHOTOS / "*.png")).values())[:args.images]
    jpeg_rate, jpeg_bpp = jpeg_decode_rate(images, max(args.repeats, 10))
    results = [measure_codec(name, images, args.repeats) for name in args.codecs]
    for result in results:
        result["fraction_of_jpeg"] = {k: v / jpeg_rate for k, v in result["images_per_s"].items()}
    RESULTS.write_text(json.dumps({
        "images": len(images), "size": f"{images[0].shape[1]}x{images[0].shape[0]}", "threads": 1,
        "cpu": cpu_name(), "torch": torch.__version__,
        "jpeg": {"quality": JPEG_QUALITY, "bpp": jpeg_bpp, "decode_images_per_s": jpeg_rate},
        "goals": {"decode_latents": 1 / 4, "decompress_batch1": 1 / 100}, "codecs": results}, indent=1))
    print(f"{len(images)} dev photos, one thread; Pillow JPEG q{JPEG_QUALITY} ({jpeg_bpp:.2f} bpp) decodes "
          f"{jpeg_rate:.1f} images/s")
    print("| codec | bpp | stage | images/s | x JPEG | 1 / (x JPEG) |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for stage, rate in result["images_per_s"].items():
            share = result["fraction_of_jpeg"][stage]
            print(f"| {result['codec']} | {result['bpp']:.3f} | {stage} | {rate:.2f} | {share:.4f} | {1 / share:.0f} |")
    for result in results:
        print(f"\nwhere decode_latents' time goes ({result['codec']}, 4 photos):")
        for row in result["decode_latents_profile"]:
            print(f"  {100 * row['share']:5.1f}%  {row['seconds']:.3f} s  {row['function']}")


if __name__ == "__main__":
    main()
