"""Add rate points to CDC weights without training, by scaling a trained point's gains.

    python -m jobs.derive_rates model/weights/cdc-hp128.safetensors q0=q1*0.5 q7=q6*1.4

NAME=RATE*K codes K * y with RATE's tables and decodes y_hat / K: K < 1 gives fewer bits, K > 1
more (model/cdc/config.py, derived_rates). The file is rewritten in place (its digest changes:
streams of the old file are refused by the new one); the command joins its provenance.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys

from jobs._cli import setup_logging
from model.cdc.train import with_derived_rates
from model.registry import read_weights, save_weights

_SPEC = re.compile(r"^(\w+)=(\w+)\*([0-9]+(?:\.[0-9]*)?)$")


def parse_spec(text: str) -> tuple[str, str, float]:
    match = _SPEC.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=RATE*K, e.g. q0=q1*0.5")
    return match[1], match[2], float(match[3])


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="a CDC weights file")
    parser.add_argument("rates", nargs="+", type=parse_spec, help="NAME=RATE*K, e.g. q0=q1*0.5")
    args = parser.parse_args(argv)
    command = "python -m jobs.derive_rates " + shlex.join(sys.argv[1:] if argv is None else argv)
    weights = with_derived_rates(read_weights(args.weights), args.rates, command)
    save_weights(weights, args.weights)
    print(f"{args.weights}: rate points {', '.join(weights.config['rates'])}; digest {weights.digest.hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
