"""The importer of the authors' UQDM checkpoint, on checkpoints these tests build in the authors' layout.

(tests/test_uqdm_tiny.py imports the real one from ../shared.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.paths import REPO
from model.uqdm.importer import CALIBRATION, import_checkpoint, import_exact
from model.uqdm.int_net import site_names
from model.uqdm.quantize import to_exact

from .uqdm_fixtures import (AUTHORS_MODEL_CONFIG, CONFIG, GAMMA_SLOPE, seeded_float_weights,
                            write_authors_checkpoint)


@pytest.fixture(scope="module")
def float_weights():
    return seeded_float_weights(seed=3)


@pytest.fixture
def checkpoint(tmp_path, float_weights):
    return write_authors_checkpoint(tmp_path / "uqdm-like", float_weights)


def exponents_of(exact_weights) -> dict[str, list[int]]:
    """The calibrated exponents an exact weights file holds (site -> one per step)."""
    sites = site_names(exact_weights.config["n_blocks"])
    return dict(zip(sites, exact_weights.tensors["net.exponents"].tolist()))


def test_the_authors_layout_imports_to_the_same_tensors(checkpoint, float_weights):
    imported = import_checkpoint(checkpoint)
    assert (imported.codec, imported.name, imported.config) == ("uqdm", "uqdm-tiny", CONFIG)
    assert imported.tensors.keys() == float_weights.tensors.keys()
    for name, value in float_weights.tensors.items():
        assert torch.equal(imported.tensors[name], value), name
    assert float(imported.tensors["gamma_slope"]) == pytest.approx(GAMMA_SLOPE)
    assert "step 10" in imported.provenance and str(checkpoint) in imported.provenance
    assert imported.digest == float_weights.digest


def test_an_imported_checkpoint_quantizes_to_the_test_codecs_weights(checkpoint, uqdm):
    """Authors' layout -> import -> exact weights: the same digest as the seeded test UQDM (seed 0)."""
    folder = write_authors_checkpoint(checkpoint.parent / "seed0", seeded_float_weights(seed=0))
    exact = to_exact(import_checkpoint(folder), exponents_of(uqdm.weights), "uqdm-test")
    assert exact.digest == uqdm.weights_digest


def test_import_exact_checks_the_digest_its_calibration_records(checkpoint, float_weights, uqdm, tmp_path):
    with pytest.raises(ValueError, match="differs from the authors' uqdm-tiny"):
        import_exact(checkpoint)  # the shipped calibration expects the authors' weights, not these
    exponents = exponents_of(uqdm.weights)
    expected = to_exact(float_weights, exponents, "mine").digest.hex()
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"exponents": exponents, "digest": expected}))
    weights = import_exact(checkpoint, name="mine", calibration=calibration)
    assert weights.name == "mine" and weights.digest.hex() == expected
    calibration.write_text(json.dumps({"exponents": exponents, "digest": "00" * 16}))
    with pytest.raises(ValueError, match=f"digest {expected}"):
        import_exact(checkpoint, calibration=calibration)
    assert json.loads(CALIBRATION.read_text())["exponents"].keys() == exponents.keys()


def test_pickled_code_is_refused_and_never_runs(tmp_path, float_weights):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = write_authors_checkpoint(tmp_path / "evil", float_weights)
    torch.save({"model": {}, "ema": {"shadow_params": [Exploit()]}, "step": 1}, folder / "checkpoint.pt")
    with pytest.raises(Exception, match="(?i)weights only|unsupported|refus"):
        import_checkpoint(folder)
    assert not marker.exists()
    json.loads((folder / "config.json").read_text())  # the folder is otherwise intact


def test_objects_the_safe_unpickler_allows_but_are_not_plain_are_refused(checkpoint):
    """numpy dtypes may be unpickled (numpy scalars need them), but one standing alone is not a value."""
    contents = torch.load(checkpoint / "checkpoint.pt", weights_only=False)
    contents["optimizer"]["param_groups"][0]["dtype"] = np.dtype("float64")
    torch.save(contents, checkpoint / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"refusing checkpoint: .*\['dtype'\] is a"):
        import_checkpoint(checkpoint)


@pytest.mark.parametrize("change,message", [
    ("drop_slope", "expected 66"),
    ("wrong_shape", "has shape"),
    ("gaussian_prior", "unsupported UQDM configuration"),
    ("fixed_schedule", "unsupported UQDM configuration"),
])
def test_checkpoints_that_do_not_match_the_architecture_are_refused(tmp_path, float_weights, change, message):
    net = [v for k, v in float_weights.tensors.items() if k.startswith("net.")]
    slope = float_weights.tensors["gamma_slope"]
    shadow, config = net + [slope], dict(AUTHORS_MODEL_CONFIG)
    if change == "drop_slope":
        shadow = net
    elif change == "wrong_shape":
        shadow = [net[0][:-1]] + net[1:] + [slope]
    elif change == "gaussian_prior":
        config["prior_type"] = "gaussian"
    else:
        config["noise_schedule"] = "fixed_linear"
    folder = write_authors_checkpoint(tmp_path / change, float_weights, model_config=config, shadow_params=shadow)
    with pytest.raises(ValueError, match=message):
        import_checkpoint(folder)


@pytest.mark.parametrize("tamper,message", [
    ("exponent", "not the"),                   # one exponent moved: other weights, refused by the digest
    ("weight", "not the"),                     # one checkpoint value changed
    ("nan", "not the"),                        # a NaN in the checkpoint
    ("no_digest", "not a calibration record"),  # nothing to check against: refused, not imported unchecked
    ("missing_site", "wrong or missing: conv_in"),
    ("not_json", "not a calibration record"),
])
def test_a_tampered_calibration_or_checkpoint_is_refused_never_imported_silently(
        tmp_path, float_weights, uqdm, tamper, message):
    exponents = exponents_of(uqdm.weights)
    record = {"exponents": exponents, "digest": to_exact(float_weights, exponents, "x").digest.hex()}
    tensors = dict(float_weights.tensors)
    if tamper == "exponent":
        record["exponents"] = {**exponents, "mid1.hidden": [e + 1 for e in exponents["mid1.hidden"]]}
    elif tamper in ("weight", "nan"):
        name = "net.mid1.net1.2.weight"
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[7] = float("nan") if tamper == "nan" else tensors[name].view(-1)[7] * 1.001
    elif tamper == "no_digest":
        del record["digest"]
    elif tamper == "missing_site":
        del record["exponents"]["conv_in"]
    calibration = tmp_path / "calibration.json"
    calibration.write_text("{not json" if tamper == "not_json" else json.dumps(record))
    folder = write_authors_checkpoint(tmp_path / "ckpt", float_weights,
                                      shadow_params=[v for k, v in tensors.items() if k.startswith("net.")]
                                      + [tensors["gamma_slope"]])
    with pytest.raises(ValueError, match=message):
        import_exact(folder, calibration=calibration)


def test_the_import_command_refuses_other_weights_in_one_line_and_writes_nothing(checkpoint, tmp_path):
    """A user pointing the import at the wrong checkpoint gets exit 2 and one line, no traceback."""
    out = tmp_path / "out.safetensors"
    run = subprocess.run([sys.executable, "-m", "jobs.import_uqdm", str(checkpoint), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "differs from the authors' uqdm-tiny" in lines[0]
    assert "Traceback" not in run.stderr and not out.exists()
