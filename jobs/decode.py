"""Decode an archive written by `diffpress compress` to PNGs or webdataset shards, on Ray.

    diffpress decode --input ARCHIVE_URL --to URL [--format png|wds] [--steps N] [--chunks N]
        [--keys K ...] [--shards S ...] [--actors N] [--gpus-per-actor G] [--batch-size B]
        [--storage-options JSON] [--allow-incomplete]

--chunks N decodes a progressive prefix (UQDM: only header + first N chunks are fetched);
--steps N sets the diffusion steps (CDC). `wds` writes one webdataset shard per archive shard,
with the same name (<shard>.tar: each key's PNG and its original extras); `png` writes
<shard>/<name>.png, where name is the key made a safe file name, and the key's extras beside
it as <name>.<ext> (_decode/<shard>.json maps names back to keys). Locally Ray starts
in-process; under `ray job submit` it joins the cluster, and --to must then be absolute or a
URL. Rerunning resumes: shards already decoded are skipped. Exits with 1 when a record or a
shard could not be decoded (the others are written; the summary lists what failed and why),
2 for a mistake in the flags or a setting the archive cannot take, found before Ray starts.
"""

from __future__ import annotations

import argparse
import sys

import torch

from jobs import cli
from jobs._cli import (add_storage_options, check_location, check_output, non_negative_float, non_negative_int,
                       positive_int, usage_errors)
from pipeline.archive import ArchiveError
from pipeline.cluster import ConfigError
from pipeline.decode import FORMATS, decode_archive

HELP = "decode an archive to PNGs or webdataset shards (Ray)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="archive URL (compress's --output)")
    parser.add_argument("--to", required=True, help="folder URL to write into")
    parser.add_argument("--format", choices=FORMATS, default="png",
                        help="png: one PNG per record, extras beside it; wds: one .tar per shard (default: png)")
    parser.add_argument("--keys", nargs="+", help="keys to decode (default: all; a key in several shards: each)")
    parser.add_argument("--shards", nargs="+", help="archive shards to decode (default: all)")
    parser.add_argument("--steps", type=non_negative_int, help="diffusion steps (CDC; 0: the mean image)")
    parser.add_argument("--chunks", type=positive_int, help="progressive prefix: number of chunks (UQDM)")
    parser.add_argument("--bf16", action="store_true",
                        help="CDC's content decoder in bfloat16: pixels within 2 levels of float32, 0-step decoding "
                             "2.6x faster on a CPU with AMX (default: float32)")
    parser.add_argument("--actors", type=positive_int, help="decoder actors (default: one per GPU, else one per CPU)")
    parser.add_argument("--gpus-per-actor", type=non_negative_float,
                        help="GPUs per decoder (default: 1 if the cluster has GPUs)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per decode call (default: 8)")
    add_storage_options(parser)
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="decode what is left when manifests counted by _SUCCESS are missing (default: refuse)")


def run(args: argparse.Namespace) -> int:
    # A setting, an archive or a pool this job cannot take: one line, before any decoding.
    with usage_errors(ArchiveError, ConfigError):
        url = check_location(args.input, "--input", args.storage_options)
        summary = decode_archive(url, check_output(args.to, "--to", args.storage_options), args.storage_options,
                                 keys=args.keys, steps=args.steps, chunks=args.chunks, fmt=args.format,
                                 shards=args.shards,
                                 actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                 batch_size=args.batch_size, allow_incomplete=args.allow_incomplete,
                                 autocast=torch.bfloat16 if args.bf16 else None)
    print(summary.table())
    return 1 if summary.errors or summary.failed_shards else 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("decode", argv)


if __name__ == "__main__":
    sys.exit(main())
