"""Import the authors' UQDM checkpoint as the exact (integer) codec's weights.

    python -m jobs.import_uqdm ../shared/weights/uqdm-tiny [--out PATH]

The checkpoint comes from the authors' repository (github.com/mandt-lab/uqdm,
checkpoints/uqdm-tiny: config.json and checkpoint.pt). Writes
~/.cache/diffpress/weights/uqdm-tiny-exact2.safetensors by default, where
`load_codec("uqdm-tiny-exact2")` finds it (or set DIFFPRESS_WEIGHTS to the output folder).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jobs._cli import setup_logging
from model.registry import USER_DIR, save_weights
from model.uqdm.importer import EXACT_NAME, import_exact

log = logging.getLogger("jobs.import_uqdm")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder with the authors' config.json and checkpoint.pt")
    parser.add_argument("--name", default=EXACT_NAME, help="registry name to import as")
    parser.add_argument("--out", type=Path, help="output .safetensors path (default: the user weights folder)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        weights = import_exact(args.source, name=args.name)
        path = save_weights(weights, args.out or USER_DIR / f"{args.name}.safetensors")
    except (FileNotFoundError, FileExistsError, ValueError) as exc:  # a wrong folder, a tampered file: one line
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    log.info("wrote %s (digest %s)", path, weights.digest.hex())
    return path


if __name__ == "__main__":
    main()
