"""Decoding in two halves: decode_latents (exact, cheap, anywhere) then synthesize (float, batched
on the codec's device); decompress is the two in a row. Batched encoding writes the streams of
one-at-a-time encoding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from model import load_codec
from model.cdc.codec import CDCLatents
from model.codec import DecodedPixels

from .sample_images import photo_crop
from .test_portability import PIXEL_BOUND


def levels_apart(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def mixed(cdc) -> list[bytes]:
    """Streams of three padded shapes and two rate points, one shape twice (a batch of two)."""
    q1 = load_codec("cdc-hp128:q1", device="cpu")
    return [cdc.compress(photo_crop(120, 150, 70, 130)), q1.compress(photo_crop(300, 60, 70, 130)),
            cdc.compress(photo_crop(10, 10, 33, 47)), q1.compress(photo_crop(200, 200, 64, 200))]


@pytest.fixture
def gpu_batching(monkeypatch):
    """Batches as a GPU makes them (a CPU runs one image a call, measured faster there), so that
    the batched networks are what these tests hold to the single-image results."""
    from model.cdc import codec as cdc_codec
    monkeypatch.setattr(cdc_codec, "CPU_BATCH_PIXELS", cdc_codec.BATCH_PIXELS)


@pytest.mark.parametrize("options", [{"steps": 0}, {"steps": 2}, {"steps": 2, "stochastic": True, "seed": 5}],
                         ids=["steps0", "steps2", "stochastic"])
def test_decompress_is_decode_latents_then_synthesize_and_batching_changes_no_pixel(cdc, mixed, options,
                                                                                   gpu_batching):
    """On a CPU a batch (equal padded shapes together, rate points mixed) gives each image the
    pixels it gets alone, bit for bit, also with diffusion steps and stochastic noise."""
    steps, rest = options["steps"], {k: v for k, v in options.items() if k != "steps"}
    alone = [cdc.decompress(data, **options) for data in mixed]
    latents = cdc.decode_latents(mixed)
    assert [type(item) for item in latents] == [CDCLatents] * len(mixed)
    np.testing.assert_equal(cdc.synthesize(latents, steps, **rest), alone)
    np.testing.assert_equal(cdc.decompress_batch(mixed, **options), alone)
    assert not np.array_equal(alone[0], alone[1][:, :, ::-1]), "distinct images, or the test is vacuous"


def test_latents_pickle_small_and_synthesize_to_the_same_pixels(cdc, mixed):
    """Latents cross process boundaries: a pickle of the size of the uint8 image (3 bytes per padded
    pixel) plus a header, and they synthesize alike after the round trip."""
    latents = cdc.decode_latents(mixed)
    copies = [pickle.loads(pickle.dumps(item)) for item in latents]
    np.testing.assert_equal(cdc.synthesize(copies, 0), cdc.synthesize(latents, 0))
    for item in latents:
        padded = item.y_hat.shape[1] * item.y_hat.shape[2] * 16 * 16
        assert item.y_hat.dtype == np.float32 and len(pickle.dumps(item)) <= 3 * padded + 1024


def test_uqdm_decode_latents_does_everything_and_synthesize_hands_the_pixels_on(uqdm):
    data = uqdm.compress(photo_crop(100, 100, 20, 70))
    latents = uqdm.decode_latents([data, data], chunks=2)
    assert all(isinstance(item, DecodedPixels) for item in latents)
    np.testing.assert_array_equal(latents[0].pixels, uqdm.decompress(data, chunks=2))
    np.testing.assert_equal(uqdm.synthesize(latents), [latents[0].pixels] * 2)
    with pytest.raises(ValueError, match="chunks=N"):
        uqdm.synthesize(latents, steps=2)


def test_synthesize_refuses_latents_of_another_codec_or_other_weights(cdc, uqdm, mixed):
    pixels = uqdm.decode_latents([uqdm.compress(photo_crop(0, 0, 8, 8))])
    with pytest.raises(ValueError, match="cannot be synthesized by 'cdc-hp128:q4'"):
        cdc.synthesize(pixels)
    other = CDCLatents(**{**cdc.decode_latents(mixed[:1])[0].__dict__, "weights_digest": b"\0" * 8})
    with pytest.raises(ValueError, match="weights 0000000000000000"):
        cdc.synthesize([other])


@pytest.mark.parametrize("steps", [0, 2])
def test_bf16_content_decoder_and_either_layout_stay_within_the_pixel_bound(cdc, steps):
    """The speed options are not bit-exact: measured here 1 level (bf16, steps 0), 2 (bf16, steps
    2), at most 1 (contiguous vs the default channels_last). fp16 is allowed as well but slow on CPUs."""
    latents = cdc.decode_latents([cdc.compress(photo_crop(150, 120, 128, 192))])
    reference = cdc.synthesize(latents, steps, channels_last=False)
    for options in ({"autocast": torch.bfloat16, "channels_last": False}, {},
                    {"autocast": torch.bfloat16}):  # bf16 + channels_last: as benchmarks/device_session
        assert levels_apart(cdc.synthesize(latents, steps, **options), reference) <= PIXEL_BOUND, options


def test_pixels_at_one_and_two_threads_are_within_the_pixel_bound(cdc, mixed):
    """Decoding no longer pins torch to one thread: the float decoders' pixels then depend on the
    thread count, within PIXEL_BOUND (measured: at most 1 level)."""
    threads = torch.get_num_threads()
    try:
        found = {}
        for count in (1, 2):
            torch.set_num_threads(count)
            found[count] = cdc.decompress_batch(mixed, steps=2)
    finally:
        torch.set_num_threads(threads)
    assert levels_apart(found[1], found[2]) <= PIXEL_BOUND


@pytest.mark.parametrize("name", ["cdc-hp128:q4", "cdc-hp128-ctx:q4"])
def test_batched_encoding_writes_the_streams_of_one_at_a_time_encoding(name, gpu_batching):
    """compress_batch runs the analysis transform over images of one padded shape together; the
    streams are byte for byte those of encoding each image alone (hyperprior and context model),
    and a batch decodes to the pixels of single decodes."""
    codec = load_codec(name, device="cpu")
    imgs = [photo_crop(120, 150, 70, 130), photo_crop(10, 10, 33, 47), photo_crop(300, 60, 70, 130),
            photo_crop(200, 200, 64, 128), photo_crop(0, 0, 1, 1)]
    together = codec.compress_batch(imgs)
    assert together == [codec.compress(img) for img in imgs]
    assert len(set(together)) == len(imgs)
    np.testing.assert_equal(codec.decompress_batch(together), [codec.decompress(data) for data in together])
