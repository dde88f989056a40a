"""Side-by-side crops a person can judge: the original, a learned codec's decodes, and the classical
codecs at the same bytes.

    paths = write_side_by_side(img, "cdc-hp128", ["q0", "q6"], "out/", steps=4)

For each rate point: the CDC stream's size sets the budget; AVIF, WebP and JPEG each get the
highest quality whose file is no larger (so they never get more bytes than CDC; one that cannot
get that small shows its smallest file, marked). One PNG per rate point, panels of the same
crop (the most detailed window) without smoothing, each titled with its codec, bytes, bpp and
PSNR of the whole image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .classical import CLASSICAL, classical_encode
from .images import decode_image
from .metrics import psnr
from .registry import load_codec

COMPARED = ("avif", "webp", "jpeg")
QUALITIES = range(0, 101)


def at_most_bytes(name: str, img: np.ndarray, budget: int) -> tuple[int, bytes] | None:
    """The highest quality of classical codec `name` whose file fits `budget` bytes (None if none does).

    A binary search: file size grows with quality for these encoders, up to small wiggles
    that can only make the search pick a slightly lower quality, never one over budget.
    """
    low, high, best = QUALITIES[0], QUALITIES[-1], None
    while low <= high:
        middle = (low + high) // 2
        data = classical_encode(name, img, middle)
        if len(data) <= budget:
            best, low = (middle, data), middle + 1
        else:
            high = middle - 1
    return best


def panels(img: np.ndarray, codec_name: str, rate: str, steps: int, device: str | None = None
           ) -> list[tuple[str, np.ndarray]]:
    """(title, decoded image) of the original, CDC at 0 and `steps` steps, and each classical codec."""
    codec = load_codec(f"{codec_name}:{rate}", device=device)
    data = codec.compress(img)
    pixels = img.shape[0] * img.shape[1]

    def title(label: str, size: int, out: np.ndarray) -> str:
        return f"{label}\n{size} B, {8 * size / pixels:.3f} bpp, {psnr(img, out):.2f} dB"

    out = [("original", img)]
    for decode_steps in (0, steps):
        decoded = codec.decompress(data, steps=decode_steps)
        out.append((title(f"{codec.name}, {decode_steps} steps", len(data), decoded), decoded))
    for name in COMPARED:
        found = at_most_bytes(name, img, len(data))
        label = CLASSICAL[name].label
        if found is None:  # it cannot get this small: show its smallest file, marked as over budget
            found = (QUALITIES[0], classical_encode(name, img, QUALITIES[0]))
            label += f" q{QUALITIES[0]} (its smallest: {len(found[1]) / len(data):.1f}x the bytes)"
        else:
            label += f" q{found[0]}"
        decoded = decode_image(found[1])[0]
        out.append((title(label, len(found[1]), decoded), decoded))
    return out


def detailed_crop(img: np.ndarray, crop: int) -> tuple[int, int]:
    """(top, left) of the crop x crop window with the most detail (gradient energy), on a coarse grid:
    flat sky shows nothing of a codec."""
    gray = img.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(gray, axis=0))[:, :-1] + np.abs(np.diff(gray, axis=1))[:-1, :]
    step = max(1, crop // 4)
    candidates = [(t, c) for t in range(0, max(1, img.shape[0] - crop + 1), step)
                  for c in range(0, max(1, img.shape[1] - crop + 1), step)]
    return max(candidates, key=lambda tl: energy[tl[0]:tl[0] + crop, tl[1]:tl[1] + crop].sum())


def write_side_by_side(img: np.ndarray, codec_name: str, rates: list[str], out_dir: str | Path, steps: int = 4,
                       crop: int = 160, device: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    top, left = detailed_crop(img, crop)
    paths = []
    for rate in rates:
        shown = panels(img, codec_name, rate, steps, device)
        figure, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 3.2), dpi=150)
        for axis, (label, decoded) in zip(np.atleast_1d(axes), shown):
            axis.imshow(decoded[top:top + crop, left:left + crop], interpolation="nearest")
            axis.set_title(label, fontsize=6)
            axis.axis("off")
        figure.tight_layout()
        path = out_dir / f"side_by_side_{rate}.png"
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)
    return paths
