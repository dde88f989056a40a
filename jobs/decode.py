"""Decode an archive written by compress_bucket to PNGs or webdataset shards.

    python -m jobs.decode --input OUTPUT_URL [--keys K ...] [--steps N] [--chunks N]
        --to URL [--format png|wds] [--storage-options JSON]

--chunks N decodes a progressive prefix (UQDM: header + first N chunks are fetched);
--steps N sets the diffusion steps (CDC). `wds` writes decoded-000000.tar, ... with each
key's PNG and its original extras (.cls, .txt, ...), like the input dataset.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs._cli import setup_logging
from pipeline.archive import decode_archive


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="archive URL (compress_bucket's --output)")
    parser.add_argument("--to", required=True, help="folder URL to write into")
    parser.add_argument("--keys", nargs="+", help="keys to decode (default: all)")
    parser.add_argument("--steps", type=int, help="diffusion steps (CDC)")
    parser.add_argument("--chunks", type=int, help="progressive prefix: number of chunks (UQDM)")
    parser.add_argument("--format", choices=("png", "wds"), default="png")
    parser.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    decode_archive(args.input, args.to, args.storage_options, keys=args.keys, steps=args.steps,
                   chunks=args.chunks, fmt=args.format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
