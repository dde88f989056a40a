"""What every command line shares: the parser, flag types and checks, logging.

A user's mistake (a flag out of range, a codec name that is not installed, an input that does
not exist) is a UsageError: `jobs.cli.main` prints it as one line on stderr and exits with
status 2 (`--verbose` adds the trace). Every check runs before Ray starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import fsspec
from safetensors import SafetensorError

from model import load_codec
from model.registry import canonical_name
from pipeline.storage import redact_url

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
USAGE = 2  # exit status of a user's mistake, as argparse's
#: set by `ray job submit` in the entrypoint's environment (ray.dashboard.modules.job.job_supervisor)
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
log = logging.getLogger("jobs")


class UsageError(Exception):
    """A mistake the user fixes on the command line: one line on stderr, exit status 2."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake raises UsageError (one line, no usage block) instead of exiting."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(message, self.prog)


def setup_logging(level: int = logging.INFO) -> None:
    """INFO and above to stderr, in one format for every job."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


@contextmanager
def usage_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Inside: exceptions of `kinds` are the user's to fix, and become UsageError (the cause kept for --verbose)."""
    try:
        yield
    except kinds as exc:
        raise UsageError(str(exc)) from exc


# ---------------------------------------------------------------------- flag types
def positive_int(text: str) -> int:
    return _bounded(text, int, 1, "a whole number >= 1")


def non_negative_int(text: str) -> int:
    return _bounded(text, int, 0, "a whole number >= 0")


def non_negative_float(text: str) -> float:
    return _bounded(text, float, 0.0, "a number >= 0")


def boolean(text: str) -> bool:
    """true/false, yes/no or 1/0 (any case)."""
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def _bounded(text: str, kind: type, low: float, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not low <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated whole numbers >= 1: "16,16,32" -> (16, 16, 32)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be whole numbers >= 1, got {text!r}")
    return values


def json_object(text: str) -> dict:
    """--storage-options: a JSON object. Never echoes the text: it may hold credentials."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); the value is not shown, it may hold credentials") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object (name: value) is needed, got a {type(value).__name__}")
    return value


# ---------------------------------------------------------------------- shared flag sets
#: the flags of the trainers on a release's frozen transforms (model/cdc/frozen.FrozenTrainConfig)
_FROZEN_TRAINING = {
    "source": (str, "released CDC weights whose transforms stay frozen (name or path)"),
    "name": (str, "registry name of the new weights"),
    "run_dir": (str, "checkpoint and latent cache folder (rerunning resumes from it)"),
    "steps": (positive_int, "optimizer steps in all (a resumed run continues to it)"),
    "batch_size": (positive_int, "crops per step"),
    "crops": (positive_int, "training crops whose latents are cached (one random rate point each)"),
    "crop": (positive_int, "crop side, px"),
    "lr": (float, "Adam learning rate (a tenth over the last 20%% of steps)"),
    "data": (str, "folder of training photos"),
    "seed": (int, "seed of crops, rates and noise"),
    "threads": (positive_int, "torch threads"),
    "export": (str, "weights file to write (default: model/weights/NAME.safetensors)"),
}
_REQUIRED = ("source", "name", "run_dir")


def add_frozen_training_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """The shared flags of train-context and train-hyper, defaults from `config` (a FrozenTrainConfig)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, (kind, help_text) in _FROZEN_TRAINING.items():
        required = name in _REQUIRED
        parser.add_argument("--" + name.replace("_", "-"), type=kind, required=required,
                            default=None if required else defaults[name],
                            help=help_text + ("" if required else " (default: %(default)s)"))


def frozen_training_values(args: argparse.Namespace) -> dict:
    """Those flags' values, as FrozenTrainConfig keywords (with the command as typed for provenance)."""
    values = {name: getattr(args, name) for name in _FROZEN_TRAINING}
    return {**values, "provenance": "diffpress " + shlex.join(args.argv)}


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-options", type=json_object, default={}, metavar="JSON",
        help="fsspec options as a JSON object, e.g. '{\"endpoint_url\": \"https://s3.example.com\"}'. Give "
             "credentials through the AWS chain (environment, ~/.aws profile, instance role), not here: "
             "`ray job submit` writes the command line into the job's log")


# ---------------------------------------------------------------------- checks before any work
def check_codec(name: str) -> str:
    """The name the actors load: an alias resolved ("uqdm-tiny" -> "uqdm-tiny-exact2"), and loaded
    here once (CPU), so that a name, rate point or weights file that cannot load is one line, not
    a traceback from every actor."""
    with usage_errors(FileNotFoundError, ValueError, SafetensorError):  # the message names what the user typed
        load_codec(name, device="cpu")
    canonical = canonical_name(name)
    if canonical != name:
        log.info("codec %s: %s", name, canonical)
    return canonical


def check_location(url: str, flag: str, storage_options: Mapping | None = None) -> str:
    """A URL as given, once its filesystem can be made with `storage_options` (nothing is
    requested yet): an unknown protocol or a filesystem not installed was a traceback from deep
    in fsspec. The message never shows option values. (s3fs takes any option here and refuses
    an unknown one only when it connects.)"""
    try:
        fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        raise UsageError(f"{flag} {redact_url(url)!r}: its filesystem is not installed ({exc})") from exc
    except (ValueError, TypeError) as exc:  # "Protocol not known: foo"; an option the constructor refuses
        raise UsageError(f"{flag} {redact_url(url)!r}: {exc} (check the URL and --storage-options)") from exc
    return url


def check_output(url: str, flag: str, storage_options: Mapping | None = None,
                 env: dict[str, str] | os._Environ = os.environ) -> str:
    """An output location as given (check_location), unless it is a relative path under `ray job
    submit`, or a local path that is (or lies under) a file: refused.

    Under `ray job submit` the command runs in Ray's temporary copy of --working-dir, so a
    relative output would land in that copy (on whichever node) and be deleted with it. A file
    in the way failed late: compress with a NotADirectoryError traceback, decode in every actor.
    """
    if RAY_JOB_ENV in env and "://" not in url and not Path(url).is_absolute():
        raise UsageError(f"{flag} {url!r} is a relative path, and this runs as a Ray job, in a temporary copy of "
                         f"--working-dir that Ray deletes: give an absolute path on storage that every node sees, or "
                         f"a URL (s3://bucket/archive)")
    check_location(url, flag, storage_options)
    if "://" not in url or url.startswith("file://"):
        path = Path(url.removeprefix("file://"))
        existing = next(p for p in (path, *path.parents) if p.exists())  # the root exists
        if not existing.is_dir():
            raise UsageError(f"{flag} {url!r}: {existing} is a file, not a folder; give a folder to write into "
                             f"(it is made if missing)")
    return url
