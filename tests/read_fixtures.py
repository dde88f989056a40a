"""Archives for the read-side tests: webdataset shards written by webdataset itself (PAX headers,
so keys of any length), compressed by the real compress_bucket run on the test's own Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import numpy as np
import webdataset
from fsspec.implementations.local import LocalFileSystem

from model import decode_image
from pipeline.compress import CompressConfig, run_compress

from .pipeline_fixtures import encoded
from .sample_images import photo_like

#: keys that are dangerous or awkward as file paths, all in one shard (issue 8.1)
HOSTILE_KEYS = ["../../x", "/abs/dir/x", "b", "./b", "x/../b", "k" * 240, "-rf", ".hidden", "%41 ~ü"]


def sample(key: str, seed: int, size: tuple[int, int] = (32, 40), **extras: bytes) -> dict:
    """A webdataset sample: a JPEG or PNG image plus cls/json extras (and any given)."""
    ext, fmt = ("jpg", "JPEG") if seed % 2 else ("png", "PNG")
    return {"__key__": key, ext: encoded(photo_like(*size, seed), fmt), "cls": str(seed).encode(),
            "json": f'{{"seed": {seed}}}'.encode(), **extras}


def write_shards(folder: Path, shards: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, samples in shards.items():
        with webdataset.TarWriter(str(folder / f"{name}.tar"), encoder=False, mtime=0) as writer:
            for item in samples:
                writer.write(item)
    return folder


def compress(folder: Path, out: Path, codec: str) -> Path:
    run_compress(CompressConfig(str(folder), str(out), codec, actors=2, batch_size=3))
    return out


def sources(shards: dict[str, list[dict]]) -> dict[tuple[str, str], np.ndarray]:
    """(shard, key) -> the original image's pixels."""
    out = {}
    for name, samples in shards.items():
        for item in samples:
            image = next(v for k, v in item.items() if k in ("jpg", "png") and not k.startswith("_"))
            out[name, item["__key__"]] = decode_image(image)[0]
    return out


def png_pixels(data: bytes) -> np.ndarray:
    return decode_image(data)[0]


def copy_archive(archive: Path, to: Path) -> Path:
    shutil.copytree(archive, to)
    return to


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under `counting://`, counting the bytes read from each file: every read
    (cat_file, cat_ranges, open) goes through _open, so a test sees what a reader fetches through fsspec."""

    protocol = "counting"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reads: list[tuple[str, int]] = []  # (path, bytes) per read call

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("counting://"):] if path.startswith("counting://") else path)

    def _open(self, path, mode="rb", **kwargs):
        file = super()._open(path, mode, **kwargs)
        if "r" in mode:
            read = file.read

            def counted(*args):
                data = read(*args)
                self.reads.append((self._strip_protocol(path), len(data)))
                return data
            file.read = counted
        return file

    def bytes_read(self, folder: str) -> int:
        return sum(n for path, n in self.reads if f"/{folder}/" in path)


def counting_fs() -> CountingFileSystem:
    """The (cached) instance that `counting://` URLs resolve to, its counts reset."""
    fsspec.register_implementation("counting", CountingFileSystem, clobber=True)
    fs = fsspec.filesystem("counting")
    fs.reads.clear()
    return fs
