"""What this installation can do: codecs and weights (name, family, digest, where the file is, rate
points), the catalog's releases that are not installed and how to get them, torch and its devices.

    diffpress info
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

import torch
from safetensors import SafetensorError

from jobs import cli
from model.registry import aliases, available, catalog, file_digest, read_weights, resolve, search_dirs

HELP = "installed codecs and weights (with digests), torch and devices"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No flags: everything it says is read from the installation."""


def report() -> str:
    lines = [f"diffpress {version('diffpress')}, torch {torch.__version__}, "
             f"CUDA {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}"
             f" ({torch.cuda.device_count()} GPUs), {torch.get_num_threads()} CPU threads",
             f"weights are looked up in: {', '.join(map(str, search_dirs()))}", "", "installed codecs:"]
    installed = set()
    for name in available():
        path = resolve(name)
        try:
            weights = read_weights(path)
        except (OSError, ValueError, SafetensorError) as exc:  # a foreign or damaged file in a weights folder: say so, go on
            lines.append(f"  {name:<20} unreadable: {exc}")
            continue
        digest = file_digest(path).hex()
        installed.add(digest)
        rates = (f", rate points {' '.join(weights.config['rates'])} (default {weights.config['default_rate']})"
                 if "rates" in weights.config else "")
        lines.append(f"  {name:<20} {weights.codec:<5} digest {digest}  {path}{rates}")
    missing = [entry for entry in catalog() if entry["digest"] not in installed]
    if missing:
        lines += ["", "released weights not installed:"]
        lines += [f"  {e['name']:<20} {e['family']:<5} digest {e['digest']}: {e['get']}" for e in missing]
    lines += ["", "short names: " + ", ".join(f"{short} = {name}" for short, name in sorted(aliases().items()))]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(report())
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.alias("info", argv)


if __name__ == "__main__":
    sys.exit(main())
