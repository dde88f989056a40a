"""CDC's context entropy model (channel groups + checkerboard): exact, decodable, and a real refinement.

The weights here are the shipped cdc-hp128 plus a context model with seeded random nets
(its output layer made non-zero, so it really moves means and tables), exported through
the same path as a trained one.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import pytest
import torch

from model import BitstreamError
from model.cdc.codec import CDCCodec
from model.cdc.context import ContextModel, anchors
from model.cdc.frozen import frozen_latents
from model.cdc.train_context import with_context
from model.cdc.train import to_unit

from .sample_images import photo_crop
from .test_cdc import repack

GROUPS = (16, 16, 32, 64, 64)


def seeded_context(seed: int = 0) -> ContextModel:
    torch.manual_seed(seed)
    context = ContextModel(GROUPS)
    for net in context.nets:
        torch.nn.init.normal_(net.layers[-1].weight, std=0.02)
    return context


@pytest.fixture(scope="module")
def calibration(cdc) -> tuple[torch.Tensor, ...]:
    images = torch.stack([torch.tensor(photo_crop(top, 200, 64, 64)).permute(2, 0, 1) for top in (0, 200)])
    return frozen_latents(cdc, to_unit(images), torch.tensor([0, 5]))


@pytest.fixture(scope="module")
def context_codec(cdc, calibration) -> CDCCodec:
    weights = with_context(cdc, seeded_context(), calibration, "cdc-ctx-test", "a test")
    return CDCCodec(weights, device="cpu", variant="q3")


def test_the_checkerboard_splits_every_position_into_two_passes():
    first = anchors(5, 6)
    assert first.sum() == 15 and (~first).sum() == 15 and bool(first[0, 0]) and not bool(first[0, 1])


def test_the_exact_context_follows_the_float_model_it_was_exported_from(calibration, context_codec):
    """Same inputs, same group: means within the 2^-10 grid and int16 weights' error, levels within one."""
    y, levels, means = calibration
    float_model = seeded_context().double()
    exact = context_codec.context
    part, g = slice(16, 32), 1
    earlier = torch.round(y[:, :16] - means[:, :16]) + means[:, :16]
    hat = (torch.round(y[:, part] - means[:, part]) + means[:, part]) * anchors(*y.shape[-2:])[None, None]
    position, mean = float_model.nets[g](levels[:, part].double(), means[:, part], hat, earlier)
    exact_levels, exact_means = exact(g, levels[:, part].double(), means[:, part], hat, earlier)
    assert (exact_means - mean).abs().max() < 0.01
    assert (exact_levels - position.clamp(0, 63)).abs().max() <= 1.0
    assert (mean - means[:, part]).abs().max() > 0.05  # the nets really moved the means


def test_a_context_stream_decodes_to_the_symbols_it_was_encoded_from(context_codec, cdc):
    img = photo_crop(100, 150, 70, 130)
    data = context_codec.compress(img)
    z, k = context_codec.decode_symbols(data)
    with warnings.catch_warnings():  # torch warns when autograd-tracked tensors reach the exact layer
        warnings.simplefilter("error")
        z2, k2 = context_codec.encode_symbols(img)
    assert torch.equal(z, z2) and torch.equal(k, k2)
    hyperprior = cdc.encode_symbols(img)[1]
    assert not torch.equal(k, hyperprior)  # other means, other symbols: the context is in use
    out = context_codec.decompress(data)
    assert out.shape == img.shape and np.abs(out.astype(int) - img).mean() < 12


def test_a_corrupt_context_stream_raises(context_codec):
    data = context_codec.compress(photo_crop(40, 60, 64, 64))
    header, chunks = context_codec.unpack(data)
    y = bytearray(chunks[1])
    y[-3] ^= 0x5A  # inside the coded passes
    with pytest.raises(BitstreamError):
        context_codec.decompress(repack(data, [chunks[0], bytes(y)]))
    crc = bytearray(chunks[1])
    crc[:4] = (zlib.crc32(b"other") & 0xFFFFFFFF).to_bytes(4, "big")
    with pytest.raises(BitstreamError, match="other values"):
        context_codec.decompress(repack(data, [chunks[0], bytes(crc)]))


def test_context_weights_are_new_weights_and_refuse_hyperprior_streams(context_codec, cdc):
    assert context_codec.weights_digest != cdc.weights_digest
    with pytest.raises(BitstreamError, match="other weights"):
        context_codec.decompress(cdc.compress(photo_crop(40, 60, 64, 64)))


def test_the_exact_context_runs_every_pass_in_order_and_sees_only_what_is_decoded(context_codec):
    """Decoding uses, for each pass, only symbols of earlier passes: changing a later symbol
    never changes an earlier pass's tables."""
    levels = torch.full((1, 192, 4, 4), 20, dtype=torch.int64)
    means = torch.zeros(1, 192, 4, 4, dtype=torch.float64)
    seen = []

    def record(part, pass_levels, pass_means, mask, bump):
        seen.append(pass_levels[mask].clone())
        k = torch.zeros(pass_levels.shape, dtype=torch.float64)
        if bump and part.start == 64:
            k[:] = 5.0
        return k

    context_codec.context.code(levels, means, lambda *a: record(*a, bump=False))
    plain, seen = seen, []
    context_codec.context.code(levels, means, lambda *a: record(*a, bump=True))
    assert len(plain) == 2 * len(GROUPS)
    for index, (a, b) in enumerate(zip(plain, seen)):
        if index <= 6:  # up to and including the fourth group's (channels 64..127) first pass
            assert torch.equal(a, b), index
    assert any(not torch.equal(a, b) for a, b in zip(plain[7:], seen[7:]))


def test_context_training_resumes_where_it_stopped_and_exports_new_weights_that_decode(tmp_path, cdc):
    """A tiny run on sample photos: 4 steps, stopped after 2 and resumed; the export names both
    commands, keeps the source's tensors and decodes its own streams."""
    from PIL import Image

    from model.cdc.train_context import ContextTrainConfig, export_with_context, train_context
    from model.registry import read_weights

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, top in enumerate((0, 150)):
        Image.fromarray(photo_crop(top, 100, 128, 128)).save(photos / f"p{i}.png")
    base = dict(source="cdc-hp128", name="cdc-ctx-tiny", run_dir=str(tmp_path / "run"), crops=4, crop=64,
                batch_size=2, data=str(photos), scales=(1.0,), checkpoint_every=2, log_every=1, threads=1,
                export=str(tmp_path / "cdc-ctx-tiny.safetensors"))
    _, curve, _ = train_context(ContextTrainConfig(**base, steps=2, provenance="first"))
    assert [row["step"] for row in curve] == [1, 2]
    context, curve, commands = train_context(ContextTrainConfig(**base, steps=4, provenance="second"))
    assert [row["step"] for row in curve] == [1, 2, 3, 4] and commands == ["first", "second"]
    path = export_with_context(ContextTrainConfig(**base, steps=4), context, curve, commands)
    weights = read_weights(path)
    assert weights.name == "cdc-ctx-tiny" and weights.config["model"]["context_groups"] == list(GROUPS)
    assert "first; then second" in weights.provenance and cdc.weights.provenance in weights.provenance
    assert torch.equal(weights.tensors["g_a.net.0.weight"], cdc.weights.tensors["g_a.net.0.weight"])
    codec = CDCCodec(weights, device="cpu")
    img = photo_crop(30, 40, 64, 64)
    assert torch.equal(codec.decode_symbols(codec.compress(img))[1], codec.encode_symbols(img)[1])
