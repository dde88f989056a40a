"""Import the authors' released UQDM checkpoint (config.json + checkpoint.pt) as our exact Weights.

`import_checkpoint` reads the float EMA weights; `import_exact` turns them into the exact
integer codec's weights (`quantize.to_exact`) with the activation exponents calibrated
once on the team's photos and shipped beside this file (uqdm-tiny.calibration.json), then
checks the result's digest against the one recorded there: the same checkpoint imports to
the same weights on every machine, or the import says it did not.

The checkpoint is a torch pickle. It is read with torch's restricted unpickler
(`weights_only=True`), allowing only the two numpy globals it needs for scalars, and
every object in it is then checked to be a tensor, a plain number, a string or a
container of those: nothing else is accepted. The EMA weights are used: they are what
the authors evaluate, and they hold the learned noise schedule that `model` lacks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.serialization import safe_globals

from ..registry import Weights
from .net import ScoreNet

_PLAIN = (int, float, bool, str, type(None), np.generic)


CALIBRATION = Path(__file__).with_name("uqdm-tiny.calibration.json")
EXACT_NAME = "uqdm-tiny-exact2"


def import_exact(folder: str | Path, name: str = EXACT_NAME, calibration: Path = CALIBRATION) -> Weights:
    """The exact codec's weights from the authors' checkpoint folder; raises if the digest is not ours."""
    return exact_from_record(import_checkpoint(folder), calibration, name, what=f"importing {folder}",
                             differs="the checkpoint (or the calibration file) differs from the authors' uqdm-tiny "
                                     "and ours")


def exact_from_record(source: Weights, calibration: str | Path, name: str, what: str | None = None,
                      differs: str = "the float source or the calibration file is not the one recorded") -> Weights:
    """`quantize.to_exact` of float weights with a calibration record's exponents; raises unless the
    result has the digest the record holds (so the same weights are made on every machine or none)."""
    from .quantize import to_exact

    try:
        record = json.loads(Path(calibration).read_text())
        exponents, expected = record["exponents"], record["digest"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{calibration} is not a calibration record with exponents and a digest: {error}") from None
    weights = to_exact(source, exponents, name)
    if weights.digest.hex() != expected:
        raise ValueError(f"{what or 'quantizing ' + source.name} gave weights with digest {weights.digest.hex()}, "
                         f"not the {expected} that {Path(calibration).name} records: {differs}; nothing was written")
    return weights


def import_checkpoint(folder: str | Path, name: str = "uqdm-tiny") -> Weights:
    """The authors' float EMA weights and noise-schedule slope (what `quantize` starts from)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    checkpoint = _load_tensors_only(folder / config.get("restore_ckpt", "checkpoint.pt"))
    cfg = config["model"]
    _check_supported(cfg)
    shadow = checkpoint["ema"]["shadow_params"]
    net = ScoreNet(cfg)
    params = list(net.named_parameters())
    if len(shadow) != len(params) + 1:
        raise ValueError(f"checkpoint has {len(shadow)} EMA tensors; expected {len(params) + 1} "
                         "(network parameters + noise-schedule slope)")
    tensors = {}
    for (param_name, param), value in zip(params, shadow):
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"EMA tensor for {param_name} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        tensors[f"net.{param_name}"] = value.detach().float().contiguous()
    tensors["gamma_slope"] = shadow[-1].detach().float().reshape(())
    keep = ("n_timesteps", "gamma_min", "gamma_max", "attention_everywhere", "use_fourier_features",
            "n_attention_heads", "n_channels", "vocab_size", "embedding_dim", "n_blocks", "norm_groups",
            "dropout_prob")
    ours = {k: cfg[k] for k in keep}
    provenance = (f"python -m jobs.import_uqdm {folder} (authors' EMA weights, step {int(checkpoint['step'])}; "
                  "'Progressive Compression with Universally Quantized Diffusion Models', ICLR 2025)")
    return Weights("uqdm", name, ours, tensors, provenance)


def _check_supported(cfg: dict) -> None:
    expected = {"prior_type": "logistic", "learned_prior_scale": True, "base_prior_scale": "forward_kernel",
                "noise_schedule": "learned_linear", "fix_gamma_max": True, "vocab_size": 256, "n_channels": 3}
    wrong = {k: cfg.get(k) for k, v in expected.items() if cfg.get(k) != v}
    if wrong:
        raise ValueError(f"unsupported UQDM configuration {wrong}; supported: {expected}")


def _load_tensors_only(path: Path) -> dict:
    allowed = [np.core.multiarray.scalar, np.dtype, type(np.dtype("float64"))]
    with safe_globals(allowed):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    _require_plain(checkpoint, "checkpoint")
    return checkpoint


def _require_plain(obj, where: str) -> None:
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _require_plain(key, where)
            _require_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _require_plain(value, f"{where}[{i}]")
        return
    raise ValueError(f"refusing checkpoint: {where} is a {type(obj).__name__}, not a tensor or plain value")
