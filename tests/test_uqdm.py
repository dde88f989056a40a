"""UQDM's mechanics on seeded weights of the authors' architecture: lossless, progressive prefixes,
coded size = the model's negative ELBO, exactness across processes, kernels and batchings, odd inputs.

Needs nothing outside the repository (see tests/uqdm_fixtures.py); the authors' weights are
tested in test_uqdm_tiny.py. The exact network takes about a second per 64x64 tile here,
so images stay small.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model import BitstreamError, bitstream, decode_image, entropy
from model.metrics import psnr
from model.paths import REPO
from model.registry import Weights, read_weights, save_weights
from model.uqdm.codec import TILE, UQDMCodec

from .sample_images import photo_crop

#: framing bytes of one UQDM segment besides its rANS words: CRC32 of the values + the coder's window
SEGMENT_FRAMING = 4 + 2
#: rANS flushes its state into whole 32-bit words: at most this many bits above the ideal per segment
ANS_SLACK_BITS = 64


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 64x64 crop of matplotlib's sample photo (Grace Hopper's face and collar)."""
    return photo_crop(250, 200, TILE, TILE)


@pytest.fixture(scope="module")
def photo_stream(uqdm, photo):
    return uqdm.compress_with_rates(photo)


@pytest.fixture(scope="module")
def prefix_images(uqdm, photo_stream) -> list[np.ndarray]:
    """The photo decoded from 1, 2, ..., n_chunks chunks of its stream."""
    data, _ = photo_stream
    return [uqdm.decompress(data, chunks=n) for n in range(1, uqdm.n_chunks + 1)]


def structured_noise(rng, height: int, width: int) -> np.ndarray:
    img = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    img[: height // 2] //= 4  # some structure, not only noise
    return img


def test_the_seeded_model_has_the_authors_architecture(uqdm):
    """Same configuration and tensor shapes as an import of uqdm-tiny: the tests exercise the real code paths."""
    from .uqdm_fixtures import AUTHORS_MODEL_CONFIG

    assert uqdm.n_steps == AUTHORS_MODEL_CONFIG["n_timesteps"] == 4 and uqdm.n_chunks == 5
    config = uqdm.weights.config
    assert config["numerics"] == "exact-int16"
    assert {k: config[k] for k in config if k != "numerics"}.items() <= AUTHORS_MODEL_CONFIG.items()
    assert uqdm.weights.tensors["net.conv_in.weight"].shape == (32, 15, 3, 3)
    assert uqdm.weights.tensors["schedule"].shape == (4, 9)


def test_lossless_and_every_prefix_decodes_to_the_image_shape(photo, prefix_images):
    assert all(out.shape == photo.shape and out.dtype == np.uint8 for out in prefix_images)
    np.testing.assert_array_equal(prefix_images[-1], photo)


def test_progressive_psnr_never_decreases(prefix_images, photo):
    curve = [psnr(out, photo) for out in prefix_images]
    assert all(b >= a for a, b in zip(curve, curve[1:])), curve
    assert curve[0] < 30 < curve[-2] and curve[-1] == float("inf"), curve


def test_a_prefix_of_the_bytes_decodes_without_the_rest(uqdm, photo_stream, prefix_images):
    data, _ = photo_stream
    header = uqdm.read_header(data)
    prefix = data[:header.size + sum(header.chunk_lengths[:2])]
    np.testing.assert_array_equal(uqdm.decompress(prefix, chunks=2), prefix_images[1])
    with pytest.raises(BitstreamError, match="truncated inside chunk 2"):
        uqdm.decompress(prefix, chunks=3)
    with pytest.raises(BitstreamError, match="truncated or padded"):
        uqdm.decompress(data[:header.size + header.chunk_lengths[0]])  # all chunks wanted by default
    with pytest.raises(ValueError, match="chunks"):
        uqdm.decompress(data, steps=2)


def test_coded_size_is_the_negative_elbo_up_to_framing(uqdm, photo_stream):
    """Each chunk's rANS words carry its ideal bits (the model's NELBO term) plus under 64 bits a segment."""
    data, ideal_bits = photo_stream
    header, chunks = bitstream.unpack(data)
    assert len(ideal_bits) == len(chunks) == uqdm.n_chunks
    for chunk, ideal in zip(chunks, ideal_bits):
        segments = entropy.split_segments(chunk, 1)
        ans_bits = 8 * sum(len(s) - SEGMENT_FRAMING for s in segments)
        assert ideal > 0 and ideal <= ans_bits <= ideal + ANS_SLACK_BITS * len(segments), (ans_bits, ideal)
    assert sum(header.chunk_lengths) + header.size == len(data)


@pytest.fixture(scope="module")
def odd_image_streams(uqdm):
    """A 65x2 image (2 tiles, both mostly padding, the second 1x2 pixels), encoded in one segment
    of 2 tiles (the CPU default tile_batch is 4) and in two segments of 1 tile."""
    img = structured_noise(np.random.default_rng(3), 65, 2)
    return img, uqdm.compress(img), UQDMCodec(uqdm.weights, device="cpu", tile_batch=1).compress(img)


def test_an_odd_size_round_trips_losslessly_in_any_framing(uqdm, odd_image_streams):
    img, one_segment, two_segments = odd_image_streams
    for data, segments in ((one_segment, 1), (two_segments, 2)):
        header, chunks = bitstream.unpack(data)
        assert (header.height, header.width) == img.shape[:2]
        assert all(len(entropy.split_segments(chunk, segments)) == segments for chunk in chunks)
    # The decoder follows the stream's framing, whatever its own tile_batch.
    np.testing.assert_array_equal(uqdm.decompress(two_segments), img)


def test_the_framing_changes_the_bytes_not_the_reconstructions(uqdm, odd_image_streams):
    _, one_segment, two_segments = odd_image_streams
    assert one_segment != two_segments
    np.testing.assert_array_equal(uqdm.decompress(one_segment, chunks=1), uqdm.decompress(two_segments, chunks=1))


ENCODE_AND_DECODE_IN_CHILD = """
import sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from model import load_codec
codec = load_codec("uqdm-test", device="cpu")
image = np.load(sys.argv[2])
data = codec.compress(image)
open(sys.argv[3], "wb").write(data)
np.save(sys.argv[4], np.stack([codec.decompress(data, chunks=n) for n in (2, codec.n_chunks - 1)]))
"""


def test_streams_are_identical_in_another_process_with_other_threads_and_cpu_kernels(
        uqdm, weights_dir, photo, photo_stream, prefix_images, tmp_path):
    """Encode and decode in a child with 1 thread, ATen's scalar kernels and oneDNN limited to SSE4.1."""
    data, _ = photo_stream
    np.save(tmp_path / "photo.npy", photo)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
           "DIFFPRESS_WEIGHTS": str(weights_dir)}
    subprocess.run([sys.executable, "-c", ENCODE_AND_DECODE_IN_CHILD, "1", str(tmp_path / "photo.npy"),
                    str(tmp_path / "child.dfz"), str(tmp_path / "child.npy")],
                   check=True, cwd=REPO, env=env, timeout=600)
    assert (tmp_path / "child.dfz").read_bytes() == data
    np.testing.assert_array_equal(np.load(tmp_path / "child.npy"), np.stack([prefix_images[1], prefix_images[3]]))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_grayscale_rgba_palette_and_16bit_inputs_are_converted_explicitly(uqdm, rng):
    base = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    gray = Image.fromarray(base[:, :, 0])
    rgba = Image.fromarray(np.dstack([base, np.full((20, 30), 128, np.uint8)]))
    palette = Image.fromarray(base).quantize(16)
    deep = Image.fromarray((base[:, :, 0].astype(np.int32) * 257 - (base[:, :, 0] > 0) * 100).astype(np.uint16))
    cases = {"gray": (gray, "L->RGB"), "rgba": (rgba, "alpha composited"),
             "palette": (palette, "P->RGB"), "16-bit": (deep, "16-bit")}
    for label, (image, note) in cases.items():
        array, how = decode_image(_png(image))
        assert note in how, (label, how)
        assert array.shape == (20, 30, 3) and array.dtype == np.uint8
    np.testing.assert_array_equal(decode_image(_png(gray))[0], np.repeat(base[:, :, :1], 3, axis=2))
    np.testing.assert_array_equal(decode_image(_png(deep))[0][:, :, 0], base[:, :, 0])
    alpha_half = decode_image(_png(rgba))[0].astype(int)
    np.testing.assert_allclose(alpha_half, (base.astype(int) * 128 + 255 * 127) / 255, atol=1)
    with pytest.raises(ValueError, match="uint8"):
        uqdm.compress(base.astype(np.uint16))
    with pytest.raises(ValueError, match="RGBA"):
        uqdm.compress(np.dstack([base, base[:, :, :1]]))


def test_other_weights_and_other_codecs_are_refused(uqdm, weights_dir, photo_stream, tmp_path):
    from model import load_codec

    data, _ = photo_stream
    original = read_weights(weights_dir / "uqdm-test.safetensors")
    tensors = dict(original.tensors)
    tensors["schedule"] = tensors["schedule"].clone()
    tensors["schedule"][0, 3] += 1e-9  # one step's delta, changed in its last bits
    save_weights(Weights("uqdm", "uqdm-other", original.config, tensors), tmp_path / "other.safetensors")
    other = load_codec(tmp_path / "other.safetensors", device="cpu")
    with pytest.raises(BitstreamError, match="other weights"):
        other.decompress(data)
    header, chunks = bitstream.unpack(data)
    foreign = bitstream.pack("cdc", header.weights_digest, header.height, header.width, chunks, header.params)
    with pytest.raises(BitstreamError, match="written by codec 'cdc'"):
        uqdm.decompress(foreign)
