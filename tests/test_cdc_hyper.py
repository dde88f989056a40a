"""A smaller CDC hyperprior retrained on frozen transforms (model/cdc/train_hyper.py)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.cdc.codec import CDCCodec
from model.cdc.config import CDCConfig
from model.cdc.train_hyper import HyperTrainConfig, export_hyper, train_hyper
from model.registry import read_weights

from .sample_images import photo_crop


def test_the_default_hyperprior_leaves_old_weights_configs_and_digests_unchanged(cdc):
    assert "hyper_widths" not in CDCConfig().to_dict() and "hyper_kernel" not in CDCConfig().to_dict()
    assert "hyper_widths" not in cdc.weights.config["model"]
    lite = CDCConfig(hyper_widths=(96, 128), hyper_kernel=1)
    assert CDCConfig.from_dict(lite.to_dict()) == lite and lite.hyper_hidden == (96, 128)
    assert CDCConfig().hyper_hidden == (192, 288)


@pytest.mark.parametrize("shape", [{"hyper_widths": (8, 8, 8)}, {"hyper_widths": (0, 8)}, {"hyper_kernel": 2}])
def test_a_hyperprior_shape_that_cannot_be_built_is_refused(shape):
    with pytest.raises(ValueError, match="hyper_"):
        CDCConfig(**shape)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cdc):
    """4 steps on two sample photos, stopped after 2 and resumed, then exported."""
    folder = tmp_path_factory.mktemp("hyper")
    photos = folder / "photos"
    photos.mkdir()
    for i, top in enumerate((0, 150)):
        Image.fromarray(photo_crop(top, 100, 128, 128)).save(photos / f"p{i}.png")
    base = dict(source="cdc-hp128", name="cdc-lite-tiny", run_dir=str(folder / "run"), hyper_widths=(24, 32),
                hyper_kernel=1, crops=68, crop=64, batch_size=2, data=str(photos), scales=(1.0,),
                checkpoint_every=2, log_every=1, threads=1, export=str(folder / "cdc-lite-tiny.safetensors"))
    _, first, _ = train_hyper(HyperTrainConfig(**base, steps=2, provenance="first"))
    prior, curve, commands = train_hyper(HyperTrainConfig(**base, steps=4, provenance="second"))
    path = export_hyper(HyperTrainConfig(**base, steps=4), prior, curve, commands)
    return first, curve, commands, read_weights(path)


def test_hyper_training_resumes_where_it_stopped_and_the_export_scores_both_hyperpriors(tiny_run):
    first, curve, commands, weights = tiny_run
    assert [row["step"] for row in first] == [1, 2] and [row["step"] for row in curve] == [1, 2, 3, 4]
    assert commands == ["first", "second"] and all(row["held_out_bpp"] > 0 for row in curve)
    assert weights.training["hyper_steps"] == 4
    assert weights.training["held_out_coded_bpp"] > 0 and weights.training["source_held_out_coded_bpp"] > 0


def test_coded_bpp_counts_what_a_stream_carries(cdc):
    """The exact tables' ideal bits of a crop's latents: its stream's payload, give or take the
    header and the coder's last words."""
    from model.cdc.train_hyper import coded_bpp

    img = photo_crop(0, 0, 128, 192)
    with cdc.float_numerics():
        y, _ = cdc._analysis([img])[0]
    stream_bpp = len(cdc.compress(img)) * 8 / img.shape[0] / img.shape[1]
    assert stream_bpp - 0.05 < coded_bpp(cdc, y.float()) < stream_bpp


def test_the_export_keeps_the_transforms_swaps_the_hyperprior_and_decodes_its_own_streams(tiny_run, cdc):
    *_, weights = tiny_run
    assert weights.name == "cdc-lite-tiny" and weights.config["model"]["hyper_widths"] == [24, 32]
    assert "first; then second" in weights.provenance and cdc.weights.provenance in weights.provenance
    for kept in ("g_a.net.0.weight", "g_s.out.weight", "log_gain_enc"):
        assert torch.equal(weights.tensors[kept], cdc.weights.tensors[kept])
    assert weights.tensors["h_s.layers.2.weight"].shape == (2 * cdc.config.m, 32, 1, 1)
    assert weights.tensors["exact.hs.2.weight"].shape == (2 * cdc.config.m, 32, 1, 1)
    codec = CDCCodec(weights, device="cpu", variant="q3")
    img = photo_crop(30, 40, 64, 128)
    data = codec.compress(img)
    assert torch.equal(codec.decode_symbols(data)[1], codec.encode_symbols(img)[1])
    assert codec.decompress(data).shape == img.shape


def test_the_exact_lite_hyper_synthesis_follows_its_float_network(tiny_run):
    """Same z: means within the 2^-10 grid and int16 weights' error, table levels within one."""
    *_, weights = tiny_run
    codec = CDCCodec(weights, device="cpu")
    z = torch.randint(-3, 4, (1, codec.config.n, 2, 3)).double()
    levels, means = codec.hyper(z)
    position, mean = codec.model.h_s.double()(z)
    assert (means - mean).abs().max() < 0.01
    assert (levels - position.clamp(0, codec.config.scale_levels - 1)).abs().max() <= 1.0


def test_new_exports_keep_hidden_activations_in_int16_and_releases_keep_the_bound_they_coded_with(tiny_run, cdc,
                                                                                               monkeypatch):
    """int16 hidden activations let h_s's large convolutions run on exact int8 GEMMs
    (model.exact.digits); cdc-hp128's streams were written with 2^20 and decode with it."""
    from model.cdc import exact_parts

    *_, weights = tiny_run
    codec = CDCCodec(weights, device="cpu")
    assert codec.hyper.chain.bound == exact_parts.HIDDEN_BOUND == (1 << 15) - 1
    assert cdc.hyper.chain.bound == exact_parts.LEGACY_HIDDEN_BOUND == (1 << 20) - 1
    seen = []
    requantize = exact_parts.exact.requantize

    def recording(acc, multiplier, bound):
        out = requantize(acc, multiplier, bound)
        seen.append((bound, float(out.abs().max()), float((out.abs() == bound).double().mean())))
        return out

    monkeypatch.setattr(exact_parts.exact, "requantize", recording)
    data = codec.compress(photo_crop(10, 20, 128, 192))
    assert torch.equal(codec.decode_symbols(data)[1], codec.encode_symbols(photo_crop(10, 20, 128, 192))[1])
    hidden = [entry for entry in seen if entry[0] == exact_parts.HIDDEN_BOUND]
    assert hidden and all(0 < largest <= exact_parts.HIDDEN_BOUND and clamped < 1e-3
                          for _, largest, clamped in hidden), hidden
