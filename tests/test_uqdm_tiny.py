"""The authors' uqdm-tiny weights on the team's photos: the import, fidelity to the authors' float
network's negative ELBO, lossless and progressive rate-distortion on dev photos.

Needs ../shared (or DIFFPRESS_SHARED): every test here is marked `shared` and skips, saying how
to provide the data, when it is absent (CI fails instead: DIFFPRESS_REQUIRE_SHARED=1).
The codec's mechanics are tested on seeded weights in test_uqdm.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from model import bitstream, entropy, exact
from model.metrics import psnr
from model.paths import REPO, UQDM_TINY_SOURCE
from model.registry import read_weights
from model.uqdm import quantize
from model.uqdm.codec import TILE, U_BITS, U_UNIT
from model.uqdm.importer import CALIBRATION, EXACT_NAME

from .test_uqdm import ANS_SLACK_BITS, SEGMENT_FRAMING

pytestmark = pytest.mark.shared
N_PHOTOS = 4


def centre_tile(path) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"))
    top, left = (img.shape[0] - TILE) // 2, (img.shape[1] - TILE) // 2
    return np.ascontiguousarray(img[top:top + TILE, left:left + TILE])


@pytest.fixture(scope="module")
def encoded_tiles(uqdm_tiny, dev_photo_paths):
    """(tile, stream, ideal bits per chunk) for the centre 64x64 tile of the first dev photos."""
    tiles = [centre_tile(p) for p in dev_photo_paths[:N_PHOTOS]]
    return [(tile, *uqdm_tiny.compress_with_rates(tile)) for tile in tiles]


def test_the_import_reproduces_the_recorded_digest(uqdm_tiny):
    assert uqdm_tiny.name == EXACT_NAME
    assert uqdm_tiny.weights_digest.hex() == json.loads(CALIBRATION.read_text())["digest"]


def test_the_import_command_writes_weights_load_codec_finds(uqdm_tiny, tmp_path):
    if not (UQDM_TINY_SOURCE / "checkpoint.pt").is_file():
        pytest.skip(f"the import command needs the authors' checkpoint at {UQDM_TINY_SOURCE} (set DIFFPRESS_SHARED)")
    env = {**os.environ, "HOME": str(tmp_path)}  # writes to ~/.cache/diffpress/weights by default
    env.pop("DIFFPRESS_WEIGHTS", None)
    subprocess.run([sys.executable, "-m", "jobs.import_uqdm", str(UQDM_TINY_SOURCE)], cwd=REPO, env=env,
                   check=True, timeout=300, capture_output=True)
    written = tmp_path / ".cache" / "diffpress" / "weights" / f"{EXACT_NAME}.safetensors"
    assert read_weights(written).digest == uqdm_tiny.weights_digest


def test_lossless_on_dev_photos(uqdm_tiny, encoded_tiles):
    for tile, data, _ in encoded_tiles:
        np.testing.assert_array_equal(uqdm_tiny.decompress(data), tile)


def test_coded_size_is_the_negative_elbo_up_to_framing(encoded_tiles):
    for _, data, ideal_bits in encoded_tiles:
        _, chunks = bitstream.unpack(data)
        for chunk, ideal in zip(chunks, ideal_bits):
            ans_bits = 8 * (len(entropy.split_segments(chunk, 1)[0]) - SEGMENT_FRAMING)
            assert ideal <= ans_bits <= ideal + ANS_SLACK_BITS, (ans_bits, ideal)


def float_nelbo_bits(float_weights, tile: np.ndarray, seed: int = 0) -> list[float]:
    """Bits per chunk of the authors' float network along the codec's trajectory (tile 0 of a stream
    with `seed`: the same initial latent and dither), computed in float64 from its float32 outputs."""
    net = quantize.float_network(float_weights)
    gammas = quantize.log_snrs(float_weights)
    steps = [quantize.step_constants(a, b) for a, b in zip(gammas, gammas[1:])]
    count = 3 * TILE * TILE
    x = torch.from_numpy(tile.transpose(2, 0, 1).copy()).double()[None].add(0.5).div(128).sub(1)
    z = torch.from_numpy(exact.normal_noise(seed, 0, count) * exact.NOISE_SCALE).reshape(x.shape)
    bits = []
    with torch.no_grad():
        for i, step in enumerate(steps):
            eps, scale = (t.double() for t in net(z.float(), torch.tensor(float(gammas[i]))))
            p_loc = (z - eps * step.eps_scale) * step.loc_scale
            r = scale * (step.prior_scale * 65536)  # the prior's logistic scale, in units of delta
            u = torch.from_numpy(exact.dither(seed, i + 1, count, U_BITS) / U_UNIT).reshape(x.shape)
            k = torch.round((z * step.q_z + x * step.q_x - p_loc) / step.delta + u)
            p = torch.sigmoid((k - u + 0.5) / r) - torch.sigmoid((k - u - 0.5) / r)
            bits.append(float(-torch.log2(p).sum()))
            z = p_loc + (k - u) * step.delta
        # p(x | z_0): VDM's decoder, a softmax over the 256 levels
        alpha_0 = math.sqrt(1.0 / (1.0 + math.exp(float(gammas[-1]))))
        levels = (torch.arange(256, dtype=torch.float64) + 0.5) / 128 - 1
        logits = -0.5 * math.exp(-gammas[-1]) * (levels[None, :] - (z / alpha_0).reshape(-1, 1)) ** 2
        pixels = torch.from_numpy(tile.transpose(2, 0, 1).reshape(-1).astype(np.int64))
        bits.append(float(-torch.log_softmax(logits, dim=1)[torch.arange(pixels.numel()), pixels].sum()) / math.log(2))
    return bits


def test_exact_network_costs_what_the_authors_float_network_costs(encoded_tiles):
    """Fidelity to the authors' NELBO: the integer network's ideal bits match the float network's
    along the same trajectory (same noise, same dither), within 1.5% in total and 5% per chunk."""
    from model.uqdm.importer import import_checkpoint

    float_weights = import_checkpoint(UQDM_TINY_SOURCE)
    exact_total = float_total = 0.0
    for tile, _, ideal_bits in encoded_tiles:
        reference = float_nelbo_bits(float_weights, tile)
        ratios = [a / b for a, b in zip(ideal_bits, reference)]
        assert all(0.95 < r < 1.05 for r in ratios), ratios
        exact_total, float_total = exact_total + sum(ideal_bits), float_total + sum(reference)
    assert 0.985 < exact_total / float_total < 1.015, exact_total / float_total
    bpp = exact_total / (len(encoded_tiles) * TILE * TILE)
    assert 8 < bpp < 20, bpp  # lossless rate of photos at 64x64 (the authors: 17.2 on ImageNet-64)


def test_progressive_rate_distortion_on_dev_photos(uqdm_tiny, encoded_tiles):
    """PSNR never decreases with more chunks: under 30 dB after 1, over 30 after T-1, lossless after T+1."""
    for tile, data, ideal_bits in encoded_tiles[:2]:
        curve = [psnr(uqdm_tiny.decompress(data, chunks=n), tile) for n in range(1, uqdm_tiny.n_chunks + 1)]
        assert all(b >= a for a, b in zip(curve, curve[1:])), curve
        assert curve[0] < 30 < curve[-3] and curve[-1] == float("inf"), curve
        assert ideal_bits[-1] < sum(ideal_bits[:-1])  # the lossless chunk is the small last step
