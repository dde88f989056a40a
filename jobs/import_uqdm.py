"""Import the authors' UQDM checkpoint as the exact (integer) codec's weights.

    diffpress import-uqdm PATH/TO/uqdm-tiny [--out PATH]

The checkpoint comes from the authors' repository (github.com/mandt-lab/uqdm,
checkpoints/uqdm-tiny: config.json and checkpoint.pt). Writes
~/.cache/diffpress/weights/uqdm-tiny-exact2.safetensors by default, where
`load_codec("uqdm-tiny-exact2")` (or `--codec uqdm-tiny`) finds it (or set DIFFPRESS_WEIGHTS
to the output folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jobs import cli
from jobs._cli import UsageError, usage_errors
from model.registry import USER_DIR, save_weights
from model.uqdm.importer import EXACT_NAME, import_exact

HELP = "import the authors' UQDM checkpoint (uqdm-tiny) as exact weights"
log = logging.getLogger("jobs.import_uqdm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="folder with the authors' config.json and checkpoint.pt")
    parser.add_argument("--name", default=EXACT_NAME, help="registry name to import as (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="output .safetensors path (default: the user weights folder)")


def run(args: argparse.Namespace) -> int:
    if not (args.source / "config.json").is_file():  # the checkpoint file's name is in config.json
        raise UsageError(f"{args.source} holds no config.json: give the folder of the authors' uqdm-tiny "
                         "checkpoint (github.com/mandt-lab/uqdm, checkpoints/uqdm-tiny: config.json, checkpoint.pt)")
    with usage_errors(FileNotFoundError, FileExistsError, ValueError):  # a tampered file, a name taken: one line
        weights = import_exact(args.source, name=args.name)
        path = save_weights(weights, args.out or USER_DIR / f"{args.name}.safetensors")
    log.info("wrote %s (digest %s)", path, weights.digest.hex())
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("import-uqdm", argv)


if __name__ == "__main__":
    sys.exit(main())
