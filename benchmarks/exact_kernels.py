"""UQDM's exact network on int8 digit GEMMs vs integer-valued float64, in one run.

    python -m benchmarks.exact_kernels [--threads 2] [--size 256x384] [--repeats 2]

Times UQDM's exact encode (all chunks) and first-chunk decode of a crop of the first dev
photo, once with the int8 digit kernels (`model.exact.digits`, what runs where its probe
passes) and once forced onto float64, and checks that both kernels give the same stream
and the same decoded image. (CDC's exact half does not use them: see model/exact/digits.py.)
Results: benchmarks/results/exact_kernels.json and a table.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import cpu_name
from model.exact import digits
from model.images import decode_image
from model.paths import DEV_PHOTOS
from model.registry import load_codec

RESULTS = Path(__file__).parent / "results"


@contextmanager
def kernels(name: str):
    """Run with the digit kernels ("digits") or without them ("float64")."""
    probe = digits.int8_gemm_is_exact
    if name == "float64":
        digits.int8_gemm_is_exact = lambda: False
    try:
        yield
    finally:
        digits.int8_gemm_is_exact = probe


def best_time(run, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="256x384", help="UQDM crop HEIGHTxWIDTH (64x64 tiles)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = map(int, args.size.split("x"))
    photos = sorted(DEV_PHOTOS.iterdir())
    photo = decode_image(photos[0].read_bytes())[0]
    crop = np.ascontiguousarray(photo[:height, :width])
    uqdm = load_codec("uqdm-tiny", device="cpu")
    megapixels = height * width / 1e6
    rows, outputs = [], {}
    for name in ("float64", "digits"):
        with kernels(name):
            encode_s, stream = best_time(lambda: uqdm.compress(crop), args.repeats)
            decode_s, image = best_time(lambda: uqdm.decompress(stream, chunks=1), args.repeats)
        outputs[name] = (stream, image)
        rows.append({"kernels": name, "encode_s": round(encode_s, 3), "encode_mp_per_s": round(megapixels / encode_s, 4),
                     "decode_1_chunk_s": round(decode_s, 3), "decode_1_chunk_mp_per_s": round(megapixels / decode_s, 4)})
    same_stream = outputs["float64"][0] == outputs["digits"][0]
    same_image = bool(np.array_equal(outputs["float64"][1], outputs["digits"][1]))
    result = {"rows": rows, "encode_speedup": round(rows[0]["encode_s"] / rows[1]["encode_s"], 2),
              "decode_speedup": round(rows[0]["decode_1_chunk_s"] / rows[1]["decode_1_chunk_s"], 2),
              "same_stream": same_stream, "same_image": same_image,
              "int8_gemm_exact_here": digits.int8_gemm_is_exact(), "uqdm_crop": args.size,
              "threads": args.threads, "cpu": cpu_name(), "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "exact_kernels.json").write_text(json.dumps(result, indent=2))
    print(f"{'kernels':<9} {'encode s':>9} {'MP/s':>8} {'1 chunk s':>10} {'MP/s':>8}")
    for row in rows:
        print(f"{row['kernels']:<9} {row['encode_s']:>9} {row['encode_mp_per_s']:>8} "
              f"{row['decode_1_chunk_s']:>10} {row['decode_1_chunk_mp_per_s']:>8}")
    print(f"speed-up: encode {result['encode_speedup']}x, decode {result['decode_speedup']}x; same stream "
          f"{same_stream}, same image {same_image}; int8 GEMM exact here: {result['int8_gemm_exact_here']}")
    return result


if __name__ == "__main__":
    main()
