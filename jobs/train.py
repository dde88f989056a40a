"""Train CDC (one stage) and export it as a registry weights file; Ray Train or in-process.

    diffpress train --name cdc-hp128 --stage content --steps 20000              # Ray Train, 1 worker
    diffpress train --name cdc-hp128 --stage diffusion --steps 4000 \\
        --init-from runs/cdc-hp128/content/checkpoint --run-dir runs/cdc-hp128/diffusion
    diffpress train ... --workers 8 --gpu --device cuda                         # a GPU cluster
    diffpress train ... --in-process                                            # no Ray (one machine)

Every TrainConfig field is a flag (model/cdc/config.py says what each does). Stages:
content (rate + MSE of the content path, every rate point at once), diffusion (the
denoising UNet on the frozen content path), joint. State lives in --run-dir (default
runs/<name>/<stage>): rerunning the same command resumes at the exact step. At the end
the weights go to --export (default model/weights/<name>.safetensors) with their curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing
from dataclasses import fields
from pathlib import Path

from jobs import cli
from jobs._cli import UsageError, boolean, positive_int, usage_errors
from model.cdc.config import PRESETS, STAGES, TrainConfig
from model.cdc.model import CDCModel
from model.cdc.train import export, fit, start_from_weights, train
from model.registry import read_weights, resolve

HELP = "train CDC weights (one stage), on Ray Train or in-process"
_PATHS = ("init_from", "data", "run_dir", "export")
_NOT_FLAGS = ("model", "rank", "world_size", "provenance")  # set by --preset/--lambdas, per worker, or from the command
#: the help of every TrainConfig flag (a test checks that none is missing)
FIELD_HELP = {
    "name": "registry name of the exported weights (required)",
    "run_dir": "checkpoints and curve go here; rerunning resumes from it (default: runs/NAME/STAGE)",
    "stage": f"what to train: {', '.join(STAGES)} (default: %(default)s)",
    "steps": "total optimizer steps of this stage; a resumed run continues to it (default: %(default)s)",
    "minutes": "instead of --steps: as many steps as fit in this many minutes",
    "batch_size": "crops per step and worker (default: %(default)s)",
    "crop": "crop size in pixels (default: %(default)s)",
    "lr": "peak learning rate (default: %(default)s)",
    "warmup": "steps of linear learning-rate warm-up (default: %(default)s)",
    "decay_from": "fraction of the steps after which the rate decays (cosine) to lr/10 (default: %(default)s)",
    "diffusion_weight": "joint stage: weight of the diffusion loss (default: %(default)s)",
    "init_from": "start from a checkpoint folder (e.g. the content stage's) or from shipped weights (a name "
                 "or file; more --lambdas than they have add rate points)",
    "data": "folder of training photos (default: %(default)s, the team's shared photos)",
    "scales": "each photo is sampled at these scales (default: %(default)s)",
    "export": "weights file to write at the end (default: model/weights/NAME.safetensors)",
    "seed": "seed of crops and initialisation (default: %(default)s)",
    "threads": "torch CPU threads per worker (default: %(default)s)",
    "bf16": "autocast convolutions to bfloat16, fp32 master weights: true or false (default: %(default)s)",
    "log_every": "steps between log lines (default: %(default)s)",
    "checkpoint_every": "steps between checkpoints (default: %(default)s)",
    "device": "torch device of each worker, e.g. cuda (default: %(default)s)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in _NOT_FLAGS:
            continue
        kind, flag, help_text = hints[f.name], f"--{f.name.replace('_', '-')}", FIELD_HELP[f.name]
        if kind is bool:
            p.add_argument(flag, type=boolean, default=f.default, help=help_text)
        elif f.name == "scales":
            p.add_argument("--scales", type=float, nargs="+", default=list(f.default), help=help_text)
        else:
            convert = float if kind in (float, float | None) else int if kind is int else str
            default = None if f.default is dataclasses.MISSING else f.default
            p.add_argument(flag, type=convert, default=default, required=f.name == "name", help=help_text)
    p.add_argument("--preset", default="hp128", choices=sorted(PRESETS), help="network sizes (default: %(default)s)")
    p.add_argument("--lambdas", type=float, nargs="+", help="the rate points' MSE weights (default: the preset's)")
    p.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers, data parallel (default: 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--in-process", action="store_true", help="run the loop here, without Ray")


def run(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["run_dir"] = values.get("run_dir") or str(Path("runs") / args.name / args.stage)
    values.update({k: str(Path(values[k]).resolve()) for k in _PATHS
                   if values.get(k) and (k != "init_from" or Path(values[k]).exists())})
    values["scales"] = tuple(values["scales"])
    if not Path(values["data"]).is_dir():  # checked here, not by the first worker that samples a crop
        raise UsageError(f"no training photos at {values['data']}: give --data FOLDER (of images), or set "
                         "DIFFPRESS_SHARED to the team's shared folder")
    if values.get("init_from") and not Path(values["init_from"], "model.safetensors").is_file():
        with usage_errors(FileNotFoundError, ValueError):
            resolve(values["init_from"])  # shipped weights, or say what was searched
    model = PRESETS[args.preset]
    if args.lambdas:
        model = dataclasses.replace(model, lambdas=tuple(args.lambdas))
    with usage_errors(ValueError):
        config = TrainConfig(**values, model=model, provenance="diffpress " + shlex.join(args.argv))
        if config.init_from and not Path(config.init_from, "model.safetensors").is_file():
            start_from_weights(CDCModel(config.model), read_weights(resolve(config.init_from)))  # fits, before Ray
    if args.in_process:
        model, curve = train(config)
        export(model, curve, config)
    else:
        fit(config, workers=args.workers, gpu=args.gpu)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("train", argv)


if __name__ == "__main__":
    sys.exit(main())
