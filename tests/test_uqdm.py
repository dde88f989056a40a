"""UQDM on the authors' real weights: lossless, progressive, rate fidelity, exactness, odd inputs."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model import BitstreamError, bitstream, decode_image
from model.metrics import psnr
from model.uqdm.codec import TILE

from model.paths import DEV_PHOTOS, REPO, UQDM_TINY_SOURCE

from .conftest import dev_photos


def dev_crop(path, height=100, width=150) -> np.ndarray:
    """An odd-sized centre crop, so tiling, padding and masking are exercised."""
    img = np.asarray(Image.open(path).convert("RGB"))
    top, left = (img.shape[0] - height) // 2, (img.shape[1] - width) // 2
    return img[top:top + height, left:left + width]


@pytest.fixture(scope="module")
def encoded_crops(uqdm):
    crops = [dev_crop(p) for p in dev_photos()]
    assert len(crops) == 12, f"expected the 12 dev photos in {DEV_PHOTOS}"
    return [(img, *uqdm.compress_with_rates(img)) for img in crops]


def test_lossless_on_dev_photos(uqdm, encoded_crops):
    for img, data, _ in encoded_crops:
        out = uqdm.decompress(data)
        assert out.shape == img.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, img)


def test_progressive_psnr_never_decreases(uqdm, encoded_crops):
    for img, data, _ in encoded_crops[:6]:
        curve = [psnr(uqdm.decompress(data, chunks=n), img) for n in range(1, uqdm.n_chunks + 1)]
        assert all(b >= a for a, b in zip(curve, curve[1:])), curve
        assert curve[0] < 30 < curve[-2] and curve[-1] == float("inf"), curve


def test_prefix_of_stream_decodes_without_the_rest(uqdm, encoded_crops):
    img, data, _ = encoded_crops[0]
    header = uqdm.read_header(data)
    for n in range(1, uqdm.n_chunks):
        prefix = data[:header.size + sum(header.chunk_lengths[:n])]
        np.testing.assert_array_equal(uqdm.decompress(prefix, chunks=n), uqdm.decompress(data, chunks=n))
        with pytest.raises(BitstreamError):
            uqdm.decompress(prefix, chunks=n + 1)
    with pytest.raises(ValueError, match="chunks"):
        uqdm.decompress(data, steps=2)


def test_coded_size_matches_negative_elbo(uqdm):
    """The entropy-coded payload is within 1% of the model's ideal bits on 64x64 photos."""
    coded = ideal = 0.0
    for path in dev_photos()[:4]:
        img = np.asarray(Image.open(path).convert("RGB").resize((TILE, TILE), Image.LANCZOS))
        data, bits = uqdm.compress_with_rates(img)
        coded += 8 * (len(data) - uqdm.read_header(data).size)
        ideal += sum(bits)
    assert ideal > 0 and 1.0 <= coded / ideal < 1.01, coded / ideal


def test_bits_per_chunk_are_reported_and_lossless_costs_more_than_lossy(uqdm, encoded_crops):
    img, data, bits = encoded_crops[1]
    header = uqdm.read_header(data)
    assert len(bits) == uqdm.n_chunks == len(header.chunk_lengths)
    for coded_bytes, ideal in zip(header.chunk_lengths, bits):
        assert coded_bytes * 8 >= ideal
    assert 3 * img.shape[0] * img.shape[1] < 8 * len(data) < 24 * img.shape[0] * img.shape[1]


DECODE_IN_CHILD = """
import sys, json, torch, numpy as np
torch.set_num_threads(int(sys.argv[1]))
from model import load_codec
codec = load_codec("uqdm-tiny", device="cpu")
data = open(sys.argv[2], "rb").read()
outs = [codec.decompress(data, chunks=n) for n in range(1, codec.n_chunks + 1)]
np.save(sys.argv[3], np.stack(outs))
"""


def test_stream_decodes_bit_exactly_in_another_process_with_other_threads(uqdm, encoded_crops, tmp_path):
    img, data, _ = encoded_crops[2]
    stream = tmp_path / "img.dfz"
    stream.write_bytes(data)
    here = np.stack([uqdm.decompress(data, chunks=n) for n in range(1, uqdm.n_chunks + 1)])
    for threads in (1, 3):
        out = tmp_path / f"decoded{threads}.npy"
        subprocess.run([sys.executable, "-c", DECODE_IN_CHILD, str(threads), str(stream), str(out)],
                       check=True, cwd=REPO, timeout=300)
        np.testing.assert_array_equal(np.load(out), here)


@pytest.mark.parametrize("shape", [(1, 1), (1, 97), (65, 1), (64, 64), (63, 129), (130, 70)])
def test_any_size_round_trips(uqdm, rng, shape):
    img = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    img[: shape[0] // 2] //= 4  # some structure, not only noise
    data = uqdm.compress(img)
    np.testing.assert_array_equal(uqdm.decompress(data), img)
    assert uqdm.decompress(data, chunks=2).shape == img.shape


def _png(image: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **save)
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
        np.testing.assert_array_equal(uqdm.decompress(uqdm.compress(array)), array)
    np.testing.assert_array_equal(decode_image(_png(deep))[0][:, :, 0], base[:, :, 0])
    alpha_half = decode_image(_png(rgba))[0].astype(int)
    np.testing.assert_allclose(alpha_half, (base.astype(int) * 128 + 255 * 127) / 255, atol=1)
    with pytest.raises(ValueError, match="uint8"):
        uqdm.compress(base.astype(np.uint16))
    with pytest.raises(ValueError, match="RGBA"):
        uqdm.compress(np.dstack([base, base[:, :, :1]]))


def test_other_weights_and_other_codecs_are_refused(uqdm, weights_dir, tmp_path):
    from model import load_codec
    from model.registry import Weights, read_weights, save_weights

    img = np.zeros((8, 8, 3), np.uint8)
    data = uqdm.compress(img)
    original = read_weights(weights_dir / "uqdm-tiny.safetensors")
    tensors = dict(original.tensors)
    tensors["gamma_slope"] = tensors["gamma_slope"] + 0.5
    save_weights(Weights("uqdm", "uqdm-other", original.config, tensors), tmp_path / "other.safetensors")
    other = load_codec(tmp_path / "other.safetensors", device="cpu")
    with pytest.raises(BitstreamError, match="other weights"):
        other.decompress(data)
    header, chunks = bitstream.unpack(data)
    foreign = bitstream.pack("cdc", header.weights_digest, 8, 8, chunks, header.params)
    with pytest.raises(BitstreamError, match="written by codec 'cdc'"):
        uqdm.decompress(foreign)


def test_importer_refuses_pickled_code(tmp_path):
    import torch

    from model.uqdm.importer import import_checkpoint

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((UQDM_TINY_SOURCE / "config.json").read_text())
    torch.save({"model": {}, "ema": {"shadow_params": [Exploit()]}, "step": 1}, folder / "checkpoint.pt")
    with pytest.raises(Exception, match="(?i)weights only|unsupported|refus"):
        import_checkpoint(folder)
    assert not marker.exists()
    json.loads((folder / "config.json").read_text())  # the folder is otherwise intact
