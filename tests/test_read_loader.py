"""The PyTorch loader: ranks x DataLoader workers read every record exactly once per epoch, a new
order each epoch, the same order for the same seed; fork and spawn; equal lengths for DDP."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.archive import Archive
from pipeline.loader import ArchiveDataset, collate_samples

from .pipeline_fixtures import local_ray  # noqa: F401 - fixture
from .read_fixtures import compress, sample, write_shards

# 5 shards of unequal sizes (16 records), one key in two shards
SHARDS = {"s0": [sample(f"a{i}", i) for i in range(5)], "s1": [sample(f"b{i}", 10 + i) for i in range(3)],
          "s2": [sample(f"c{i}", 20 + i) for i in range(4)] + [sample("a0", 99, (24, 40))],
          "s3": [sample("d0", 30)], "s4": [sample(f"e{i}", 40 + i) for i in range(2)]}
RECORDS = Counter((shard, s["__key__"]) for shard, samples in SHARDS.items() for s in samples)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, local_ray):  # noqa: F811
    folder = tmp_path_factory.mktemp("loader")
    return str(compress(write_shards(folder / "in", SHARDS), folder / "out", "cdc-hp128"))


def epoch_order(url: str, epoch: int, rank: int, world_size: int = 2, seed: int = 7, context: str = "fork",
                **options) -> list[tuple[str, str]]:
    dataset = ArchiveDataset(url, shuffle=True, seed=seed, shuffle_buffer=4, rank=rank, world_size=world_size,
                             steps=0, decode_batch=2, **options)
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context=context)
    order = [(s["__shard__"], s["__key__"]) for s in loader]
    assert len(order) == len(dataset)
    return order


def test_two_ranks_two_workers_read_every_record_once_per_epoch_in_a_new_order(archive):
    orders = {(epoch, rank): epoch_order(archive, epoch, rank) for epoch in (0, 1) for rank in (0, 1)}
    for epoch in (0, 1):
        assert Counter(orders[epoch, 0] + orders[epoch, 1]) == RECORDS  # exactly once, across ranks and workers
        assert abs(len(orders[epoch, 0]) - len(orders[epoch, 1])) <= 1
    assert orders[0, 0] + orders[0, 1] != orders[1, 0] + orders[1, 1]       # a new order each epoch
    assert epoch_order(archive, 1, 0) == orders[1, 0]                         # the same for the same seed
    assert epoch_order(archive, 1, 0, seed=8) != orders[1, 0]


def test_spawn_and_persistent_workers_follow_set_epoch(archive):
    """Spawned, persistent workers: set_epoch in the main process still reaches them."""
    dataset = ArchiveDataset(archive, shuffle=True, seed=7, shuffle_buffer=4, rank=1, world_size=2, steps=0,
                             decode_batch=2)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn",
                        persistent_workers=True)
    orders = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        orders.append([(s["__shard__"], s["__key__"]) for s in loader])
    assert orders == [epoch_order(archive, 0, 1), epoch_order(archive, 1, 1)]


def test_equal_lengths_for_ddp_pad_or_drop(archive):
    for world in (2, 3):
        pads = [ArchiveDataset(archive, rank=r, world_size=world, equal_lengths="pad") for r in range(world)]
        drops = [ArchiveDataset(archive, rank=r, world_size=world, equal_lengths="drop") for r in range(world)]
        assert {len(d) for d in pads} == {-(-16 // world)} and {len(d) for d in drops} == {16 // world}
        padded = Counter(r for d in pads for shard, rows in d.assignment(3, 0, 1) for r in _records(d, shard, rows))
        assert set(padded) == set(RECORDS) and padded.total() == len(pads[0]) * world
        kept = Counter(r for d in drops for shard, rows in d.assignment(3, 0, 1) for r in _records(d, shard, rows))
        assert max(kept.values()) == 1 and kept.total() == 16 // world * world
    rank = ArchiveDataset(archive, rank=2, world_size=3, equal_lengths="pad", steps=0, shuffle=True)
    rank.set_epoch(4)
    assert len(list(rank)) == 6  # what the loader yields, not only what it plans


def _records(dataset: ArchiveDataset, shard: str, rows) -> list[tuple[str, str]]:
    table = Archive(dataset.url).shard_table(shard)
    return [(shard, table["key"][row].as_py()) for row in rows]


def test_samples_look_like_webdataset_and_collate_keeps_extras(archive):
    dataset = ArchiveDataset(archive, keys=["a1", "a2", "a3"], steps=0, transform=lambda image: image[:16, :16])
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_samples)))
    assert batch["__key__"] == ["a1", "a2", "a3"] and batch["__shard__"] == ["s0"] * 3
    assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == torch.uint8
    assert [e["cls"] for e in batch["extras"]] == [b"1", b"2", b"3"]
    uneven = collate_samples(list(ArchiveDataset(archive, keys=["a0"], steps=0)))
    assert isinstance(uneven["image"], list) and len(uneven["image"]) == 2  # a0 is in s0 and s2, two sizes


def test_chw_and_float_images_are_the_decoded_pixels_in_torchvisions_convention(archive):
    hwc = ArchiveDataset(archive, keys=["b0", "b1"], steps=0)
    chw = ArchiveDataset(archive, keys=["b0", "b1"], steps=0, layout="CHW", dtype=torch.float32)
    batch = next(iter(DataLoader(chw, batch_size=2, collate_fn=collate_samples)))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape[:2] == (2, 3)
    expected = torch.stack([s["image"] for s in hwc]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(batch["image"], expected) and batch["image"].max() <= 1
    for bad, message in (({"layout": "HW"}, "layout must be one of"), ({"dtype": torch.int32}, "dtype must be")):
        with pytest.raises(ValueError, match=message):
            ArchiveDataset(archive, **bad)


def test_loader_pixels_are_archive_decode_pixels(archive):
    """Workers (fork, one thread each) give exactly Archive.decode's pixels, also with diffusion steps."""
    reader = Archive(archive, threads=1)
    loader = DataLoader(ArchiveDataset(archive, steps=1, shards=["s1", "s3"], decode_batch=3), batch_size=None,
                        num_workers=2)
    seen = 0
    for item in loader:
        assert np.array_equal(item["image"].numpy(), reader.decode(item["__key__"], steps=1, shard=item["__shard__"]))
        seen += 1
    assert seen == 4


def test_decode_on_device_workers_yield_latents_the_synthesizer_turns_into_the_workers_pixels(archive):
    """decode_on="device": workers run only the exact half, the Synthesizer the float half in one
    batch; on one thread, bit for bit what decode_on="worker" gives, in the chosen layout/dtype."""
    reader = Archive(archive, threads=1)
    dataset = ArchiveDataset(archive, steps=1, shards=["s0", "s3"], decode_on="device", decode_batch=2,
                             layout="CHW", dtype=torch.float32)
    synthesize = dataset.synthesizer("cpu")
    seen = 0
    for batch in DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_samples):
        assert "image" not in batch and len(batch["latents"]) == len(batch["__key__"])
        images = synthesize(batch)  # threads=1 on a CPU: the workers' pixels
        assert images.shape == (len(batch["__key__"]), 3, 32, 40) and images.dtype == torch.float32
        for key, shard, image in zip(batch["__key__"], batch["__shard__"], images):
            expected = torch.from_numpy(reader.decode(key, steps=1, shard=shard)).permute(2, 0, 1) / 255
            assert torch.equal(image, expected), key
            seen += 1
    assert seen == 6


def test_decode_on_device_refuses_what_belongs_on_the_device(archive):
    for options, message in (({"decode_on": "gpu"}, "decode_on must be one of"),
                             ({"decode_on": "device", "device": "cpu"}, r"dataset.synthesizer\(device\)"),
                             ({"decode_on": "device", "transform": torch.flip}, "Synthesizer's output")):
        with pytest.raises(ValueError, match=message):
            ArchiveDataset(archive, **options)
