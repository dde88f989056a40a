"""Decode an archive written by compress_bucket to PNGs or webdataset shards, on Ray.

    python -m jobs.decode --input OUTPUT_URL --to URL [--format png|wds] [--steps N] [--chunks N]
        [--keys K ...] [--shards S ...] [--actors N] [--gpus-per-actor G] [--batch-size B]
        [--storage-options JSON] [--allow-incomplete]

--chunks N decodes a progressive prefix (UQDM: only header + first N chunks are fetched);
--steps N sets the diffusion steps (CDC). `wds` writes one webdataset shard per archive shard,
with the same name (<shard>.tar: each key's PNG and its original extras); `png` writes
<shard>/<name>.png, where name is the key made a safe file name (_decode/<shard>.json maps
names back to keys). Locally Ray starts in-process; under `ray job submit` it joins the
cluster. Rerunning resumes: shards already decoded are skipped. Exits with 1 when a record
could not be decoded (the others are written; the summary lists what failed and why).
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs._cli import setup_logging
from pipeline.archive import ArchiveError
from pipeline.compress import ConfigError
from pipeline.decode import FORMATS, decode_archive


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="archive URL (compress_bucket's --output)")
    parser.add_argument("--to", required=True, help="folder URL to write into")
    parser.add_argument("--format", choices=FORMATS, default="png")
    parser.add_argument("--keys", nargs="+", help="keys to decode (default: all; a key in several shards: each)")
    parser.add_argument("--shards", nargs="+", help="archive shards to decode (default: all)")
    parser.add_argument("--steps", type=int, help="diffusion steps (CDC)")
    parser.add_argument("--chunks", type=int, help="progressive prefix: number of chunks (UQDM)")
    parser.add_argument("--actors", type=int, help="decoder actors (default: one per GPU, else one per CPU)")
    parser.add_argument("--gpus-per-actor", type=float, help="GPUs per decoder (default: 1 if the cluster has GPUs)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per decode call (default: 8)")
    parser.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="decode what is left when manifests counted by _SUCCESS are missing (default: refuse)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        summary = decode_archive(args.input, args.to, args.storage_options, keys=args.keys, steps=args.steps,
                                 chunks=args.chunks, fmt=args.format, shards=args.shards, actors=args.actors,
                                 gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size,
                                 allow_incomplete=args.allow_incomplete)
    except (ArchiveError, ConfigError) as exc:  # a setting, an archive or a pool this job cannot take: say why
        print(f"python -m jobs.decode: error: {exc}", file=sys.stderr)
        return 2
    print(summary.table())
    return 1 if summary.errors or summary.failed_shards else 0


if __name__ == "__main__":
    sys.exit(main())
