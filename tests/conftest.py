"""Shared fixtures: paths to the shared photos and the authors' UQDM weights, imported once."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from model.paths import DEV_PHOTOS, UQDM_TINY_SOURCE


def dev_photos() -> list[Path]:
    return sorted(DEV_PHOTOS.glob("*.png"))


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder holding uqdm-tiny imported from the authors' checkpoint.

    Exported as DIFFPRESS_WEIGHTS so that `load_codec("uqdm-tiny")` finds it here and in
    any Ray worker started by the tests.
    """
    if not (UQDM_TINY_SOURCE / "checkpoint.pt").is_file():
        pytest.fail(f"the authors' UQDM weights are missing at {UQDM_TINY_SOURCE} (set DIFFPRESS_SHARED)")
    from model.uqdm.importer import import_checkpoint
    from model.registry import save_weights

    folder = tmp_path_factory.mktemp("weights")
    save_weights(import_checkpoint(UQDM_TINY_SOURCE), folder / "uqdm-tiny.safetensors")
    os.environ["DIFFPRESS_WEIGHTS"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def uqdm(weights_dir):
    from model import load_codec

    return load_codec("uqdm-tiny", device="cpu")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
