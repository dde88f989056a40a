"""Compress webdataset shards into an archive of bitstreams + Parquet manifests, on Ray.

    python -m jobs.compress_bucket --input URL_OR_GLOB --output URL --codec NAME
        [--gpus-per-actor G] [--actors N] [--batch-size B] [--storage-options JSON]

Locally Ray starts in-process; under `ray job submit` (RAY_ADDRESS set) it joins the
cluster. With no --input it compresses sample shards made from matplotlib's photos.
Rerunning resumes: committed shards are skipped, and shards that transient failures left
uncommitted are done again (the run exits with status 3 while any remain; 2 for bad flags).
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs._cli import setup_logging
from pipeline.compress import CompressConfig, ConfigError, connect_ray, run_compress
from pipeline.samples import build_sample_shards

DEFAULT_CODEC = "cdc-hp128"  # shipped in model/weights/; uqdm-tiny-exact2 needs jobs.import_uqdm first
DEFAULT_OUTPUT = "out/compress_bucket"
SAMPLE_SHARDS = "out/sample_shards"
INCOMPLETE = 3  # exit status when shards were left uncommitted by transient failures (rerun to retry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.compress_bucket", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="shard folder, glob, tar URL, or a comma-separated list of them "
                                        f"(default: sample shards built in {SAMPLE_SHARDS})")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help=f"archive URL (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--codec", default=DEFAULT_CODEC, help=f"codec name or weights path (default: {DEFAULT_CODEC})")
    parser.add_argument("--gpus-per-actor", type=float, help="GPUs per encoder (default: 1 if the cluster has GPUs)")
    parser.add_argument("--actors", type=int, help="encoder actors (default: one per GPU, else one per CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per encode call (default: 4)")
    parser.add_argument("--storage-options", type=_json_object, default={},
                        help='fsspec options as JSON, e.g. \'{"endpoint_url": "...", "key": "...", "secret": "..."}\'')
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None  # never echo the text: credentials
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object (name: value) is needed, got a {type(value).__name__}")
    return value


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = CompressConfig(inputs=args.input or SAMPLE_SHARDS, output=args.output, codec=args.codec, actors=args.actors,
                                gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size,
                                storage_options=args.storage_options)
    except ConfigError as exc:
        parser.error(str(exc))
    if not args.input:  # built once the flags are known to be right
        build_sample_shards(SAMPLE_SHARDS)
    connect_ray()
    try:
        summary = run_compress(config)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(summary.table())
    return 0 if summary.complete else INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
