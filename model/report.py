"""An evaluation report (`model.evaluation.evaluate`) as files: JSON, a Markdown table, plots.

    write_report(report, "out/")   # results.json, results.md, rd_psnr.png, rd_msssim.png, rd_swd.png

Each plot has one panel per image set (curves are compared only within a set): every
classical codec's sweep (dashed) and every learned curve (solid), bpp on a log axis.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .classical import CLASSICAL

#: metric -> (name, axis label, file name)
PLOTS = {
    "psnr": ("PSNR", "PSNR (dB), higher is better", "rd_psnr.png"),
    "msssim_db": ("MS-SSIM", "MS-SSIM (dB: -10 log10(1 - MS-SSIM)), higher is better", "rd_msssim.png"),
    "swd": ("Realism", "realism: patch SWD (8-bit levels), lower is better", "rd_swd.png"),
}


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    paths = [out / "results.json", out / "results.md"]
    for metric, (title, axis, filename) in PLOTS.items():
        plot(report, metric, title, axis, out / filename)
        paths.append(out / filename)
    return paths


# ----------------------------------------------------------------------------- Markdown
def _cell(value, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _setting(point: dict) -> str:
    for key in ("rate", "chunks", *{c.knob for c in CLASSICAL.values()}):
        if key in point:
            return f"{key} {point[key]}"
    return point.get("codec", "")


def markdown(report: dict) -> str:
    s, sets = report["settings"], report["image_sets"]
    lines = ["# Rate, distortion and realism", ""]
    if report.get("command"):
        lines += [f"`{report['command']}`", ""]
    load = report.get("load_average")
    lines += [f"{len(report['images'])} images; wall time {report['wall_s']['total']:.0f} s"
              + (f" (CPU time {report['cpu_s']:.0f} s)" if "cpu_s" in report else "")
              + (f" on {report['machine']}" if report.get("machine") else "")
              + (f"; load average {load['start']:.1f} at the start, {load['end']:.1f} at the end" if load else "")
              + ".", "",
              "Every number is a mean over the images of a set (bpp from the real streams, headers included); "
              "`SWD` is the realism measure: the sliced Wasserstein distance between the patch distributions of "
              f"the originals and the reconstructions ({s['swd']['patch_size']}x{s['swd']['patch_size']} patches, "
              f"means removed, {s['swd']['patches_per_image']} per image, {s['swd']['projections']} projections, "
              f"seed {s['swd']['seed']}; 8-bit levels, lower is more realistic). Seconds are per image.", "",
              "## Image sets", ""]
    lines += _table(["set", "images", "sizes (WxH)", "made as"],
                    [[k, str(v["images"]), ", ".join(v["sizes_wxh"]), v["description"]] for k, v in sets.items()])
    lines += ["", "## BD-rate", "",
              "On the curves averaged over images (PCHIP in log-rate over the overlapping quality range; "
              "negative = fewer bits for the same quality; n/a = the curves do not overlap).", ""]
    for key in sets:
        rows = [r for r in report["bd_rate"] if r["image_set"] == key]
        anchors = list(dict.fromkeys(r["anchor"] for r in rows))
        curves = list(dict.fromkeys(r["curve"] for r in rows))
        if not rows:
            continue
        lines += [f"Set `{key}`:", ""]
        header = ["curve"] + [f"vs {a} ({m})" for a in anchors for m in ("PSNR", "MS-SSIM")]
        body = []
        for curve in curves:
            cells = [curve]
            for anchor in anchors:
                row = next((r for r in rows if r["curve"] == curve and r["anchor"] == anchor), {})
                cells += [_cell(row.get("psnr"), "+.1f") + "%" * (row.get("psnr") is not None),
                          _cell(row.get("msssim_db"), "+.1f") + "%" * (row.get("msssim_db") is not None)]
            body.append(cells)
        lines += _table(header, body) + [""]
    for table in report["steps_tables"]:
        lines += [f"## Diffusion steps: {table['codec']} on set `{table['image_set']}`", "",
                  f"One stream per image ({table['rows'][0]['bpp']:.4f} bpp); deterministic = DDIM eta 0 from seed 0, "
                  f"stochastic = eta 1 with seed {table['seed']}.", ""]
        lines += _table(["steps", "decoding", "PSNR", "MS-SSIM", "SWD", "decode s"],
                        [[str(r["steps"]), r["decoding"], _cell(r["psnr"]), _cell(r["msssim"], ".4f"),
                          _cell(r["swd"], ".3f"), _cell(r["decode_s"], ".3f")] for r in table["rows"]]) + [""]
    for kind, title in (("learned", "Learned codecs"), ("classical", "Classical codecs")):
        lines += [f"## {title}", ""]
        if kind == "learned":
            lines += ["`bits vs JPEG`: the point's bits against JPEG's at the same PSNR / MS-SSIM on the same set "
                      "(negative = fewer; n/a = outside JPEG's measured range).", ""]
        rows = [[c["label"], c["image_set"], _setting(p), _cell(p["bpp"], ".4f"),
                 _cell(p["psnr"], ".2f", "lossless" if p["lossless"] else "inf"), _cell(p["msssim"], ".4f"),
                 _cell(p["swd"], ".3f"), _cell(p["encode_s"], ".3f"), _cell(p["decode_s"], ".3f")]
                + ([_versus(p.get("bits_vs_jpeg"))] if kind == "learned" else [])
                for c in report["curves"] if c["kind"] == kind for p in c["points"]]
        lines += _table(["curve", "set", "setting", "bpp", "PSNR", "MS-SSIM", "SWD", "encode s", "decode s"]
                        + (["bits vs JPEG (PSNR / MS-SSIM)"] if kind == "learned" else []), rows)
        lines += [""]
    return "\n".join(lines)


def _versus(bits: dict | None) -> str:
    if not bits:
        return "n/a"
    return " / ".join(_cell(bits[m], "+.1f") + "%" * (bits[m] is not None) for m in ("psnr", "msssim_db"))


# ----------------------------------------------------------------------------- plots
def plot(report: dict, metric: str, title: str, axis_label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sets = list(report["image_sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 5.2), squeeze=False)
    classical = [c for c in report["curves"] if c["kind"] == "classical"]
    learned = [c for c in report["curves"] if c["kind"] == "learned"]
    colours = {c: plt.cm.tab10(i) for i, c in enumerate(dict.fromkeys(c["label"] for c in classical + learned))}
    for ax, key in zip(axes[0], sets):
        for curve in classical + learned:
            if curve["image_set"] != key:
                continue
            points = [(p["bpp"], p[metric]) for p in curve["points"] if p[metric] is not None]
            if curve.get("lossless"):
                p = curve["points"][0]
                note = "exact" if p["lossless"] else "not exact"
                y = p[metric] if p[metric] is not None and math.isfinite(p[metric]) else None
                if y is None:  # PSNR / MS-SSIM infinite: say where it is instead of drawing it
                    ax.annotate(f"{curve['label']}: {p['bpp']:.2f} bpp ({note})", xy=(0.98, 0.02),
                                xycoords="axes fraction", ha="right", va="bottom", fontsize=8,
                                color=colours[curve["label"]])
                else:
                    ax.plot([p["bpp"]], [y], "*", ms=12, color=colours[curve["label"]], label=curve["label"])
                continue
            if not points:
                continue
            xs, ys = zip(*sorted(points))
            if curve["kind"] == "classical":
                style = dict(ls="--", marker="o", ms=3, lw=1.2)
            else:  # learned curves often lie on top of each other: tell them apart by marker and line
                n = learned.index(curve)
                style = dict(ls=("-", "-.", ":")[n % 3], marker="s^vDP"[n % 5], ms=6, lw=2.2, mfc="none", mew=1.5)
            ax.plot(xs, ys, color=colours[curve["label"]], label=curve["label"], **style)
        info = report["image_sets"][key]
        ax.set_title(f"set '{key}': {info['images']} images, {', '.join(info['sizes_wxh'][:2])}"
                     + ("..." if len(info["sizes_wxh"]) > 2 else ""), fontsize=10)
        ax.set_xscale("log")
        ax.set_xticks([t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20)
                       if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]] or ax.get_xlim())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bits per pixel (bpp, log scale)")
        ax.set_ylabel(axis_label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{title} vs rate: means over the images of each set (thin dashed: classical; thick: learned)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
