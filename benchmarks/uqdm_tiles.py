"""UQDM tile size: the float NELBO of the same pixels coded as 64x64 tiles vs larger tiles (issue 20).

    python -m benchmarks.uqdm_tiles                       # -> benchmarks/results/uqdm_tiles.json + table
                                                          # (12 photos, tiles 64/96/128/192: ~27 min, one thread)
    python -m benchmarks.uqdm_tiles --photos 1 --sizes 64 128 --out /tmp/t.json   # a quick look

uqdm-tiny (the authors' float checkpoint, ../shared) is convolutional with one global
self-attention layer, so it runs on any tile size although it was trained on 64x64 images.
For the central --crop x --crop pixels of each dev photo (never trained on; native resolution),
the float negative ELBO (model.uqdm.train.nelbo_bits: what the exact codec codes, within 1%) is
measured with the crop cut into independent s x s tiles for each s in --sizes (each divides
the crop, so every tiling codes exactly the same pixels and no padding). Common random numbers:
one z_1 field and one dither field per step are drawn per photo (seed + photo index) at the
crop's size and cut into each tiling's tiles, and the codec's own hard universal quantization
follows them (nelbo_bits with z_1 and dithers), so the tilings differ only in the tiling.

Besides the total, split into the T step rates and the lossless term, each tiling reports the
bpp of the bottom-right 64x64 block of each of its tiles against the same pixels coded as 64x64
tiles. That block is the neighbour-context proxy: given z_t of the whole window, each element's
rate at every step is its own, so a 64x64 block's bits inside an s x s tile are what it costs
when the rest of the window (above and left of it: already decoded in raster order) is given
to the decoder, which can recompute those pixels' latents from their pixels and the seed. The
model conditions on neighbours only through their latents at the same noise level; using their
clean pixels would need a model trained for it (not measured). Seconds are one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from model.paths import UQDM_TINY_SOURCE
from model.uqdm.importer import import_checkpoint
from model.uqdm.train import TrainableUQDM, nelbo_bits

from .machine import cpu_name
from .uqdm_bench import RESULTS, dev_images


def to_tiles(field: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) -> (N, C, size, size), row-major; size divides H and W."""
    c, h, w = field.shape
    return field.reshape(c, h // size, size, w // size, size).permute(1, 3, 0, 2, 4).reshape(-1, c, size, size)


def from_tiles(tiles: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of to_tiles: (N, C, size, size) -> (C, H, W)."""
    size, c = tiles.shape[-1], tiles.shape[1]
    return tiles.reshape(h // size, w // size, c, size, size).permute(2, 0, 3, 1, 4).reshape(c, h, w)


def bit_map(model: TrainableUQDM, pixels: torch.Tensor, z_1: torch.Tensor, dithers: list[torch.Tensor],
            size: int) -> torch.Tensor:
    """(T + 1, H, W) float64 bits per pixel position (channels summed), per step and the lossless term,
    of the (3, H, W) uint8 `pixels` coded as independent size x size tiles on these z_1 and dithers."""
    h, w = pixels.shape[1:]
    tiles, z, u = to_tiles(pixels, size), to_tiles(z_1, size), [to_tiles(d, size) for d in dithers]
    batch = max(1, 16384 // (size * size))
    maps = []
    with torch.no_grad():
        for i in range(0, len(tiles), batch):
            parts: list[torch.Tensor] = []
            nelbo_bits(model, tiles[i:i + batch], z[i:i + batch], [d[i:i + batch] for d in u], parts=parts)
            maps.append(torch.stack([p.double().sum(1) for p in parts], 1))   # (b, T + 1, size, size)
    return from_tiles(torch.cat(maps), h, w)


def bottom_right_mask(h: int, w: int, size: int, block: int = 64) -> torch.Tensor:
    """True on the bottom-right block x block pixels of every size x size tile."""
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[size - block:, size - block:] = True
    return inside.repeat(h // size, w // size)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=12)
    parser.add_argument("--crop", type=int, default=384, help="central crop side (each size must divide it)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 192])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "uqdm_tiles.json")
    args = parser.parse_args(argv)
    if any(args.crop % s or s < 64 for s in args.sizes) or 64 not in args.sizes:
        parser.error("every size must be >= 64 and divide --crop, and 64 must be among them")
    torch.set_num_threads(1)
    model = TrainableUQDM(import_checkpoint(UQDM_TINY_SOURCE)).eval()
    steps = model.config["n_timesteps"]
    images = dev_images()[:args.photos]
    crop = args.crop
    seconds = {s: 0.0 for s in args.sizes}
    per_photo = []
    for index, img in enumerate(images):
        top, left = (img.shape[0] - crop) // 2, (img.shape[1] - crop) // 2
        pixels = torch.from_numpy(np.ascontiguousarray(img[top:top + crop, left:left + crop].transpose(2, 0, 1)))
        generator = torch.Generator().manual_seed(args.seed + index)
        z_1 = torch.randn(pixels.shape, generator=generator)
        dithers = [torch.rand(pixels.shape, generator=generator) - 0.5 for _ in range(steps)]
        maps = {}
        for size in args.sizes:
            started = time.perf_counter()
            maps[size] = bit_map(model, pixels, z_1, dithers, size)
            seconds[size] += time.perf_counter() - started
        row = {"photo": index, "crop": [top, left, crop, crop]}
        for size, m in maps.items():
            mask = bottom_right_mask(crop, crop, size)
            row[str(size)] = {"bpp": float(m.sum()) / crop ** 2,
                              "step_bpp": [float(m[i].sum()) / crop ** 2 for i in range(steps)],
                              "lossless_bpp": float(m[steps].sum()) / crop ** 2,
                              "br64_bpp": float(m.sum(0)[mask].mean()),
                              "br64_bpp_as_64_tiles": float(maps[64].sum(0)[mask].mean())}
        per_photo.append(row)
        print(f"photo {index}: " + ", ".join(f"{s}: {row[str(s)]['bpp']:.3f}" for s in args.sizes)
              + f" bpp ({sum(seconds.values()):.0f} s so far)", flush=True)
    pixels_total = len(images) * crop ** 2

    def mean(size: int, key: str):
        values = np.array([row[str(size)][key] for row in per_photo])
        return [round(float(v), 4) for v in values.mean(0)] if values.ndim > 1 else round(float(values.mean()), 4)

    summary = {}
    for size in args.sizes:
        summary[str(size)] = {"bpp": mean(size, "bpp"), "step_bpp": mean(size, "step_bpp"),
                              "lossless_bpp": mean(size, "lossless_bpp"),
                              "vs_64": round(mean(size, "bpp") / mean(64, "bpp"), 4),
                              "br64_bpp": mean(size, "br64_bpp"),
                              "br64_bpp_as_64_tiles": mean(size, "br64_bpp_as_64_tiles"),
                              "attention_pairs_per_pixel": size * size,
                              "seconds": round(seconds[size], 1),
                              "seconds_per_megapixel": round(seconds[size] / pixels_total * 1e6, 1)}
    result = {"model": "uqdm-tiny (authors' float checkpoint)", "photos": len(images),
              "subset": f"central {crop}x{crop} native-resolution crop of each dev photo; float NELBO on "
                        f"common z_1 and dither fields (seed {args.seed} + photo index), the codec's hard "
                        "universal quantization; every tiling codes the same pixels, no padding",
              "br64": "bottom-right 64x64 block of each tile: its bits given the rest of the window "
                      "(neighbour-context proxy), against the same pixels coded as 64x64 tiles",
              "mean": summary, "per_photo": per_photo,
              "machine": {"cpu": cpu_name(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cores": os.cpu_count(),
                          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    head = ["tile", "bpp", "vs 64", *[f"step {i + 1}" for i in range(steps)], "lossless",
            "BR64 in tile", "BR64 as 64s", "s/MP"]
    print(" | ".join(f"{h:>12}" for h in head))
    for size, s in summary.items():
        cells = [f"{size}x{size}", s["bpp"], s["vs_64"], *s["step_bpp"], s["lossless_bpp"], s["br64_bpp"],
                 s["br64_bpp_as_64_tiles"], s["seconds_per_megapixel"]]
        print(" | ".join(f"{c!s:>12}" for c in cells))
    return result


if __name__ == "__main__":
    main()
