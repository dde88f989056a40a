"""Shared fixtures: the seeded test UQDM, the shipped CDC, and the authors' UQDM from ../shared.

Everything but the tests marked `shared` runs on a fresh clone: images come from
matplotlib or are generated, UQDM's mechanics run on a UQDM of the authors' architecture
with seeded weights (tests/uqdm_fixtures.py). Tests marked `shared` are about the
authors' UQDM weights or the team's photos (../shared, or $DIFFPRESS_SHARED); they skip,
saying how to provide them, when those are absent, and fail instead when
DIFFPRESS_REQUIRE_SHARED=1 (CI, .ci/run): CI always runs the whole suite.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.paths import DEV_PHOTOS, SHARED, UQDM_TINY_SOURCE

SHARED_MARKER = "shared: needs ../shared: the authors' UQDM checkpoint or the team's photos"
REQUIRE_SHARED = "DIFFPRESS_REQUIRE_SHARED"
#: fixtures that provide ../shared data: a test using one is marked `shared` even if its author forgot
SHARED_FIXTURES = ("uqdm_tiny", "dev_photo_paths")
#: where a user's own weights were before the tests pointed DIFFPRESS_WEIGHTS at their own folder
_USER_WEIGHTS = os.environ.get("DIFFPRESS_WEIGHTS")

HOW_TO_PROVIDE = (
    "set DIFFPRESS_SHARED to a folder laid out like ../shared (weights/uqdm-tiny/ with the authors' config.json and "
    "checkpoint.pt from github.com/mandt-lab/uqdm, checkpoints/uqdm-tiny; data/photos/dev/ with the team's photos)")


# ---------------------------------------------------------------------- the `shared` marker
def pytest_configure(config):
    config.addinivalue_line("markers", SHARED_MARKER)


def pytest_collection_modifyitems(items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SHARED_FIXTURES) \
                and not item.get_closest_marker("shared"):
            item.add_marker(pytest.mark.shared)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With DIFFPRESS_REQUIRE_SHARED=1, a skipped `shared` test is a failure that says why."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE_SHARED) == "1" and item.get_closest_marker("shared"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{REQUIRE_SHARED}=1 (CI runs the whole suite) but this test, marked `shared`, "
                           f"was skipped: {reason}")


# ---------------------------------------------------------------------- weights
@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder holding the seeded exact UQDM as `uqdm-test` (and `uqdm-tiny-exact2` once
    the `uqdm_tiny` fixture has imported it). Exported as DIFFPRESS_WEIGHTS in os.environ, so
    that `load_codec` finds them here and in every Ray worker or child process the tests start.
    """
    from model.registry import save_weights

    from .uqdm_fixtures import TEST_NAME, seeded_exact_weights

    folder = tmp_path_factory.mktemp("weights")
    save_weights(seeded_exact_weights(), folder / f"{TEST_NAME}.safetensors")
    os.environ["DIFFPRESS_WEIGHTS"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def uqdm(weights_dir):
    """The exact UQDM codec on seeded weights (the authors' architecture): its mechanics, anywhere."""
    from model import load_codec

    return load_codec("uqdm-test", device="cpu")


@pytest.fixture(scope="session")
def uqdm_tiny(request):
    """The exact codec on the authors' uqdm-tiny weights, imported from ../shared (or a user's import)."""
    from model import load_codec
    from model.registry import USER_DIR, read_weights, save_weights
    from model.uqdm.importer import CALIBRATION, EXACT_NAME, import_exact

    file_name = f"{EXACT_NAME}.safetensors"
    if (UQDM_TINY_SOURCE / "checkpoint.pt").is_file():
        target = request.getfixturevalue("weights_dir") / file_name
        if not target.is_file():
            save_weights(import_exact(UQDM_TINY_SOURCE), target)
    else:
        imported = [folder / file_name for folder in ([Path(_USER_WEIGHTS)] if _USER_WEIGHTS else []) + [USER_DIR]
                    if (folder / file_name).is_file()]
        if not imported:
            pytest.skip(f"needs the authors' UQDM weights, not found at {UQDM_TINY_SOURCE} nor imported in "
                        f"{USER_DIR}: {HOW_TO_PROVIDE}; or import them once with "
                        "`python -m jobs.import_uqdm PATH/TO/uqdm-tiny`")
        expected = json.loads(CALIBRATION.read_text())["digest"]
        found = read_weights(imported[0]).digest.hex()
        if found != expected:
            pytest.fail(f"{imported[0]} has digest {found}, not the {expected} of the authors' uqdm-tiny: re-import it "
                        "with `python -m jobs.import_uqdm PATH/TO/uqdm-tiny`")
        target = request.getfixturevalue("weights_dir") / file_name
        shutil.copyfile(imported[0], target)
    return load_codec(EXACT_NAME, device="cpu")


@pytest.fixture(scope="session")
def cdc():
    """The shipped CDC weights at their default rate point."""
    from model import load_codec

    return load_codec("cdc-hp128", device="cpu")


# ---------------------------------------------------------------------- images
def dev_photos() -> list[Path]:
    """The team's 12 evaluation photos in ../shared (empty when absent)."""
    return sorted(DEV_PHOTOS.glob("*.png"))


@pytest.fixture(scope="session")
def dev_photo_paths() -> list[Path]:
    photos = dev_photos()
    if len(photos) < 12:
        pytest.skip(f"needs the team's 12 dev photos, found {len(photos)} in {DEV_PHOTOS} (SHARED = {SHARED}): "
                    f"{HOW_TO_PROVIDE}")
    return photos


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
