"""CDC (cdc-hp128, shipped): exact symbols in real bitstreams, rate points, the 0-step and diffusion
decoders, hostile streams, training. Images from matplotlib or generated; dev photos only in the
test marked `shared`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from model import BitstreamError, bitstream, load_codec
from model.cdc.config import PRESETS, CDCConfig, TrainConfig
from model.metrics import psnr
from model.paths import REPO
from model.registry import Weights, read_weights, resolve, save_weights

from .sample_images import photo_crop, photo_like, sample_photo

NAME = "cdc-hp128"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """256x256 of matplotlib's Grace Hopper photo: face, uniform and collar."""
    return photo_crop(150, 120, 256, 256)


@pytest.fixture(scope="module")
def small(cdc) -> tuple[np.ndarray, bytes]:
    img = photo_crop(250, 200, 64, 96)
    return img, cdc.compress(img)


def test_symbols_roundtrip_through_real_bitstreams(cdc, photo):
    crop = photo[:160, :200]  # padded to 192 x 256
    z, k = cdc.encode_symbols(crop)
    data = cdc.compress(crop)
    z_read, k_read = cdc.decode_symbols(data)
    assert z.shape == z_read.shape == (1, cdc.config.n, 3, 4)
    assert k.shape == k_read.shape == (1, cdc.config.m, 12, 16)
    assert torch.equal(z.cpu(), z_read.cpu()) and torch.equal(k.cpu(), k_read.cpu())
    assert (k != 0).sum() > 100 and (z != 0).any(), "all-zero symbols would make this test vacuous"
    # Each chunk starts with the CRC32 of the symbols it decodes to (int32, little-endian).
    _, chunks = bitstream.unpack(data)
    for chunk, symbols in zip(chunks, (z, k)):
        assert chunk[:4] == zlib.crc32(symbols.cpu().numpy().astype("<i4").tobytes()).to_bytes(4, "big")


def test_every_rate_point_decodes_and_higher_rates_spend_more_bits_for_higher_psnr(cdc, photo):
    # q1-q6 trained; q0 and q7 derived by gain scaling, numbered after them (the stream's index)
    assert cdc.name == f"{NAME}:q4" and cdc.rate_names == ["q1", "q2", "q3", "q4", "q5", "q6", "q0", "q7"]
    sizes, quality = [], []
    for rate in [f"q{i}" for i in range(8)]:
        codec = load_codec(f"{NAME}:{rate}", device="cpu")
        assert codec.name == f"{NAME}:{rate}"
        data = codec.compress(photo)
        assert bitstream.read_header(data).params == bytes([cdc.rate_names.index(rate)])
        out = codec.decompress(data)
        np.testing.assert_array_equal(cdc.decompress(data), out)  # the stream names its rate point
        sizes.append(len(data))
        quality.append(psnr(out, photo))
    assert all(b > a for a, b in zip(sizes, sizes[1:])), sizes
    assert all(b > a for a, b in zip(quality, quality[1:])), quality
    assert quality[1] > 24, quality  # q1: a trained model, not noise (measured: 27.3 dB at 0.40 bpp)


def test_unknown_rate_points_and_variants_are_refused(uqdm):
    with pytest.raises(ValueError, match="unknown rate point 'q9'; cdc-hp128 has q1, q2"):
        load_codec(f"{NAME}:q9", device="cpu")
    with pytest.raises(ValueError, match="has no variants"):
        load_codec("uqdm-test:q1", device="cpu")


@pytest.mark.parametrize("height,width", [(1, 1), (17, 33), (64, 65), (3, 130)])
def test_any_size_roundtrips_and_is_cropped_back(cdc, height, width):
    img = photo_crop(200, 150, height, width)
    data = cdc.compress(img)
    header = bitstream.read_header(data)
    assert (header.height, header.width) == (height, width)
    out = cdc.decompress(data)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 40


def test_mean_image_and_diffusion_decodes_both_resemble_the_input(cdc, small):
    img, data = small
    mean = cdc.decompress(data, steps=0)
    np.testing.assert_array_equal(cdc.decompress(data), mean)  # steps=0 is the default
    sampled = cdc.decompress(data, steps=2)
    assert mean.shape == sampled.shape == img.shape
    assert not np.array_equal(mean, sampled)
    assert psnr(mean, img) > 24 and psnr(sampled, img) > 22, (psnr(mean, img), psnr(sampled, img))
    np.testing.assert_array_equal(cdc.decompress(data, steps=2), sampled)  # deterministic (eta = 0, seed 0)


def test_stochastic_decoding_depends_on_the_seed_only(cdc, small):
    _, data = small
    a = cdc.decompress(data, steps=2, stochastic=True, seed=1)
    np.testing.assert_array_equal(cdc.decompress(data, steps=2, stochastic=True, seed=1), a)
    assert not np.array_equal(cdc.decompress(data, steps=2, stochastic=True, seed=2), a)
    assert not np.array_equal(cdc.decompress(data, steps=2), a)


def test_steps_must_be_an_integer_in_range(cdc, small):
    _, data = small
    for steps in (-1, 2.5, 10_000, "2"):
        with pytest.raises(ValueError, match="steps"):
            cdc.decompress(data, steps=steps)


DECODE_IN_CHILD = """
import sys, numpy as np, torch
torch.set_num_threads(1)
from model import load_codec
codec = load_codec("cdc-hp128", device="cpu")
data = open(sys.argv[1], "rb").read()
z, k = codec.decode_symbols(data)
np.savez(sys.argv[2], z=z.numpy(), k=k.numpy(), image=codec.decompress(data))
"""


def test_symbols_are_exact_and_pixels_within_a_level_in_another_process_and_cpu_kernels(cdc, small, tmp_path):
    img, data = small
    assert cdc.compress(img) == data
    (tmp_path / "stream.dfz").write_bytes(data)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
    subprocess.run([sys.executable, "-c", DECODE_IN_CHILD, str(tmp_path / "stream.dfz"), str(tmp_path / "out.npz")],
                   cwd=REPO, env=env, check=True, timeout=300)
    child = np.load(tmp_path / "out.npz")
    z, k = cdc.decode_symbols(data)
    np.testing.assert_array_equal(child["z"], z.numpy())
    np.testing.assert_array_equal(child["k"], k.numpy())
    difference = np.abs(child["image"].astype(int) - cdc.decompress(data).astype(int))
    assert difference.max() <= 2, difference.max()  # float decoder: a level or two at most, by design


# ---------------------------------------------------------------------- hostile streams
def repack(data: bytes, chunks: list[bytes], params: bytes | None = None, codec: str = "cdc") -> bytes:
    """The same header with other chunks, every container CRC recomputed: only the decoder can tell."""
    header = bitstream.read_header(data)
    return bitstream.pack(codec, header.weights_digest, header.height, header.width, chunks,
                          header.params if params is None else params)


def test_truncated_and_bit_flipped_streams_raise(cdc, small):
    _, data = small
    for n in (0, 5, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(BitstreamError):
            cdc.decompress(data[:n])
    rng = np.random.default_rng(0)
    for i in rng.choice(len(data), size=40, replace=False):
        bad = bytearray(data)
        bad[i] ^= 1 << int(rng.integers(8))
        with pytest.raises(BitstreamError):
            cdc.decompress(bytes(bad))


def test_corrupt_payloads_under_recomputed_crcs_raise(cdc, small):
    """Damage inside the entropy-coded symbols, with valid container CRCs: the symbol CRCs catch it."""
    _, data = small
    _, chunks = bitstream.unpack(data)
    rng = np.random.default_rng(1)
    for trial in range(60):
        damaged = [bytearray(c) for c in chunks]
        victim = damaged[trial % 2]
        position = int(rng.integers(4, len(victim)))  # past the symbol CRC
        if trial % 3 == 2:
            del victim[position]
        else:
            victim[position] ^= 1 << int(rng.integers(8))
        with pytest.raises(BitstreamError, match="corrupt|symbols|length"):
            cdc.decompress(repack(data, [bytes(c) for c in damaged]))


def test_empty_missing_and_garbage_chunks_raise(cdc, small):
    _, data = small
    _, chunks = bitstream.unpack(data)
    rng = np.random.default_rng(2)
    cases = {"empty chunks": [b"", b""], "one chunk": chunks[:1], "three chunks": chunks + [b""],
             "garbage": [rng.bytes(len(chunks[0])), rng.bytes(len(chunks[1]))],
             "chunks swapped": chunks[::-1], "padding after the symbols": [chunks[0], chunks[1] + b"\x01"]}
    for label, bad in cases.items():
        with pytest.raises(BitstreamError):
            cdc.decompress(repack(data, bad))
            pytest.fail(label)
    for params in (b"", bytes([len(cdc.rate_names)]), b"\x00\x00"):
        with pytest.raises(BitstreamError, match="rate point|parameter"):
            cdc.decompress(repack(data, chunks, params=params))


def test_other_weights_and_other_codec_families_are_refused(cdc, small, tmp_path):
    _, data = small
    weights = read_weights(resolve(NAME))
    tensors = dict(weights.tensors)
    name = next(k for k in tensors if k.startswith("g_s."))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_weights(Weights("cdc", "cdc-other", weights.config, tensors), tmp_path / "other.safetensors")
    other = load_codec(tmp_path / "other.safetensors", device="cpu")
    with pytest.raises(BitstreamError, match="other weights") as raised:
        other.decompress(data)
    # the stream's digest names the weights it needs, from the catalog of releases
    assert f"cdc-hp128 (digest {weights.digest.hex()}): shipped inside diffpress" in str(raised.value)
    with pytest.raises(BitstreamError, match="which no diffpress release made"):
        cdc.decompress(other.compress(np.zeros((8, 8, 3), np.uint8)))
    _, chunks = bitstream.unpack(data)
    with pytest.raises(BitstreamError, match="written by codec 'uqdm'"):
        cdc.decompress(repack(data, chunks, codec="uqdm"))


def test_a_small_stream_claiming_a_huge_image_is_refused_before_allocating(cdc):
    img = photo_like(128, 192, seed=4)
    data = cdc.compress(img)
    _, chunks = bitstream.unpack(data)
    header = bitstream.read_header(data)
    hostile = bitstream.pack("cdc", header.weights_digest, 65536, 4096, chunks, header.params)
    assert 300 < len(hostile) < 700, len(hostile)
    started = time.perf_counter()
    with pytest.raises(BitstreamError, match="more than its .* payload bytes can describe"):
        cdc.decompress(hostile)
    with pytest.raises(BitstreamError, match="payload bytes"):
        cdc.decode_symbols(hostile)
    assert time.perf_counter() - started < 0.5


# ---------------------------------------------------------------------- weights and configs
def test_the_shipped_weights_hold_every_rate_point_and_their_training_record():
    weights = read_weights(resolve(NAME))
    config = CDCConfig.from_dict(weights.config["model"])
    assert config.to_dict() == weights.config["model"]  # nothing lost or added
    assert weights.config["rates"] == config.rate_names and weights.config["default_rate"] == "q4"
    assert weights.training["lambdas"] == list(config.lambdas) and weights.training["steps"] > 0
    assert any(k.startswith("exact.") for k in weights.tensors)


def test_every_shipped_weights_file_loads():
    from model.registry import SHIPPED_DIR

    names = sorted(p.stem for p in SHIPPED_DIR.glob("*.safetensors"))
    assert NAME in names
    for name in names:
        assert load_codec(name, device="cpu").weights.name == name


def test_configs_refuse_unknown_keys_naming_them_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown CDCConfig keys \['mm'\]; known keys: \[.*'m'"):
        CDCConfig.from_dict({"preset": "hp128", "mm": 16})
    with pytest.raises(ValueError, match=r"unknown CDC preset 'huge'"):
        CDCConfig.from_dict({"preset": "huge"})
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['sttage', 'wrap_model'\]; known keys: \[.*'stage'"):
        TrainConfig.from_dict({"name": "x", "run_dir": "r", "sttage": "content", "wrap_model": None})
    with pytest.raises(ValueError, match="unknown CDCConfig keys"):
        TrainConfig.from_dict({"name": "x", "run_dir": "r", "model": {"widths": [8]}})
    with pytest.raises(ValueError, match="stage must be one of"):
        TrainConfig(name="x", run_dir="r", stage="everything")


def test_configs_round_trip_through_dicts():
    config = CDCConfig.from_dict({"preset": "hp128", "n": 16, "m": 24, "unet_widths": [8, 8, 8, 8]})
    assert config.unet_widths == (8, 8, 8, 8) and config.lambdas == PRESETS["hp128"].lambdas
    assert CDCConfig.from_dict(config.to_dict()) == config
    train_config = TrainConfig(name="x", run_dir="r", stage="diffusion", model=config, scales=(1.0,))
    assert TrainConfig.from_dict(train_config.to_dict()) == train_config


def test_derived_rate_points_scale_a_trained_points_gains_and_change_only_the_config():
    from model.cdc.model import CDCModel
    from model.cdc.train import with_derived_rates

    config = CDCConfig.from_dict({"n": 16, "m": 24, "unet_widths": [8, 8, 8, 8], "lambdas": [0.01, 0.02],
                                  "derived_rates": [["low", "q1", 0.5], ["high", "q2", 2.0]]})
    assert config.rate_names == ["q1", "q2", "low", "high"] and CDCConfig.from_dict(config.to_dict()) == config
    model = CDCModel(config)
    with torch.no_grad():
        model.log_gain_enc.normal_()
        model.log_gain_dec.normal_()
    enc, dec = model.gains(torch.arange(4))
    torch.testing.assert_close(enc[2:], enc[:2] * torch.tensor([0.5, 2.0])[:, None, None, None])
    torch.testing.assert_close(dec[2:], dec[:2] / torch.tensor([0.5, 2.0])[:, None, None, None])
    for bad in (["x", "q3", 0.5], ["x", "q1", 0.0], ["q2", "q1", 0.5]):  # unknown source, k <= 0, a taken name
        with pytest.raises(ValueError, match="derived rate"):
            CDCConfig.from_dict({"lambdas": [0.01, 0.02], "derived_rates": [bad]})

    weights = read_weights(resolve(NAME))
    more = with_derived_rates(weights, [("q8", "q6", 2.0)], "a test")
    assert more.tensors is weights.tensors and more.digest != weights.digest  # streams of one refuse the other
    assert more.config["rates"] == weights.config["rates"] + ["q8"] and more.provenance.endswith("then: a test")


def test_derive_rates_command_writes_new_weights_and_never_changes_the_source(tmp_path, capsys):
    from jobs import derive_rates

    path = tmp_path / "cdc.safetensors"
    path.write_bytes(resolve(NAME).read_bytes())
    before = path.read_bytes()
    assert derive_rates.main([str(path), "q8=q6*2", "--name", "cdc-more"]) == 0
    assert path.read_bytes() == before
    weights = read_weights(tmp_path / "cdc-more.safetensors")
    assert weights.name == "cdc-more" and weights.config["rates"][-1] == "q8"
    assert "diffpress derive-rates " in weights.provenance
    assert load_codec(str(tmp_path / "cdc-more.safetensors") + ":q8", device="cpu").rate_names[-1] == "q8"
    capsys.readouterr()
    for refused, reason in [(["q9=q6*3", "--name", "x", "--out", str(path)], "never changed in place"),  # onto the source
                            (["q9=q6+2", "--name", "x"], "is not NAME=RATE*K"),
                            (["q3=q6*2", "--name", "x"], "have a name of its own")]:  # an existing rate name
        assert derive_rates.main([str(path), *refused]) == 2
        error = capsys.readouterr().err
        assert reason in error and len(error.splitlines()) == 1, error
    assert path.read_bytes() == before


def test_paper_preset_runs_the_same_code_at_the_authors_sizes():
    from model.cdc.model import CDCModel

    hp128, paper = CDCModel(PRESETS["hp128"]), CDCModel(PRESETS["paper"])
    assert sum(p.numel() for p in paper.parameters()) > 2 * sum(p.numel() for p in hp128.parameters())
    with torch.no_grad():
        losses = paper(torch.rand(1, 3, 64, 64) * 2 - 1, torch.tensor([2]), "joint")
    assert set(losses) == {"loss", "bpp", "mse01", "diffusion_mse"}
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------- training
TINY = CDCConfig(n=16, m=24, unet_widths=(8, 8, 8, 8))


@pytest.fixture(scope="module")
def training_photos(tmp_path_factory):
    """Training data with no ../shared: matplotlib's photos and two generated ones."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(sample_photo()).save(folder / "hopper.png")
    Image.fromarray(sample_photo("Minduka_Present_Blue_Pack.png")).save(folder / "pack.png")
    for seed in (1, 2):
        Image.fromarray(photo_like(160, 224, seed)).save(folder / f"generated{seed}.jpg", quality=95)
    return folder


def tiny_config(tmp_path, training_photos, stage: str = "content", steps: int = 20, **changes) -> TrainConfig:
    values = dict(name="cdc-tiny", run_dir=str(tmp_path / stage), stage=stage, model=TINY, steps=steps,
                  batch_size=4, crop=64, lr=1e-3, warmup=5, data=str(training_photos), scales=(1.0,),
                  export=str(tmp_path / "cdc-tiny.safetensors"), provenance="tests/test_cdc.py", threads=1,
                  log_every=10, checkpoint_every=20)
    return TrainConfig(**{**values, **changes})


def test_training_smoke_loss_falls_resume_continues_and_the_export_loads(tmp_path, training_photos):
    from model.cdc.model import CDCModel
    from model.cdc.train import CropSampler, export, to_unit, train

    config = tiny_config(tmp_path, training_photos)
    held_out = to_unit(CropSampler(config.data, config.crop, seed=99).batch(12))
    rates = torch.arange(12) % len(TINY.lambdas)

    def held_out_loss(model, stage="content") -> float:  # the same crops, noise and times every call
        torch.manual_seed(123)
        with torch.no_grad():
            return float(model(held_out, rates, stage)["loss"])

    torch.manual_seed(config.seed)
    initial = held_out_loss(CDCModel(TINY))  # train() starts from these weights
    model, curve = train(config)
    assert [row["step"] for row in curve] == [10, 20]
    # Rerunning with more steps resumes at step 20 from the checkpoint, not from scratch.
    model, curve = train(tiny_config(tmp_path, training_photos, steps=40))
    assert [row["step"] for row in curve] == [10, 20, 30, 40]
    assert all(np.isfinite(row["loss"]) and row["bpp"] > 0 for row in curve)
    assert held_out_loss(model) < 0.7 * initial, (held_out_loss(model), initial)

    # The diffusion stage starts from the content checkpoint and trains only the UNet.
    diffusion = tiny_config(tmp_path, training_photos, stage="diffusion", steps=10,
                            init_from=str(tmp_path / "content" / "checkpoint"))
    content_weights = model.g_a.state_dict()
    model, curve = train(diffusion)
    assert [row["stage"] for row in curve] == ["content"] * 4 + ["diffusion"]
    assert np.isfinite(curve[-1]["diffusion_mse"])
    assert all(torch.equal(v, model.g_a.state_dict()[k]) for k, v in content_weights.items())

    path = export(model, curve, diffusion)
    codec = load_codec(path, device="cpu")
    img = photo_crop(100, 100, 40, 50)
    data = codec.compress(img)
    assert codec.decompress(data).shape == codec.decompress(data, steps=1).shape == (40, 50, 3)
    assert path.with_suffix(".curve.csv").read_text().count("\n") == 1 + len(curve)
    weights = read_weights(path)
    assert weights.training == {"lambdas": list(TINY.lambdas), "stage": "diffusion", "steps": 10}
    assert weights.config["model"] == TINY.to_dict() and weights.provenance == "tests/test_cdc.py"


def test_training_from_shipped_weights_keeps_their_networks_and_adds_rate_points(tmp_path, training_photos):
    """init_from=<weights>: the float networks as shipped, h_s back from its exact integers (which
    re-export to the very same integers), the trained rate points' gains untouched, a new point's
    gains extrapolated (finer steps at a higher lambda); training runs on from there."""
    import dataclasses

    from model.cdc.exact_parts import export_chain
    from model.cdc.model import CDCModel
    from model.cdc.train import start_from_weights, train

    weights = read_weights(resolve(NAME))
    base = CDCConfig.from_dict(weights.config["model"])
    config = dataclasses.replace(base, lambdas=base.lambdas + (0.0932,), derived_rates=())
    model = CDCModel(config)
    start_from_weights(model, weights)
    shipped = {k: v for k, v in weights.tensors.items() if not k.startswith("exact.") and "gain" not in k}
    assert all(torch.equal(model.state_dict()[k].half(), v) for k, v in shipped.items())
    with torch.no_grad():
        again = export_chain(list(model.h_s.layers), ("up", "up", "same"), torch.zeros(1, base.n, 2, 2).double(), "hs")
    for i in range(3):
        assert torch.equal(again[f"hs.{i}.weight"], weights.tensors[f"exact.hs.{i}.weight"])
    trained = len(base.lambdas)
    np.testing.assert_array_equal(model.log_gain_enc[:trained].detach().half(), weights.tensors["log_gain_enc"])
    assert bool((model.log_gain_enc[trained] > model.log_gain_enc[trained - 1]).all())  # finer quantization
    with pytest.raises(ValueError, match="lambdas must start with"):
        start_from_weights(CDCModel(dataclasses.replace(config, lambdas=(0.001,) + base.lambdas)), weights)

    run = tiny_config(tmp_path, training_photos, model=config, steps=2, batch_size=1, log_every=1, init_from=NAME)
    _, curve = train(run)
    assert [row["step"] for row in curve] == [1, 2] and all(np.isfinite(row["loss"]) for row in curve)


def test_training_refuses_the_evaluation_photos(tmp_path):
    from model.cdc.train import CropSampler

    (tmp_path / "dev").mkdir()
    with pytest.raises(ValueError, match="evaluation set"):
        CropSampler(tmp_path / "dev", 64, seed=0)


# ---------------------------------------------------------------------- the team's photos
@pytest.mark.shared
def test_rate_distortion_on_dev_photos(dev_photo_paths):
    """On centre 256x256 crops of 3 dev photos: more bits and higher PSNR at every higher rate point."""
    crops = []
    for path in dev_photo_paths[:3]:
        img = np.asarray(Image.open(path).convert("RGB"))
        top, left = (img.shape[0] - 256) // 2, (img.shape[1] - 256) // 2
        crops.append(img[top:top + 256, left:left + 256])
    bpp, quality = [], []
    for rate in ("q1", "q3", "q6"):
        codec = load_codec(f"{NAME}:{rate}", device="cpu")
        streams = [codec.compress(c) for c in crops]
        bpp.append(8 * sum(map(len, streams)) / (len(crops) * 256 * 256))
        quality.append(float(np.mean([psnr(codec.decompress(s), c) for s, c in zip(streams, crops)])))
    assert all(b > a for a, b in zip(bpp, bpp[1:])), bpp
    assert all(b > a for a, b in zip(quality, quality[1:])), quality
    assert quality[0] > 22 and bpp[-1] < 3, (bpp, quality)
