"""A PyTorch IterableDataset over an archive, decoding each image on demand.

    dataset = ArchiveDataset("s3://bucket/out", storage_options, chunks=2)
    for sample in DataLoader(dataset, batch_size=None, num_workers=4): ...

Each DataLoader worker opens the archive and loads the codec itself, then decodes its
own share of the keys (every num_workers-th key), so nothing large crosses processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .archive import Archive


class ArchiveDataset(IterableDataset):
    """Yields {"key", "image" (HxWx3 uint8 tensor), "extras" (dict of name -> bytes)} per record."""

    def __init__(self, url: str, storage_options: Mapping | None = None, keys: Sequence[str] | None = None,
                 steps: int | None = None, chunks: int | None = None):
        self.url, self.storage_options = url, dict(storage_options or {})
        self.keys, self.steps, self.chunks = list(keys) if keys else None, steps, chunks

    def __iter__(self) -> Iterator[dict]:
        archive = Archive(self.url, self.storage_options)
        keys = self.keys or archive.keys()
        worker = get_worker_info()
        if worker is not None:
            keys = keys[worker.id::worker.num_workers]
        for key in keys:
            image = archive.decode(key, steps=self.steps, chunks=self.chunks)
            yield {"key": key, "image": torch.from_numpy(image), "extras": dict(archive.record(key)["extras"])}
