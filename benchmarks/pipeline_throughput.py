"""Pipeline throughput vs the bare codec on the same images; 1 vs 2 encoder actors.

    DIFFPRESS_WEIGHTS=DIR python -m benchmarks.pipeline_throughput [--images 48] [--side 64]

The bare codec runs compress_batch on already-decoded arrays: the ceiling for one encoder.
It is measured in a Ray worker, like the encoders. Ray runs workers at niceness 15 by
default; here at 0 (RAY_worker_niceness), so that on a shared machine the encoders, the
bare codec and other users' processes compete on equal terms: priority is not overhead. The pipeline runs compress_bucket on a private in-process Ray (2 CPUs)
over webdataset shards of the same images as PNG: tar reading, PNG decoding, Ray
transport and writes included. CPU seconds per image (bare codec vs inside the encoder
actors, Ray's own threads in those processes included) show whether the codec does more
work in the pipeline, whatever else runs on the machine; wall-clock rates also depend on
other users' load. Three wall-clock figures per run: "steady" (from the first encoded
batch to the last manifest: what a long job sees per image), "run" (from the first shard
submitted, so with actor start-up and codec loading, a fixed cost per job) and "end to
end" (the whole run_compress call, listing and summary included). Writes JSON to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from benchmarks.machine import cpu_name
from model import load_codec
from model.paths import DEV_PHOTOS, SHARED
from pipeline.compress import CompressConfig, run_compress
from pipeline.shards import Sample, write_shard

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_throughput.json"
SHARDS = 4


def crops(count: int, side: int) -> list[np.ndarray]:
    """`count` side x side crops, at seeded random places, from the shared dev photos."""
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(DEV_PHOTOS.glob("*.png"))]
    if not photos:
        raise FileNotFoundError(f"no dev photos in {DEV_PHOTOS}: see {SHARED}/data/README.md")
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        out.append(np.ascontiguousarray(photo[top:top + side, left:left + side]))
    return out


def write_shards(images: list[np.ndarray], folder: Path) -> None:
    per_shard = -(-len(images) // SHARDS)
    for number in range(SHARDS):
        samples = []
        for i, image in enumerate(images[number * per_shard:(number + 1) * per_shard]):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            samples.append(Sample(f"{number:02d}-{i:04d}", {"png": buffer.getvalue(), "cls": b"0"}))
        (folder / f"bench-{number:03d}.tar").write_bytes(write_shard(samples))


def bare_codec(codec_name: str, images: list[np.ndarray], batch_size: int) -> dict:
    codec = load_codec(codec_name, device="cpu")
    codec.compress_batch(images[:1])  # warm-up
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(images), batch_size):
        codec.compress_batch(images[start:start + batch_size])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "mp_per_s": _megapixels(images) / seconds,
            "cpu_seconds_per_image": (time.process_time() - cpu) / len(images)}


def pipeline(codec_name: str, shards: Path, actors: int, batch_size: int, images: list[np.ndarray]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-out") as output:
        started = time.perf_counter()
        summary = run_compress(CompressConfig(str(shards), output, codec_name, actors=actors, batch_size=batch_size))
        end_to_end = time.perf_counter() - started
    assert summary.images == len(images), summary
    busy = sum(encoder["busy_seconds"] for encoder in summary.encoders.values())
    cpu = sum(encoder["cpu_seconds"] for encoder in summary.encoders.values())
    return {"actors": actors, "run_seconds": summary.run_seconds, "end_to_end_seconds": end_to_end,
            "encoder_busy_fraction": busy / (actors * summary.run_seconds),
            "steady_mp_per_s": summary.steady_megapixels_per_second,
            "run_mp_per_s": summary.megapixels_per_second,
            "end_to_end_mp_per_s": _megapixels(images) / end_to_end, "bpp": summary.bpp,
            "encoder_cpu_seconds_per_image": cpu / len(images)}


def _megapixels(images: list[np.ndarray]) -> float:
    return sum(i.shape[0] * i.shape[1] for i in images) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", default="uqdm-tiny-exact2")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setup; the best is kept")
    args = parser.parse_args()
    images = crops(args.images, args.side)
    with tempfile.TemporaryDirectory(prefix="bench-in") as shards, \
            tempfile.TemporaryDirectory(prefix="bench-ray", dir="/tmp") as ray_dir:
        write_shards(images, Path(shards))
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
        try:
            # The machine is shared: measurements interleaved, repeated, best of each kept.
            in_worker = ray.remote(num_cpus=1)(bare_codec)
            bare = [ray.get(in_worker.remote(args.codec, images, args.batch_size))]
            attempts = {1: [], 2: []}
            for _ in range(args.repeats):
                for actors, results in attempts.items():
                    results.append(pipeline(args.codec, Path(shards), actors, args.batch_size, images))
                bare.append(ray.get(in_worker.remote(args.codec, images, args.batch_size)))
            bare_in_driver = bare_codec(args.codec, images, args.batch_size)
        finally:
            ray.shutdown()
    bare_mp = max(b["mp_per_s"] for b in bare)
    bare_cpu = min(b["cpu_seconds_per_image"] for b in bare)
    runs = [max(results, key=lambda run: run["steady_mp_per_s"]) for results in attempts.values()]
    result = {"codec": args.codec, "images": args.images, "side": args.side, "batch_size": args.batch_size,
              "cpu_cores": 2, "machine": cpu_name(),
              "bare_codec": {"runs_in_ray_worker": bare, "mp_per_s": bare_mp, "cpu_seconds_per_image": bare_cpu,
                             "in_driver": bare_in_driver},
              "repeats": args.repeats, "load_average_after": os.getloadavg(),
              "pipeline": runs, "pipeline_attempts": attempts,
              "ratio_1_actor_vs_bare_steady": runs[0]["steady_mp_per_s"] / bare_mp,
              "ratio_1_actor_vs_bare_run": runs[0]["run_mp_per_s"] / bare_mp,
              "ratio_1_actor_vs_bare_end_to_end": runs[0]["end_to_end_mp_per_s"] / bare_mp,
              "encoder_cpu_vs_bare_1_actor": runs[0]["encoder_cpu_seconds_per_image"] / bare_cpu,
              "encoder_cpu_vs_bare_2_actors": runs[1]["encoder_cpu_seconds_per_image"] / bare_cpu,
              "speedup_2_vs_1_actors_steady": runs[1]["steady_mp_per_s"] / runs[0]["steady_mp_per_s"],
              "speedup_2_vs_1_actors_run": runs[1]["run_mp_per_s"] / runs[0]["run_mp_per_s"]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"{'MP/s (ratio to bare codec)':<26}{'steady':>16}{'run':>16}{'end to end':>16}")
    print(f"{'bare codec, 1 thread':<26}{bare_mp:>9.4f} (1.00)   CPU s/image {bare_cpu:.3f}   "
          f"[in the driver, not niced: {bare_in_driver['mp_per_s']:.4f}]")
    for run in runs:
        cells = "".join(f"{run[k]:>9.4f} ({run[k] / bare_mp:.2f})" for k in
                        ("steady_mp_per_s", "run_mp_per_s", "end_to_end_mp_per_s"))
        print(f"{'pipeline, %d actor(s)' % run['actors']:<26}{cells}   encoders busy "
              f"{run['encoder_busy_fraction']:.0%}, encoder CPU s/image {run['encoder_cpu_seconds_per_image']:.3f}")
    print(f"2 vs 1 actors: x{result['speedup_2_vs_1_actors_steady']:.2f} steady, "
          f"x{result['speedup_2_vs_1_actors_run']:.2f} run.  JSON: {RESULTS}")


if __name__ == "__main__":
    main()
