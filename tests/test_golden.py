"""Streams written by earlier releases and on other machines decode as they did there, forever.

- tests/golden/<release>/: every release's streams (tests/golden_streams.py), both codecs.
- ../shared/golden/<machine>/: streams written on another vendor's machine, with what that
  machine decoded (marked `shared`: the files live there).
UQDM: every prefix pixel-identical. CDC: symbols identical, pixels within PIXEL_BOUND levels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from model import load_codec
from model.paths import GOLDEN as SHARED_GOLDEN

from .conftest import HOW_TO_PROVIDE
from .golden_streams import CDC_DECODES, GOLDEN, decodes, sha256, symbols
from .test_portability import PIXEL_BOUND

RELEASES = sorted(p.parent for p in GOLDEN.glob("*/index.json"))
MACHINES = sorted(p.parent for p in SHARED_GOLDEN.glob("*/index.json")) if SHARED_GOLDEN.is_dir() else []


def streams_of(folder: Path) -> list[tuple[Path, str, dict]]:
    index = json.loads((folder / "index.json").read_text())
    return [(folder, name, entry) for name, entry in sorted(index["streams"].items())]


def assert_pixels_within_bound(found: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert found.shape == expected.shape, what
    difference = np.abs(found.astype(np.int16) - expected.astype(np.int16)).max()
    assert difference <= PIXEL_BOUND, f"{what}: pixels {difference} levels apart"


@pytest.fixture(scope="module")
def codecs(weights_dir):
    loaded = {}
    return lambda name: loaded.setdefault(name, load_codec(name, device="cpu"))


def test_every_release_has_golden_streams_of_both_codecs():
    assert RELEASES, f"no golden streams in {GOLDEN}"
    for folder in RELEASES:
        families = {entry["codec"].split("-")[0] for _, _, entry in streams_of(folder)}
        assert families == {"cdc", "uqdm"}, folder


@pytest.mark.parametrize("folder,name,entry", [s for f in RELEASES for s in streams_of(f)],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_streams_of_every_release_still_decode(folder, name, entry, codecs):
    data = (folder / f"{name}.bin").read_bytes()
    assert sha256(data) == entry["sha256"], "the golden stream itself changed"
    codec = codecs(entry["codec"])
    found = decodes(codec, data)
    assert found.keys() == entry["pixels_sha256"].keys()
    if codec.progressive:
        for what, pixels in found.items():
            assert sha256(pixels) == entry["pixels_sha256"][what], f"{name} {what}"
        return
    assert sha256(symbols(codec, data).astype("<i4")) == entry["symbols_sha256"]
    expected = np.load(folder / f"{name}.npz")
    for what in CDC_DECODES:
        assert_pixels_within_bound(found[what], expected[what], f"{name} {what}")


@pytest.mark.shared
@pytest.mark.parametrize("folder", MACHINES or [None], ids=lambda f: f.name if f else "none")
def test_streams_written_on_another_vendors_machine_decode_alike(folder, codecs):
    if folder is None:
        pytest.skip(f"needs ../shared/golden (streams written on other machines): {HOW_TO_PROVIDE}")
    entries = streams_of(folder)
    assert entries
    for _, name, entry in entries:
        data = (folder / f"{name}.bin").read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        codec = codecs(entry["codec"])
        there = np.load(folder / f"{name}.npz")
        np.testing.assert_array_equal(symbols(codec, data), there["symbols"], err_msg=name)
        for steps in (0, 2):
            assert_pixels_within_bound(codec.decompress(data, steps=steps), there[f"steps{steps}"], f"{name} steps {steps}")


def test_a_changed_golden_decode_would_be_seen(codecs):
    """Not vacuous: a CDC decode three levels off, or a UQDM pixel flipped, fails the checks."""
    folder, name, entry = next(s for f in RELEASES for s in streams_of(f) if s[2]["codec"].startswith("cdc"))
    expected = np.load(folder / f"{name}.npz")["steps0"]
    with pytest.raises(AssertionError):
        assert_pixels_within_bound(np.clip(expected.astype(np.int16) + PIXEL_BOUND + 1, 0, 255).astype(np.uint8),
                                   expected, "shifted")
    folder, name, entry = next(s for f in RELEASES for s in streams_of(f) if s[2]["codec"].startswith("uqdm"))
    pixels = decodes(codecs(entry["codec"]), (folder / f"{name}.bin").read_bytes())["chunks1"].copy()
    pixels.flat[0] ^= 1
    assert sha256(pixels) != entry["pixels_sha256"]["chunks1"]
