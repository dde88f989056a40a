"""diffpress: compress image datasets with learned diffusion codecs (CDC, UQDM) on Ray, and read them back.

    diffpress compress --input 'shards/*.tar' --output /data/archive [--codec cdc-hp128:q4]
    diffpress decode --input /data/archive --to /data/decoded [--steps 2 | --chunks 2]
    diffpress info                      # installed codecs, weights digests, torch and devices
    diffpress COMMAND --help

Every flag is checked before Ray starts: a mistake is one line on stderr and exit status 2
(--verbose shows the trace). `python -m jobs.compress_bucket ...` (and jobs.decode, jobs.train,
...) run the same commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from jobs._cli import USAGE, Parser, UsageError, setup_logging

#: subcommand -> the module that defines it (HELP, add_arguments(parser), run(args) -> exit status)
COMMANDS = {
    "compress": "jobs.compress_bucket",
    "decode": "jobs.decode",
    "evaluate": "jobs.evaluate",
    "train": "jobs.train",
    "import-uqdm": "jobs.import_uqdm",
    "train-context": "jobs.train_context",
    "train-hyper": "jobs.train_hyper",
    "train-uqdm": "jobs.train_uqdm",
    "derive-rates": "jobs.derive_rates",
    "info": "jobs.info",
}


def build_parser() -> Parser:
    parser = Parser(prog="diffpress", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="on an error, show its full trace")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__, parents=[common],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status (2: a usage error, printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # the command as typed: provenance of weights and reports
        setup_logging()
        return args.run(args)
    except UsageError as exc:
        if "--verbose" in argv:
            traceback.print_exc()
        prog = exc.prog or (f"diffpress {argv[0]}" if argv and argv[0] in COMMANDS else "diffpress")
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USAGE


def alias(command: str, argv: Sequence[str] | None = None) -> int:
    """`python -m jobs.X ARGS` is `diffpress COMMAND ARGS`."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
