"""Compress webdataset shards into an archive of bitstreams + Parquet manifests, on Ray.

    diffpress compress --input URL_OR_GLOB --output URL --codec NAME
        [--gpus-per-actor G] [--actors N] [--batch-size B] [--storage-options JSON]

Locally Ray starts in-process; under `ray job submit` (RAY_ADDRESS set) it joins the
cluster, and --output must then be absolute or a URL. With no --input it compresses sample
shards made from matplotlib's photos. Rerunning resumes: committed shards are skipped, and
shards that transient failures left uncommitted are done again (the run exits with status 3
while any remain; 2 for a mistake in the flags, or an output that another compress job is
writing or that cannot be written, found before Ray starts).
"""

from __future__ import annotations

import argparse
import sys

from jobs import cli
from jobs._cli import (add_storage_options, check_codec, check_output, non_negative_float, positive_int,
                       usage_errors)
from pipeline.compress import CompressConfig, ConfigError, run_compress
from pipeline.samples import build_sample_shards

HELP = "compress webdataset shards into an archive (Ray)"
DEFAULT_CODEC = "cdc-hp128"  # shipped in model/weights/; uqdm-tiny needs `diffpress import-uqdm` first
DEFAULT_OUTPUT = "out/compress_bucket"
SAMPLE_SHARDS = "out/sample_shards"
INCOMPLETE = 3  # exit status when shards were left uncommitted by transient failures (rerun to retry)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="shard folder, glob, tar URL, or a comma-separated list of them "
                                        f"(default: sample shards built in {SAMPLE_SHARDS})")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"archive URL (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--codec", default=DEFAULT_CODEC,
                        help=f"codec name (`diffpress info` lists them; NAME:RATE picks a CDC rate point) or weights "
                             f"path (default: {DEFAULT_CODEC})")
    parser.add_argument("--gpus-per-actor", type=non_negative_float,
                        help="GPUs per encoder (default: 1 if the cluster has GPUs)")
    parser.add_argument("--actors", type=positive_int, help="encoder actors (default: one per GPU, else one per CPU)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per encode call (default: 4)")
    add_storage_options(parser)


def run(args: argparse.Namespace) -> int:
    codec_name = check_codec(args.codec)
    with usage_errors(ConfigError):
        config = CompressConfig(inputs=args.input or SAMPLE_SHARDS,
                                output=check_output(args.output, "--output", args.storage_options),
                                codec=codec_name, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                batch_size=args.batch_size,
                                storage_options=args.storage_options)
        if not args.input:  # built once the flags are known to be right
            build_sample_shards(SAMPLE_SHARDS)
        summary = run_compress(config)
    print(summary.table())
    return 0 if summary.complete else INCOMPLETE


def main(argv: list[str] | None = None) -> int:
    return cli.alias("compress", argv)


if __name__ == "__main__":
    sys.exit(main())
