"""Sample shards from the photos matplotlib ships, so compress_bucket runs with no input and no network."""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib.cbook
from PIL import Image

from .shards import Sample, write_shard

# Longest side of the sample images: small enough that the demo encodes in seconds on a CPU.
SAMPLE_SIDE = 192
SOURCES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")


def build_sample_shards(folder: str | os.PathLike) -> Path:
    """Write two small webdataset shards (images + .txt/.cls extras) into `folder`; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples = [_sample(i, name) for i, name in enumerate(SOURCES)]
    samples += [_crop(i, samples[0]) for i in range(3)]
    for number, part in enumerate((samples[:3], samples[3:])):
        target = folder / f"sample-{number:06d}.tar"
        if not target.exists():
            target.write_bytes(write_shard(part))
    return folder


def _sample(index: int, name: str) -> Sample:
    with Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as image:
        image.thumbnail((SAMPLE_SIDE, SAMPLE_SIDE), Image.Resampling.LANCZOS)
        extension = "png" if image.mode != "RGB" else "jpg"
        data = _encode(image, extension)
    return Sample(f"{index:04d}", {extension: data, "txt": name.encode(), "cls": str(index).encode()})


def _crop(index: int, source: Sample) -> Sample:
    with Image.open(io.BytesIO(source.members["jpg"])) as image:
        left = 32 * index
        crop = image.crop((left, left, left + 64, left + 64))
        data = _encode(crop, "jpg")
    return Sample(f"crop{index:02d}", {"jpg": data, "txt": b"grace_hopper.jpg, 64x64 crop"})


def _encode(image: Image.Image, extension: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG" if extension == "jpg" else "PNG", **({"quality": 90} if extension == "jpg" else {}))
    return out.getvalue()
