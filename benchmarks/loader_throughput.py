"""Loader throughput: images per second through ArchiveDataset + DataLoader, per decoding setting,
next to webdataset reading the original JPEG shards (what training reads today).

    DIFFPRESS_WEIGHTS=../shared/weights python -m benchmarks.loader_throughput \\
        [--images 8] [--uqdm-images 4] [--uqdm-crop 0] [--workers 2] [--uqdm-codec uqdm-tiny-exact2] \\
        [--only REGEX] [--batch 4] [--out benchmarks/results/loader_throughput.json]

Data: the dev photos (768x512; for UQDM optionally their central crops) as webdataset shards of
JPEG quality 95, two photos a shard;
compressed by compress_bucket (private in-process Ray, 2 CPUs) with cdc-hp128 and with UQDM.
Each setting reads its archive through DataLoader(num_workers=W, batch_size=None,
persistent_workers=True) for two epochs: the first warms up (worker start, codec load), the
second is measured. Settings: CDC steps 0 (the mean image), 1, 2, 4, and steps 0 in bf16
(autocast, in the workers); UQDM prefixes of 1 to 5 chunks (5 = lossless); CDC steps 0 with
decode_on="device" (the workers decode latents, the measuring loop synthesizes batches of
--batch with a Synthesizer on this machine's CPU, float32 and bf16 autocast: what a training
loop without a GPU would do); webdataset's WebDataset(...).decode("rgb8") over the JPEG shards (read
25 times over, as it is too fast to time on a few images).

Where one image's time goes is measured in the main process on one thread: fetching its
bytes, and for CDC the entropy decoding + hyperprior (decode_symbols), then the content
decoder (steps 0), then the diffusion steps. Writes benchmarks/results/loader_throughput.json
and prints a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

import ray
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.machine import cpu_name
from model.paths import DEV_PHOTOS
from pipeline.archive import Archive, torch_threads
from pipeline.compress import CompressConfig, run_compress
from pipeline.loader import ArchiveDataset, collate_samples

RESULTS = Path(__file__).resolve().parent / "results" / "loader_throughput.json"
CDC_STEPS = (0, 1, 2, 4)
PHOTOS_PER_SHARD = 2
BASELINE_PASSES = 25
DEVICE_CHECK = RESULTS.parent / "device_check.json"  # benchmarks/device_session.py on a lent GPU


def gpu_codec_speeds() -> dict[str, float]:
    """The bare codecs' MP/s on the GPU that device_session.py measured (768x512), by setting name."""
    if not DEVICE_CHECK.exists():
        return {}
    check = json.loads(DEVICE_CHECK.read_text())
    speed, device = check["speed"], check["device"]
    cdc, uqdm = speed.get("cdc-hp128:q3", {}), speed.get("uqdm-tiny-exact2", {})
    pairs = {"cdc steps 0": cdc.get("decode_mp_s_steps0"), "cdc steps 4": cdc.get("decode_mp_s_steps4"),
             "uqdm 1 chunk": uqdm.get("decode_mp_s_chunks1"), "uqdm 5 chunks (lossless)": uqdm.get("decode_mp_s_chunks5")}
    return {name: {"mp_per_s": value, "device": device} for name, value in pairs.items() if value}


def jpeg_shards(count: int, folder: Path, crop: int = 0) -> list[str]:
    """The first `count` dev photos (or their central crop x crop pixels) as webdataset shards
    of JPEG q95 (+ a .cls)."""
    photos = sorted(DEV_PHOTOS.glob("*.png"))[:count]
    if len(photos) < count:
        raise FileNotFoundError(f"needs {count} dev photos in {DEV_PHOTOS}")
    folder.mkdir(parents=True)
    urls = []
    for number, start in enumerate(range(0, count, PHOTOS_PER_SHARD)):
        url = str(folder / f"photos-{number:03d}.tar")
        with webdataset.TarWriter(url, encoder=False, mtime=0) as writer:
            for path in photos[start:start + PHOTOS_PER_SHARD]:
                buffer = io.BytesIO()
                image = Image.open(path).convert("RGB")
                if crop:
                    left, top = (image.width - crop) // 2, (image.height - crop) // 2
                    image = image.crop((left, top, left + crop, top + crop))
                image.save(buffer, format="JPEG", quality=95)
                writer.write({"__key__": path.stem, "jpg": buffer.getvalue(), "cls": b"0"})
        urls.append(url)
    return urls


def hwc_images(item) -> list[torch.Tensor]:
    """The H x W x 3 images of one loader item (an archive sample, or webdataset's tuple)."""
    return [item["image"] if isinstance(item, dict) else item[1]]


def timed_epochs(loader: DataLoader, before_epoch=lambda epoch: None, images_of=hwc_images) -> dict:
    """Two epochs; the second measured. Returns images, pixels and seconds of each."""
    epochs = []
    for epoch in range(2):
        before_epoch(epoch)
        started, images, pixels = time.perf_counter(), 0, 0
        for item in loader:
            for image in images_of(item):
                images, pixels = images + 1, pixels + image.shape[0] * image.shape[1]
        epochs.append({"images": images, "pixels": pixels, "seconds": time.perf_counter() - started})
    warm, measured = epochs
    return {"warm_up_seconds": warm["seconds"], **measured, "images_per_s": measured["images"] / measured["seconds"],
            "mp_per_s": measured["pixels"] / 1e6 / measured["seconds"], "load_average": os.getloadavg()[0]}


def archive_loader(url: str, workers: int, **options) -> dict:
    dataset = ArchiveDataset(url, decode_batch=1, **options)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True)
    return timed_epochs(loader, dataset.set_epoch)


def device_loader(url: str, workers: int, batch: int, steps: int, autocast: torch.dtype | None) -> dict:
    """decode_on="device": latents from the workers, batches synthesized in this loop."""
    dataset = ArchiveDataset(url, steps=steps, decode_batch=batch, decode_on="device")
    synthesize = dataset.synthesizer("cpu", autocast=autocast)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=True,
                        collate_fn=collate_samples)
    return {**timed_epochs(loader, dataset.set_epoch, lambda batch: list(synthesize(batch))),
            "main_process_torch_threads": torch.get_num_threads()}


def webdataset_loader(urls: list[str], workers: int) -> dict:
    dataset = (webdataset.WebDataset(urls * BASELINE_PASSES, shardshuffle=False, empty_check=False)
               .decode("rgb8").to_tuple("__key__", "jpg").map_tuple(None, torch.from_numpy))
    return timed_epochs(DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True))


def breakdown(url: str, options: dict) -> dict:
    """Seconds for one image, in the main process on one thread: fetch, then decoding stages."""
    archive = Archive(url, threads=1)
    row = archive.shard_records(archive.shards()[0])[0]
    codec = archive.codec
    started = time.perf_counter()
    data = archive.fetch([row], options.get("chunks"))[0]
    out = {"fetch": time.perf_counter() - started}
    started = time.perf_counter()
    archive.decode_rows([row], **options)
    out["decode"] = time.perf_counter() - started
    if not codec.progressive:
        with torch_threads(codec.device):
            started = time.perf_counter()
            codec.decode_symbols(data)
            out["entropy_and_hyperprior"] = time.perf_counter() - started
            started = time.perf_counter()
            codec.decompress(data, steps=0, **{k: v for k, v in options.items() if k == "autocast"})
            out["content_decoder"] = time.perf_counter() - started - out["entropy_and_hyperprior"]
        out["diffusion_steps"] = out["decode"] - out["entropy_and_hyperprior"] - out["content_decoder"]
    return out


def compress(urls: list[str], output: Path, codec: str) -> str:
    run_compress(CompressConfig(urls, str(output), codec, actors=2, batch_size=1))
    return str(output)


def compress_archives(codecs: set, urls: list[str], root: Path, args: argparse.Namespace) -> dict[str, str]:
    """The archives the chosen settings read ("cdc", "uqdm"), compressed on a private local Ray."""
    with tempfile.TemporaryDirectory(prefix="bench-ray", dir="/tmp") as ray_dir:
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
        try:
            archives = {"cdc": compress(urls, root / "cdc", "cdc-hp128")} if "cdc" in codecs else {}
            if "uqdm" in codecs:
                uqdm_urls = jpeg_shards(args.uqdm_images, root / "jpeg-uqdm", args.uqdm_crop)
                archives["uqdm"] = compress(uqdm_urls, root / "uqdm", args.uqdm_codec)
        finally:
            ray.shutdown()
    return archives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="dev photos for CDC and webdataset (default 8)")
    parser.add_argument("--uqdm-images", type=int, default=4, help="dev photos for UQDM (default 4)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--uqdm-codec", default="uqdm-tiny-exact2")
    parser.add_argument("--batch", type=int, default=4, help="images per synthesis call, decode_on=device (default 4)")
    parser.add_argument("--only", default="", help="measure only the settings whose names match this regex")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON report (default {RESULTS.name})")
    parser.add_argument("--uqdm-crop", type=int, default=0,
                        help="UQDM on central crops of this size (default 0: whole photos; it is slow on a CPU)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loader") as folder:
        root = Path(folder)
        urls = jpeg_shards(args.images, root / "jpeg")
        settings = {"webdataset jpeg (baseline)": (None, {})}
        settings.update({f"cdc steps {steps}": ("cdc", {"steps": steps}) for steps in CDC_STEPS})
        settings["cdc steps 0, bf16"] = ("cdc", {"steps": 0, "autocast": torch.bfloat16})
        settings.update({f"cdc steps 0, decode_on=device{bf16}, batch {args.batch}":
                         ("cdc", {"steps": 0, "device": True, "autocast": torch.bfloat16 if bf16 else None})
                         for bf16 in ("", " bf16")})
        settings.update({f"uqdm {n} chunk{'s' if n > 1 else ''}{' (lossless)' if n == 5 else ''}": ("uqdm", {"chunks": n})
                         for n in range(1, 6)})
        settings = {name: value for name, value in settings.items() if re.search(args.only, name)}
        archives = compress_archives({codec for codec, _ in settings.values()}, urls, root, args)
        results = {}
        for name, (codec, options) in settings.items():
            print(f"measuring {name} ...", flush=True)
            if codec is None:
                results[name] = webdataset_loader(urls, args.workers)
            elif options.get("device"):
                results[name] = {**device_loader(archives[codec], args.workers, args.batch, options["steps"],
                                                 options["autocast"]), "options": str(options)}
            else:
                results[name] = {**archive_loader(archives[codec], args.workers, **options),
                                 "one_image_seconds": breakdown(archives[codec], options),
                                 "options": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in options.items()}}
    for name, gpu in gpu_codec_speeds().items():
        if name in results:
            results[name]["gpu_codec_decode"] = gpu
    report = {"workers": args.workers, "images": args.images, "uqdm_images": args.uqdm_images,
              "uqdm_codec": args.uqdm_codec, "photo_size": "768x512",
              "uqdm_size": f"{args.uqdm_crop}x{args.uqdm_crop}" if args.uqdm_crop else "768x512", "cpu_cores": os.cpu_count(),
              "machine": cpu_name(), "torch_threads_per_worker": 1,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"JSON: {args.out}")


def table(report: dict) -> str:
    lines = [f"| setting ({report['workers']} DataLoader workers; CDC and JPEG 768x512, UQDM {report['uqdm_size']}) "
             "| images/s | MP/s | one image: fetch / "
             "decode (s) | of which entropy+hyper / content / diffusion (s) | bare codec decode on a GPU, MP/s (device_check.json) | "
             "load avg |", "|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        one = r.get("one_image_seconds", {})
        split = (f"{one['entropy_and_hyperprior']:.2f} / {one['content_decoder']:.2f} / {one['diffusion_steps']:.2f}"
                 if "content_decoder" in one else "-")
        fetch = f"{one['fetch'] * 1000:.1f} ms / {one['decode']:.2f}" if one else "-"
        gpu = f"{r['gpu_codec_decode']['mp_per_s']:.3g}" if "gpu_codec_decode" in r else "-"
        lines.append(f"| {name} | {r['images_per_s']:.3f} | {r['mp_per_s']:.3f} | {fetch} | {split} | {gpu} | "
                     f"{r['load_average']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
