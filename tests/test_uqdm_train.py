"""UQDM training (model/uqdm/train.py, diffpress train-uqdm) on the seeded test UQDM and tiny photos.

No ../shared: the network is tests/uqdm_fixtures.py's seeded one, the photos are matplotlib's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import model
from jobs import cli
from model import training
from model.registry import read_weights, save_weights
from model.uqdm.codec import UQDMCodec, _tile
from model.uqdm.train import (TrainableUQDM, Trainer, UQDMTrainConfig, codec_trajectory, export, float_source,
                              nelbo_bits, read_checkpoint, remake_exact)

from .sample_images import photo_crop, photo_like, sample_photo
from .uqdm_fixtures import seeded_exact_weights, seeded_float_weights


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(sample_photo()).save(folder / "hopper.png")
    Image.fromarray(photo_like(96, 128, 1)).save(folder / "generated.png")
    return folder


@pytest.fixture(scope="module")
def float_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "uqdm-test-float.safetensors"
    return save_weights(seeded_float_weights(), path)


def config(tmp_path, photos, float_file, **changes) -> UQDMTrainConfig:
    values = dict(checkpoint=str(tmp_path / "checkpoint"), steps=4, batch_size=1, lr=1e-3, warmup=1,
                  ema_decay=0.9, bf16=False, log_every=1, checkpoint_every=2, data=str(photos),
                  init_from=str(float_file))
    return UQDMTrainConfig(**{**values, **changes})


def test_the_float_loss_is_the_exact_codecs_coded_bits_within_one_percent():
    """On the codec's own z_1 and dithers the float NELBO is its ideal bits; the stream (header,
    CRCs, coder overhead) within 1% more; a fresh random draw within a few %."""
    torch.set_num_threads(1)
    img = photo_crop(40, 60, 64, 64)
    codec = UQDMCodec(seeded_exact_weights(), device="cpu")
    data, ideal = codec.compress_with_rates(img)
    model = TrainableUQDM(seeded_float_weights())
    tiles = torch.from_numpy(_tile(img))
    with torch.no_grad():
        same = float(nelbo_bits(model, tiles, *codec_trajectory(codec, len(tiles))).sum())
        fresh = float(nelbo_bits(model, tiles, generator=torch.Generator().manual_seed(0)).sum())
    assert sum(ideal) / same == pytest.approx(1.0, abs=0.01)
    assert len(data) * 8 / same == pytest.approx(1.0, abs=0.015)
    assert fresh / same == pytest.approx(1.0, abs=0.05)


def test_training_steps_lower_the_loss_on_a_fixed_batch_and_the_schedule_slope_learns(tmp_path, photos, float_file):
    trainer = Trainer(config(tmp_path, photos, float_file, lr=2e-3))
    batch = trainer.sampler.batch(1)
    slope = float(trainer.model.gamma_slope.detach())

    def loss() -> float:
        with torch.no_grad():
            return float(nelbo_bits(trainer.model, batch, generator=torch.Generator().manual_seed(7)).mean())

    before = loss()
    for _ in range(3):
        trainer.step(batch)
    assert loss() < 0.97 * before
    assert float(trainer.model.gamma_slope.detach()) != slope


def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(tmp_path, photos, float_file):
    whole = Trainer(config(tmp_path / "whole", photos, float_file))
    whole.run()
    first = Trainer(config(tmp_path / "split", photos, float_file, steps=2))
    first.run()
    resumed = Trainer(config(tmp_path / "split", photos, float_file))
    assert resumed.state["step"] == 2
    resumed.run()
    for key, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
        assert torch.equal(resumed.ema[key], whole.ema[key]), key
    assert [r["loss_bpp"] for r in resumed.state["curve"]] == [r["loss_bpp"] for r in whole.state["curve"]]
    assert (tmp_path / "split" / "checkpoint" / "curve.csv").read_text().count("\n") == 5  # header + 4 steps


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, photos, float_file, monkeypatch):
    trainer = Trainer(config(tmp_path, photos, float_file))
    trainer.step(trainer.sampler.batch(1))
    trainer.save()
    trainer.step(trainer.sampler.batch(1))
    real = training.save_file

    def failing(tensors, path, *args, **kwargs):
        if path.endswith("ema.safetensors"):
            raise OSError("disk full")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(training, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.undo()
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 1
    assert not (tmp_path / "checkpoint.tmp").exists()
    assert Trainer(config(tmp_path, photos, float_file)).state["step"] == 1


def test_export_gives_exact_weights_that_code_losslessly_and_are_remade_with_the_same_digest(tmp_path, photos,
                                                                                             float_file):
    trainer = Trainer(config(tmp_path, photos, float_file, steps=1))
    trainer.run()
    ema, state = read_checkpoint(tmp_path / "checkpoint")
    source = float_source(ema, state["model_config"], "uqdm-mine", "tests")
    tiles = training.CropSampler(photos, 64, seed=1).batch(2).numpy()
    exact = export(source, "uqdm-mine", tmp_path / "uqdm-mine.calibration.json",
                   tmp_path / "uqdm-mine.float.safetensors", tmp_path / "out" / "uqdm-mine.safetensors", tiles)
    assert read_weights(tmp_path / "out" / "uqdm-mine.safetensors").digest == exact.digest
    assert remake_exact(tmp_path / "uqdm-mine.calibration.json", "uqdm-mine").digest == exact.digest
    codec = UQDMCodec(exact, device="cpu")
    img = photo_crop(10, 20, 37, 50)
    assert np.array_equal(codec.decompress(codec.compress(img)), img)
    record = json.loads((tmp_path / "uqdm-mine.calibration.json").read_text())
    record["exponents"]["conv_in"][0] -= 1
    (tmp_path / "tampered.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="records"):
        remake_exact(tmp_path / "tampered.json", "uqdm-mine")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps"),
    (["--ema-decay", "1.5"], "--ema-decay"),
    (["--bf16", "maybe"], "--bf16"),
    (["--data", "/nonexistent/photos"], "no training photos"),
    (["--export-only", "--no-export"], "exclude"),
])
def test_cli_mistakes_are_one_line_and_exit_2(argv, message, capsys, tmp_path, photos):
    argv = [*argv, "--checkpoint", str(tmp_path / "c")]
    if "--data" not in argv:
        argv += ["--data", str(photos)]
    assert cli.main(["train-uqdm", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_export_only_without_a_checkpoint_is_one_line(capsys, tmp_path, photos):
    assert cli.main(["train-uqdm", "--export-only", "--checkpoint", str(tmp_path / "none"), "--data", str(photos)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no UQDM training checkpoint" in err, err


def test_the_command_trains_and_exports_into_out_dir_not_into_the_package(tmp_path, photos, float_file):
    # fine-tunes derive from the authors' weights, which we may not redistribute: made per user, never shipped
    out = tmp_path / "weights"
    argv = ["train-uqdm", "--name", "uqdm-mine", "--steps", "1", "--batch-size", "1", "--bf16", "false",
            "--checkpoint", str(tmp_path / "run"), "--init-from", str(float_file), "--data", str(photos),
            "--out-dir", str(out)]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["uqdm-mine.calibration.json", "uqdm-mine.curve.csv",
                                                     "uqdm-mine.float.safetensors", "uqdm-mine.safetensors"]
    exported = read_weights(out / "uqdm-mine.safetensors")
    assert remake_exact(out / "uqdm-mine.calibration.json", "uqdm-mine").digest == exported.digest
    assert "diffpress train-uqdm" in exported.provenance
    assert not list(Path(model.__file__).parent.rglob("uqdm-mine*"))


def test_the_loss_split_per_step_and_element_adds_up_to_the_bits():
    torch.set_num_threads(1)
    model = TrainableUQDM(seeded_float_weights())
    tiles = torch.from_numpy(_tile(photo_crop(40, 60, 64, 64)))
    parts: list[torch.Tensor] = []
    with torch.no_grad():
        bits = nelbo_bits(model, tiles, generator=torch.Generator().manual_seed(0), parts=parts)
    assert len(parts) == model.config["n_timesteps"] + 1 and parts[0].shape == tiles.shape
    assert float(sum(p.double().sum() for p in parts)) == pytest.approx(float(bits.sum()), rel=1e-5)
