"""A UQDM of the authors' architecture with seeded weights, and checkpoints in the authors' layout.

Test data, not library code: the codec's mechanics (coding, prefixes, lossless, exactness,
hostile streams, the pipeline with a progressive codec) are tested on these weights, so
they run on any clone; only the tests about the authors' weights need ../shared.

The network is `model.uqdm.net.ScoreNet` with uqdm-tiny's configuration, initialized the
way torch initializes it (uniform within 1/sqrt(fan-in); GroupNorm 1 and 0) but from our
integer hash (`model.exact.random_bits`), so that the weights are the same on every machine
(torch's own initialization is not: its uniform kernel differs under ATEN_CPU_CAPABILITY);
the noise schedule is the authors' (gamma_max 6, slope 18.3, so gamma_min -12.3). Its
activation exponents were calibrated once (`calibrate_test_model`, on crops of matplotlib's
sample photo and two noise tiles; the float calibration itself differs between kernels) and
are recorded in uqdm-test.calibration.json with the digest the weights must have; the
fixture quantizes with them exactly as an import does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from model.exact import random_bits
from model.registry import Weights

from .sample_images import photo_tiles

#: The authors' uqdm-tiny model section of config.json (github.com/mandt-lab/uqdm).
AUTHORS_MODEL_CONFIG = {
    "n_timesteps": 4, "prior_type": "logistic", "learned_prior_scale": True,
    "base_prior_scale": "forward_kernel", "noise_schedule": "learned_linear", "fix_gamma_max": True,
    "gamma_min": -12.3, "gamma_max": 6.0, "attention_everywhere": False, "use_fourier_features": True,
    "ema_rate": 0.9999, "n_attention_heads": 1, "n_channels": 3, "vocab_size": 256, "embedding_dim": 32,
    "n_blocks": 1, "norm_groups": 8, "dropout_prob": 0.0,
}
#: The keys `importer.import_checkpoint` keeps in a weights file's config.
CONFIG = {k: AUTHORS_MODEL_CONFIG[k] for k in (
    "n_timesteps", "gamma_min", "gamma_max", "attention_everywhere", "use_fourier_features",
    "n_attention_heads", "n_channels", "vocab_size", "embedding_dim", "n_blocks", "norm_groups", "dropout_prob")}
GAMMA_SLOPE = 18.3  # gamma_max - gamma_min: the authors' schedule before training
TEST_NAME = "uqdm-test"
CALIBRATION_SEED = 5
CALIBRATION = Path(__file__).with_name("uqdm-test.calibration.json")


def seeded_float_weights(seed: int = 0, name: str = "uqdm-test-float") -> Weights:
    """Float weights of a ScoreNet initialized from the integer hash with `seed`, as `import_checkpoint`
    returns them."""
    from model.uqdm.net import ScoreNet

    net = ScoreNet(CONFIG)
    stream = {key: index for index, (key, _) in enumerate(net.named_parameters())}
    tensors = {}
    for prefix, module in net.named_modules():
        for kind, param in module.named_parameters(recurse=False):
            key = f"{prefix}.{kind}"
            if isinstance(module, torch.nn.GroupNorm):
                values = np.ones(param.shape) if kind == "weight" else np.zeros(param.shape)
            else:  # Conv2d, Linear: uniform within 1/sqrt(fan-in), weight and bias alike
                unit = random_bits(seed, stream[key], param.numel()).astype(np.float64) * 2.0 ** -31 - 1.0
                values = unit.reshape(param.shape) * (1.0 / np.sqrt(module.weight[0].numel()))
            tensors[f"net.{key}"] = torch.from_numpy(values.astype(np.float32))
    tensors = {f"net.{key}": tensors[f"net.{key}"] for key in stream}  # the network's parameter order
    tensors["gamma_slope"] = torch.tensor(GAMMA_SLOPE)
    return Weights("uqdm", name, dict(CONFIG), tensors, f"tests/uqdm_fixtures.py (ScoreNet, hash seed {seed})")


def calibration_tiles() -> np.ndarray:
    """6 crops of matplotlib's photo and 2 uniform-noise tiles, (8, 3, 64, 64) uint8."""
    noise = np.random.default_rng(CALIBRATION_SEED).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    return np.concatenate([photo_tiles(6, CALIBRATION_SEED), noise])


def calibrate_test_model(seed: int = 0) -> dict:
    """What uqdm-test.calibration.json records (run once; `python -m tests.uqdm_fixtures` rewrites it)."""
    from model.uqdm.quantize import calibrate, to_exact

    float_weights = seeded_float_weights(seed)
    exponents = calibrate(float_weights, calibration_tiles(), seed=0)
    digest = to_exact(float_weights, exponents, TEST_NAME).digest.hex()
    return {"about": "Activation exponents of the seeded test UQDM (tests/uqdm_fixtures.py), calibrated once by "
                     "calibrate_test_model on this file's machine, and the digest its exact weights must have.",
            "exponents": exponents, "digest": digest}


def seeded_exact_weights(seed: int = 0, name: str = TEST_NAME) -> Weights:
    """The exact codec's weights made from `seeded_float_weights` with the recorded exponents, as an import makes them."""
    from model.uqdm.quantize import to_exact

    return to_exact(seeded_float_weights(seed), json.loads(CALIBRATION.read_text())["exponents"], name)


def write_authors_checkpoint(folder: Path, weights: Weights, model_config: dict | None = None,
                             shadow_params: list | None = None) -> Path:
    """config.json + checkpoint.pt in the layout of the authors' release.

    checkpoint.pt holds `model` (raw weights), `ema` (decay, num_updates and `shadow_params`:
    the network's parameters in order, then the noise-schedule slope), `optimizer` (with a
    numpy float64 learning rate, as the authors' pickle has) and `step`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = {"restore_ckpt": "checkpoint.pt", "model": model_config or AUTHORS_MODEL_CONFIG,
              "training": {"n_steps": 10}, "optim": {"lr": 2e-4}, "data": {"data_spec": "imagenet"}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    net = {k[len("net."):]: v for k, v in weights.tensors.items() if k.startswith("net.")}
    if shadow_params is None:
        shadow_params = [v.clone() for v in net.values()] + [weights.tensors["gamma_slope"].reshape(()).clone()]
    checkpoint = {
        "model": {k: v.clone() for k, v in net.items()},
        "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow_params},
        "optimizer": {"state": {0: {"step": torch.tensor(10.0)}},
                      "param_groups": [{"lr": np.float64(2e-4), "betas": (0.9, 0.999), "eps": 1e-8,
                                        "weight_decay": 0, "amsgrad": False, "foreach": None, "params": [0]}]},
        "step": 10,
    }
    torch.save(checkpoint, folder / "checkpoint.pt")
    return folder


if __name__ == "__main__":
    CALIBRATION.write_text(json.dumps(calibrate_test_model(), indent=1) + "\n")
    print(f"wrote {CALIBRATION}")
