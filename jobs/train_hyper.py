"""Retrain CDC's hyperprior smaller on a released model's frozen transforms (model/cdc/train_hyper.py).

    diffpress train-hyper --source cdc-hp128 --name cdc-hp128-lite --run-dir runs/cdc-hp128-lite \\
        [--hyper-widths 96,128] [--hyper-kernel 1] [--steps 4000]

Rerunning the same command resumes from <run-dir>/checkpoint; at the end the new weights are
written to model/weights/NAME.safetensors (or --export) with the commands that made them as
provenance, and the curve (the new and the source hyperprior's bits on held-out latents) beside them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields

from jobs import cli
from jobs._cli import UsageError, positive_int, usage_errors
from model.cdc.config import CDCConfig
from model.cdc.train_hyper import HyperTrainConfig, export_hyper, source_codec, train_hyper

HELP = "retrain CDC's hyperprior smaller on released weights' frozen transforms (new weights, new name)"
_FLAGS = {"source": str, "name": str, "run_dir": str, "hyper_kernel": positive_int, "steps": positive_int,
          "batch_size": positive_int, "crops": positive_int, "crop": positive_int, "lr": float, "data": str,
          "seed": int, "threads": positive_int, "export": str}
_HELP = {"source": "released hyperprior-only CDC weights whose transforms stay frozen (name or path)",
         "name": "registry name of the new weights", "run_dir": "checkpoint and latent cache folder",
         "hyper_kernel": "kernel of h_s's last layer (odd)",
         "steps": "optimizer steps in all (a resumed run continues to it)", "batch_size": "crops per step",
         "crops": "training crops whose latents are cached (one random rate point each)", "crop": "crop side, px",
         "lr": "Adam learning rate (a tenth over the last 20%% of steps)", "data": "folder of training photos",
         "seed": "seed of crops, rates and noise", "threads": "torch threads",
         "export": "weights file to write (default: model/weights/NAME.safetensors)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(HyperTrainConfig)}
    for name, kind in _FLAGS.items():
        required = name in ("source", "name", "run_dir")
        parser.add_argument("--" + name.replace("_", "-"), type=kind, required=required,
                            default=None if required else defaults[name],
                            help=_HELP[name] + ("" if required else " (default: %(default)s)"))
    parser.add_argument("--hyper-widths", default=",".join(map(str, defaults["hyper_widths"])),
                        help="h_s's two hidden widths (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    try:
        widths = tuple(int(w) for w in args.hyper_widths.split(","))
    except ValueError:
        raise UsageError(f"--hyper-widths: {args.hyper_widths!r} is not comma-separated integers") from None
    with usage_errors(ValueError, FileNotFoundError):  # the shape and the source, before any work
        CDCConfig(hyper_widths=widths, hyper_kernel=args.hyper_kernel)
        source_codec(args.source)
    command = "diffpress " + shlex.join(args.argv)
    cfg = HyperTrainConfig(**{k: getattr(args, k) for k in _FLAGS}, hyper_widths=widths, provenance=command)
    with usage_errors(FileNotFoundError, FileExistsError):
        print(export_hyper(cfg, *train_hyper(cfg)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("train-hyper", argv)


if __name__ == "__main__":
    sys.exit(main())
