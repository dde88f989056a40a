"""Retrain CDC's hyperprior smaller on a released model's frozen transforms (model/cdc/train_hyper.py).

    diffpress train-hyper --source cdc-hp128 --name cdc-hp128-lite --run-dir runs/cdc-hp128-lite \\
        [--hyper-widths 96,128] [--hyper-kernel 1] [--steps 4000]

Rerunning the same command resumes from <run-dir>/checkpoint; at the end the new weights are
written to model/weights/NAME.safetensors (or --export) with the commands that made them as
provenance, and the curve (the new and the source hyperprior's bits on held-out latents) beside them.
"""

from __future__ import annotations

import argparse
import sys

from jobs import cli
from jobs._cli import add_frozen_training_flags, frozen_training_values, positive_int, positive_ints, usage_errors
from model.cdc.config import CDCConfig
from model.cdc.train_hyper import HyperTrainConfig, export_hyper, source_codec, train_hyper

HELP = "retrain CDC's hyperprior smaller on released weights' frozen transforms (new weights, new name)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_frozen_training_flags(parser, HyperTrainConfig)
    parser.add_argument("--hyper-widths", type=positive_ints, default=HyperTrainConfig.hyper_widths,
                        help="h_s's two hidden widths (default: 96,128)")
    parser.add_argument("--hyper-kernel", type=positive_int, default=HyperTrainConfig.hyper_kernel,
                        help="kernel of h_s's last layer, odd (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    with usage_errors(ValueError, FileNotFoundError):  # the shape and the source, before any work
        CDCConfig(hyper_widths=args.hyper_widths, hyper_kernel=args.hyper_kernel)
        source_codec(args.source)
    cfg = HyperTrainConfig(**frozen_training_values(args), hyper_widths=args.hyper_widths,
                           hyper_kernel=args.hyper_kernel)
    with usage_errors(FileNotFoundError, FileExistsError):
        print(export_hyper(cfg, *train_hyper(cfg)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("train-hyper", argv)


if __name__ == "__main__":
    sys.exit(main())
