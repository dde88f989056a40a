"""Train CDC's context entropy model on a released model's frozen transforms (model/cdc/train_context.py).

    diffpress train-context --source cdc-hp128 --name cdc-hp128-ctx --run-dir runs/cdc-hp128-ctx [--steps 3000]

Rerunning the same command resumes from <run-dir>/checkpoint; at the end the new weights
are written to model/weights/NAME.safetensors (or --export) with the commands that made
them as provenance.
"""

from __future__ import annotations

import argparse
import sys

from jobs import cli
from jobs._cli import add_frozen_training_flags, frozen_training_values, positive_ints, usage_errors
from model.cdc.train_context import ContextTrainConfig, export_with_context, train_context

HELP = "train CDC's context entropy model on released weights' frozen transforms (new weights, new name)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_frozen_training_flags(parser, ContextTrainConfig)
    parser.add_argument("--groups", type=positive_ints, default=ContextTrainConfig.groups,
                        help="channel groups of y, small first, summing to m (default: 16,16,32,64,64)")


def run(args: argparse.Namespace) -> int:
    cfg = ContextTrainConfig(**frozen_training_values(args), groups=args.groups)
    with usage_errors(FileNotFoundError, FileExistsError):
        print(export_with_context(cfg, *train_context(cfg)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("train-context", argv)


if __name__ == "__main__":
    sys.exit(main())
