"""The evaluation library (BD-rate, image sets, points, progressive prefixes) and the CLI end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import matplotlib.cbook
import matplotlib.image
import numpy as np
import pytest
import torch
from PIL import Image

from model.codec import Codec, DecodedPixels
from model.evaluation import Settings, bd_rate, bits_at_equal_quality, evaluate, image_set, measure, progressive_curves
from model.paths import REPO
from model.registry import Weights
from model.report import markdown

# A classical-looking curve: PSNR rising with log-rate, at unevenly spaced rates.
RATES = [0.08, 0.15, 0.3, 0.55, 1.0, 1.9]


def quality(bpp: float) -> float:
    return 30 + 4 * math.log2(bpp) - 0.1 * math.log2(bpp) ** 2


def curve(rates, scale: float = 1.0) -> list[tuple[float, float]]:
    """(bpp, quality) points of `quality`, then the rates multiplied by `scale` at equal quality."""
    return [(r * scale, quality(r)) for r in rates]


def test_bd_rate_of_a_curve_against_itself_is_zero():
    assert bd_rate(curve(RATES), curve(RATES)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("scale, expected", [(0.8, -20.0), (1.25, 25.0)])
def test_bd_rate_of_a_scaled_curve(scale, expected):
    assert bd_rate(curve(RATES), curve(RATES, scale)) == pytest.approx(expected, abs=1e-9)
    # also when the two curves are sampled at other qualities (interpolation, partial overlap)
    other = [0.1, 0.2, 0.4, 0.9, 2.5]
    assert bd_rate(curve(RATES), curve(other, scale)) == pytest.approx(expected, abs=0.5)


def test_bd_rate_is_none_without_overlap_or_points():
    low, high = curve([0.05, 0.1]), curve([1.0, 2.0])
    assert bd_rate(low, high) is None
    assert bd_rate(curve(RATES), curve([0.5])) is None
    assert bd_rate(curve(RATES), [(0.5, None), (1.0, math.inf)]) is None


@pytest.mark.parametrize("scale", [0.5, 0.8, 1.25])
def test_bits_at_equal_quality_of_a_point_on_a_scaled_curve(scale):
    for rate in (0.1, 0.33, 1.0):  # anchor points and between them
        assert bits_at_equal_quality(curve(RATES), rate * scale, quality(rate)) == pytest.approx(
            100 * (scale - 1), abs=0.5)
    assert bits_at_equal_quality(curve(RATES), 0.01, quality(0.001)) is None  # outside the anchor: not guessed
    assert bits_at_equal_quality(curve(RATES), 0.5, None) is None


def test_image_sets():
    images = {"a": np.zeros((512, 768, 3), np.uint8), "b": np.zeros((100, 90, 3), np.uint8)}
    crops = image_set(images, "crop", 128)
    assert crops.key == "crop128" and crops.images["a"].shape == (128, 128, 3)
    assert crops.images["b"].shape == (100, 90, 3)  # smaller sides kept whole
    down = image_set(images, "downsize", 64)
    assert down.key == "down64" and {img.shape for img in down.images.values()} == {(64, 64, 3)}
    assert image_set(images, "crop", 0).images is images
    assert crops.summary()["sizes_wxh"] == ["128x128", "90x100"]


def sample_image(side: int = 128) -> np.ndarray:
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        return np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.LANCZOS))


SWD = {"patch_size": 8, "projections": 32, "patches_per_image": 256, "seed": 0}


def test_measure_an_exact_roundtrip():
    images = image_set({"x": sample_image(64)}, "crop", 0)
    point = measure(images, lambda name, img: (100, img.copy(), 0.0, 0.0), {"quality": 1}, SWD)
    assert point["lossless"] and point["psnr"] is None and point["exact_images"] == 1
    assert point["msssim"] == pytest.approx(1.0) and point["msssim_db"] is None and point["swd"] == 0.0
    assert point["bpp"] == pytest.approx(800 / 64 ** 2) and point["quality"] == 1


class ToyProgressive(Codec):
    """A progressive codec for tests: chunk i carries 2 more bits of each pixel (8 = lossless)."""

    family = "uqdm"  # the container knows only the real families
    progressive = True
    n_chunks = 4

    def __init__(self):
        super().__init__(Weights("uqdm", "toy-progressive", {}, {}), device="cpu")

    def compress_batch(self, imgs):
        out = []
        for img in imgs:
            chunks = [zlib.compress(((img >> (6 - 2 * i)) & 3).tobytes()) for i in range(self.n_chunks)]
            out.append(self.pack(img.shape[0], img.shape[1], chunks))
        return out

    def decompress_batch(self, datas, steps=None, chunks=None):
        return self.synthesize(self.decode_latents(datas, chunks))

    def decode_latents(self, datas, chunks=None):
        latents = []
        for data in datas:
            header, parts = self.unpack(data, chunks)
            img = np.zeros((header.height, header.width, 3), np.uint8)
            for i, part in enumerate(parts):
                bits = np.frombuffer(zlib.decompress(part), np.uint8).reshape(img.shape)
                img |= bits << (6 - 2 * i)
            pixels = img | (1 << (7 - 2 * len(parts))) if len(parts) < self.n_chunks else img
            latents.append(DecodedPixels(**self.latents_header(header), pixels=pixels))
        return latents

    def synthesize_tensors(self, latents, steps=None):
        return [torch.from_numpy(item.pixels).permute(2, 0, 1) for item in latents]


def test_progressive_curves_use_prefixes_and_end_lossless():
    images = image_set({"a": sample_image(64), "b": sample_image(96)[:64, :80]}, "crop", 0)
    prefixes, lossless = progressive_curves(ToyProgressive(), images, Settings(swd=SWD))
    bpps = [p["bpp"] for p in prefixes["points"]]
    assert [p["chunks"] for p in prefixes["points"]] == [1, 2, 3]
    assert bpps == sorted(bpps) and [p["psnr"] for p in prefixes["points"]] == sorted(p["psnr"] for p in prefixes["points"])
    assert lossless["lossless"] and lossless["points"][0]["lossless"] and lossless["points"][0]["bpp"] > bpps[-1]
    assert all(p["encode_s"] == prefixes["points"][0]["encode_s"] for p in prefixes["points"])  # one encode
    # the report draws and tabulates a lossless point (infinite PSNR) without failing
    report = {"settings": Settings(swd=SWD).__dict__, "image_sets": {images.key: images.summary()},
              "images": ["a", "b"], "curves": [prefixes, lossless], "steps_tables": [], "bd_rate": [],
              "wall_s": {"total": 1.0}}
    assert "lossless" in markdown(report)


@pytest.mark.parametrize("uqdm_set, key", [("downsize", "down64"), ("crop", "crop64")])
def test_evaluate_runs_uqdm_on_the_uqdm_set(monkeypatch, uqdm_set, key):
    img = sample_image(256)[:, :192]  # 256x192: a 64 crop of it and a 64 downsizing differ
    monkeypatch.setattr("model.evaluation.load_codec", lambda name, device=None: ToyProgressive())
    report = evaluate({"a": img}, Settings(learned=["toy"], classical=["jpeg"], uqdm_size=64, uqdm_set=uqdm_set,
                                           swd=SWD))
    assert set(report["image_sets"]) == {"full", key} and report["settings"]["uqdm_set"] == uqdm_set
    toy = [c for c in report["curves"] if c["kind"] == "learned"]
    assert {c["image_set"] for c in toy} == {key}
    assert {c["image_set"] for c in report["curves"] if c["name"] == "jpeg"} == {"full", key}
    assert toy[1]["points"][0]["lossless"]
    made = image_set({"a": img}, uqdm_set, 64).images["a"]  # the set's pixels: the central crop only with "crop"
    assert made.shape == (64, 64, 3) and np.array_equal(made, img[96:160, 64:128]) == (uqdm_set == "crop")
    with pytest.raises(ValueError, match="uqdm_set"):
        Settings(uqdm_set="resize")


def test_cli_passes_uqdm_set_to_the_evaluation(monkeypatch, tmp_path):
    from jobs import evaluate as job
    from jobs._cli import Parser, UsageError

    Image.fromarray(sample_image(64)).save(tmp_path / "x.png")
    parser = Parser()
    job.add_arguments(parser)
    seen = {}

    class Stop(Exception):
        pass

    def stop(images, settings):
        seen["settings"] = settings
        raise Stop  # nothing past the settings is needed here

    monkeypatch.setattr(job, "evaluate", stop)
    for flags, expected in (([], "downsize"), (["--uqdm-set", "crop"], "crop")):
        args = parser.parse_args(["--images", str(tmp_path / "*.png"), "--out", str(tmp_path / "out"),
                                  "--codecs", "jpeg", *flags])
        with pytest.raises(Stop):
            job.run(args)
        assert seen["settings"].uqdm_set == expected
    with pytest.raises(UsageError, match="uqdm-set"):
        parser.parse_args(["--images", "x", "--out", "y", "--uqdm-set", "resize"])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[Path, dict]:
    """jobs.evaluate on two small sample images: CDC at two rates, JPEG, WebP."""
    folder = tmp_path_factory.mktemp("evaluate")
    Image.fromarray(sample_image(128)).save(folder / "hopper.png")
    Image.fromarray(sample_image(256)[64:192, 32:224]).save(folder / "hopper-crop.png")
    out = folder / "out"
    run = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--images", str(folder / "*.png"), "--out", str(out),
                          "--codecs", "cdc-hp128:q1", "cdc-hp128:q4", "jpeg", "webp", "--steps", "0", "1",
                          "--curve-steps", "1", "--steps-rate", "q4", "--diffusion-size", "64",
                          "--swd-projections", "32"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "## BD-rate" in run.stdout  # the Markdown is printed too
    return out, json.loads((out / "results.json").read_text())


def test_cli_writes_every_output(cli_run):
    out, report = cli_run
    for name in ("results.json", "results.md", "rd_psnr.png", "rd_msssim.png", "rd_swd.png",
                 "side_by_side_q0.png", "side_by_side_q6.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("rd_psnr.png", "rd_msssim.png", "rd_swd.png"):
        assert matplotlib.image.imread(out / name).shape[0] > 100
    assert report["command"].startswith("diffpress evaluate ") and report["settings"]["threads"] == 1


def test_cli_report_contents(cli_run):
    out, report = cli_run
    assert set(report["image_sets"]) == {"full", "crop64"}
    labels = {(c["label"], c["image_set"]) for c in report["curves"]}
    assert {("cdc-hp128 (mean image)", "full"), ("cdc-hp128 (mean image)", "crop64"),
            ("cdc-hp128 (1 step, deterministic)", "crop64"), ("cdc-hp128 (1 step, stochastic)", "crop64"),
            ("JPEG", "full"), ("WebP", "full"), ("JPEG", "crop64"), ("WebP", "crop64")} <= labels
    cdc = next(c for c in report["curves"] if c["label"] == "cdc-hp128 (mean image)" and c["image_set"] == "full")
    assert [p["rate"] for p in cdc["points"]] == ["q1", "q4"]
    assert cdc["points"][0]["bpp"] < cdc["points"][1]["bpp"] and cdc["points"][0]["psnr"] < cdc["points"][1]["psnr"]
    assert all(len(p["per_image"]) == 2 for p in cdc["points"])
    table = report["steps_tables"][0]
    assert table["codec"] == "cdc-hp128:q4" and [(r["steps"], r["decoding"]) for r in table["rows"]] == [
        (0, "mean image"), (1, "deterministic"), (1, "stochastic")]
    rows = {(r["curve"], r["anchor"], r["image_set"]): r for r in report["bd_rate"]}
    assert ("cdc-hp128 (mean image)", "JPEG", "full") in rows and ("WebP", "JPEG", "full") in rows
    assert ("JPEG", "JPEG", "full") not in rows
    text = (out / "results.md").read_text()
    for heading in ("## BD-rate", "## Diffusion steps", "## Learned codecs", "## Classical codecs"):
        assert heading in text


@pytest.mark.parametrize("name", ["avif", "webp", "jpeg"])
def test_side_by_side_gives_classical_codecs_the_most_bytes_that_fit_the_budget_never_more(name):
    from model.classical import classical_encode
    from model.sidebyside import at_most_bytes

    img = sample_image(96)
    budget = len(classical_encode(name, img, 50)) + 7
    quality, data = at_most_bytes(name, img, budget)
    assert len(data) <= budget and quality >= 50
    assert quality == 100 or len(classical_encode(name, img, quality + 1)) > budget
    assert at_most_bytes(name, img, 10) is None  # no file is that small
