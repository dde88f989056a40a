"""Add rate points to CDC weights without training, by scaling a trained point's gains.

    diffpress derive-rates model/weights/cdc-hp128.safetensors q0=q1*0.5 q7=q6*1.4 --name cdc-hp128-wide

NAME=RATE*K codes K * y with RATE's tables and decodes y_hat / K: K < 1 gives fewer bits, K > 1
more (model/cdc/config.py, derived_rates). The result is new weights (the config, hence the
digest, changes), written under the new --name beside the source (or to --out); the source
is never changed, so the streams it wrote keep decoding. The command joins the provenance.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from safetensors import SafetensorError

from jobs import cli
from jobs._cli import UsageError, usage_errors
from model.cdc.train import with_derived_rates
from model.registry import read_weights, save_weights

HELP = "add CDC rate points by gain scaling (new weights, new name)"
_SPEC = re.compile(r"^(\w+)=(\w+)\*([0-9]+(?:\.[0-9]*)?)$")


def parse_spec(text: str) -> tuple[str, str, float]:
    match = _SPEC.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=RATE*K, e.g. q0=q1*0.5")
    return match[1], match[2], float(match[3])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", type=Path, help="a CDC weights file")
    parser.add_argument("rates", nargs="+", type=parse_spec, help="NAME=RATE*K, e.g. q0=q1*0.5")
    parser.add_argument("--name", required=True, help="registry name of the new weights")
    parser.add_argument("--out", type=Path, help="output file (default: NAME.safetensors beside the source)")


def run(args: argparse.Namespace) -> int:
    with usage_errors(FileNotFoundError, FileExistsError, ValueError, SafetensorError):
        source = read_weights(args.weights)
        if source.codec != "cdc":
            raise UsageError(f"{args.weights} holds {source.codec} weights ({source.name}); rate points are CDC's")
        weights = with_derived_rates(source, args.rates, "diffpress " + shlex.join(args.argv), args.name)
        out = save_weights(weights, args.out or args.weights.with_name(f"{args.name}.safetensors"))
    print(f"{out}: {args.name}, rate points {', '.join(weights.config['rates'])}; digest {weights.digest.hex()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("derive-rates", argv)


if __name__ == "__main__":
    sys.exit(main())
