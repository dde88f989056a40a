"""Classical codecs as the reference: JPEG, WebP, AVIF, JPEG 2000 and HEVC-intra round trips.

Each is run through Pillow (pillow-heif for HEVC: x265, the same core as BPG) with the
library's defaults (4:2:0 chroma where the format subsamples by default) and swept over one
knob. The grids span about 0.05-2 bpp on 768x512 photos; JPEG cannot go below ~0.15 bpp,
and on small images every format's header weighs more.

    data = classical_encode("webp", img, 50)                 # bytes; decode with model.images.decode_image
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()


@dataclass(frozen=True)
class ClassicalCodec:
    label: str          # for tables and plots
    pillow_format: str  # Pillow's format name
    knob: str           # what the sweep varies
    grid: tuple[int, ...]

    def save_options(self, setting: int) -> dict:
        if self.pillow_format == "JPEG2000":  # irreversible 9/7 wavelet at a target compression ratio
            return {"quality_mode": "rates", "quality_layers": [setting], "irreversible": True}
        return {"quality": setting}


#: name -> codec and its sweep, from low to high rate.
CLASSICAL: dict[str, ClassicalCodec] = {
    "jpeg": ClassicalCodec("JPEG", "JPEG", "quality", (2, 5, 10, 25, 50, 75, 90)),
    "webp": ClassicalCodec("WebP", "WEBP", "quality", (0, 10, 25, 50, 75, 90)),
    "avif": ClassicalCodec("AVIF", "AVIF", "quality", (0, 15, 30, 45, 60, 75)),
    # Compression ratio against 24-bit RGB: 480 -> 0.05 bpp ... 12 -> 2 bpp, whatever the content.
    "jpeg2000": ClassicalCodec("JPEG 2000", "JPEG2000", "ratio", (480, 240, 120, 60, 30, 12)),
    "hevc": ClassicalCodec("HEVC-intra", "HEIF", "quality", (0, 10, 20, 30, 40, 50)),
}


def classical_encode(name: str, img: np.ndarray, setting: int) -> bytes:
    """Encode with Pillow (pillow-heif for HEVC); `model.images.decode_image` reads it back."""
    codec = CLASSICAL[name]
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format=codec.pillow_format, **codec.save_options(setting))
    return buffer.getvalue()
