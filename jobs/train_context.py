"""Train CDC's context entropy model on a released model's frozen transforms (model/cdc/train_context.py).

    diffpress train-context --source cdc-hp128 --name cdc-hp128-ctx --run-dir runs/cdc-hp128-ctx [--steps 3000]

Rerunning the same command resumes from <run-dir>/checkpoint; at the end the new weights
are written to model/weights/NAME.safetensors (or --export) with the commands that made
them as provenance.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields

from jobs import cli
from jobs._cli import UsageError, positive_int, usage_errors
from model.cdc.train_context import ContextTrainConfig, export_with_context, train_context

HELP = "train CDC's context entropy model on released weights' frozen transforms (new weights, new name)"
_FLAGS = {"source": str, "name": str, "run_dir": str, "steps": positive_int, "batch_size": positive_int,
          "crops": positive_int, "crop": positive_int, "lr": float, "data": str, "seed": int,
          "threads": positive_int, "export": str}
_HELP = {"source": "released CDC weights whose transforms stay frozen (name or path)",
         "name": "registry name of the new weights", "run_dir": "checkpoint and latent cache folder",
         "steps": "optimizer steps in all (a resumed run continues to it)", "batch_size": "crops per step",
         "crops": "training crops whose latents are cached (one random rate point each)", "crop": "crop side, px",
         "lr": "Adam learning rate (a tenth over the last 20%% of steps)", "data": "folder of training photos",
         "seed": "seed of crops, rates and noise", "threads": "torch threads",
         "export": "weights file to write (default: model/weights/NAME.safetensors)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(ContextTrainConfig)}
    for name, kind in _FLAGS.items():
        required = name in ("source", "name", "run_dir")
        parser.add_argument("--" + name.replace("_", "-"), type=kind, required=required,
                            default=None if required else defaults[name], help=_HELP[name])
    parser.add_argument("--groups", default=",".join(map(str, defaults["groups"])),
                        help="channel groups of y, small first, summing to m (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        groups = tuple(int(g) for g in args.groups.split(","))
    except ValueError:
        raise UsageError(f"--groups: {args.groups!r} is not comma-separated integers") from None
    command = "diffpress " + shlex.join(args.argv)
    cfg = ContextTrainConfig(**{k: getattr(args, k) for k in _FLAGS}, groups=groups, provenance=command)
    with usage_errors(FileNotFoundError, FileExistsError):
        print(export_with_context(cfg, *train_context(cfg)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("train-context", argv)


if __name__ == "__main__":
    sys.exit(main())
