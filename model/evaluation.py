"""Rate, distortion and realism of the learned codecs against classical ones, on a set of images.

    images = load_images("photos/*.png")
    report = evaluate(images, Settings(learned=["cdc-hp128", "uqdm-tiny-exact2"]))  # JSON-ready dict
    model.report.write_report(report, "out/")      # results.json, results.md, rd_*.png

What is measured. Every curve is a list of points; a point is one setting (a CDC rate point, a
UQDM prefix, a classical quality) run on every image of one image set:
- bpp from the real stream's bytes (headers included); PSNR and MS-SSIM per image, then
  averaged over the images; encode and decode seconds per image, averaged;
- realism: the sliced Wasserstein distance between the patches of the set's originals and
  of its reconstructions (`model.metrics.sliced_wasserstein`), one number per point.

Curves. Each classical codec: its quality sweep (`model.classical.CLASSICAL`). CDC: one curve per
decoding (0 steps: the mean image; `curve_steps` DDIM steps, deterministic; the same,
stochastic) over its rate points. UQDM: one progressive curve over the prefixes 1..T of a single
stream per image, and its lossless stream as a point of its own. The steps table: CDC at one rate
point for each number of steps, deterministic and stochastic.

Image sets. Diffusion decoding and UQDM are slow on a CPU, so by default they run on smaller
images (`Settings.diffusion_size`, `Settings.uqdm_size`): CDC's diffusion curves and steps table
on central crops (CDC was trained on photo crops at their native scale), UQDM by default on
images resized so the shorter side fits its 64 px tiles, then centre-cropped (ImageNet-64's
preparation: the released UQDM models were trained on it), or (`Settings.uqdm_set = "crop"`) on
central crops at native scale, as the codec codes a photo (cut into 64x64 tiles). Every classical
codec is swept on every image set that a learned curve uses, and curves are compared only within
one set. Size 0 = the images as given.

BD-rate (`bd_rate`): on the curves averaged over images, against JPEG and WebP on the same set,
for PSNR and MS-SSIM (in dB).

Threads. torch runs on one CPU thread by default (`Settings.threads`): on a machine shared with
other work (this project's 2-core machine with a training run), two threads made CDC 1.5-3x and
UQDM up to 10x slower than one, waiting on each other; one thread also keeps timings comparable.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.interpolate import PchipInterpolator

from .classical import CLASSICAL, classical_encode
from .codec import Codec
from .images import decode_image
from .metrics import msssim, msssim_db, psnr, sliced_wasserstein
from .registry import load_codec, split_variant

log = logging.getLogger(__name__)

#: the curves every other is compared with by BD-rate
BD_ANCHORS = ("jpeg", "webp", "avif")
#: how `Settings.uqdm_set` makes UQDM's images (`image_set`'s `how`)
UQDM_SETS = ("downsize", "crop")


@dataclass
class Settings:
    """What `evaluate` runs. Learned codecs are registry names or weights paths; a CDC name
    without a rate point means all of them, "cdc-hp128:q2" one (repeat it for several)."""

    learned: list[str] = field(default_factory=lambda: ["cdc-hp128", "uqdm-tiny-exact2"])
    classical: list[str] = field(default_factory=lambda: list(CLASSICAL))
    curve_steps: int = 4              # DDIM steps of CDC's diffusion curves (deterministic and stochastic)
    steps: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])  # the steps table
    steps_rate: str = "q3"            # the rate point of the steps table
    diffusion_size: int = 128         # CDC decodes with steps > 0 run on central crops of this size (0: full)
    uqdm_size: int = 64               # UQDM runs on images of this size (0: full), made as uqdm_set says
    uqdm_set: str = "downsize"        # "downsize": resized, then centre-cropped; "crop": central crops, native scale
    seed: int = 1                     # stochastic decoding's seed
    swd: dict = field(default_factory=lambda: {"patch_size": 8, "projections": 128, "patches_per_image": 1024,
                                                "seed": 0})
    device: str | None = None         # torch device of the learned codecs (default: cuda if present)
    threads: int | None = 1           # torch CPU threads while evaluating (None: leave torch's setting)

    def __post_init__(self):
        unknown = set(self.classical) - set(CLASSICAL)
        if unknown:
            raise ValueError(f"unknown classical codecs {sorted(unknown)}; known: {', '.join(CLASSICAL)}")
        if any(s < 0 for s in self.steps) or self.curve_steps < 1:
            raise ValueError("steps must be >= 0 and curve_steps >= 1")
        if self.uqdm_set not in UQDM_SETS:
            raise ValueError(f"unknown uqdm_set {self.uqdm_set!r}; known: {', '.join(UQDM_SETS)}")


# ----------------------------------------------------------------------------- image sets
@dataclass
class ImageSet:
    key: str
    description: str
    images: dict[str, np.ndarray] = field(repr=False)

    def summary(self) -> dict:
        sizes = sorted({f"{img.shape[1]}x{img.shape[0]}" for img in self.images.values()})
        return {"description": self.description, "images": len(self.images), "sizes_wxh": sizes}


def image_set(images: dict[str, np.ndarray], how: str, size: int) -> ImageSet:
    """The images as given (size 0), central `size`-pixel crops ("crop"), or resized so the
    shorter side is `size` (box filter: each output pixel averages the input pixels it covers)
    then centre-cropped to size x size ("downsize")."""
    if size <= 0:
        return ImageSet("full", "the images as given", images)
    if how == "crop":
        return ImageSet(f"crop{size}", f"central {size}x{size} crops (smaller sides kept whole)",
                        {k: _central_crop(img, size) for k, img in images.items()})
    if how == "downsize":
        return ImageSet(f"down{size}", f"resized (box filter) to a shorter side of {size} px, "
                        f"then central {size}x{size} crops", {k: _downsized(img, size) for k, img in images.items()})
    raise ValueError(f"unknown image set {how!r}")


def _central_crop(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return np.ascontiguousarray(img[top:top + size, left:left + size])


def _downsized(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = size / min(h, w)
    resized = Image.fromarray(img).resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BOX)
    return _central_crop(np.asarray(resized), size)


def load_images(pattern: str) -> dict[str, np.ndarray]:
    """Every file matching the glob, decoded to HxWx3 uint8, by file name."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no images match {pattern!r}")
    return {Path(p).name: decode_image(Path(p).read_bytes())[0] for p in paths}


# ----------------------------------------------------------------------------- measuring
#: (image name, image) -> (stream bytes, decoded image, encode seconds, decode seconds)
Roundtrip = Callable[[str, np.ndarray], tuple[int, np.ndarray, float, float]]


def measure(images: ImageSet, roundtrip: Roundtrip, setting: dict, swd: dict) -> dict:
    """One point: `roundtrip` on every image of the set, per-image metrics and their means.

    PSNR is None (JSON has no infinity) where an image came back exactly; `exact_images`
    counts them, and `lossless` says all did. The mean PSNR is over all images, so it is
    None as soon as one image is exact.
    """
    started = time.perf_counter()
    rows, decoded = [], []
    for name, img in images.images.items():
        size, out, encode_s, decode_s = roundtrip(name, img)
        value = psnr(img, out)
        rows.append({"image": name, "bytes": size, "bpp": 8 * size / (img.shape[0] * img.shape[1]),
                     "psnr": None if math.isinf(value) else value, "msssim": msssim(img, out),
                     "encode_s": encode_s, "decode_s": decode_s})
        decoded.append(out)
    exact = sum(r["psnr"] is None for r in rows)
    point = {**setting, **{k: _mean(r[k] for r in rows) for k in ("bpp", "psnr", "msssim", "encode_s", "decode_s")},
             "msssim_db": msssim_db(_mean(r["msssim"] for r in rows)),
             "swd": sliced_wasserstein(list(images.images.values()), decoded, **swd),
             "exact_images": exact, "lossless": exact == len(rows), "seconds": time.perf_counter() - started,
             "per_image": rows}
    point["msssim_db"] = None if math.isinf(point["msssim_db"]) else point["msssim_db"]
    log.info("%s %s: %.4f bpp, PSNR %s, MS-SSIM %.4f, SWD %.3f (%.1f s)", images.key, setting, point["bpp"],
             "exact" if point["psnr"] is None else f"{point['psnr']:.2f}", point["msssim"], point["swd"],
             time.perf_counter() - started)
    return point


def _mean(values: Iterable[float | None]) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else float(np.mean(values))


def classical_curve(name: str, images: ImageSet, swd: dict) -> dict:
    codec = CLASSICAL[name]

    def roundtrip_at(setting: int) -> Roundtrip:
        def roundtrip(_: str, img: np.ndarray):
            started = time.perf_counter()
            data = classical_encode(name, img, setting)
            encoded = time.perf_counter()
            out = decode_image(data)[0]
            return len(data), out, encoded - started, time.perf_counter() - encoded
        return roundtrip

    points = [measure(images, roundtrip_at(s), {codec.knob: s}, swd) for s in codec.grid]
    return {"name": name, "label": codec.label, "kind": "classical", "image_set": images.key,
            "decoding": f"Pillow {codec.pillow_format}, {codec.knob} sweep", "points": points}


class Streams:
    """Each image of a set encoded once by one codec (timed), shared by every way of decoding it."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self._streams: dict[tuple[str, str], tuple[bytes, float]] = {}

    def get(self, key: tuple[str, str], img: np.ndarray) -> tuple[bytes, float]:
        if key not in self._streams:
            started = time.perf_counter()
            data = self.codec.compress(img)
            self._streams[key] = (data, time.perf_counter() - started)
        return self._streams[key]


def decoding_roundtrip(streams: Streams, images: ImageSet, **options) -> Roundtrip:
    """Round trip through cached streams, decoded with `options` (CDC: steps, stochastic, seed)."""
    def roundtrip(name: str, img: np.ndarray):
        data, encode_s = streams.get((images.key, name), img)
        started = time.perf_counter()
        out = streams.codec.decompress(data, **options)
        return len(data), out, encode_s, time.perf_counter() - started
    return roundtrip


def prefix_roundtrip(streams: Streams, images: ImageSet, chunks: int) -> Roundtrip:
    """Round trip of a progressive stream cut after `chunks` chunks: the bytes a reader fetches."""
    def roundtrip(name: str, img: np.ndarray):
        data, encode_s = streams.get((images.key, name), img)
        header = streams.codec.read_header(data)
        prefix = data[:header.size + sum(header.chunk_lengths[:chunks])]
        started = time.perf_counter()
        out = streams.codec.decompress(prefix, chunks=chunks)
        return len(prefix), out, encode_s, time.perf_counter() - started
    return roundtrip


# ----------------------------------------------------------------------------- the run
def evaluate(images: dict[str, np.ndarray], settings: Settings | None = None) -> dict:
    """Run every curve of `settings` on the images; a JSON-ready report (see the module docstring)."""
    settings = settings or Settings()
    saved_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _evaluate(images, settings)
    finally:
        torch.set_num_threads(saved_threads)


def _evaluate(images: dict[str, np.ndarray], settings: Settings) -> dict:
    started, cpu_started, load_started = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    full = image_set(images, "crop", 0)
    diffusion = image_set(images, "crop", settings.diffusion_size)
    uqdm = image_set(images, settings.uqdm_set, settings.uqdm_size)
    sets: dict[str, ImageSet] = {full.key: full}
    curves, steps_tables = [], []
    for name, variants in _group_variants(settings.learned):
        codec = load_codec(name, device=settings.device)
        if codec.progressive:
            sets.setdefault(uqdm.key, uqdm)
            curves += progressive_curves(codec, uqdm, settings)
        elif codec.has_variants:
            sets.setdefault(diffusion.key, diffusion)
            new_curves, table = rate_point_curves(codec, variants, full, diffusion, settings)
            curves += new_curves
            steps_tables += [table] if table else []
        else:
            streams = Streams(codec)
            curves.append(_learned_curve(codec.name, codec.name, full, [
                measure(full, decoding_roundtrip(streams, full), {"codec": codec.name}, settings.swd)]))
    learned_s = time.perf_counter() - started
    for key, images_ in sets.items():
        curves += [classical_curve(name, images_, settings.swd) for name in settings.classical]
    add_bits_vs_anchor(curves)
    return {"settings": asdict(settings),
            "image_sets": {key: s.summary() for key, s in sets.items()},
            "images": list(images),
            "curves": curves,
            "steps_tables": steps_tables,
            "bd_rate": bd_rate_table(curves),
            "wall_s": {"learned": learned_s, "total": time.perf_counter() - started},
            "cpu_s": time.process_time() - cpu_started,
            "load_average": {"start": load_started, "end": os.getloadavg()[0]},
            "machine": _machine(settings)}


def _machine(settings: Settings) -> str:
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else ""
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} on {device}{gpu} "
            f"with {torch.get_num_threads()} CPU thread(s)")


def _group_variants(specs: list[str]) -> list[tuple[str, list[str]]]:
    """["cdc-hp128:q1", "cdc-hp128:q3", "uqdm"] -> [("cdc-hp128", ["q1", "q3"]), ("uqdm", [])]."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, variant = split_variant(spec)
        groups.setdefault(str(name), [])
        if variant is not None:
            groups[str(name)].append(variant)
    return list(groups.items())


def _learned_curve(name: str, label: str, images: ImageSet, points: list[dict], **extra) -> dict:
    return {"name": name, "label": label, "kind": "learned", "image_set": images.key, "points": points, **extra}


def rate_point_curves(codec: Codec, variants: list[str], full: ImageSet, diffusion: ImageSet,
                      settings: Settings) -> tuple[list[dict], dict | None]:
    """CDC: 0 steps on the full images; 0 steps and `curve_steps` (deterministic, stochastic) on
    the diffusion set; and the steps table at `steps_rate` (None if that rate is not evaluated).
    `variants`: the rate points to run (all of the codec's when empty)."""
    name = codec.weights.name
    rates = variants or list(codec.rate_names)
    streams = {rate: Streams(type(codec)(codec.weights, device=codec.device, variant=rate)) for rate in rates}
    cache: dict[tuple, dict] = {}

    def point(rate: str, images: ImageSet, steps: int, stochastic: bool) -> dict:
        key = (rate, images.key, steps, stochastic)
        if key not in cache:
            options = {"steps": steps} | ({"stochastic": True, "seed": settings.seed} if stochastic else {})
            cache[key] = measure(images, decoding_roundtrip(streams[rate], images, **options),
                                 {"rate": rate, "steps": steps, "stochastic": stochastic}, settings.swd)
        return cache[key]

    def curve(images: ImageSet, steps: int, stochastic: bool) -> dict:
        how = "mean image" if steps == 0 else f"{steps} step{'s' * (steps > 1)}, {_decoding_name(steps, stochastic)}"
        return _learned_curve(name, f"{name} ({how})", images, [point(r, images, steps, stochastic) for r in rates],
                              decoding={"steps": steps, "stochastic": stochastic})

    curves = [curve(full, 0, False)]
    if diffusion.key != full.key:
        curves.append(curve(diffusion, 0, False))
    curves += [curve(diffusion, settings.curve_steps, False), curve(diffusion, settings.curve_steps, True)]
    if settings.steps_rate not in rates or not settings.steps:
        return curves, None
    rows = []
    for steps in settings.steps:
        for stochastic in ([False] if steps == 0 else [False, True]):
            p = point(settings.steps_rate, diffusion, steps, stochastic)
            rows.append({"steps": steps, "decoding": _decoding_name(steps, stochastic),
                         **{k: p[k] for k in ("bpp", "psnr", "msssim", "msssim_db", "swd", "decode_s")}})
    table = {"codec": f"{name}:{settings.steps_rate}", "image_set": diffusion.key, "seed": settings.seed, "rows": rows}
    return curves, table


def _decoding_name(steps: int, stochastic: bool) -> str:
    return "mean image" if steps == 0 else "stochastic" if stochastic else "deterministic"


def progressive_curves(codec: Codec, images: ImageSet, settings: Settings) -> list[dict]:
    """UQDM: one stream per image; prefixes 1..T as a curve, the whole (lossless) stream as a point."""
    streams = Streams(codec)
    n_chunks = codec.n_chunks
    points = [measure(images, prefix_roundtrip(streams, images, n), {"chunks": n}, settings.swd)
              for n in range(1, n_chunks + 1)]
    return [_learned_curve(codec.name, f"{codec.name} (prefixes 1-{n_chunks - 1})", images, points[:-1],
                           decoding={"progressive": True}),
            _learned_curve(codec.name, f"{codec.name} (lossless)", images, points[-1:],
                           decoding={"progressive": True}, lossless=True)]


# ----------------------------------------------------------------------------- BD-rate
def bd_rate(reference: list[tuple[float, float]], test: list[tuple[float, float]]) -> float | None:
    """Bjontegaard delta rate of `test` against `reference`, in percent: the average difference in
    bits for the same quality (negative: `test` needs fewer bits).

    Each curve is a list of (bpp, quality) points. Method: log(bpp) as a function of quality,
    interpolated by a piecewise cubic Hermite polynomial (PCHIP: monotone, no overshoot; the
    "piecewise cubic" variant of the JVET/AOM tools rather than Bjontegaard's single cubic fit)
    through each curve's points, integrated over the quality range both curves cover;
    100 * (exp(mean log-rate difference) - 1). None when a curve has fewer than two usable
    points or the quality ranges do not overlap. Never extrapolated.
    """
    a, b = _log_rate_curve(reference), _log_rate_curve(test)
    if a is None or b is None:
        return None
    low, high = max(a.x[0], b.x[0]), min(a.x[-1], b.x[-1])
    if not high > low:
        return None
    mean_diff = (b.integrate(low, high) - a.integrate(low, high)) / (high - low)
    return float(100 * (math.exp(mean_diff) - 1))


def _log_rate_curve(points: list[tuple[float, float]]) -> PchipInterpolator | None:
    usable = sorted((q, math.log(r)) for r, q in points
                    if r is not None and q is not None and r > 0 and math.isfinite(q))
    by_quality: dict[float, list[float]] = {}
    for q, log_r in usable:  # equal qualities: their mean rate
        by_quality.setdefault(q, []).append(log_r)
    if len(by_quality) < 2:
        return None
    qualities = sorted(by_quality)
    return PchipInterpolator(qualities, [float(np.mean(by_quality[q])) for q in qualities])


def bits_at_equal_quality(anchor: list[tuple[float, float]], bpp: float, quality: float | None) -> float | None:
    """One point's bits against `anchor`'s (bpp, quality) curve at the same quality, in percent
    (negative: fewer bits); None outside the anchor's quality range (never extrapolated)."""
    curve = _log_rate_curve(anchor)
    if curve is None or quality is None or not curve.x[0] <= quality <= curve.x[-1]:
        return None
    return float(100 * (bpp / math.exp(curve(quality)) - 1))


def add_bits_vs_anchor(curves: list[dict], anchor: str = "jpeg") -> None:
    """Give every learned point `bits_vs_<anchor>`: {metric: bits_at_equal_quality} for PSNR and
    MS-SSIM, against the anchor's curve on the same image set (the per-rate form of BD-rate)."""
    for curve in curves:
        ref = next((c for c in curves if c["name"] == anchor and c["image_set"] == curve["image_set"]), None)
        if curve["kind"] != "learned" or ref is None:
            continue
        for point in curve["points"]:
            point[f"bits_vs_{anchor}"] = {
                metric: bits_at_equal_quality([(p["bpp"], p[metric]) for p in ref["points"]], point["bpp"],
                                              point[metric]) for metric in ("psnr", "msssim_db")}


def bd_rate_table(curves: list[dict]) -> list[dict]:
    """BD-rate of every lossy curve against each anchor (JPEG, WebP, AVIF) on the same image set."""
    out = []
    for curve in curves:
        if len(curve["points"]) < 2:
            continue
        for anchor in BD_ANCHORS:
            ref = next((c for c in curves if c["name"] == anchor and c["image_set"] == curve["image_set"]), None)
            if ref is None or ref is curve:
                continue
            row = {"image_set": curve["image_set"], "curve": curve["label"], "anchor": CLASSICAL[anchor].label}
            for metric in ("psnr", "msssim_db"):
                row[metric] = bd_rate([(p["bpp"], p[metric]) for p in ref["points"]],
                                      [(p["bpp"], p[metric]) for p in curve["points"]])
            out.append(row)
    return out
