"""Train CDC's context entropy model on a released model's frozen transforms (model/cdc/train_context.py).

    diffpress train-context --source cdc-hp128 --name cdc-hp128-ctx --run-dir runs/cdc-hp128-ctx [--steps 3000]
        [--init-from cdc-hp128-ctx]

Rerunning the same command resumes from <run-dir>/checkpoint; at the end the new weights
are written to model/weights/NAME.safetensors (or --export) with the commands that made
them as provenance.
"""

from __future__ import annotations

import argparse
import sys

from jobs import cli
from jobs._cli import add_frozen_training_flags, frozen_training_values, positive_ints, usage_errors
from model.cdc.train_context import ContextTrainConfig, export_with_context, released_context, train_context

HELP = "train CDC's context entropy model on released weights' frozen transforms (new weights, new name)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_frozen_training_flags(parser, ContextTrainConfig)
    parser.add_argument("--groups", type=positive_ints, default=ContextTrainConfig.groups,
                        help="channel groups of y, small first, summing to m (default: 16,16,32,64,64)")
    parser.add_argument("--init-from", default=None, metavar="WEIGHTS",
                        help="start a new run from these released weights' context nets (same --groups), "
                             "e.g. cdc-hp128-ctx")
    parser.add_argument("--rounded-rate", action="store_true",
                        help="train on the rate as coded (y - mean rounded, straight-through gradients) instead of "
                             "the uniform-noise proxy")


def run(args: argparse.Namespace) -> int:
    cfg = ContextTrainConfig(**frozen_training_values(args), groups=args.groups, init_from=args.init_from,
                             rounded_rate=args.rounded_rate)
    if cfg.init_from:
        with usage_errors(FileNotFoundError, ValueError):  # unknown weights, or no context of these groups
            released_context(cfg.init_from, cfg.groups)
    with usage_errors(FileNotFoundError, FileExistsError):
        print(export_with_context(cfg, *train_context(cfg)))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("train-context", argv)


if __name__ == "__main__":
    sys.exit(main())
