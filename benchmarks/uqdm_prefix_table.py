"""Every UQDM prefix against JPEG, WebP (and AVIF) at the same bpp, from a jobs.evaluate run.

    python -m jobs.evaluate --images '../shared/data/photos/dev/*.png' --out benchmarks/results/evaluate-uqdm-crop256 \\
        --codecs uqdm-tiny-exact2 jpeg webp avif --uqdm-set crop --uqdm-size 256 --side-by-side
    python -m benchmarks.uqdm_prefix_table benchmarks/results/evaluate-uqdm-crop256   # -> prefixes.md, prefixes.json

For each prefix (chunks 1..T) of the UQDM curve, on the same image set: its mean bpp and PSNR, and
each classical codec's PSNR at that bpp, interpolated on the codec's curve from the same run
(PCHIP of PSNR in log-bpp through the averaged points; never extrapolated: "outside" gives the
curve's bpp range). The classical grids (`model.classical`) stop at about 1 bpp (JPEG q90, WebP
q90, AVIF q75), below most prefixes; so, with `--extend` (default), JPEG and WebP are also run
here at higher qualities on the same images (the run's set rebuilt from its settings), and a
second PSNR-at-equal-bpp is read on the run's points plus those. Also the run's BD-rate rows of
the UQDM curve.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

import numpy as np
from scipy.interpolate import PchipInterpolator

from model.classical import CLASSICAL, classical_encode
from model.evaluation import image_set, load_images, measure
from model.images import decode_image

#: qualities run beyond the grids of `model.classical` (Pillow defaults otherwise: 4:2:0 chroma)
EXTENSION = {"jpeg": (95, 98, 100), "webp": (95, 100)}


def psnr_at_bpp(points: list[tuple[float, float]], bpp: float) -> float | None:
    """PSNR at `bpp` on the (bpp, psnr) curve: PCHIP in log-bpp; None outside its bpp range."""
    usable = sorted({(b, q) for b, q in points if b and q is not None and math.isfinite(q)})
    xs, ys = [], []
    for b, q in usable:  # equal rates: keep the first (sorted, so the lower PSNR)
        if not xs or math.log(b) > xs[-1]:
            xs.append(math.log(b))
            ys.append(q)
    if len(xs) < 2 or not xs[0] <= math.log(bpp) <= xs[-1]:
        return None
    return float(PchipInterpolator(xs, ys)(math.log(bpp)))


def extended_points(report: dict, set_key: str, names: list[str]) -> dict[str, list[dict]]:
    """JPEG and WebP at EXTENSION's qualities on the run's image set (rebuilt from its settings)."""
    s = report["settings"]
    how, size = s.get("uqdm_set", "downsize"), s["uqdm_size"]
    argv = shlex.split(report["command"])
    pattern = argv[argv.index("--images") + 1]
    images = image_set(load_images(pattern), how, size)
    assert images.key == set_key, (images.key, set_key)
    assert sorted(images.images) == sorted(report["images"])
    out = {}
    for name in names:
        def roundtrip_at(quality: int, name: str = name):
            def roundtrip(_: str, img: np.ndarray):
                started = time.perf_counter()
                data = classical_encode(name, img, quality)
                encoded = time.perf_counter()
                return len(data), decode_image(data)[0], encoded - started, time.perf_counter() - encoded
            return roundtrip
        out[name] = [measure(images, roundtrip_at(q), {CLASSICAL[name].knob: q}, s["swd"]) for q in EXTENSION[name]]
    return out


def table(report: dict, extend: bool = True) -> dict:
    uqdm = [c for c in report["curves"] if c["kind"] == "learned" and c.get("decoding", {}).get("progressive")]
    if not uqdm:
        raise SystemExit("no progressive (UQDM) curve in this report")
    key = uqdm[0]["image_set"]
    prefixes = sorted((p for c in uqdm for p in c["points"]), key=lambda p: p["chunks"])
    classical = {c["name"]: c for c in report["curves"] if c["kind"] == "classical" and c["image_set"] == key}
    extra = extended_points(report, key, [n for n in EXTENSION if n in classical]) if extend else {}
    rows = []
    for p in prefixes:
        row = {"chunks": p["chunks"], "bpp": p["bpp"], "psnr": p["psnr"], "lossless": p["lossless"],
               "bits_vs_jpeg_psnr": (p.get("bits_vs_jpeg") or {}).get("psnr")}
        for name, curve in classical.items():
            run = [(q["bpp"], q["psnr"]) for q in curve["points"]]
            row[f"{name}_psnr"] = psnr_at_bpp(run, p["bpp"])
            if name in extra:
                row[f"{name}_psnr_extended"] = psnr_at_bpp(run + [(q["bpp"], q["psnr"]) for q in extra[name]],
                                                           p["bpp"])
        rows.append(row)
    ranges = {name: [min(q["bpp"] for q in c["points"]), max(q["bpp"] for q in c["points"])]
              for name, c in classical.items()}
    ranges_ext = {name: [ranges[name][0], max([ranges[name][1]] + [q["bpp"] for q in pts])]
                  for name, pts in extra.items()}
    return {"image_set": key, "set": report["image_sets"][key], "command": report.get("command"),
            "machine": report.get("machine"), "wall_s": report["wall_s"], "rows": rows,
            "classical_bpp_range": ranges, "extended_bpp_range": ranges_ext,
            "extension": {n: [{k: q[k] for k in ("quality", "bpp", "psnr", "msssim")} for q in pts]
                          for n, pts in extra.items()},
            "bd_rate": [r for r in report["bd_rate"] if r["image_set"] == key and r["curve"] in {c["label"] for c in uqdm}]}


def _cell(value, spec=".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(t: dict) -> str:
    names = list(t["classical_bpp_range"])
    label = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}
    out = [f"# UQDM prefixes against classical codecs at equal bpp, set `{t['image_set']}`", "",
           (f"{t['set']['images']} images, {t['set']['description']}. From `{t['command']}` "
            f"({t['wall_s']['total']:.0f} s on {t['machine']})."), "",
           "PSNR in dB (means over images); a classical codec's PSNR at the prefix's bpp is interpolated on its "
           "averaged curve (PCHIP in log-bpp), `outside` = the prefix's bpp is beyond the curve's range "
           "(never extrapolated). In-run bpp ranges: "
           + "; ".join(f"{label.get(n, n)} {lo:.3f}-{hi:.3f}" for n, (lo, hi) in t["classical_bpp_range"].items())
           + ".", ""]
    header = ["chunks", "UQDM bpp", "UQDM PSNR"] + [f"{label.get(n, n)} PSNR" for n in names]
    header += [f"{label.get(n, n)} PSNR, extended grid" for n in t["extended_bpp_range"]]
    header += ["bits vs JPEG at equal PSNR"]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in t["rows"]:
        cells = [str(r["chunks"]) + (" (lossless)" if r["lossless"] else ""), f"{r['bpp']:.3f}",
                 "exact" if r["psnr"] is None else f"{r['psnr']:.2f}"]
        cells += ["outside" if r[f"{n}_psnr"] is None else f"{r[f'{n}_psnr']:.2f}" for n in names]
        cells += ["outside" if r[f"{n}_psnr_extended"] is None else f"{r[f'{n}_psnr_extended']:.2f}"
                  for n in t["extended_bpp_range"]]
        bits = r["bits_vs_jpeg_psnr"]
        cells += ["n/a" if bits is None else f"{bits:+.0f}%"]
        out.append("| " + " | ".join(cells) + " |")
    if t["extension"]:
        out += ["", "Extended grid: run here on the same images, Pillow defaults (4:2:0 chroma): "
                + "; ".join(f"{label.get(n, n)} " + ", ".join(f"q{q['quality']} {q['bpp']:.3f} bpp {_cell(q['psnr'])} dB"
                                                             for q in pts) for n, pts in t["extension"].items())
                + ". Extended bpp ranges: "
                + "; ".join(f"{label.get(n, n)} {lo:.3f}-{hi:.3f}" for n, (lo, hi) in t["extended_bpp_range"].items())
                + "."]
    out += ["", ("`bits vs JPEG`: the run's own per-prefix figure (JPEG's in-run curve at the prefix's PSNR; n/a "
                 "outside it)."), "", ("BD-rate of the UQDM prefix curve (from the run; only over the PSNR range "
                 "both curves cover, which for UQDM's few, widely spaced prefixes is a narrow part of its curve):"), "",
            "| anchor | BD-rate PSNR | BD-rate MS-SSIM (dB) |", "|---|---|---|"]
    out += [f"| {r['anchor']} | {_cell(r['psnr'], '+.1f')}% | {_cell(r['msssim_db'], '+.1f')}% |" for r in t["bd_rate"]]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="a jobs.evaluate output folder (with results.json)")
    p.add_argument("--no-extend", action="store_true", help="only the run's classical curves")
    args = p.parse_args()
    folder = Path(args.results)
    t = table(json.loads((folder / "results.json").read_text()), extend=not args.no_extend)
    (folder / "prefixes.json").write_text(json.dumps(t, indent=1) + "\n")
    text = markdown(t)
    (folder / "prefixes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
