"""A PyTorch IterableDataset over an archive: split by rank and worker, shuffled by epoch, decoded in batches.

    dataset = ArchiveDataset("s3://bucket/out", storage_options, chunks=2, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=32, num_workers=4, collate_fn=collate_samples)
    for epoch in range(10):
        dataset.set_epoch(epoch)       # before iterating: a new order (persistent workers see it too)
        for batch in loader: ...       # batch["image"]: B x H x W x 3 uint8, batch["__key__"], batch["extras"]

Each sample is {"__key__", "__shard__", "image", "extras" (name -> bytes: the key's .cls, .txt,
.json, ... as in the original dataset)}. Extras sit in their own dict so no extra can overwrite
the image or the key, whatever it is called. The image is an H x W x 3 uint8 tensor, or with
`layout="CHW"` 3 x H x W (torchvision's convention), and with a float `dtype` scaled to [0, 1].

How an epoch is cut: the shards (in name order, or permuted by (seed, epoch) when shuffling:
the same permutation on every rank) are laid end to end, and each rank takes one contiguous
range of that sequence, then each DataLoader worker one contiguous range of its rank's. So a
worker reads only the manifests and blob ranges of its own shards (and at most two shards it
shares with a neighbour), every record is read exactly once per epoch across ranks and
workers, and ranks differ by at most one image. `equal_lengths="pad"` repeats the epoch's
first records so every rank yields the same count (DistributedSampler's default),
`equal_lengths="drop"` leaves the last records of the epoch out: use one of them under DDP,
where a rank with one batch fewer makes the others wait forever. Image counts come from the
manifests' Parquet footers, read once in the main process.

Shuffling: each worker passes its records through a buffer of `shuffle_buffer` record
*descriptors* (shard, row), seeded by (seed, epoch, rank, worker): the buffer holds no pixels,
so it can be large; images are fetched and decoded in batches of `decode_batch` through the
codec's decompress_batch (adjacent records in one ranged read, prefixes alone for UQDM's
`chunks`), on `device` when one is given (e.g. "cuda:0"; with CUDA, use the spawn or forkserver
start method, or do not touch CUDA in the main process before the workers fork).
`autocast=torch.bfloat16` runs CDC's content decoder in bf16: within 2 levels of float32, and
2.6x faster 0-step decoding on a CPU with AMX (benchmarks/results/decode_split.json).

Decoding on the training GPU, `decode_on="device"`: the workers run only the exact half of
decoding (CDC: entropy decoding and the integer hyper-synthesis, cheap, CPU) and yield
`latents` instead of `image` (UQDM, whose exact half is its whole decode, yields the streams);
a Synthesizer runs the rest batched on the GPU, in the training loop:

    dataset = ArchiveDataset(url, decode_on="device", layout="CHW", dtype=torch.float32)
    loader = DataLoader(dataset, batch_size=64, num_workers=4, collate_fn=collate_samples)
    synthesize = dataset.synthesizer("cuda:0")     # optionally autocast=torch.bfloat16
    for batch in loader:
        images = synthesize(batch)                 # B x 3 x H x W on cuda:0 (a list if sizes differ)

Rank and world size come from torch.distributed when it is initialized at construction, or
from `rank` / `world_size`. Works with fork, spawn and forkserver workers, and with any fsspec
URL; the dataset pickles small (URL, options, shard names and counts).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from multiprocessing.context import get_spawning_popen

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from model.codec import Latents

from .archive import Archive, synthesize_on_device

EQUAL_LENGTHS = (None, "pad", "drop")
DECODE_ON = ("worker", "device")
LAYOUTS = ("HWC", "CHW")
Piece = tuple[str, Sequence[int]]  # a shard and row numbers in its manifest


class ArchiveDataset(IterableDataset):
    def __init__(self, url: str, storage_options: Mapping | None = None, *, keys: Iterable[str] | None = None,
                 shards: Iterable[str] | None = None, steps: int | None = None, chunks: int | None = None,
                 shuffle: bool = False, seed: int = 0, shuffle_buffer: int = 10_000,
                 rank: int | None = None, world_size: int | None = None, equal_lengths: str | None = None,
                 decode_batch: int = 8, device: str | None = None, layout: str = "HWC",
                 dtype: torch.dtype = torch.uint8, transform: Callable[[torch.Tensor], object] | None = None,
                 allow_incomplete: bool = False, decode_on: str = "worker", autocast: torch.dtype | None = None):
        check_image_format(layout, dtype)
        _check_decode_on(decode_on, device, transform)
        if equal_lengths not in EQUAL_LENGTHS:
            raise ValueError(f"equal_lengths must be one of {EQUAL_LENGTHS}, got {equal_lengths!r}")
        if decode_batch < 1 or shuffle_buffer < 1:
            raise ValueError("decode_batch and shuffle_buffer must be at least 1")
        self.url, self.storage_options = url, dict(storage_options or {})
        self.steps, self.chunks, self.autocast = steps, chunks, autocast
        self.device, self.transform = device, transform
        self.layout, self.dtype = layout, dtype
        self.shuffle, self.seed, self.shuffle_buffer, self.decode_batch = shuffle, seed, shuffle_buffer, decode_batch
        self.equal_lengths, self.allow_incomplete, self.decode_on = equal_lengths, allow_incomplete, decode_on
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        archive = Archive(url, self.storage_options, allow_incomplete=allow_incomplete)
        archive.decode_options(steps, chunks, autocast)  # what this archive cannot take fails here, not in a worker
        shards = None if shards is None else list(shards)
        if keys is None:
            sizes = archive.shard_sizes(shards)
            self.pieces: list[Piece] = [(shard, range(sizes[shard])) for shard in sorted(sizes)]
        else:
            self.pieces = list(archive.locate(keys, shards).items())
        self._epoch = _SharedEpoch()
        self._reader: tuple[int, Archive] | None = None

    # ------------------------------------------------------------------ epochs and splits
    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration follows (call it before iterating the loader)."""
        self._epoch.value = epoch

    @property
    def total(self) -> int:
        """Records in the archive's selection (every rank together, no padding)."""
        return sum(len(rows) for _, rows in self.pieces)

    def _rank_range(self) -> tuple[int, int]:
        """This rank's [start, end) in the epoch's sequence of records (end may pass the total: padding)."""
        total, rank, world = self.total, self.rank, self.world_size
        if self.equal_lengths is None:
            return total * rank // world, total * (rank + 1) // world
        per_rank = total // world if self.equal_lengths == "drop" else -(-total // world)
        return rank * per_rank, (rank + 1) * per_rank

    def __len__(self) -> int:
        """Images this rank yields per epoch (over all its DataLoader workers)."""
        start, end = self._rank_range()
        return end - start

    def assignment(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[Piece]:
        """The records a worker of this rank reads in `epoch`, in order before the shuffle buffer."""
        pieces = list(self.pieces)
        if self.shuffle:
            pieces = [pieces[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(pieces))]
        start, end = self._rank_range()
        count = end - start
        return _cut(pieces, start + count * worker // num_workers, start + count * (worker + 1) // num_workers)

    # ------------------------------------------------------------------ reading
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self._epoch.value
        pieces = self.assignment(epoch, worker, num_workers)
        archive = self._archive()
        left = {}  # records still to read per shard: a shard's manifest is dropped once it is read
        for shard, rows in pieces:
            left[shard] = left.get(shard, 0) + len(rows)
        records: Iterator[tuple[str, int]] = ((shard, row) for shard, rows in pieces for row in rows)
        if self.shuffle:
            records = _buffer_shuffled(records, self.shuffle_buffer,
                                       np.random.default_rng([self.seed, epoch, self.rank, worker]))
        for batch in _batches(records, self.decode_batch):
            rows = _manifest_rows(archive, batch)
            if self.decode_on == "device":
                field, decoded = "latents", archive.latents_of_rows(rows, self.chunks)
            else:
                field, decoded = "image", [self._image(image) for image in
                                           archive.decode_rows(rows, self.steps, self.chunks, self.autocast)]
            for row, item in zip(rows, decoded):
                yield {"__key__": row["key"], "__shard__": row["shard"], field: item, "extras": row["extras"]}
            for shard, _ in batch:
                left[shard] -= 1
                if not left[shard]:
                    archive.forget(shard)

    def _image(self, image: np.ndarray) -> object:
        tensor = image_tensor(image, self.layout, self.dtype)
        return self.transform(tensor) if self.transform else tensor

    def synthesizer(self, device: str | torch.device | None = None, **options) -> Synthesizer:
        """The Synthesizer for this dataset's latents (decode_on="device"), with its steps, autocast,
        layout and dtype, on `device` (default: CUDA when present, else the CPU); options: autocast,
        channels_last, threads (see Synthesizer)."""
        options = {"autocast": self.autocast, **options}
        return Synthesizer(self.url, self.storage_options, device=device, steps=self.steps, chunks=self.chunks,
                           layout=self.layout, dtype=self.dtype, allow_incomplete=self.allow_incomplete, **options)

    def _archive(self) -> Archive:
        """This process's reader (and codec), kept across epochs: persistent workers load the codec once."""
        if self._reader is None or self._reader[0] != os.getpid():
            # decode_on="device": the exact half on this worker's CPU, whatever GPU the machine has
            device = self.device if self.decode_on == "worker" else "cpu"
            self._reader = (os.getpid(), Archive(self.url, self.storage_options, device=device, threads=1,
                                                 allow_incomplete=self.allow_incomplete))
        return self._reader[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}


class Synthesizer:
    """The device half of decoding, batched on one device: latents from ArchiveDataset(...,
    decode_on="device") -> images there. On a CPU with `threads=1` (the default) the pixels are
    the workers' bit for bit; on a GPU, with more threads or with autocast, within the codecs'
    tested pixel bound. UQDM's workers pass the streams on and the device decodes them whole
    (its exact half is its whole decode, far faster on a GPU).

    `synthesize(batch)` takes a collated batch (its "latents"), one sample, or a list of latents,
    and returns a B x ... tensor on the device (a list when the images differ in size), in
    `layout` and `dtype` as the dataset yields them. `autocast` (e.g. torch.bfloat16) and
    `channels_last` are CDC's speed options."""

    def __init__(self, url: str, storage_options: Mapping | None = None, *, device: str | torch.device | None = None,
                 steps: int | None = None, chunks: int | None = None, layout: str = "HWC",
                 dtype: torch.dtype = torch.uint8, autocast: torch.dtype | None = None,
                 channels_last: bool | None = None, threads: int | None = 1, allow_incomplete: bool = False):
        check_image_format(layout, dtype)
        archive = Archive(url, storage_options, device=device, allow_incomplete=allow_incomplete)
        self.options = archive.decode_options(steps, chunks, autocast)  # what this archive cannot take fails here
        if channels_last is not None:
            if archive.progressive:
                raise ValueError("channels_last is CDC's speed option; UQDM decodes exactly")
            self.options.update(channels_last=channels_last)
        self.codec, self.layout, self.dtype = archive.codec, layout, dtype  # the weights load now, not mid-epoch
        self.device, self.url, self.threads = self.codec.device, url, threads

    def __call__(self, batch: Mapping | Latents | bytes | Sequence[Latents | bytes]) -> torch.Tensor | list[torch.Tensor]:
        latents = batch["latents"] if isinstance(batch, Mapping) else batch
        latents = [latents] if isinstance(latents, (Latents, bytes)) else list(latents)
        rows = ([{"key": key, "shard": shard} for key, shard in zip(batch["__key__"], batch["__shard__"])]
                if isinstance(batch, Mapping) and "__key__" in batch else [{"key": "?"}] * len(latents))
        images = synthesize_on_device(self.codec, latents, self.options, rows, self.url, self.threads)
        return stack_if_equal([shaped(image, self.layout, self.dtype) for image in images])


def _check_decode_on(decode_on: str, device: str | None, transform: Callable | None) -> None:
    if decode_on not in DECODE_ON:
        raise ValueError(f"decode_on must be one of {DECODE_ON}, got {decode_on!r}")
    if decode_on == "device" and device is not None:
        raise ValueError("with decode_on='device' the workers decode latents on their CPU: give the device "
                         "to dataset.synthesizer(device) instead")
    if decode_on == "device" and transform is not None:
        raise ValueError("with decode_on='device' the images first exist on the device: apply the transform "
                         "to the Synthesizer's output instead")


def check_image_format(layout: str, dtype: torch.dtype) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if dtype != torch.uint8 and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be torch.uint8 or a floating dtype, got {dtype!r}")


def image_tensor(image: np.ndarray, layout: str = "HWC", dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A decoded H x W x 3 uint8 image as a tensor: HWC, or CHW (contiguous); uint8, or a float
    dtype scaled to [0, 1]."""
    return shaped(torch.from_numpy(image).permute(2, 0, 1), layout, dtype)


def shaped(image: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """A 3 x H x W uint8 tensor in `layout` (contiguous) and `dtype` (a float one scaled to [0, 1])."""
    image = (image if layout == "CHW" else image.permute(1, 2, 0)).contiguous()
    return image if dtype == torch.uint8 else image.to(dtype).div_(255)


def collate_samples(samples: Sequence[dict]) -> dict:
    """A DataLoader batch of samples: lists of keys, shards and extras; images stacked into a
    B x ... tensor when they share a shape, else a list (crop them in `transform` to stack);
    latents (decode_on="device") as a list, for the Synthesizer."""
    batch = {"__key__": [s["__key__"] for s in samples], "__shard__": [s["__shard__"] for s in samples],
             "extras": [s["extras"] for s in samples]}
    if samples and "latents" in samples[0]:
        return {**batch, "latents": [s["latents"] for s in samples]}
    return {**batch, "image": stack_if_equal([sample["image"] for sample in samples])}


def stack_if_equal(images: list) -> torch.Tensor | list:
    """One tensor when every image is a tensor of one shape, else the list as it is."""
    stackable = all(isinstance(i, torch.Tensor) and i.shape == images[0].shape for i in images)
    return torch.stack(images) if images and stackable else images


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world_size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return rank, world_size


def _cut(pieces: Sequence[Piece], start: int, end: int) -> list[Piece]:
    """The records at positions [start, end) of the pieces laid end to end; positions past the
    total wrap around to the beginning (padding)."""
    total = sum(len(rows) for _, rows in pieces)
    out: list[Piece] = []
    while total and start < end:
        position = start - start % total  # where this lap of the sequence begins
        lap_end = position + total
        for shard, rows in pieces:
            low, high = max(start, position), min(end, position + len(rows))
            if low < high:
                out.append((shard, rows[low - position:high - position]))
            position += len(rows)
        start = lap_end
    return out


def _buffer_shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """webdataset's shuffle buffer: fill `size` items, then yield a random one for each new one."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _manifest_rows(archive: Archive, records: Sequence[tuple[str, int]]) -> list[dict]:
    """The manifest rows of (shard, row) records, in their order."""
    rows_by_shard: dict[str, list[int]] = {}
    for shard, row in records:
        rows_by_shard.setdefault(shard, []).append(row)
    found = {}
    for shard, rows in rows_by_shard.items():
        found.update(((shard, row), record) for row, record in zip(rows, archive.shard_records(shard, rows)))
    return [found[record] for record in records]


class _SharedEpoch:
    """The epoch number in shared memory, so that DataLoader workers, persistent ones too, read
    the value set_epoch last wrote in the main process. Fork workers inherit the memory; spawn and
    forkserver workers receive it while they start. Pickled any other way (Ray, deepcopy) it
    travels as a plain number."""

    def __init__(self, value: int = 0):
        self._shared = multiprocessing.RawValue("q", value)

    @property
    def value(self) -> int:
        return self._shared.value

    @value.setter
    def value(self, value: int) -> None:
        self._shared.value = value

    def __getstate__(self) -> dict:
        return {"shared": self._shared} if get_spawning_popen() is not None else {"value": self.value}

    def __setstate__(self, state: dict) -> None:
        self._shared = state["shared"] if "shared" in state else multiprocessing.RawValue("q", state["value"])
